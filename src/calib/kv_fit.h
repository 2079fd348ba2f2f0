// From captured activations to a layer's calibration: per-channel key bounds
// and the K/V codebooks (weighted k-means over the normalised elements).
//
// Every statistic leaves out the attention-sink tokens (position < sink_tokens
// in their window). Normalisation, per variant:
//  keys    u = (x - zp_c) / r_c with the variant's channel bounds (zp = (upper +
//          lower)/2, r = (upper - lower)/2). Min/max bounds put every element in
//          [-1, 1]; with the percentile bounds (0.5 / 99.5 for 1% outliers)
//          a token's k = kv_outliers_per_tail(fraction, row) elements of largest
//          |u| > 1 per tail are the encoder's exact outliers and left out; other
//          elements beyond the bounds are coded densely, so they are fitted,
//          clamped to [-1, 1] (exactly what the encoder does).
//  values  per token over the whole row (all heads): zp/r from the row's min/max,
//          or (outlier variant) from the min/max left after dropping the
//          k = kv_outliers_per_tail(fraction, row) smallest and k largest
//          elements, which are left out.
// Percentiles interpolate linearly between order statistics (numpy's default).
//
// Element weights: "none" = 1; "scale2" = r^2 of the element's vector (r_c of its
// channel for keys, the token's r for values): an error e in the normalised
// domain is r * e in the original units, so this weighting minimises the
// original-domain squared error. Optional extra per-element weights (e.g.
// Fisher information, (dL/dA)^2) multiply in.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "base/threads.h"
#include "calib/kv_calibration.h"
#include "kernels/cpu/rope.h"

namespace kvq {

struct KvFitParams {
  int n_kv_heads = 0, head_dim = 0;
  RopeSpec rope;                      // to compute post-RoPE keys
  int sink_tokens = 1;
  bool weight_scale2 = true;          // false: weight 1 ("none")
  float outlier_fraction = 0.01f;     // of the outlier variants
  std::vector<int> bits{2, 3, 4, 8};  // codebook sizes to fit
  uint64_t seed = 0;                  // k-means
  int histogram_bins = 1 << 16;       // resolution of the binned k-means over [-1, 1]
};

// One layer's activations for n tokens: pre-RoPE keys and values [n][row].
struct KvLayerCapture {
  int64_t n_tokens = 0;
  const int32_t* positions = nullptr;  // [n], position of each token in its window
  const float* k = nullptr;
  const float* v = nullptr;
  // Optional extra element weights [n][row] (null = 1), e.g. Fisher information.
  const float* k_weight = nullptr;
  const float* v_weight = nullptr;
};

// Throws kvq::Error when no token is left after the sink or an activation is not finite.
KvLayerCalibration fit_kv_layer(const KvFitParams& params, const KvLayerCapture& capture);

// Every layer, layers spread over the pool's threads. progress(done, total) is
// called after each layer, under a lock, from whichever thread finished it.
std::vector<KvLayerCalibration> fit_kv_layers(const KvFitParams& params, std::span<const KvLayerCapture> layers,
                                              ThreadPool& pool,
                                              const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace kvq

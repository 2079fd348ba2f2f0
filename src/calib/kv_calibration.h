// The KV calibration sidecar in memory, and its GGUF form on disk.
//
// A sidecar holds, per layer, everything a calibrated format can ask for:
//  keys:   per-channel bounds (row() = n_kv_heads * head_dim channels) for
//          {pre-RoPE, post-RoPE} x {min/max, 0.5/99.5 percentiles (1% outliers)};
//  K, V:   codebooks of 2^b sorted centroids in [-1, 1] for every fitted b, each
//          without outliers and with the 1% outlier variant.
// for_format() picks what one format needs.
//
// On disk (GGUF v3), metadata under kvq.calib.*, tensors (F32; GGUF dims, [0] contiguous):
//   blk.{L}.k_bounds.{pre|post}.minmax   [row, 2]   lower row then upper row
//   blk.{L}.k_bounds.{pre|post}.o1       [row, 2]   percentile bounds (outlier thresholds)
//   blk.{L}.{k|v}_codebook.nuq{b}        [2^b]
//   blk.{L}.{k|v}_codebook.nuq{b}.o1     [2^b]      fitted with the 1% outliers left out
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "formats/kv_format.h"

namespace kvq {

constexpr uint32_t kKvCalibrationFormatVersion = 1;

struct KvCalibrationInfo {
  uint32_t format_version = kKvCalibrationFormatVersion;
  std::string kvq_version;         // the kvq that wrote it
  std::string model_fingerprint;   // ModelInfo::fingerprint of the calibrated model
  std::string model_name;
  std::string text_name;           // where the calibration text came from
  int64_t n_windows = 0, window = 0, n_tokens = 0;
  int sink_tokens = 0;             // first positions of each window left out of every statistic
  std::string weighting;           // "fisher-s2", "fisher", "scale2" or "none" (metadata only)
  float outlier_fraction = 0.01f;  // of the *.o1 variants
  std::vector<int> bits;           // codebook sizes fitted (2^bits centroids)
  uint64_t seed = 0;
};

struct KvChannelBounds {
  std::vector<float> lower, upper;  // row() each
};

// Index helpers for the variant arrays.
enum KvKeyDomain { kPreRope = 0, kPostRope = 1 };
enum KvOutlierVariant { kNoOutliers = 0, kOutliers1 = 1 };

struct KvLayerCalibration {
  std::array<std::array<KvChannelBounds, 2>, 2> k_bounds;       // [domain][variant]
  std::array<std::map<int, std::vector<float>>, 2> k_codebook;  // [variant]: bits -> 2^bits centroids
  std::array<std::map<int, std::vector<float>>, 2> v_codebook;
};

class KvCalibration {
 public:
  KvCalibrationInfo info;
  int n_layers = 0, n_kv_heads = 0, head_dim = 0;
  std::vector<KvLayerCalibration> layers;  // n_layers

  int row() const { return n_kv_heads * head_dim; }

  // What `format` needs for one layer's keys or values (empty fields for what it
  // does not need). Throws when the sidecar lacks the variant (bits not fitted,
  // another outlier fraction).
  KvTensorCalibration for_format(int layer, KvRole role, const KvFormat& format) const;

  // Throws "PATH: calibrated for another model (...)" when the shape or the
  // fingerprint differ from the model's.
  void check_compatible(int n_layers, int n_kv_heads, int head_dim, std::string_view fingerprint,
                        std::string_view path) const;

  // Checks the in-memory contents (what load() also enforces); `what` names it in errors.
  void validate(std::string_view what) const;

  void save(const std::string& path) const;  // throws kvq::Error on I/O failure
  static KvCalibration load(const std::string& path);
};

}  // namespace kvq

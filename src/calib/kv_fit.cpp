#include "calib/kv_fit.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <numeric>

#include "base/error.h"
#include "calib/kmeans.h"

namespace kvq {
namespace {

// Linear interpolation between order statistics at q * (n - 1) (numpy's default).
// Reorders v.
float percentile(std::vector<float>& v, double q) {
  const size_t n = v.size();
  const double pos = q * double(n - 1);
  const size_t i = std::min(size_t(pos), n - 1);
  std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(i), v.end());
  const double a = v[i];
  if (i + 1 >= n) return float(a);
  const double b = *std::min_element(v.begin() + std::ptrdiff_t(i) + 1, v.end());
  return float(a + (b - a) * (pos - double(i)));
}

struct ZpRange {
  double zp, r;
};
ZpRange zp_range(double lo, double hi) { return {(hi + lo) / 2, (hi - lo) / 2}; }

double normalise(double x, const ZpRange& s) { return s.r > 0 ? (x - s.zp) / s.r : 0.0; }

// Per-channel bounds of keys given channel-major: ch[c * n + t].
void channel_bounds(const std::vector<float>& ch, int64_t n, int row, float fraction,
                    std::array<KvChannelBounds, 2>& out) {
  for (auto& b : out) {
    b.lower.resize(size_t(row));
    b.upper.resize(size_t(row));
  }
  std::vector<float> tmp(static_cast<size_t>(n));
  for (int c = 0; c < row; ++c) {
    const float* x = ch.data() + int64_t(c) * n;
    const auto [mn, mx] = std::minmax_element(x, x + n);
    out[kNoOutliers].lower[size_t(c)] = *mn;
    out[kNoOutliers].upper[size_t(c)] = *mx;
    std::copy(x, x + n, tmp.begin());
    out[kOutliers1].lower[size_t(c)] = percentile(tmp, double(fraction) / 2);
    out[kOutliers1].upper[size_t(c)] = percentile(tmp, 1.0 - double(fraction) / 2);
  }
}

}  // namespace

KvLayerCalibration fit_kv_layer(const KvFitParams& p, const KvLayerCapture& cap) {
  const int row = p.n_kv_heads * p.head_dim;
  KVQ_ASSERT(row > 0 && cap.n_tokens >= 0 && cap.positions && cap.k && cap.v);
  std::vector<int64_t> kept;
  for (int64_t t = 0; t < cap.n_tokens; ++t)
    if (cap.positions[t] >= p.sink_tokens) kept.push_back(t);
  const int64_t n = int64_t(kept.size());
  if (n == 0) fail("calibration: no tokens left after excluding the {} sink token(s) of each window", p.sink_tokens);
  for (int64_t t : kept)
    for (int c = 0; c < row; ++c) {
      const int64_t i = t * row + c;
      if (!std::isfinite(cap.k[i]) || !std::isfinite(cap.v[i]))
        fail("calibration: non-finite activation at token {} element {}", t, c);
      if ((cap.k_weight && !(cap.k_weight[i] >= 0 && std::isfinite(cap.k_weight[i]))) ||
          (cap.v_weight && !(cap.v_weight[i] >= 0 && std::isfinite(cap.v_weight[i]))))
        fail("calibration: element weight at token {} element {} is not a finite non-negative number", t, c);
    }

  KvLayerCalibration out;
  // Keys: bounds in both domains. ch: [row][n] channel-major.
  std::vector<float> ch(static_cast<size_t>(n) * size_t(row));
  auto transpose = [&](auto&& token_row) {
    for (int64_t j = 0; j < n; ++j) {
      const float* x = token_row(j);
      for (int c = 0; c < row; ++c) ch[size_t(c) * size_t(n) + size_t(j)] = x[c];
    }
  };
  {
    const Rope rope(p.rope);
    std::vector<float> rotated(static_cast<size_t>(row));
    transpose([&](int64_t j) {
      std::memcpy(rotated.data(), cap.k + kept[size_t(j)] * row, size_t(row) * sizeof(float));
      rope.apply(rotated.data(), p.n_kv_heads, cap.positions[kept[size_t(j)]]);
      return rotated.data();
    });
    channel_bounds(ch, n, row, p.outlier_fraction, out.k_bounds[kPostRope]);
  }
  transpose([&](int64_t j) { return cap.k + kept[size_t(j)] * row; });
  channel_bounds(ch, n, row, p.outlier_fraction, out.k_bounds[kPreRope]);
  ch = {};

  // Key codebooks: pre-RoPE (the codebook formats store keys before RoPE), fitted
  // on exactly what the encoder codes. With outliers, a token keeps at most
  // k_cap elements per tail beyond the channel bounds exactly (those of largest
  // |u|); the others beyond the bounds are coded with the dense levels like any
  // element, so they stay in the fit, at the edge of the codebook's range
  // (leaving them out pulled the outer centroids inwards, and every such element
  // then lost up to the gap to +-1).
  const int k_cap = kv_outliers_per_tail(p.outlier_fraction, row);
  std::array<WeightedHistogram, 2> kh{WeightedHistogram(p.histogram_bins), WeightedHistogram(p.histogram_bins)};
  std::vector<double> u(static_cast<size_t>(row));
  std::vector<int> beyond_hi, beyond_lo;
  std::vector<uint8_t> exact(static_cast<size_t>(row));
  for (int v = 0; v < 2; ++v) {
    const KvChannelBounds& b = out.k_bounds[kPreRope][size_t(v)];
    std::vector<ZpRange> s(static_cast<size_t>(row));
    for (int c = 0; c < row; ++c) s[size_t(c)] = zp_range(b.lower[size_t(c)], b.upper[size_t(c)]);
    for (int64_t t : kept) {
      beyond_hi.clear();
      beyond_lo.clear();
      for (int c = 0; c < row; ++c) {
        u[size_t(c)] = normalise(cap.k[t * row + c], s[size_t(c)]);
        if (u[size_t(c)] > 1) beyond_hi.push_back(c);
        else if (u[size_t(c)] < -1) beyond_lo.push_back(c);
      }
      std::fill(exact.begin(), exact.end(), 0);
      if (v == kOutliers1) {
        // The k_cap of largest |u| per tail (ties: lower channel first).
        auto keep_top = [&](std::vector<int>& idx) {
          const size_t m = std::min(idx.size(), size_t(k_cap));
          std::partial_sort(idx.begin(), idx.begin() + std::ptrdiff_t(m), idx.end(), [&](int a, int c) {
            const double ua = std::abs(u[size_t(a)]), uc = std::abs(u[size_t(c)]);
            return ua > uc || (ua == uc && a < c);
          });
          for (size_t j = 0; j < m; ++j) exact[size_t(idx[j])] = 1;
        };
        keep_top(beyond_hi);
        keep_top(beyond_lo);
      }
      for (int c = 0; c < row; ++c) {
        if (exact[size_t(c)]) continue;
        const int64_t i = t * row + c;
        double w = p.weight_scale2 ? s[size_t(c)].r * s[size_t(c)].r : 1.0;
        if (cap.k_weight) w *= cap.k_weight[i];
        kh[size_t(v)].add(float(std::clamp(u[size_t(c)], -1.0, 1.0)), float(w));
      }
    }
  }

  // Values: per token over the whole row.
  std::array<WeightedHistogram, 2> vh{WeightedHistogram(p.histogram_bins), WeightedHistogram(p.histogram_bins)};
  const int k_trim = kv_outliers_per_tail(p.outlier_fraction, row);
  std::vector<int> idx(static_cast<size_t>(row));
  std::vector<uint8_t> trimmed(static_cast<size_t>(row));
  for (int64_t t : kept) {
    const float* x = cap.v + t * row;
    const float* xw = cap.v_weight ? cap.v_weight + t * row : nullptr;
    // The k smallest and k largest by (value, index): deterministic on ties.
    std::iota(idx.begin(), idx.end(), 0);
    auto less = [&](int a, int b) { return x[a] < x[b] || (x[a] == x[b] && a < b); };
    std::fill(trimmed.begin(), trimmed.end(), 0);
    if (2 * k_trim < row) {
      std::nth_element(idx.begin(), idx.begin() + k_trim, idx.end(), less);
      std::nth_element(idx.begin() + k_trim, idx.end() - k_trim - 1, idx.end(), less);
      for (int j = 0; j < k_trim; ++j) trimmed[size_t(idx[size_t(j)])] = trimmed[size_t(idx[size_t(row - 1 - j)])] = 1;
    }
    double mn = INFINITY, mx = -INFINITY, tmn = INFINITY, tmx = -INFINITY;
    for (int c = 0; c < row; ++c) {
      mn = std::min(mn, double(x[c]));
      mx = std::max(mx, double(x[c]));
      if (!trimmed[size_t(c)]) {
        tmn = std::min(tmn, double(x[c]));
        tmx = std::max(tmx, double(x[c]));
      }
    }
    if (!(tmn <= tmx)) tmn = tmx = 0;  // everything trimmed (row too narrow): no kept elements anyway
    const ZpRange s[2] = {zp_range(mn, mx), zp_range(tmn, tmx)};
    for (int v = 0; v < 2; ++v) {
      const double w0 = p.weight_scale2 ? s[v].r * s[v].r : 1.0;
      for (int c = 0; c < row; ++c) {
        if (v == kOutliers1 && trimmed[size_t(c)]) continue;
        vh[size_t(v)].add(float(normalise(x[c], s[v])), float(xw ? w0 * xw[c] : w0));
      }
    }
  }

  for (int v = 0; v < 2; ++v)
    for (int b : p.bits) {
      out.k_codebook[size_t(v)][b] = kh[size_t(v)].kmeans(1 << b, p.seed);
      out.v_codebook[size_t(v)][b] = vh[size_t(v)].kmeans(1 << b, p.seed);
    }
  return out;
}

std::vector<KvLayerCalibration> fit_kv_layers(const KvFitParams& params, std::span<const KvLayerCapture> layers,
                                              ThreadPool& pool, const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t total = int64_t(layers.size());
  std::vector<KvLayerCalibration> out(layers.size());
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  int64_t done = 0;
  std::exception_ptr error;
  pool.run([&](int, int) {
    for (;;) {
      const int64_t l = next.fetch_add(1);
      if (l >= total) return;
      try {
        out[size_t(l)] = fit_kv_layer(params, layers[size_t(l)]);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!error) error = std::current_exception();
        next.store(total);
        return;
      }
      std::lock_guard<std::mutex> lock(mutex);
      ++done;
      if (progress && !error) progress(done, total);
    }
  });
  if (error) std::rethrow_exception(error);
  return out;
}

}  // namespace kvq

#include "calib/kmeans.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "base/error.h"

namespace kvq {
namespace {

// Distinct sorted points with positive weights and the prefix sums of w, w*x,
// w*x^2 (size m + 1): a run [s, e) has mass W[e] - W[s] and so on.
struct Points {
  std::vector<double> p, W, WX, WXX;
  int64_t size() const { return int64_t(p.size()); }
  double mass(int64_t s, int64_t e) const { return W[size_t(e)] - W[size_t(s)]; }
  // Weighted mean of the run, clamped into the run's range (rounding in the
  // prefix differences must not move it out and break the ordering).
  double mean(int64_t s, int64_t e) const {
    const double m = (WX[size_t(e)] - WX[size_t(s)]) / mass(s, e);
    return std::clamp(m, p[size_t(s)], p[size_t(e - 1)]);
  }
  double sse(int64_t s, int64_t e, double c) const {
    if (e <= s) return 0;
    const double v = (WXX[size_t(e)] - WXX[size_t(s)]) - 2 * c * (WX[size_t(e)] - WX[size_t(s)]) + c * c * mass(s, e);
    return std::max(v, 0.0);
  }
};

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<float> uniform_levels(int k) {
  std::vector<float> out(static_cast<size_t>(k), 0.0f);
  for (int j = 0; j < k && k > 1; ++j) out[size_t(j)] = float(-1.0 + 2.0 * j / (k - 1));
  return out;
}

// Fewer distinct values than centroids: the values, then midpoints of the
// largest gaps of the list bounded by min(-1, lowest) and max(1, highest).
std::vector<double> fill_levels(std::vector<double> v, int k) {
  const double lo = std::min(-1.0, v.empty() ? -1.0 : v.front());
  const double hi = std::max(1.0, v.empty() ? 1.0 : v.back());
  while (int(v.size()) < k) {
    double best_gap = -1, best_mid = 0;
    size_t best_at = 0;
    for (size_t i = 0; i <= v.size(); ++i) {
      const double a = i == 0 ? lo : v[i - 1];
      const double b = i == v.size() ? hi : v[i];
      // The virtual ends are not levels: a gap to them counts whole but its
      // new level sits on the end itself when the end is free.
      double mid = (a + b) / 2;
      if (i == 0 && a < b && (v.empty() || v.front() > lo)) mid = lo;
      if (i == v.size() && a < b && (v.empty() || v.back() < hi)) mid = hi;
      if (b - a > best_gap) {
        best_gap = b - a;
        best_mid = mid;
        best_at = i;
      }
    }
    v.insert(v.begin() + std::ptrdiff_t(best_at), best_mid);
  }
  return v;
}

// First index whose point is > b (points equal to a boundary go to the lower cluster).
int64_t cut_at(const Points& pts, double b) {
  return int64_t(std::upper_bound(pts.p.begin(), pts.p.end(), b) - pts.p.begin());
}

struct Fit {
  std::vector<double> c;
  double sse = std::numeric_limits<double>::infinity();
};

// Lloyd from strictly increasing centroids. A centroid of an empty cluster stays
// where it is (it lies inside its own cell, so the order is kept).
Fit lloyd(const Points& pts, std::vector<double> c, int max_iterations) {
  const int k = int(c.size());
  const int64_t m = pts.size();
  std::vector<int64_t> cuts(static_cast<size_t>(k) + 1), prev;
  auto assign = [&] {
    cuts[0] = 0;
    cuts[size_t(k)] = m;
    for (int j = 0; j + 1 < k; ++j) cuts[size_t(j) + 1] = cut_at(pts, (c[size_t(j)] + c[size_t(j) + 1]) / 2);
  };
  for (int it = 0; it < max_iterations; ++it) {
    assign();
    if (cuts == prev) break;
    prev = cuts;
    for (int j = 0; j < k; ++j) {
      const int64_t s = cuts[size_t(j)], e = cuts[size_t(j) + 1];
      if (e > s && pts.mass(s, e) > 0) c[size_t(j)] = pts.mean(s, e);
    }
  }
  assign();
  Fit f;
  f.sse = 0;
  for (int j = 0; j < k; ++j) f.sse += pts.sse(cuts[size_t(j)], cuts[size_t(j) + 1], c[size_t(j)]);
  f.c = std::move(c);
  return f;
}

// k contiguous non-empty groups from cut indices (forced strictly increasing
// with room left for the groups after), each represented by its weighted mean.
std::vector<double> means_of_groups(const Points& pts, std::vector<int64_t> cuts) {
  const int k = int(cuts.size()) - 1;
  const int64_t m = pts.size();
  cuts[0] = 0;
  cuts[size_t(k)] = m;
  for (int j = 1; j < k; ++j) cuts[size_t(j)] = std::clamp(cuts[size_t(j)], cuts[size_t(j) - 1] + 1, m - (k - j));
  std::vector<double> c(static_cast<size_t>(k));
  for (int j = 0; j < k; ++j) c[size_t(j)] = pts.mean(cuts[size_t(j)], cuts[size_t(j) + 1]);
  return c;
}

// Index of the point at which the cumulative weight reaches `target`.
int64_t weighted_index(const Points& pts, double target) {
  const auto it = std::lower_bound(pts.W.begin() + 1, pts.W.end(), target);
  return std::min<int64_t>(int64_t(it - (pts.W.begin() + 1)), pts.size() - 1);
}

// The optimal k-partition of (at most kDpPoints) sorted points by dynamic
// programming: D[j][e] = min_s D[j-1][s] + cost(s, e). The 1-D k-means cost
// satisfies the quadrangle inequality, so the optimal split point is monotone in
// e and divide and conquer computes each row in O(m log m): O(k m log m) in all.
// Larger inputs are first merged into kDpPoints contiguous groups of equal
// count; Lloyd on the full data then refines the boundaries.
constexpr int64_t kDpPoints = 4096;

std::vector<int64_t> dp_cuts(const Points& pts, int k) {
  const int64_t m = pts.size();
  auto cost = [&](int64_t s, int64_t e) {  // [s, e)
    const double w = pts.mass(s, e), wx = pts.WX[size_t(e)] - pts.WX[size_t(s)];
    return w > 0 ? std::max(0.0, pts.WXX[size_t(e)] - pts.WXX[size_t(s)] - wx * wx / w) : 0.0;
  };
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> prev(size_t(m) + 1, inf), cur(size_t(m) + 1, inf);
  std::vector<int32_t> arg(size_t(k) * size_t(m + 1), 0);
  for (int64_t e = 1; e <= m; ++e) prev[size_t(e)] = cost(0, e);
  prev[0] = inf;
  for (int j = 2; j <= k; ++j) {
    int32_t* a = arg.data() + size_t(j - 1) * size_t(m + 1);
    // cur[e] for e in [lo, hi], split s in [slo, shi] (s >= j - 1, s < e).
    auto solve = [&](auto&& self, int64_t lo, int64_t hi, int64_t slo, int64_t shi) -> void {
      if (lo > hi) return;
      const int64_t mid = (lo + hi) / 2;
      double best = inf;
      int64_t best_s = std::max<int64_t>(slo, j - 1);
      for (int64_t s = std::max<int64_t>(slo, j - 1); s <= std::min(shi, mid - 1); ++s) {
        const double v = prev[size_t(s)] + cost(s, mid);
        if (v < best) {
          best = v;
          best_s = s;
        }
      }
      cur[size_t(mid)] = best;
      a[mid] = int32_t(best_s);
      self(self, lo, mid - 1, slo, best_s);
      self(self, mid + 1, hi, best_s, shi);
    };
    std::fill(cur.begin(), cur.end(), inf);
    solve(solve, j, m, j - 1, m - 1);
    std::swap(prev, cur);
  }
  std::vector<int64_t> cuts(size_t(k) + 1);
  cuts[size_t(k)] = m;
  for (int j = k; j >= 2; --j) cuts[size_t(j) - 1] = arg[size_t(j - 1) * size_t(m + 1) + size_t(cuts[size_t(j)])];
  cuts[0] = 0;
  return cuts;
}

// Start from the optimum over coarse groups (exact when m <= kDpPoints).
std::vector<int64_t> coarse_optimal_cuts(const Points& pts, int k) {
  const int64_t m = pts.size();
  if (m <= kDpPoints) return dp_cuts(pts, k);
  Points g;
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < kDpPoints; ++i) {
    const int64_t s = i * m / kDpPoints, e = (i + 1) * m / kDpPoints;
    starts.push_back(s);
    g.p.push_back(pts.mean(s, e));
  }
  g.W.assign(size_t(kDpPoints) + 1, 0);
  g.WX.assign(size_t(kDpPoints) + 1, 0);
  g.WXX.assign(size_t(kDpPoints) + 1, 0);
  for (int64_t i = 0; i < kDpPoints; ++i) {
    g.W[size_t(i) + 1] = pts.W[size_t(i + 1 < kDpPoints ? starts[size_t(i) + 1] : m)];
    g.WX[size_t(i) + 1] = pts.WX[size_t(i + 1 < kDpPoints ? starts[size_t(i) + 1] : m)];
    g.WXX[size_t(i) + 1] = pts.WXX[size_t(i + 1 < kDpPoints ? starts[size_t(i) + 1] : m)];
  }
  std::vector<int64_t> cuts = dp_cuts(g, k);
  for (auto& c : cuts) c = c < kDpPoints ? starts[size_t(c)] : m;
  return cuts;
}

std::vector<float> kmeans_points(const Points& pts, int k, uint64_t seed, const KmeansOptions& opt) {
  const int64_t m = pts.size();
  std::vector<double> best;
  if (m <= k) {
    best = fill_levels(pts.p, k);
  } else {
    const double total = pts.W.back();
    std::vector<std::vector<double>> starts;
    // The (coarse) optimum, when the DP is cheap enough.
    if (k > 1 && k < kDpPoints) starts.push_back(means_of_groups(pts, coarse_optimal_cuts(pts, k)));
    // Weighted quantiles: k groups of about equal weight.
    std::vector<int64_t> cuts(static_cast<size_t>(k) + 1);
    for (int j = 1; j < k; ++j) cuts[size_t(j)] = weighted_index(pts, total * j / k) + 1;
    starts.push_back(means_of_groups(pts, cuts));
    // Uniform levels over the data's range.
    if (k > 1) {
      std::vector<double> u(static_cast<size_t>(k));
      const double a = pts.p.front(), b = pts.p.back();
      for (int j = 0; j < k; ++j) u[size_t(j)] = a + (b - a) * j / (k - 1);
      starts.push_back(std::move(u));
    }
    // Seeded: groups cut at sorted random weighted positions.
    if (k > 1) {
      uint64_t state = seed;
      std::vector<double> r(static_cast<size_t>(k) - 1);
      for (double& x : r) x = double(splitmix64(state) >> 11) * 0x1.0p-53 * total;
      std::sort(r.begin(), r.end());
      for (int j = 1; j < k; ++j) cuts[size_t(j)] = weighted_index(pts, r[size_t(j) - 1]) + 1;
      starts.push_back(means_of_groups(pts, cuts));
    }
    Fit chosen;
    for (auto& s : starts) {
      Fit f = lloyd(pts, std::move(s), opt.max_iterations);
      if (f.sse < chosen.sse) chosen = std::move(f);
    }
    best = std::move(chosen.c);
  }
  std::vector<float> out(best.begin(), best.end());
  for (size_t j = 1; j < out.size(); ++j)  // doubles a hair apart may meet as floats
    if (!(out[j] > out[j - 1])) out[j] = std::nextafter(out[j - 1], std::numeric_limits<float>::infinity());
  return out;
}

void finish_prefix(Points& pts, const std::vector<double>& w, const std::vector<double>& wxx) {
  const size_t m = pts.p.size();
  pts.W.assign(m + 1, 0);
  pts.WX.assign(m + 1, 0);
  pts.WXX.assign(m + 1, 0);
  for (size_t i = 0; i < m; ++i) {
    pts.W[i + 1] = pts.W[i] + w[i];
    pts.WX[i + 1] = pts.WX[i] + w[i] * pts.p[i];
    pts.WXX[i + 1] = pts.WXX[i] + wxx[i];
  }
}

void check_k(int k) {
  if (k < 1 || k > (1 << 16)) fail("k-means: number of centroids {} is out of range 1..65536", k);
}

}  // namespace

std::vector<float> weighted_kmeans_1d(std::span<const float> x, std::span<const float> w, int k, uint64_t seed,
                                      const KmeansOptions& options) {
  check_k(k);
  if (x.size() != w.size()) fail("k-means: {} points but {} weights", x.size(), w.size());
  std::vector<std::pair<float, float>> xw;
  xw.reserve(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(w[i]) || w[i] < 0) fail("k-means: weight {} of point {} is not a finite non-negative number", w[i], i);
    if (w[i] == 0) continue;
    if (!std::isfinite(x[i])) fail("k-means: point {} is not finite ({})", i, x[i]);
    xw.emplace_back(x[i], w[i]);
  }
  if (xw.empty()) return uniform_levels(k);
  std::sort(xw.begin(), xw.end());
  Points pts;
  std::vector<double> wd, wxx;
  for (const auto& [xi, wi] : xw) {
    const double xv = xi, wv = wi;
    if (!pts.p.empty() && pts.p.back() == xv) {
      wd.back() += wv;
      wxx.back() += wv * xv * xv;
    } else {
      pts.p.push_back(xv);
      wd.push_back(wv);
      wxx.push_back(wv * xv * xv);
    }
  }
  finish_prefix(pts, wd, wxx);
  return kmeans_points(pts, k, seed, options);
}

double weighted_sse_1d(std::span<const float> x, std::span<const float> w, std::span<const float> centroids) {
  KVQ_ASSERT(x.size() == w.size() && !centroids.empty());
  double sse = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (w[i] == 0) continue;
    const auto it = std::lower_bound(centroids.begin(), centroids.end(), x[i]);
    double d = std::numeric_limits<double>::infinity();
    if (it != centroids.end()) d = std::min(d, std::abs(double(*it) - x[i]));
    if (it != centroids.begin()) d = std::min(d, std::abs(double(*(it - 1)) - x[i]));
    sse += double(w[i]) * d * d;
  }
  return sse;
}

WeightedHistogram::WeightedHistogram(int n_bins, float lo, float hi)
    : n_bins_(n_bins), lo_(lo), scale_(double(n_bins) / (double(hi) - double(lo))), bins_(size_t(n_bins)) {
  KVQ_ASSERT(n_bins >= 1 && hi > lo);
}

void WeightedHistogram::merge(const WeightedHistogram& other) {
  KVQ_ASSERT(other.n_bins_ == n_bins_ && other.lo_ == lo_ && other.scale_ == scale_);
  for (size_t i = 0; i < bins_.size(); ++i) {
    bins_[i].w += other.bins_[i].w;
    bins_[i].wx += other.bins_[i].wx;
    bins_[i].wxx += other.bins_[i].wxx;
  }
}

double WeightedHistogram::total_weight() const {
  double s = 0;
  for (const Bin& b : bins_) s += b.w;
  return s;
}

std::vector<float> WeightedHistogram::kmeans(int k, uint64_t seed, const KmeansOptions& options) const {
  check_k(k);
  Points pts;
  std::vector<double> wd, wxx;
  for (const Bin& b : bins_) {
    if (!(b.w > 0)) continue;
    const double mean = b.wx / b.w;
    if (!pts.p.empty() && !(mean > pts.p.back())) {  // keep the points strictly increasing (rounding)
      wd.back() += b.w;
      wxx.back() += b.wxx;
      continue;
    }
    pts.p.push_back(mean);
    wd.push_back(b.w);
    wxx.push_back(b.wxx);
  }
  if (pts.p.empty()) return uniform_levels(k);
  finish_prefix(pts, wd, wxx);
  return kmeans_points(pts, k, seed, options);
}

}  // namespace kvq

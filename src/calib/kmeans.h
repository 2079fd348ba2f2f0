// Deterministic weighted 1-D k-means (Lloyd), the fitter of the nuqN codebooks.
//
// In one dimension the clusters of any Lloyd step are contiguous runs of the
// sorted points, so with prefix sums of w and w*x over sorted (or binned) data
// one iteration costs O(k log n): binary-search each boundary (midpoint between
// neighbouring centroids), take each run's weighted mean. Lloyd only finds a
// local optimum, so several starts are run and the lowest weighted SSE kept:
// the optimal partition by dynamic programming (exact up to 4096 distinct
// points; above, over 4096 contiguous groups of equal count, then refined by
// Lloyd on all points), weighted quantiles, uniform levels over the data's
// range, and one seeded random start.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace kvq {

struct KmeansOptions {
  int max_iterations = 100;  // per start; stops earlier once the partition no longer changes
};

// k sorted centroids minimising sum_i w_i (x_i - c(x_i))^2. Points of weight 0
// are ignored. With fewer distinct (weighted) values than k the distinct values
// are returned together with deterministic fillers (largest gaps of the range
// extended to [-1, 1] halved), so the result always has k strictly increasing
// values; empty input gives k uniform levels over [-1, 1].
// Throws kvq::Error on k < 1, x/w of different sizes, NaN or infinite x with a
// positive weight, and NaN, infinite or negative weights.
std::vector<float> weighted_kmeans_1d(std::span<const float> x, std::span<const float> w, int k, uint64_t seed,
                                      const KmeansOptions& options = {});

// Weighted SSE of x under the nearest of the sorted centroids (for tests and reports).
double weighted_sse_1d(std::span<const float> x, std::span<const float> w, std::span<const float> centroids);

// A fine histogram over [lo, hi] that keeps, per bin, the sums of w, w*x and
// w*x^2, so k-means over millions of elements runs on the bins' weighted means
// (a partition boundary can only fall between bins: with 2^16 bins over [-1, 1]
// a bin is 3e-5 wide, 0.4% of an 8-bit level step). Values outside [lo, hi]
// are clamped to the end bins.
class WeightedHistogram {
 public:
  explicit WeightedHistogram(int n_bins = 1 << 16, float lo = -1.0f, float hi = 1.0f);
  void add(float x, float w) {
    if (!(w > 0)) return;  // also drops NaN weights; callers validate inputs
    double t = (double(x) - lo_) * scale_;
    const int64_t b = !(t > 0) ? 0 : (t >= double(n_bins_ - 1) ? n_bins_ - 1 : int64_t(t));  // NaN: bin 0, no UB
    Bin& bin = bins_[size_t(b)];
    const double wd = w, xd = x;
    bin.w += wd;
    bin.wx += wd * xd;
    bin.wxx += wd * xd * xd;
  }
  void merge(const WeightedHistogram& other);
  double total_weight() const;
  int n_bins() const { return n_bins_; }
  // k sorted centroids of the binned data, as weighted_kmeans_1d.
  std::vector<float> kmeans(int k, uint64_t seed, const KmeansOptions& options = {}) const;

 private:
  struct Bin {
    double w = 0, wx = 0, wxx = 0;
  };
  int n_bins_;
  double lo_, scale_;
  std::vector<Bin> bins_;
};

}  // namespace kvq

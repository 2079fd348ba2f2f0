// Element-wise kernels against double-precision formulas.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/ops.h"

namespace kvq {
namespace {

std::vector<float> random_vec(size_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// y = x / sqrt(mean(x^2) + eps) * w, in double.
std::vector<double> rmsnorm_ref(const std::vector<float>& x, const std::vector<float>& w, int64_t n, int dim,
                                float eps) {
  std::vector<double> y(x.size());
  for (int64_t r = 0; r < n; ++r) {
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += double(x[size_t(r * dim + i)]) * x[size_t(r * dim + i)];
    const double inv = 1.0 / std::sqrt(ss / dim + double(eps));
    for (int i = 0; i < dim; ++i) y[size_t(r * dim + i)] = x[size_t(r * dim + i)] * inv * w[size_t(i)];
  }
  return y;
}

TEST(Ops, RmsNormMatchesDoubleFormula) {
  uint32_t seed = 1;
  for (int dim : {1, 7, 64, 576, 4097})
    for (int64_t n : {1, 3})
      for (float eps : {1e-5f, 1e-6f})
        for (float amp : {1e-3f, 1.0f, 300.0f}) {
          SCOPED_TRACE("dim=" + std::to_string(dim) + " n=" + std::to_string(n) + " amp=" + std::to_string(amp));
          const std::vector<float> x = random_vec(size_t(n * dim), seed++, -amp, amp);
          const std::vector<float> w = random_vec(size_t(dim), seed++, -2.0f, 2.0f);
          const std::vector<double> want = rmsnorm_ref(x, w, n, dim, eps);
          std::vector<float> y(x.size());
          rmsnorm(x.data(), w.data(), y.data(), n, dim, eps);
          // Float scale factor and two float products: <= ~3 ulp relative.
          for (size_t i = 0; i < y.size(); ++i)
            ASSERT_NEAR(y[i], want[i], 4e-7 * std::fabs(want[i]) + 1e-30) << "i=" << i;
          // In place (y aliases x) gives the same result.
          std::vector<float> z = x;
          rmsnorm(z.data(), w.data(), z.data(), n, dim, eps);
          for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(z[i], y[i]) << "in-place i=" << i;
        }
}

TEST(Ops, RmsNormZeroRowIsFiniteAndEpsMatters) {
  std::vector<float> x(16, 0.0f), w(16, 1.0f), y(16, 7.0f);
  rmsnorm(x.data(), w.data(), y.data(), 1, 16, 1e-5f);
  for (float v : y) EXPECT_EQ(v, 0.0f);
  // A tiny row: eps dominates the denominator.
  x.assign(16, 1e-4f);
  rmsnorm(x.data(), w.data(), y.data(), 1, 16, 1e-2f);
  for (float v : y) EXPECT_NEAR(v, 1e-4 / std::sqrt(1e-8 + 1e-2), 1e-9);
}

TEST(Ops, RmsNormRowsAreIndependent) {
  const int dim = 32;
  const std::vector<float> w = random_vec(dim, 4, 0.5f, 1.5f);
  std::vector<float> x = random_vec(3 * dim, 5, -1.0f, 1.0f);
  for (int i = 0; i < dim; ++i) x[size_t(dim + i)] *= 1000.0f;  // a loud middle row
  std::vector<float> all(x.size()), one(dim);
  rmsnorm(x.data(), w.data(), all.data(), 3, dim, 1e-6f);
  for (int r = 0; r < 3; ++r) {
    rmsnorm(x.data() + r * dim, w.data(), one.data(), 1, dim, 1e-6f);
    for (int i = 0; i < dim; ++i) EXPECT_EQ(all[size_t(r * dim + i)], one[size_t(i)]) << r << "," << i;
  }
}

TEST(Ops, SiluMulMatchesDoubleFormula) {
  std::vector<float> g = random_vec(1000, 7, -20.0f, 20.0f);
  g.insert(g.end(), {0.0f, -0.0f, 1e-30f, -1e-30f, 88.0f, -88.0f, 89.0f, -89.0f, 100.0f, -100.0f, 1e30f, -1e30f});
  const std::vector<float> up = random_vec(g.size(), 8, -3.0f, 3.0f);
  std::vector<float> out = g;
  silu_mul(out.data(), up.data(), int64_t(out.size()));
  for (size_t i = 0; i < g.size(); ++i) {
    const double x = g[i];
    const double want = x / (1.0 + std::exp(-x)) * up[i];
    ASSERT_TRUE(std::isfinite(out[i])) << "g=" << g[i];
    ASSERT_NEAR(out[i], want, 1e-6 * std::fabs(want) + 1e-35) << "g=" << g[i] << " up=" << up[i];
  }
}

TEST(Ops, SiluMulPropagatesNaN) {
  std::vector<float> g = {std::numeric_limits<float>::quiet_NaN(), 1.0f};
  const std::vector<float> up = {1.0f, std::numeric_limits<float>::quiet_NaN()};
  silu_mul(g.data(), up.data(), 2);
  EXPECT_TRUE(std::isnan(g[0]));
  EXPECT_TRUE(std::isnan(g[1]));
}

TEST(Ops, AddInplace) {
  std::vector<float> x = random_vec(37, 1, -1, 1);
  const std::vector<float> y = random_vec(37, 2, -1, 1);
  std::vector<float> want(37);
  for (size_t i = 0; i < 37; ++i) want[i] = x[i] + y[i];
  add_inplace(x.data(), y.data(), 37);
  EXPECT_EQ(x, want);
}

TEST(Ops, FindNonFinite) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const float big = std::numeric_limits<float>::max();
  const float den = std::numeric_limits<float>::denorm_min();
  std::vector<float> x = {0.0f, -0.0f, big, -big, den, -den, 1.0f};
  EXPECT_EQ(find_non_finite(x.data(), int64_t(x.size())), -1);
  EXPECT_EQ(find_non_finite(x.data(), 0), -1);
  for (float bad : {nan, -nan, inf, -inf}) {
    for (size_t at : {size_t(0), size_t(3), x.size() - 1}) {
      std::vector<float> y = x;
      y[at] = bad;
      EXPECT_EQ(find_non_finite(y.data(), int64_t(y.size())), int64_t(at)) << bad << " at " << at;
      // Not reported when outside the scanned range.
      EXPECT_EQ(find_non_finite(y.data(), int64_t(at)), -1);
    }
  }
  // The first of several.
  std::vector<float> z(100, 1.0f);
  z[70] = inf;
  z[42] = nan;
  z[90] = nan;
  EXPECT_EQ(find_non_finite(z.data(), 100), 42);
}

}  // namespace
}  // namespace kvq

// Rope::apply against the textbook rotation computed in double:
//   theta_i = pos * freq_scale * base^(-2i/n_rot) / freq_factor_i,  i < n_rot/2
//   normal pairing rotates (x[2i], x[2i+1]); neox pairing rotates (x[i], x[i+n_rot/2]);
//   dims >= n_rot pass through unchanged.
// The kernel computes the angles in double and rotates in float, so it must agree
// with the double formula to a few float ulps of the pair's magnitude.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/rope.h"
#include "kvq/error.h"

namespace kvq {
namespace {

std::vector<float> random_vec(size_t n, uint32_t seed, float amp = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-amp, amp);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// The reference: one head vector at `pos`.
std::vector<double> textbook(const RopeSpec& s, const float* x, int64_t pos) {
  std::vector<double> y(x, x + s.head_dim);
  const int half = s.n_rot / 2;
  for (int i = 0; i < half; ++i) {
    double theta = double(pos) * s.freq_scale * std::pow(double(s.freq_base), -2.0 * i / s.n_rot);
    if (!s.freq_factors.empty()) theta /= s.freq_factors[size_t(i)];
    const int a = s.neox ? i : 2 * i, b = s.neox ? i + half : 2 * i + 1;
    const double xa = x[a], xb = x[b];
    y[size_t(a)] = xa * std::cos(theta) - xb * std::sin(theta);
    y[size_t(b)] = xa * std::sin(theta) + xb * std::cos(theta);
  }
  return y;
}

RopeSpec spec(int head_dim, int n_rot, bool neox, float base = 10000.0f, float freq_scale = 1.0f) {
  RopeSpec s;
  s.head_dim = head_dim;
  s.n_rot = n_rot;
  s.neox = neox;
  s.freq_base = base;
  s.freq_scale = freq_scale;
  return s;
}

void check_against_textbook(const RopeSpec& s, int n_heads, int64_t pos, uint32_t seed) {
  SCOPED_TRACE("head_dim=" + std::to_string(s.head_dim) + " n_rot=" + std::to_string(s.n_rot) +
               " neox=" + std::to_string(s.neox) + " pos=" + std::to_string(pos) +
               " freq_scale=" + std::to_string(s.freq_scale) + " factors=" + std::to_string(s.freq_factors.size()));
  const Rope rope(s);
  const std::vector<float> x = random_vec(size_t(n_heads) * s.head_dim, seed);
  std::vector<float> y = x;
  rope.apply(y.data(), n_heads, pos);
  for (int h = 0; h < n_heads; ++h) {
    const float* xh = x.data() + size_t(h) * s.head_dim;
    const std::vector<double> want = textbook(s, xh, pos);
    for (int d = 0; d < s.head_dim; ++d) {
      const float got = y[size_t(h) * s.head_dim + d];
      if (d >= s.n_rot) {
        ASSERT_EQ(got, xh[d]) << "tail dim " << d << " of head " << h << " must pass through";
      } else {
        // |x| <= 1 per component: pair magnitude <= sqrt(2); float cos/sin and
        // two products + one add: a few ulps of that.
        ASSERT_NEAR(got, want[size_t(d)], 1e-6) << "head " << h << " dim " << d;
      }
    }
  }
}

TEST(Rope, NormalPairingMatchesTextbook) {
  uint32_t seed = 1;
  for (int hd : {8, 64, 128})
    for (int64_t pos : {int64_t(0), int64_t(1), int64_t(7), int64_t(1000), int64_t(131071)})
      check_against_textbook(spec(hd, hd, false), 3, pos, seed++);
}

TEST(Rope, NeoxPairingMatchesTextbook) {
  uint32_t seed = 100;
  for (int hd : {8, 64, 128})
    for (int64_t pos : {int64_t(0), int64_t(1), int64_t(7), int64_t(1000), int64_t(131071)})
      check_against_textbook(spec(hd, hd, true), 3, pos, seed++);
}

TEST(Rope, PartialRotationLeavesTailUntouched) {
  uint32_t seed = 200;
  for (bool neox : {false, true}) {
    check_against_textbook(spec(64, 32, neox), 2, 123, seed++);
    check_against_textbook(spec(80, 64, neox), 2, 4567, seed++);
    check_against_textbook(spec(16, 2, neox), 4, 99, seed++);
    check_against_textbook(spec(12, 10, neox), 1, 5, seed++);
  }
}

TEST(Rope, FreqScaleAndBase) {
  uint32_t seed = 300;
  for (bool neox : {false, true}) {
    check_against_textbook(spec(64, 64, neox, 10000.0f, 0.25f), 2, 5000, seed++);
    check_against_textbook(spec(64, 64, neox, 500000.0f, 1.0f), 2, 77777, seed++);
    check_against_textbook(spec(32, 32, neox, 1000000.0f, 0.125f), 2, 3, seed++);
  }
  // freq_scale 0.5 at position 2p equals freq_scale 1 at position p.
  const std::vector<float> x = random_vec(64, 9);
  std::vector<float> a = x, b = x;
  Rope(spec(64, 64, false, 10000.0f, 0.5f)).apply(a.data(), 1, 2000);
  Rope(spec(64, 64, false, 10000.0f, 1.0f)).apply(b.data(), 1, 1000);
  for (int d = 0; d < 64; ++d) EXPECT_EQ(a[size_t(d)], b[size_t(d)]) << d;
}

TEST(Rope, FreqFactorsDivideFrequencies) {
  uint32_t seed = 400;
  for (bool neox : {false, true}) {
    RopeSpec s = spec(64, 64, neox, 500000.0f);
    s.freq_factors.resize(32);
    for (int i = 0; i < 32; ++i) s.freq_factors[size_t(i)] = 1.0f + float(i % 5) * 1.75f;
    check_against_textbook(s, 2, 8191, seed++);
    RopeSpec p = spec(48, 32, neox);
    p.freq_factors.assign(16, 8.0f);
    check_against_textbook(p, 3, 321, seed++);
  }
}

TEST(Rope, PreservesPairNorms) {
  for (bool neox : {false, true}) {
    const RopeSpec s = spec(128, 96, neox);
    const Rope rope(s);
    const std::vector<float> x = random_vec(128, 17, 3.0f);
    for (int64_t pos : {1, 2, 100, 99999}) {
      std::vector<float> y = x;
      rope.apply(y.data(), 1, pos);
      const int half = s.n_rot / 2;
      double total_x = 0, total_y = 0;
      for (int i = 0; i < half; ++i) {
        const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const double nx = double(x[size_t(a)]) * x[size_t(a)] + double(x[size_t(b)]) * x[size_t(b)];
        const double ny = double(y[size_t(a)]) * y[size_t(a)] + double(y[size_t(b)]) * y[size_t(b)];
        EXPECT_NEAR(ny, nx, 4e-6 * nx + 1e-12) << "pair " << i << " pos " << pos;
      }
      for (int d = 0; d < 128; ++d) {
        total_x += double(x[size_t(d)]) * x[size_t(d)];
        total_y += double(y[size_t(d)]) * y[size_t(d)];
      }
      EXPECT_NEAR(total_y, total_x, 1e-6 * total_x);
    }
  }
}

TEST(Rope, PositionZeroIsIdentity) {
  for (bool neox : {false, true}) {
    RopeSpec s = spec(64, 48, neox, 10000.0f, 0.3f);
    s.freq_factors.assign(24, 2.5f);
    const Rope rope(s);
    const std::vector<float> x = random_vec(64 * 4, 23, 100.0f);
    std::vector<float> y = x;
    rope.apply(y.data(), 4, 0);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(y[i], x[i]) << i;
  }
}

TEST(Rope, InverseAngleRestoresInput) {
  for (bool neox : {false, true})
    for (int64_t pos : {1, 37, 4096, 100000}) {
      const Rope rope(spec(64, 64, neox));
      const std::vector<float> x = random_vec(64 * 2, uint32_t(pos));
      std::vector<float> y = x;
      rope.apply(y.data(), 2, pos);
      bool moved = false;
      for (size_t i = 0; i < x.size(); ++i) moved |= y[i] != x[i];
      EXPECT_TRUE(moved);
      rope.apply(y.data(), 2, -pos);
      for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(y[i], x[i], 1e-6) << "pos " << pos << " i " << i;
    }
}

// Rotations compose: p then q equals p + q (within rounding).
TEST(Rope, RotationsCompose) {
  const Rope rope(spec(32, 32, true));
  const std::vector<float> x = random_vec(32, 5);
  std::vector<float> a = x, b = x;
  rope.apply(a.data(), 1, 30);
  rope.apply(a.data(), 1, 12);
  rope.apply(b.data(), 1, 42);
  for (int d = 0; d < 32; ++d) EXPECT_NEAR(a[size_t(d)], b[size_t(d)], 1e-6) << d;
}

// angles() + rotate() is what apply() does.
TEST(Rope, AnglesAndRotateMatchApply) {
  for (bool neox : {false, true}) {
    const Rope rope(spec(64, 40, neox));
    const std::vector<float> x = random_vec(64, 8);
    std::vector<float> a = x, b = x, c(20), s(20);
    rope.apply(a.data(), 1, 555);
    rope.angles(555, c.data(), s.data());
    rope.rotate(b.data(), c.data(), s.data());
    for (int d = 0; d < 64; ++d) EXPECT_EQ(a[size_t(d)], b[size_t(d)]) << d;
    for (int i = 0; i < 20; ++i) {
      const double theta = 555.0 * std::pow(10000.0, -2.0 * i / 40);
      EXPECT_NEAR(c[size_t(i)], std::cos(theta), 1e-7);
      EXPECT_NEAR(s[size_t(i)], std::sin(theta), 1e-7);
    }
  }
}

TEST(Rope, RejectsBadSpecs) {
  EXPECT_THROW(Rope(spec(64, 0, false)), Error);
  EXPECT_THROW(Rope(spec(64, 63, false)), Error);
  EXPECT_THROW(Rope(spec(64, 66, false)), Error);
  EXPECT_THROW(Rope(spec(64, 64, false, 0.0f)), Error);
  EXPECT_THROW(Rope(spec(64, 64, false, -1.0f)), Error);
  RopeSpec s = spec(64, 64, false);
  s.freq_factors.assign(31, 1.0f);
  EXPECT_THROW({ Rope r(s); }, Error);
  s.freq_factors.assign(32, 1.0f);
  EXPECT_NO_THROW({ Rope r(s); });
}

}  // namespace
}  // namespace kvq

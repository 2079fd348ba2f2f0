// Sampler: greedy, determinism per seed, top-k / top-p cuts, the empirical
// distribution at temperature 1, and parameter validation.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kvq/error.h"
#include "kvq/kvq.h"

namespace kvq {
namespace {

SamplerParams params(float temperature, int top_k, float top_p, uint64_t seed = 0) {
  SamplerParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  return p;
}

std::vector<float> random_logits(size_t n, uint32_t seed, float amp = 5.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-amp, amp);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

int32_t argmax_lowest(const std::vector<float>& x) {
  int32_t best = 0;
  for (size_t i = 1; i < x.size(); ++i)
    if (x[i] > x[size_t(best)]) best = int32_t(i);
  return best;
}

TEST(Sampler, GreedyIsArgmax) {
  for (float t : {0.0f, -0.0f}) {
    Sampler s(params(t, 40, 0.95f, 7));
    for (uint32_t seed = 0; seed < 50; ++seed) {
      const std::vector<float> logits = random_logits(1 + seed * 37, seed);
      EXPECT_EQ(s.sample(logits), argmax_lowest(logits)) << "seed " << seed;
    }
  }
}

TEST(Sampler, GreedyTiesPickLowestId) {
  Sampler s(params(0.0f, 0, 1.0f));
  EXPECT_EQ(s.sample(std::vector<float>{1, 3, 3, 2, 3}), 1);
  EXPECT_EQ(s.sample(std::vector<float>{5, 5}), 0);
  EXPECT_EQ(s.sample(std::vector<float>(1000, -2.0f)), 0);
  const float ninf = -std::numeric_limits<float>::infinity();
  EXPECT_EQ(s.sample(std::vector<float>{ninf, ninf, -1e30f, ninf}), 2);
}

TEST(Sampler, SameSeedSameSequenceDifferentSeedDifferent) {
  const std::vector<float> logits = random_logits(100, 3, 1.0f);  // a flat-ish distribution
  auto draw = [&](uint64_t seed) {
    Sampler s(params(1.0f, 0, 1.0f, seed));
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(s.sample(logits));
    return out;
  };
  EXPECT_EQ(draw(42), draw(42));
  EXPECT_EQ(draw(0), draw(0));
  EXPECT_NE(draw(42), draw(43));
  EXPECT_NE(draw(0), draw(1));
  // Successive draws of one sampler are not all the same token.
  const std::vector<int32_t> seq = draw(5);
  int distinct = 0;
  std::vector<bool> seen(100);
  for (int32_t t : seq) distinct += !seen[size_t(t)], seen[size_t(t)] = true;
  EXPECT_GT(distinct, 10);
}

TEST(Sampler, TopK1IsGreedyAtAnyTemperature) {
  for (float t : {0.1f, 1.0f, 5.0f, 100.0f}) {
    Sampler s(params(t, 1, 1.0f, 11));
    for (uint32_t seed = 0; seed < 30; ++seed) {
      const std::vector<float> logits = random_logits(50 + seed, seed + 1000);
      ASSERT_EQ(s.sample(logits), argmax_lowest(logits)) << "t=" << t << " seed " << seed;
    }
    // Ties: the lowest id.
    ASSERT_EQ(s.sample(std::vector<float>{0, 9, 2, 9}), 1);
  }
}

TEST(Sampler, TinyTopPKeepsOnlyTopToken) {
  for (float t : {0.5f, 1.0f, 3.0f}) {
    Sampler s(params(t, 0, 1e-6f, 13));
    for (uint32_t seed = 0; seed < 30; ++seed) {
      const std::vector<float> logits = random_logits(200, seed + 2000, 0.1f);  // nearly flat
      ASSERT_EQ(s.sample(logits), argmax_lowest(logits)) << "t=" << t << " seed " << seed;
    }
  }
}

// Counts over N draws vs the expected probabilities: each within 3 sigma of
// the binomial count (sigma = sqrt(N p (1-p))).
void expect_frequencies(Sampler& s, const std::vector<float>& logits, const std::vector<double>& probs, int N) {
  std::vector<int> counts(logits.size());
  for (int i = 0; i < N; ++i) {
    const int32_t t = s.sample(logits);
    ASSERT_GE(t, 0);
    ASSERT_LT(t, int32_t(logits.size()));
    ++counts[size_t(t)];
  }
  for (size_t i = 0; i < logits.size(); ++i) {
    const double mean = N * probs[i], sigma = std::sqrt(N * probs[i] * (1 - probs[i]));
    if (probs[i] == 0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " must never be drawn";
    } else {
      EXPECT_NEAR(counts[i], mean, 3 * sigma) << "token " << i << " p=" << probs[i];
    }
  }
}

std::vector<double> softmax(const std::vector<float>& x, double t, size_t keep) {
  std::vector<double> p(x.size(), 0.0);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += (p[i] = std::exp(x[i] / t));
  for (auto& v : p) v /= sum;
  return p;
}

TEST(Sampler, EmpiricalFrequenciesMatchSoftmax) {
  const std::vector<float> logits = {1.0f, 0.5f, 0.0f, -1.0f};
  {
    Sampler s(params(1.0f, 0, 1.0f, 2024));
    expect_frequencies(s, logits, softmax(logits, 1.0, 4), 20000);
  }
  {
    Sampler s(params(0.5f, 0, 1.0f, 77));
    expect_frequencies(s, logits, softmax(logits, 0.5, 4), 20000);
  }
  {
    // top_k = 2 renormalises over the two largest.
    Sampler s(params(1.0f, 2, 1.0f, 99));
    expect_frequencies(s, logits, softmax(logits, 1.0, 2), 20000);
  }
  {
    // Probabilities ~ .47, .29, .17, .06: top_p 0.6 keeps the first two
    // (cumulative .47 < .6 <= .76).
    Sampler s(params(1.0f, 0, 0.6f, 5));
    expect_frequencies(s, logits, softmax(logits, 1.0, 2), 20000);
  }
  {
    // Order in the logits array does not matter: shuffled ids.
    const std::vector<float> shuffled = {0.0f, -1.0f, 1.0f, 0.5f};
    Sampler s(params(1.0f, 0, 1.0f, 31337));
    const std::vector<double> p = softmax(logits, 1.0, 4);
    expect_frequencies(s, shuffled, {p[2], p[3], p[0], p[1]}, 20000);
  }
}

TEST(Sampler, MaskedTokensAreNeverDrawn) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::vector<float> logits = {ninf, 0.0f, ninf, 0.0f, ninf};
  Sampler s(params(1.0f, 0, 1.0f, 8));
  expect_frequencies(s, logits, {0, 0.5, 0, 0.5, 0}, 4000);
}

TEST(Sampler, InvalidParamsThrow) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_THROW(Sampler(params(1.0f, 40, 0.0f)), Error);
  EXPECT_THROW(Sampler(params(1.0f, 40, -0.5f)), Error);
  EXPECT_THROW(Sampler(params(1.0f, 40, 1.0001f)), Error);
  EXPECT_THROW(Sampler(params(1.0f, 40, 2.0f)), Error);
  EXPECT_THROW(Sampler(params(1.0f, 40, nan)), Error);
  EXPECT_THROW(Sampler(params(-0.1f, 40, 0.9f)), Error);
  EXPECT_THROW(Sampler(params(nan, 40, 0.9f)), Error);
  EXPECT_THROW(Sampler(params(inf, 40, 0.9f)), Error);
  EXPECT_NO_THROW(Sampler(params(0.0f, 40, 1.0f)));
  EXPECT_NO_THROW(Sampler(params(1.0f, 0, 1e-9f)));
  EXPECT_NO_THROW(Sampler(params(1.0f, -5, 1.0f)));
  Sampler s(params(1.0f, 40, 0.9f));
  EXPECT_THROW(s.sample(std::vector<float>{}), Error);
  Sampler g(params(0.0f, 40, 0.9f));
  EXPECT_THROW(g.sample(std::vector<float>{}), Error);
}

}  // namespace
}  // namespace kvq

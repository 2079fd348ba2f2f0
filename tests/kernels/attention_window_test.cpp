// Full-precision side stores of a quantized cache, seen through attention:
// the attention sink (first tokens) and the recent window (for a query at
// position P, every key/value at a position > P - R). The window is per query,
// so a prefill batch must give exactly what token-by-token decoding gives.
// Checked with a lossy format (int2, and a pre-RoPE per-channel format), where a
// missed or misplaced patch changes the output by far more than the tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/threads.h"
#include "formats/kv_format.h"
#include "kernels/cpu/attention.h"
#include "kvcache/kv_cache.h"

namespace kvq {
namespace {

struct WindowCase {
  std::string fmt = "int2";
  int sink = 0;
  int64_t window = 0;
  int64_t n = 150;
  int64_t batch = 150;  // tokens per prefill batch
  int n_kv = 2, group = 3, hd = 32;
  uint32_t seed = 7;
};

// Runs every token through the cache in batches and returns attention outputs
// for all tokens ([n][n_heads][hd]); `use_ref` selects the double oracle.
std::vector<float> run(const WindowCase& c, bool use_ref, ThreadPool& pool) {
  KvCacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_kv_heads = c.n_kv;
  cfg.head_dim = c.hd;
  cfg.n_ctx = c.n;
  cfg.k_format = &kv_format(c.fmt);
  cfg.v_format = &kv_format(c.fmt);
  cfg.rope.head_dim = c.hd;
  cfg.rope.n_rot = c.hd;
  cfg.sink_tokens = c.sink;
  cfg.window_tokens = c.window;
  if (cfg.k_format->needs_calibration(KvRole::key)) {
    KvTensorCalibration cal;
    cal.lower.assign(size_t(c.n_kv * c.hd), -1.0f);
    cal.upper.assign(size_t(c.n_kv * c.hd), 1.0f);
    cfg.k_calibration.assign(1, cal);
  }
  KvCache cache(cfg);
  std::mt19937 rng(c.seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int64_t row = int64_t(c.n_kv) * c.hd, n_heads = int64_t(c.n_kv) * c.group;
  std::vector<float> k(size_t(c.n * row)), v(k.size()), q(size_t(c.n * n_heads * c.hd));
  for (auto& x : k) x = u(rng);
  for (auto& x : v) x = u(rng);
  for (auto& x : q) x = 2 * u(rng);
  std::vector<int32_t> pos(size_t(c.n));
  for (int64_t i = 0; i < c.n; ++i) pos[size_t(i)] = int32_t(i);
  std::vector<float> out(q.size());
  for (int64_t b0 = 0; b0 < c.n; b0 += c.batch) {
    const int64_t bn = std::min(c.batch, c.n - b0);
    cache.begin_batch(std::span<const int32_t>(pos.data() + b0, size_t(bn)));
    cache.store(0, k.data() + b0 * row, v.data() + b0 * row);
    const AttentionArgs a{q.data() + b0 * n_heads * c.hd, bn, int(n_heads), pos.data() + b0,
                          1.0f / std::sqrt(float(c.hd)), cache.view(0), out.data() + b0 * n_heads * c.hd,
                          resolve_kernels({})};
    if (use_ref) attention_ref(a);
    else attention(a, pool);
    cache.end_batch();
  }
  return out;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b, int64_t from = 0) {
  double m = 0;
  for (size_t i = size_t(from); i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

constexpr double kTol = 2e-5;  // float vs double over <= 150 keys of |v| <= 1 (see attention_test.cpp)

ThreadPool& pool2() {
  static ThreadPool p(2);
  return p;
}

TEST(AttentionWindow, FastPathMatchesOracle) {
  for (const char* fmt : {"int2", "int3-ch"})
    for (int64_t window : {0, 1, 17, 64, 100})
      for (int64_t batch : {150, 37, 1})
        for (int sink : {0, 1, 5}) {
          WindowCase c;
          c.fmt = fmt;
          c.window = window;
          c.batch = batch;
          c.sink = sink;
          SCOPED_TRACE(std::string(fmt) + " window " + std::to_string(window) + " batch " + std::to_string(batch) +
                       " sink " + std::to_string(sink));
          EXPECT_LT(max_diff(run(c, false, pool2()), run(c, true, pool2())), kTol);
        }
}

TEST(AttentionWindow, PrefillEqualsTokenByTokenDecode) {
  // The window belongs to each query: a batch must see what decoding one token
  // at a time sees (this fails if the window were taken from the batch's end).
  for (const char* fmt : {"int2", "int3-ch"})
    for (int64_t window : {1, 10, 64, 90}) {
      WindowCase c;
      c.fmt = fmt;
      c.window = window;
      c.sink = 1;
      c.batch = 150;
      const auto prefill = run(c, false, pool2());
      c.batch = 1;
      const auto decode = run(c, false, pool2());
      SCOPED_TRACE(std::string(fmt) + " window " + std::to_string(window));
      EXPECT_LT(max_diff(prefill, decode), kTol);
    }
}

TEST(AttentionWindow, WholeContextInFullPrecisionEqualsF16) {
  // A window (or sink) covering everything reads only the binary16 side stores:
  // the same numbers as an f16 cache. For a post-RoPE format exactly those
  // numbers; a pre-RoPE format rounds keys to binary16 *before* rotating, the
  // f16 cache after, so there the outputs agree to binary16 rounding
  // (|k| <= 1.5, 2^-11 relative, times |q| sqrt(hd) in the score: < 2e-3).
  WindowCase f16;
  f16.fmt = "f16";
  const auto ref = run(f16, false, pool2());
  for (const char* fmt : {"int2", "int3-ch"}) {
    const double tol = kv_format(fmt).keys_pre_rope ? 2e-3 : kTol;
    WindowCase c;
    c.fmt = fmt;
    c.window = c.n;
    EXPECT_LT(max_diff(run(c, false, pool2()), ref), tol) << fmt << " window";
    c.window = 0;
    c.sink = int(c.n);
    EXPECT_LT(max_diff(run(c, false, pool2()), ref), tol) << fmt << " sink";
    // And without them the lossy format is far from f16 (the checks above mean something).
    c.sink = 0;
    EXPECT_GT(max_diff(run(c, false, pool2()), ref), 20 * tol) << fmt;
  }
}

TEST(AttentionWindow, WindowChangesOnlyWhatItCovers) {
  WindowCase c;
  c.window = 20;
  const auto with = run(c, false, pool2());
  c.window = 0;
  const auto without = run(c, false, pool2());
  const int64_t per_token = int64_t(c.n_kv) * c.group * c.hd;
  // The first query sees only itself, which is in the window: differs from int2.
  // Later queries see quantized history too; all differ somewhere.
  EXPECT_GT(max_diff(with, without), 100 * kTol);
  // Window 0 and sink 0 equal the plain int2 cache exactly (no patching at all).
  WindowCase plain;
  EXPECT_EQ(max_diff(run(plain, false, pool2()), without, 0), 0.0) << per_token;
}

}  // namespace
}  // namespace kvq

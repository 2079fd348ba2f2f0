// Every attention tile kernel this CPU runs (the scalar reference, the AVX2 and
// AVX-512 ones, and the portable Highway one at each of its targets this CPU supports, e.g.
// AVX2, SSE4, SSSE3 and the emulated baseline) against attention_ref(),
// the double-precision two-pass oracle, over awkward shapes: cache lengths that
// straddle page boundaries, decode (split-K + merge) and prefill query blocks,
// grouped-query heads, head sizes with and without a SIMD path, 1-3 threads, and
// both KV formats. Also: causal masking, split/unsplit agreement, adversarial
// score ranges.
//
// Tolerance. The oracle computes scores, exp and the weighted sum in double from
// the very same decoded keys/values the kernel reads, so the only differences
// are float rounding in the kernel:
//  * score = sum_d q_d*k_d*scale in float: |err| <~ c*sqrt(hd)*eps*S, where
//    S = scale*sum_d |q_d k_d| (the dot product's condition number); a score
//    error delta moves the softmax average by at most 2*delta*max|v|.
//  * exp (libm or the AVX2 polynomial, rel. err < 2e-7), the running sum l and
//    the float accumulation of sum_j p_j v_j over n keys: <~ c*sqrt(n)*eps*max|v|
//    (random-walk growth of rounding errors over n terms).
//  * a fixed 2e-6*max|v| floor (~16 ulp) covering the online-softmax rescalings.
// So tol = max|v| * (2e-6 + 2*eps*sqrt(n) + 4*eps*sqrt(hd)*S_max), i.e. about
// 3e-6..1e-5 * max|v| for ordinary random inputs (observed errors are 20-50x
// smaller); a bug (wrong key, wrong head, missed mask, bad merge, a poor exp)
// produces errors of order max|v| or at least far above this.
#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/cpu.h"
#include "base/threads.h"
#include "formats/kv_format.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_tile.h"
#include "kernels/cpu/kv_tile.h"
#include "kvcache/kv_cache.h"
#include "kvq/error.h"

namespace kvq {
namespace {

// One way through the kernel: a tile kernel, the SIMD level of the tile
// decoders beside it, and (portable kernel) the Highway target.
struct KernelPath {
  std::string name;
  SimdLevel level;
  AttentionKernel kernel;
  int64_t target = 0;
};

std::vector<KernelPath> kernel_paths() {
  std::vector<KernelPath> paths = {{"scalar", SimdLevel::scalar, AttentionKernel::scalar}};
  // The AVX2 kernel beside the AVX2 tile decoders (an AVX2 CPU); on an AVX-512
  // CPU also beside the AVX-512 decoders, and the AVX-512 kernel.
  if (detected_simd_level() >= SimdLevel::avx2) paths.push_back({"avx2", SimdLevel::avx2, AttentionKernel::avx2});
  if (detected_simd_level() >= SimdLevel::avx512) {
    paths.push_back({"avx2+avx512 decoders", SimdLevel::avx512, AttentionKernel::avx2});
    paths.push_back({"avx512", SimdLevel::avx512, AttentionKernel::avx512});
  }
  for (int64_t t : portable_targets()) {
    // Targets of AVX2 width and up run beside the AVX2 tile decoders (as on an
    // AVX-512 CPU), narrower ones beside the portable decoders (as on a CPU without AVX2).
    const std::string name = hwy::TargetName(t);
    const bool wide = name.rfind("AVX", 0) == 0;
    paths.push_back({"portable/" + name, wide ? detected_simd_level() : SimdLevel::scalar, AttentionKernel::portable, t});
  }
  return paths;
}

// The kernel set that runs a path.
KernelSet kernels_of(const KernelPath& p) {
  KernelSet ks;
  ks.simd = p.level;
  ks.attention = p.kernel;
  ks.portable_target = p.target;
  return resolve_kernels(ks);
}

// Every Highway target compiled in that this CPU runs is among the paths above,
// the portable baseline (one lane, EMU128 or SCALAR) included, so the tests
// cover several vector widths.
TEST(Attention, PortableKernelRunsEveryTargetOfThisCpu) {
  const std::vector<int64_t> targets = portable_targets();
  ASSERT_GE(targets.size(), 1u);
  std::string names;
  for (int64_t t : targets) names += std::string(" ") + hwy::TargetName(t);
  EXPECT_TRUE(names.find("EMU128") != std::string::npos || names.find("SCALAR") != std::string::npos)
      << "no portable baseline among" << names;
#if defined(__x86_64__)
  if (detected_simd_level() >= SimdLevel::avx2) { EXPECT_NE(names.find("AVX2"), std::string::npos) << names; }
  // Automatic choice: the hand-written kernels on AVX2 and AVX-512 CPUs, the
  // portable kernel for head sizes they cannot take.
  const KernelSet best = resolve_kernels({});
  if (detected_simd_level() == SimdLevel::avx2) { EXPECT_EQ(attention_kernel_name(best, 64), "avx2"); }
  if (detected_simd_level() == SimdLevel::avx512) {
    EXPECT_EQ(attention_kernel_name(best, 64), "avx512");
    EXPECT_EQ(attention_kernel_name(best, 40).rfind("portable/", 0), 0u) << "head size 40: not a multiple of 16";
  }
  if (detected_simd_level() >= SimdLevel::avx2) { EXPECT_EQ(attention_kernel_name(best, 20).rfind("portable/", 0), 0u); }
#endif
  // Lowered to scalar on a SIMD CPU: the reference (a CPU without AVX2 runs the portable kernel).
  const KernelSet low = kernels_at(SimdLevel::scalar);
  EXPECT_EQ(attention_kernel_name(low, 64), detected_simd_level() == SimdLevel::scalar
                                                 ? "portable/" + std::string(portable_target_name(low.portable_target))
                                                 : "scalar");
}

ThreadPool& pool(int n) {
  static std::unique_ptr<ThreadPool> pools[4];
  if (!pools[n]) pools[n] = std::make_unique<ThreadPool>(n);
  return *pools[n];
}

struct Case {
  int64_t n_tokens = 65;
  int64_t n_q = 1;
  int group = 1;
  int n_kv = 1;
  int hd = 16;
  int threads = 1;
  std::string fmt = "f32";
  int32_t pos0 = 0;      // position of the first cached token
  int32_t pos_step = 1;  // positions pos0, pos0 + step, ...
  int64_t jump_at = -1;  // tokens from jump_at on sit `jump` positions further
  int32_t jump = 0;
  bool neox = false;     // RoPE pairing
  int n_rot = 0;         // rotated dims; 0: all
  uint32_t seed = 1;
  float q_amp = 1.0f, k_amp = 1.0f, v_amp = 1.0f;
  bool zero_q = false;
  float scale = 0;  // 0: 1/sqrt(hd)
  bool rotate_values = false;  // KvCacheConfig::rotate_values

  std::string str() const {
    return "n_tokens=" + std::to_string(n_tokens) + " n_q=" + std::to_string(n_q) +
           " group=" + std::to_string(group) + " n_kv=" + std::to_string(n_kv) + " hd=" + std::to_string(hd) +
           " threads=" + std::to_string(threads) + " fmt=" + fmt + " pos0=" + std::to_string(pos0) +
           " step=" + std::to_string(pos_step) + " jump_at=" + std::to_string(jump_at) +
           " neox=" + std::to_string(neox) + " n_rot=" + std::to_string(n_rot) + " seed=" + std::to_string(seed) +
           (rotate_values ? " rotv" : "");
  }
};

// A one-layer cache filled with random keys/values. The queries are the last
// n_q tokens: the first n_tokens - n_q tokens are committed, the last n_q form
// the current (stored, not yet committed) batch, as in a prefill step.
struct AttnSetup {
  Case c;
  std::unique_ptr<KvCache> cache;
  std::vector<float> q;
  std::vector<int32_t> q_pos;
  int n_heads = 0;
  float scale = 0;

  explicit AttnSetup(const Case& cs, const std::vector<float>* keys = nullptr, const std::vector<float>* vals = nullptr)
      : c(cs) {
    n_heads = c.group * c.n_kv;
    scale = c.scale != 0 ? c.scale : 1.0f / std::sqrt(float(c.hd));
    KvCacheConfig cfg;
    cfg.n_layers = 1;
    cfg.n_kv_heads = c.n_kv;
    cfg.head_dim = c.hd;
    cfg.n_ctx = c.n_tokens + 3;
    cfg.k_format = &kv_format(c.fmt);
    cfg.v_format = &kv_format(c.fmt);
    cfg.rope.head_dim = c.hd;
    cfg.rope.n_rot = c.n_rot ? c.n_rot : c.hd;
    cfg.rope.neox = c.neox;
    cfg.rotate_values = c.rotate_values;
    const KvFormat& f = kv_format(c.fmt);
    if (f.needs_calibration(KvRole::key) || f.needs_calibration(KvRole::value)) {
      // Bounds a little inside the data (so 1% formats find outliers) and a
      // warped, sorted codebook.
      KvTensorCalibration cal;
      cal.lower.assign(size_t(c.n_kv * c.hd), -0.9f * c.k_amp);
      cal.upper.assign(size_t(c.n_kv * c.hd), 0.9f * c.k_amp);
      const int n_lev = 1 << f.bits;
      for (int i = 0; i < n_lev; ++i) {
        const float x = -1.0f + 2.0f * float(i) / float(n_lev - 1);
        cal.codebook.push_back(x * std::fabs(x) * 0.5f + x * 0.5f);
      }
      cfg.k_calibration.assign(1, cal);
      cfg.v_calibration.assign(1, cal);
    }
    cache = std::make_unique<KvCache>(cfg);

    std::mt19937 rng(c.seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const int64_t row = int64_t(c.n_kv) * c.hd;
    std::vector<float> k(size_t(c.n_tokens * row)), v(k.size());
    for (auto& x : k) x = c.k_amp * u(rng);
    for (auto& x : v) x = c.v_amp * u(rng);
    if (keys) k = *keys;
    if (vals) v = *vals;
    std::vector<int32_t> pos(size_t(c.n_tokens));
    for (int64_t i = 0; i < c.n_tokens; ++i)
      pos[size_t(i)] = c.pos0 + int32_t(i) * c.pos_step + (c.jump_at >= 0 && i >= c.jump_at ? c.jump : 0);

    const int64_t n_old = c.n_tokens - c.n_q;
    if (n_old > 0) {
      cache->begin_batch(std::span<const int32_t>(pos.data(), size_t(n_old)));
      cache->store(0, k.data(), v.data());
      cache->end_batch();
    }
    cache->begin_batch(std::span<const int32_t>(pos.data() + n_old, size_t(c.n_q)));
    cache->store(0, k.data() + n_old * row, v.data() + n_old * row);

    q.resize(size_t(c.n_q * n_heads * c.hd));
    for (auto& x : q) x = c.zero_q ? 0.0f : c.q_amp * u(rng);
    q_pos.assign(pos.begin() + n_old, pos.end());
  }

  AttentionArgs args(float* out, const KernelSet& ks = resolve_kernels({})) const {
    return AttentionArgs{q.data(), c.n_q, n_heads, q_pos.data(), scale, cache->view(0), out, ks};
  }

  std::vector<float> run_fast(int threads, const KernelSet& ks = resolve_kernels({})) const {
    std::vector<float> out(q.size(), -12345.0f);
    attention(args(out.data(), ks), pool(threads));
    return out;
  }
  std::vector<float> run_ref() const {
    std::vector<float> out(q.size(), -12345.0f);
    attention_ref(args(out.data()));
    return out;
  }

  // Decoded (post-RoPE) keys / values of one KV head, [n_tokens][hd].
  std::vector<float> read(int h, bool keys) const {
    const KvLayerView kv = cache->view(0);
    const KernelSet ks = resolve_kernels({});
    std::vector<float> page(size_t(c.hd) * kKvPageTokens), res(size_t(kv.n_tokens) * c.hd);
    for (int64_t p = 0; p * kKvPageTokens < kv.n_tokens; ++p) {
      if (keys) kv_decode_key_tile(ks, kv, p, h, page.data());
      else kv_decode_value_tile(ks, kv, p, h, page.data());
      for (int64_t j = 0; j < kKvPageTokens && p * kKvPageTokens + j < kv.n_tokens; ++j)
        for (int d = 0; d < c.hd; ++d)
          res[size_t((p * kKvPageTokens + j) * c.hd + d)] =
              keys ? page[size_t(d * kKvPageTokens + j)] : page[size_t(j * c.hd + d)];
    }
    return res;
  }

  double max_abs_v() const {
    double m = 0;
    for (int h = 0; h < c.n_kv; ++h)
      for (float x : read(h, false)) m = std::max(m, double(std::fabs(x)));
    return m;
  }

  // max over (query, head, key) of scale * sum_d |q_d k_d|.
  double max_score_condition() const {
    double s_max = 0;
    for (int h = 0; h < c.n_kv; ++h) {
      const std::vector<float> k = read(h, true);
      for (int64_t t = 0; t < c.n_q; ++t)
        for (int g = 0; g < c.group; ++g) {
          const float* qq = q.data() + (t * n_heads + h * c.group + g) * c.hd;
          for (int64_t i = 0; i < c.n_tokens; ++i) {
            double s = 0;
            for (int d = 0; d < c.hd; ++d) s += std::fabs(double(qq[d]) * k[size_t(i * c.hd + d)]);
            s_max = std::max(s_max, s * scale);
          }
        }
    }
    return s_max;
  }

  double tolerance() const {
    const double eps = FLT_EPSILON;
    return max_abs_v() * (2e-6 + 2 * eps * std::sqrt(double(c.n_tokens)) +
                          4 * eps * std::sqrt(double(c.hd)) * max_score_condition());
  }
};

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b, size_t* where = nullptr) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::isnan(a[i]) || std::isnan(b[i]) ? INFINITY : std::fabs(double(a[i]) - b[i]);
    if (d > m || (std::isinf(d) && !std::isinf(m))) {
      m = d;
      if (where) *where = i;
    }
  }
  return m;
}

// Checks every kernel path against the oracle.
void check_case(const Case& c) {
  SCOPED_TRACE(c.str());
  const AttnSetup s(c);
  const std::vector<float> ref = s.run_ref();
  const double tol = s.tolerance();
  for (const KernelPath& path : kernel_paths()) {
    const KernelSet ks = kernels_of(path);
    const std::vector<float> out = s.run_fast(c.threads, ks);
    size_t at = 0;
    const double err = max_abs_diff(out, ref, &at);
    EXPECT_LE(err, tol) << "kernel=" << path.name << " worst at flat index " << at << " (token "
                        << at / (size_t(s.n_heads) * c.hd) << ", head " << (at / c.hd) % s.n_heads << ", dim "
                        << at % c.hd << "): got " << out[at] << " want " << ref[at];
  }
}

// Every cache length x every query count, other parameters cycled so each
// value meets many others.
TEST(Attention, MatchesReferenceAcrossShapes) {
  const int64_t n_tokens_list[] = {1, 31, 63, 64, 65, 127, 129, 1000};
  const int64_t n_q_list[] = {1, 2, 7, 8, 9, 33};
  const int groups[] = {1, 3, 4};
  const int hds[] = {8, 16, 64, 80, 128, 12};
  const char* fmts[] = {"f32", "f16"};
  int k = 0;
  for (int64_t n : n_tokens_list) {
    for (int64_t nq : n_q_list) {
      if (nq > n) continue;
      Case c;
      c.n_tokens = n;
      c.n_q = nq;
      c.group = groups[k % 3];
      c.n_kv = 1 + (k / 3) % 3;
      c.hd = hds[k % 6];
      if (n == 1000 && c.hd > 64) c.hd = 64;  // keep the oracle fast
      c.threads = 1 + (k / 2) % 3;
      c.fmt = fmts[(k / 5) % 2];
      c.seed = uint32_t(100 + k);
      check_case(c);
      ++k;
    }
  }
}

// Every head size x GQA group x format, for a decode step and a prefill block.
// Through every format of the table (fast tile decoders included), in the
// default model's shape: decode (one query: split-K, all KV heads per task),
// a short batch, and a long one (prefill's large query blocks).
TEST(Attention, MatchesReferenceThroughEveryFormatModelShape) {
  int k = 0;
  for (const KvFormat& f : kv_format_table())
    for (int64_t nq : {1, 20, 140}) {
      Case c;
      c.n_tokens = nq == 1 ? 700 : 333;
      c.n_q = nq;
      c.group = 3;
      c.n_kv = 3;
      c.hd = 64;
      c.threads = 2;
      c.fmt = std::string(f.name);
      c.seed = uint32_t(900 + k++);
      check_case(c);
    }
}

// Per-token quant values are accumulated straight from the packed codes
// (2/3/4 bits, head_dim % 32 == 0): every such format at other head sizes and
// groups than the model's, decode and a short batch, ragged last pages.
TEST(Attention, PackedValuesMatchReferenceHeadSizesGroups) {
  int k = 0;
  for (const char* fmt : {"int4", "int3", "int2", "nuq4-1%", "nuq3-1%", "nuq2-1%", "int4-ch-1%"})
    for (int hd : {32, 128})
      for (int group : {1, 4})
        for (int64_t nq : {1, 5}) {
          Case c;
          c.n_tokens = 150;
          c.n_q = nq;
          c.group = group;
          c.n_kv = 2;
          c.hd = hd;
          c.threads = 2;
          c.fmt = fmt;
          c.v_amp = 3.0f;  // zero-points and ranges far from 0 and 1
          c.seed = uint32_t(1300 + k++);
          check_case(c);
        }
}

// Values rotated before quantization (KvCacheConfig::rotate_values) under
// formats that do not rotate by themselves: KVQuant presets (packed values in
// decode), a block format and plain floats; decode, a short and a long batch.
TEST(Attention, RotatedValuesMatchReference) {
  int k = 0;
  for (const char* fmt : {"nuq4-1%", "int4-ch-1%", "nuq2-1%", "q4_0", "f16"})
    for (int64_t nq : {1, 7, 140}) {
      Case c;
      c.n_tokens = nq == 1 ? 400 : 200;
      c.n_q = nq;
      c.group = 3;
      c.n_kv = 2;
      c.hd = 64;
      c.threads = 2;
      c.fmt = fmt;
      c.rotate_values = true;
      c.seed = uint32_t(1700 + k++);
      check_case(c);
    }
}

TEST(Attention, MatchesReferenceHeadSizesGroupsFormats) {
  int k = 0;
  for (int hd : {8, 12, 16, 64, 80, 128})
    for (int group : {1, 3, 4})
      for (const char* fmt : {"f32", "f16"})
        for (int64_t nq : {1, 9}) {
          Case c;
          c.n_tokens = 129;
          c.n_q = nq;
          c.group = group;
          c.n_kv = 1 + k % 3;
          c.hd = hd;
          c.threads = 2;
          c.fmt = fmt;
          c.seed = uint32_t(500 + k++);
          check_case(c);
        }
}

TEST(Attention, MatchesReferenceAcrossThreadCounts) {
  int k = 0;
  for (int threads : {1, 2, 3})
    for (int64_t n : {65, 1000})
      for (int64_t nq : {1, 33}) {
        Case c;
        c.n_tokens = n;
        c.n_q = nq;
        c.group = 4;
        c.n_kv = 2;
        c.hd = 64;
        c.threads = threads;
        c.fmt = (k & 1) ? "f16" : "f32";
        c.seed = uint32_t(900 + k++);
        check_case(c);
      }
}

// Positions need not be 0..n-1: gaps and an offset start.
TEST(Attention, MatchesReferenceWithGappedPositions) {
  for (int64_t nq : {1, 9}) {
    Case c;
    c.n_tokens = 200;
    c.n_q = nq;
    c.group = 3;
    c.n_kv = 2;
    c.hd = 16;
    c.threads = 3;
    c.pos0 = 1000;
    c.pos_step = 3;
    c.seed = 77;
    check_case(c);
  }
}

// Pre-RoPE keys in decode and short batches are rotated relative to their page
// and the queries turned back by each page's first angle (attention.cpp); the
// oracle rotates every key at its own position. Both pairings, part of the head
// rotated, far positions, and a page whose positions jump (rotated at its own
// angles) among pages that run consecutively.
TEST(Attention, PageRelativeRopeMatchesReference) {
  int k = 0;
  for (const char* fmt : {"nuq4-1%", "int3-ch", "nuq8"})
    for (bool neox : {false, true})
      for (int n_rot : {32, 16})
        for (int64_t jump_at : {int64_t(-1), int64_t(150)})
          for (int64_t nq : {1, 5}) {
            Case c;
            c.n_tokens = 300;
            c.n_q = nq;
            c.group = 3;
            c.n_kv = 2;
            c.hd = 32;
            c.threads = 2;
            c.fmt = fmt;
            c.neox = neox;
            c.n_rot = n_rot;
            c.pos0 = jump_at < 0 ? 70000 : 5;
            c.jump_at = jump_at;
            c.jump = 1000;
            c.seed = uint32_t(1300 + k++);
            check_case(c);
          }
}

// Large scores (|score| up to ~80 and beyond): exp overflow/underflow handling
// of the running max, the tile max and the split merge.
TEST(Attention, MatchesReferenceWithLargeLogits) {
  int k = 0;
  for (int64_t n : {65, 1000})
    for (int64_t nq : {1, 9})
      for (int hd : {16, 64}) {
        Case c;
        c.n_tokens = n;
        c.n_q = nq;
        c.group = 1 + k % 3;
        c.n_kv = 2;
        c.hd = hd;
        c.threads = 1 + k % 3;
        c.fmt = (k & 1) ? "f16" : "f32";
        c.seed = uint32_t(1300 + k++);
        // Scores = scale * q.k. max_score_condition() bounds every |score| from
        // above; rescale so that bound is 160: the extreme scores then land
        // around +-80..160 (exp of differences far outside float range).
        const AttnSetup probe(c);
        c.scale = float(probe.scale * 160.0 / probe.max_score_condition());
        check_case(c);
      }
}

// A single key that dominates by ~160 in score: the output is its value.
TEST(Attention, SpikeKeyDominates) {
  for (const KernelPath& path : kernel_paths()) {
    const KernelSet ks = kernels_of(path);
    for (int64_t n : {64, 200, 1000}) {
      Case c;
      c.n_tokens = n;
      c.n_q = 1;
      c.hd = 16;
      c.n_kv = 1;
      const int64_t spike = n / 3;
      std::vector<float> keys(size_t(n * c.hd), 0.0f), vals(size_t(n * c.hd));
      std::mt19937 rng(5);
      std::uniform_real_distribution<float> u(-1, 1);
      for (auto& x : vals) x = u(rng);
      // Keys are rotated on the way in; with zero keys everywhere except the
      // spike, the scores are 0 except one. Choose q = rotated spike key direction.
      keys[size_t(spike * c.hd)] = 1.0f;  // pre-RoPE key e0 of the spike token
      AttnSetup s(c, &keys, &vals);
      const std::vector<float> keys_read = s.read(0, true);
      for (int d = 0; d < c.hd; ++d)
        s.q[size_t(d)] = keys_read[size_t(spike * c.hd + d)] * 160.0f * std::sqrt(float(c.hd));
      std::vector<float> out = s.run_fast(2, ks);
      const std::vector<float> ref = s.run_ref();
      for (int d = 0; d < c.hd; ++d) {
        EXPECT_NEAR(out[size_t(d)], vals[size_t(spike * c.hd + d)], 1e-5) << "n=" << n << " d=" << d;
        EXPECT_NEAR(ref[size_t(d)], vals[size_t(spike * c.hd + d)], 1e-5) << "n=" << n << " d=" << d;
      }
    }
  }
}

// All-equal scores (zero query): the output is the plain mean of the visible values.
TEST(Attention, EqualScoresGiveMeanOfVisibleValues) {
  for (const KernelPath& path : kernel_paths()) {
    const KernelSet ks = kernels_of(path);
    for (int64_t n : {1, 63, 65, 1000})
      for (int64_t nq : {int64_t(1), std::min<int64_t>(n, 9)}) {
        Case c;
        c.n_tokens = n;
        c.n_q = nq;
        c.group = 3;
        c.n_kv = 2;
        c.hd = 16;
        c.threads = 2;
        c.zero_q = true;
        c.seed = 3;
        SCOPED_TRACE(c.str());
        const AttnSetup s(c);
        const std::vector<float> out = s.run_fast(c.threads, ks);
        for (int h = 0; h < c.n_kv; ++h) {
          const std::vector<float> v = s.read(h, false);
          for (int64_t t = 0; t < nq; ++t) {
            const int64_t visible = n - nq + t + 1;
            for (int d = 0; d < c.hd; ++d) {
              double mean = 0;
              for (int64_t i = 0; i < visible; ++i) mean += v[size_t(i * c.hd + d)];
              mean /= double(visible);
              for (int g = 0; g < c.group; ++g)
                ASSERT_NEAR(out[size_t((t * s.n_heads + h * c.group + g) * c.hd + d)], mean, 2e-6)
                    << "t=" << t << " h=" << h << " g=" << g << " d=" << d;
            }
          }
        }
      }
  }
}

// Causal masking: changing the key/value of the last token changes only the
// last query's output; earlier queries must be bit-identical.
TEST(Attention, FutureKeysAreMasked) {
  int k = 0;
  for (const KernelPath& path : kernel_paths()) {
    const KernelSet ks = kernels_of(path);
    for (int64_t n : {9, 65, 129, 300})
      for (int hd : {16, 12}) {
        Case c;
        c.n_tokens = n;
        c.n_q = 9;
        c.group = 2;
        c.n_kv = 2;
        c.hd = hd;
        c.threads = 1 + k % 3;
        c.fmt = (k & 1) ? "f16" : "f32";
        c.seed = uint32_t(40 + k++);
        SCOPED_TRACE(c.str());
        const int64_t row = int64_t(c.n_kv) * hd;
        std::mt19937 rng(c.seed);
        std::uniform_real_distribution<float> u(-1, 1);
        std::vector<float> keys(size_t(n * row)), vals(keys.size());
        for (auto& x : keys) x = u(rng);
        for (auto& x : vals) x = u(rng);
        const AttnSetup a(c, &keys, &vals);
        // Perturb the last token (future for every query but the last) heavily.
        for (int64_t i = (n - 1) * row; i < n * row; ++i) {
          keys[size_t(i)] = 50.0f * (keys[size_t(i)] >= 0 ? 1 : -1);
          vals[size_t(i)] = 1000.0f;
        }
        AttnSetup b(c, &keys, &vals);
        b.q = a.q;
        const std::vector<float> oa = a.run_fast(c.threads, ks), ob = b.run_fast(c.threads, ks);
        const size_t per_token = size_t(a.n_heads) * hd;
        for (size_t i = 0; i < (size_t(c.n_q) - 1) * per_token; ++i)
          ASSERT_EQ(oa[i], ob[i]) << "query token " << i / per_token << " saw a future key";
        // ...and the last query does see it (the perturbation is not a no-op).
        bool changed = false;
        for (size_t i = (size_t(c.n_q) - 1) * per_token; i < oa.size(); ++i) changed |= oa[i] != ob[i];
        EXPECT_TRUE(changed);
        // The oracle agrees on both.
        EXPECT_LE(max_abs_diff(ob, b.run_ref()), b.tolerance());
      }
  }
}

// A decode query that sits in the middle of the cache (every later key masked;
// with split-K, whole key ranges see nothing), and one before every key.
TEST(Attention, DecodeQueryInTheMiddleAndBeforeAllKeys) {
  for (const KernelPath& path : kernel_paths()) {
    const KernelSet ks = kernels_of(path);
    for (int32_t qpos : {0, 5, 70, 130, 640, 999}) {
      Case c;
      c.n_tokens = 1000;
      c.n_q = 1;
      c.group = 2;
      c.n_kv = 1;
      c.hd = 16;
      c.pos0 = 1;  // positions 1..1000
      c.seed = 11;
      SCOPED_TRACE("qpos=" + std::to_string(qpos));
      AttnSetup s(c);
      s.q_pos[0] = qpos;
      for (int threads : {1, 3}) {
        const std::vector<float> out = s.run_fast(threads, ks), ref = s.run_ref();
        EXPECT_LE(max_abs_diff(out, ref), s.tolerance()) << "threads=" << threads;
        if (qpos == 0) {
          for (float x : out) ASSERT_EQ(x, 0.0f) << "no visible key must give a zero output";
        }
      }
    }
  }
}

// Split-K merge exactness: the last query of a large prefill block (computed
// over the whole key range by one task, unsplit) equals the same query run as
// a decode step (key range split into partial softmax states, then merged) to
// within float rounding of the merge (a few ulp of max|v|).
TEST(Attention, SplitMergeEqualsUnsplit) {
  for (const KernelPath& path : kernel_paths()) {
    const KernelSet ks = kernels_of(path);
    for (int64_t n : {129, 1000})
      for (int threads : {1, 3}) {
        Case c;
        c.n_tokens = n;
        // 1 KV head, group 1: 24 tokens per query block; >= 4*threads blocks
        // leaves the key range unsplit.
        c.n_q = 24 * 4 * threads + 1;
        c.n_kv = 1;
        c.group = 1;
        c.hd = 64;
        c.seed = uint32_t(n + threads);
        if (c.n_q > n) continue;
        SCOPED_TRACE(c.str());
        const AttnSetup prefill(c);
        Case d = c;
        d.n_q = 1;
        AttnSetup decode(d);
        decode.q.assign(prefill.q.end() - c.hd, prefill.q.end());
        decode.q_pos = {prefill.q_pos.back()};
        const std::vector<float> whole = prefill.run_fast(threads, ks);
        const std::vector<float> split = decode.run_fast(threads, ks);
        const double maxv = prefill.max_abs_v();
        for (int dd = 0; dd < c.hd; ++dd)
          EXPECT_NEAR(split[size_t(dd)], whole[whole.size() - c.hd + dd], 8 * FLT_EPSILON * maxv) << "dim " << dd;
      }
  }
}

TEST(Attention, RejectsHeadsNotMultipleOfKvHeads) {
  Case c;
  c.n_kv = 2;
  c.group = 1;
  AttnSetup s(c);
  s.n_heads = 3;
  std::vector<float> out(3 * 16);
  s.q.resize(out.size());
  EXPECT_THROW(attention(s.args(out.data()), pool(1)), Error);
}

}  // namespace
}  // namespace kvq

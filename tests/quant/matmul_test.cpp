// Fast kernels (dequantize_row / quantize_row / vec_dot / matmul) against the
// scalar references, at awkward sizes. The reference path is the one at
// SimdLevel::scalar; the fast path the detected level.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>
#include <vector>

#include "base/cpu.h"
#include "base/fp16.h"
#include "base/threads.h"
#include "quant/blocks.h"
#include "quant/quant.h"

namespace kvq {
namespace {

using T = GgmlType;

const SimdLevel kFast = detected_simd_level();

const QuantTraits& tr(T t) {
  const QuantTraits* p = quant_traits(t);
  EXPECT_NE(p, nullptr);
  return *p;
}

size_t row_bytes(T t, int64_t n) {
  const QuantTraits& q = tr(t);
  return size_t(n / q.block_elems) * size_t(q.block_bytes);
}

const T kLegacy[] = {T::Q4_0, T::Q4_1, T::Q5_0, T::Q5_1, T::Q8_0};
const T kKQuants[] = {T::Q4_K, T::Q5_K, T::Q6_K};
const T kFloats[] = {T::F32, T::F16, T::BF16};
const int64_t kLegacyCols[] = {32, 64, 96, 576, 1536};
const int64_t kKCols[] = {256, 512};
const int64_t kFloatCols[] = {1, 7, 32, 33, 96, 576};

std::vector<int64_t> cols_for(T t) {
  for (T k : kKQuants)
    if (k == t) return {std::begin(kKCols), std::end(kKCols)};
  for (T f : kFloats)
    if (f == t) return {std::begin(kFloatCols), std::end(kFloatCols)};
  return {std::begin(kLegacyCols), std::end(kLegacyCols)};
}

std::vector<T> all_weight_types() {
  std::vector<T> v(std::begin(kLegacy), std::end(kLegacy));
  v.insert(v.end(), std::begin(kKQuants), std::end(kKQuants));
  v.insert(v.end(), std::begin(kFloats), std::end(kFloats));
  return v;
}

void put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// A finite fp16 in +-[2^-8, 2^-2) with a random sign (a plausible block scale).
uint16_t rand_scale(std::mt19937& rng, bool allow_negative = true) {
  std::uniform_real_distribution<float> u(-8.0f, -2.0f);
  float v = std::exp2(u(rng));
  if (allow_negative && (rng() & 1)) v = -v;
  return f32_to_fp16(v);
}

// Random weight row of n elements: random quant bits, sane scales. With
// `exact`, every scale is 1 (or a small integer) so that all dot products are
// small integers that any summation order computes exactly.
std::vector<uint8_t> random_row(T t, int64_t n, std::mt19937& rng, bool exact = false) {
  std::vector<uint8_t> row(row_bytes(t, n));
  for (auto& b : row) b = uint8_t(rng());
  const QuantTraits& q = tr(t);
  const uint16_t one = f32_to_fp16(1.0f);
  const int64_t nb = n / q.block_elems;
  for (int64_t i = 0; i < nb; ++i) {
    uint8_t* b = row.data() + i * q.block_bytes;
    auto scale = [&](size_t off, bool neg = true) { put16(b + off, exact ? one : rand_scale(rng, neg)); };
    switch (t) {
      case T::Q4_0: scale(offsetof(BlockQ4_0, d)); break;
      case T::Q5_0: scale(offsetof(BlockQ5_0, d)); break;
      case T::Q8_0: scale(offsetof(BlockQ8_0, d)); break;
      case T::Q4_1:
        scale(offsetof(BlockQ4_1, d), false);
        put16(b + offsetof(BlockQ4_1, m), exact ? f32_to_fp16(-8.0f) : rand_scale(rng));
        break;
      case T::Q5_1:
        scale(offsetof(BlockQ5_1, d), false);
        put16(b + offsetof(BlockQ5_1, m), exact ? f32_to_fp16(-16.0f) : rand_scale(rng));
        break;
      case T::Q4_K:
        scale(offsetof(BlockQ4_K, d), false);
        scale(offsetof(BlockQ4_K, dmin), false);
        break;
      case T::Q5_K:
        scale(offsetof(BlockQ5_K, d), false);
        scale(offsetof(BlockQ5_K, dmin), false);
        break;
      case T::Q6_K:
        scale(offsetof(BlockQ6_K, d), false);
        if (exact)  // |sc| <= 31 keeps two super-blocks' sums below 2^24
          for (int g = 0; g < QK_K / 16; ++g) b[offsetof(BlockQ6_K, scales) + g] = uint8_t(int8_t(int(rng() % 63) - 31));
        break;
      case T::F16: {
        std::uniform_real_distribution<float> u(-2.0f, 2.0f);
        put16(b, f32_to_fp16(exact ? float(int(rng() % 31) - 15) : u(rng)));
        break;
      }
      case T::BF16: {
        std::uniform_real_distribution<float> u(-2.0f, 2.0f);
        put16(b, f32_to_bf16(exact ? float(int(rng() % 31) - 15) : u(rng)));
        break;
      }
      case T::F32: {
        std::uniform_real_distribution<float> u(-2.0f, 2.0f);
        const float f = exact ? float(int(rng() % 31) - 15) : u(rng);
        std::memcpy(b, &f, 4);
        break;
      }
      default: ADD_FAILURE() << "no generator for type " << int(t);
    }
  }
  return row;
}

// The same row with every quantized value zeroed: dequantizing it gives the
// per-element offset mu (Q4_1: m, Q4_K: -dmin*m, Q4_0: -8d, floats: 0), so
// |w - mu| bounds the scaled-integer part of each element.
std::vector<uint8_t> zero_quants(T t, std::vector<uint8_t> row) {
  const QuantTraits& q = tr(t);
  const size_t nb = row.size() / size_t(q.block_bytes);
  for (size_t i = 0; i < nb; ++i) {
    uint8_t* b = row.data() + i * size_t(q.block_bytes);
    auto zero = [&](size_t off, size_t len) { std::memset(b + off, 0, len); };
    switch (t) {
      case T::Q4_0: zero(offsetof(BlockQ4_0, qs), 16); break;
      case T::Q4_1: zero(offsetof(BlockQ4_1, qs), 16); break;
      case T::Q5_0: zero(offsetof(BlockQ5_0, qh), 20); break;
      case T::Q5_1: zero(offsetof(BlockQ5_1, qh), 20); break;
      case T::Q8_0: zero(offsetof(BlockQ8_0, qs), 32); break;
      case T::Q4_K: zero(offsetof(BlockQ4_K, qs), 128); break;
      case T::Q5_K: zero(offsetof(BlockQ5_K, qh), 32 + 128); break;
      case T::Q6_K: zero(offsetof(BlockQ6_K, ql), 128 + 64); break;
      default: zero(0, size_t(q.block_bytes)); break;
    }
  }
  return row;
}

std::vector<float> dequant_ref(T t, const void* p, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  tr(t).to_float_ref(p, out.data(), n);
  return out;
}

std::vector<float> random_floats(int64_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> g(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = g(rng);
  return v;
}

// An activation row of type `at` (the weight's vec_dot_type): quantized with the
// reference, or for `exact`, small integers with unit scales.
std::vector<uint8_t> activation_row(T at, int64_t n, std::mt19937& rng, bool exact) {
  std::vector<uint8_t> a(row_bytes(at, n));
  if (!exact) {
    auto x = random_floats(n, rng);
    tr(at).from_float_ref(x.data(), a.data(), n);
    return a;
  }
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = float(int(rng() % 31) - 15);
  // Scales of 1: pin one element per block to 127 (so amax = 127, d = 1) then
  // quantize with the reference; q = x exactly since x is an integer.
  const int be = tr(at).block_elems;
  if (at == T::Q8_K) {  // d = max/-127: make the extreme element -127 so d = 1
    for (int64_t i = 0; i < n; i += be) x[size_t(i)] = -127.0f;
  } else if (be > 1) {
    for (int64_t i = 0; i < n; i += be) x[size_t(i)] = 127.0f;
  }
  tr(at).from_float_ref(x.data(), a.data(), n);
  return a;
}

// Bound on |fast - ref| for one dot product of n elements. Both paths sum
// terms whose magnitudes are bounded by S = sum_i (|w_i - mu_i| + |mu_i|) |a_i|
// (+ sum_b |mu_b| |s_b| for Q8_1, whose s is stored rounded). The reference
// sums in double and rounds once (error <= u*S); each fast kernel keeps float
// partial sums whose longest chain of additions is <= n/8 + 16 (one per block
// or per 8 floats, plus lane reductions and <= 4 roundings per term), so its
// error is <= (n/8 + 16) u S. Hence tol = (n/8 + 24) u S with u = 2^-24.
double tolerance(T wt, const uint8_t* w, const uint8_t* a, int64_t n) {
  const T at = tr(wt).vec_dot_type;
  const std::vector<uint8_t> wrow(w, w + row_bytes(wt, n));
  const auto wf = dequant_ref(wt, wrow.data(), n);
  const auto mu = dequant_ref(wt, zero_quants(wt, wrow).data(), n);
  const auto af = dequant_ref(at, a, n);
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i)
    s += (std::fabs(double(wf[size_t(i)]) - mu[size_t(i)]) + std::fabs(mu[size_t(i)])) * std::fabs(af[size_t(i)]);
  if (at == T::Q8_1)
    for (int64_t b = 0; b < n / QK; ++b) {
      uint16_t sh;
      std::memcpy(&sh, a + b * sizeof(BlockQ8_1) + offsetof(BlockQ8_1, s), 2);
      s += std::fabs(mu[size_t(b * QK)]) * std::fabs(fp16_to_f32(sh));
    }
  return (double(n) / 8.0 + 24.0) * std::ldexp(1.0, -24) * s;
}

bool have_fast() { return detected_simd_level() >= SimdLevel::avx2; }

// ---------------------------------------------------------------- quantize_row

std::vector<float> tricky_floats(int64_t n, std::mt19937& rng, int variant) {
  std::vector<float> x = random_floats(n, rng, variant == 1 ? 1e-3f : variant == 2 ? 300.0f : 1.0f);
  if (variant == 3) {
    // Exact halves: with amax = 127 per block, d = 1 and x*id = x.
    for (int64_t i = 0; i < n; ++i) x[size_t(i)] = float(int(rng() % 254) - 127) + ((rng() & 1) ? 0.5f : -0.5f);
    for (int64_t i = 0; i < n; i += 32) x[size_t(i)] = (rng() & 1) ? 127.0f : -127.0f;
  } else if (variant == 4) {
    // All-zero blocks and ties between +amax and -amax.
    for (int64_t i = 0; i < n; ++i) x[size_t(i)] = (i / 32) % 2 ? 0.0f : x[size_t(i)];
    for (int64_t i = 0; i + 40 < n; i += 256) {
      x[size_t(i + 3)] = -5.0f;
      x[size_t(i + 40)] = 5.0f;
    }
  }
  return x;
}

TEST(MatmulKernels, QuantizeRowBitIdentical) {
  if (!have_fast()) GTEST_SKIP() << "no SIMD kernels on this CPU";
  std::mt19937 rng(1);
  const T types[] = {T::Q8_0, T::Q8_1, T::Q8_K, T::F16, T::BF16, T::F32};
  for (T t : types) {
    const bool k = t == T::Q8_K;
    const std::vector<int64_t> sizes = k ? std::vector<int64_t>{256, 512, 1536} : std::vector<int64_t>{32, 64, 96, 576, 1536};
    for (int64_t n : sizes)
      for (int variant = 0; variant < 5; ++variant) {
        const auto x = tricky_floats(n, rng, variant);
        std::vector<uint8_t> fast(row_bytes(t, n)), ref(row_bytes(t, n));
        quantize_row(t, x.data(), fast.data(), n, kFast);
        tr(t).from_float_ref(x.data(), ref.data(), n);
        EXPECT_EQ(0, std::memcmp(fast.data(), ref.data(), ref.size()))
            << ggml_type_name(t) << " n=" << n << " variant=" << variant;
      }
  }
}

// ---------------------------------------------------------------- dequantize_row

TEST(MatmulKernels, DequantizeRowBitIdentical) {
  if (!have_fast()) GTEST_SKIP() << "no SIMD kernels on this CPU";
  std::mt19937 rng(2);
  for (T t : all_weight_types())
    for (int64_t n : cols_for(t)) {
      const auto row = random_row(t, n, rng);
      std::vector<float> fast(static_cast<size_t>(n)), ref(static_cast<size_t>(n));
      dequantize_row(t, row.data(), fast.data(), n, kFast);
      tr(t).to_float_ref(row.data(), ref.data(), n);
      EXPECT_EQ(0, std::memcmp(fast.data(), ref.data(), ref.size() * 4)) << ggml_type_name(t) << " n=" << n;
    }
}

// ---------------------------------------------------------------- vec_dot

TEST(MatmulKernels, VecDotWithinBound) {
  std::mt19937 rng(3);
  for (T t : all_weight_types())
    for (int64_t n : cols_for(t))
      for (int rep = 0; rep < 4; ++rep) {
        const auto w = random_row(t, n, rng);
        const auto a = activation_row(tr(t).vec_dot_type, n, rng, false);
        const float ref = tr(t).vec_dot_ref(n, w.data(), a.data());
        const float fast = vec_dot(t, n, w.data(), a.data(), kFast);
        EXPECT_NEAR(fast, ref, tolerance(t, w.data(), a.data(), n)) << ggml_type_name(t) << " n=" << n;
      }
}

// With unit scales and small integers every partial sum is an integer below
// 2^24, so any summation order is exact: integer dots must match bit for bit.
TEST(MatmulKernels, VecDotIntegerExact) {
  std::mt19937 rng(4);
  for (T t : all_weight_types())
    for (int64_t n : cols_for(t))
      for (int rep = 0; rep < 4; ++rep) {
        const auto w = random_row(t, n, rng, true);
        const auto a = activation_row(tr(t).vec_dot_type, n, rng, true);
        EXPECT_EQ(vec_dot(t, n, w.data(), a.data(), kFast), tr(t).vec_dot_ref(n, w.data(), a.data()))
            << ggml_type_name(t) << " n=" << n;
      }
}

// ---------------------------------------------------------------- matmul

void check_matmul(T t, int64_t rows, int64_t cols, int64_t tokens, uint64_t pad, ThreadPool& pool, std::mt19937& rng) {
  const uint64_t rb = row_bytes(t, cols) + pad;
  std::vector<uint8_t> wbytes(size_t(rb * uint64_t(rows)));
  for (int64_t r = 0; r < rows; ++r) {
    const auto row = random_row(t, cols, rng);
    std::memcpy(wbytes.data() + uint64_t(r) * rb, row.data(), row.size());
  }
  const WeightView w{t, rows, cols, wbytes.data(), rb};
  const auto x = random_floats(cols * tokens, rng);
  std::vector<float> y_fast(size_t(rows * tokens), -1.0f), y_ref(size_t(rows * tokens), -2.0f),
      y_scalar(size_t(rows * tokens), -3.0f);
  matmul(w, x.data(), y_fast.data(), tokens, pool, kFast);
  matmul_ref(w, x.data(), y_ref.data(), tokens);
  matmul(w, x.data(), y_scalar.data(), tokens, pool, SimdLevel::scalar);
  const T at = tr(t).vec_dot_type;
  std::vector<uint8_t> a(row_bytes(at, cols));
  for (int64_t tk = 0; tk < tokens; ++tk) {
    tr(at).from_float_ref(x.data() + tk * cols, a.data(), cols);
    for (int64_t r = 0; r < rows; ++r) {
      const size_t i = size_t(tk * rows + r);
      // The scalar level runs the very same reference arithmetic.
      ASSERT_EQ(y_scalar[i], y_ref[i]) << ggml_type_name(t) << " r=" << r << " t=" << tk;
      ASSERT_NEAR(y_fast[i], y_ref[i], tolerance(t, wbytes.data() + uint64_t(r) * rb, a.data(), cols))
          << ggml_type_name(t) << " rows=" << rows << " cols=" << cols << " tokens=" << tokens << " r=" << r
          << " t=" << tk;
    }
  }
}

TEST(MatmulKernels, MatmulMatchesReference) {
  std::mt19937 rng(5);
  ThreadPool pool2(2), pool3(3);
  const int64_t row_counts[] = {1, 3, 17, 33};
  const int64_t token_counts[] = {1, 2, 5, 17, 64};
  for (T t : all_weight_types())
    for (int64_t cols : cols_for(t))
      for (int64_t rows : row_counts)
        for (int64_t tokens : token_counts) check_matmul(t, rows, cols, tokens, 0, (rows + tokens) % 2 ? pool3 : pool2, rng);
}

TEST(MatmulKernels, MatmulLargeAndPaddedRows) {
  std::mt19937 rng(6);
  ThreadPool pool(2);
  // Default-model shapes (smaller token counts) and a padded row stride.
  check_matmul(T::Q4_1, 192, 576, 70, 0, pool, rng);
  check_matmul(T::Q4_1, 576, 1536, 9, 0, pool, rng);
  check_matmul(T::Q8_0, 300, 576, 1, 0, pool, rng);
  check_matmul(T::Q8_0, 65, 576, 130, 0, pool, rng);
  check_matmul(T::Q4_1, 40, 96, 33, 12, pool, rng);
  check_matmul(T::Q8_0, 40, 96, 1, 2, pool, rng);
  check_matmul(T::Q6_K, 21, 512, 3, 8, pool, rng);
}

}  // namespace
}  // namespace kvq

namespace kvq {
namespace {

// Several weights on one input (Q/K/V, gate/up) must give exactly what separate
// matmul calls give: the same kernels run on the same rows, only the
// parallel split differs, and each row's sum does not depend on it.
TEST(MatmulKernels, SharedInputEqualsSeparateCalls) {
  std::mt19937 rng(9);
  ThreadPool pool(2), pool3(3);
  const int64_t cols = 576;
  for (T t : {T::Q4_1, T::Q8_0, T::Q4_0, T::F16})
    for (int64_t tokens : {1, 2, 4, 5, 9}) {
      const int64_t rows[3] = {37, 16, 5};
      std::vector<std::vector<uint8_t>> bytes(3);
      std::vector<WeightView> w(3);
      for (int i = 0; i < 3; ++i) {
        for (int64_t r = 0; r < rows[i]; ++r) {
          const auto row = random_row(t, cols, rng);
          bytes[i].insert(bytes[i].end(), row.begin(), row.end());
        }
        w[i] = WeightView{t, rows[i], cols, bytes[i].data(), row_bytes(t, cols)};
      }
      const auto x = random_floats(cols * tokens, rng);
      std::vector<std::vector<float>> fused(3), separate(3);
      MatmulOutput outs[3];
      for (int i = 0; i < 3; ++i) {
        fused[i].assign(size_t(rows[i] * tokens), -1.0f);
        separate[i].assign(size_t(rows[i] * tokens), -2.0f);
        outs[i] = {&w[i], fused[i].data()};
        matmul(w[i], x.data(), separate[i].data(), tokens, pool, kFast);
      }
      matmul_shared_input(outs, 3, x.data(), tokens, tokens % 2 ? pool3 : pool, kFast);
      for (int i = 0; i < 3; ++i)
        for (size_t j = 0; j < fused[i].size(); ++j)
          ASSERT_EQ(fused[i][j], separate[i][j]) << ggml_type_name(t) << " tokens=" << tokens << " out " << i << " at " << j;
    }
}

}  // namespace
}  // namespace kvq

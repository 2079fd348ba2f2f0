// AVX2/FMA/F16C kernels for the weight formats. Every function here has a
// scalar reference (quant_ref) that tests compare it with.
//
// Integer dot products: weights are unpacked to bytes, activations are int8;
// _mm256_maddubs_epi16 multiplies an unsigned byte operand with a signed one and
// adds adjacent pairs to int16, _mm256_madd_epi16 then widens pairs to int32.
// Unsigned weights (Q4_1, Q5_1, K-quants) feed maddubs directly; signed ones
// (Q8_0, Q4_0, Q5_0) use |w| as the unsigned operand and move w's sign onto the
// activation (_mm256_sign_epi8). Neither overflows int16: |pair| <= 2*255*127
// would, but our unsigned values are <= 63 and |w| <= 128 with |a| <= 127
// (Q8_0/Q8_1 activations never hold -128), so |pair| <= 2*128*127 = 32512.
#include <immintrin.h>

#include "base/avx2_reduce.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "base/fp16.h"
#include "quant/blocks.h"
#include "quant/quant_simd.h"

namespace kvq::simd {

namespace {

using avx2::hmax;
using avx2::hsum;


// ---------------------------------------------------------------- helpers

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }  // exact, like fp16_to_f32

inline int hsum_i32(__m256i v) {
  __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 1));
  return _mm_cvtsi128_si32(x);
}

// Keeps the compiler from fusing a multiply with a later add into an FMA:
// the references round twice and dequantization must match them bit for bit.
inline __m256 no_fuse(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

// roundf() semantics (half away from zero), exactly: t = trunc(v) and v - t is
// exact, so the comparison with 0.5 decides the same way roundf does.
inline __m256 round_half_away(__m256 v) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
  const __m256 ge = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  const __m256 one = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0f));
  return _mm256_add_ps(t, _mm256_and_ps(ge, one));
}

// Four vectors of int32 (each in int8 range) -> 32 int8 in element order.
inline __m256i pack_i32x4_to_i8(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
  const __m256i p01 = _mm256_packs_epi32(i0, i1);
  const __m256i p23 = _mm256_packs_epi32(i2, i3);
  const __m256i p = _mm256_packs_epi16(p01, p23);
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 16 packed nibbles -> 32 bytes: low nibbles are elements 0..15, high 16..31.
// (Broadcast load + per-lane variable shift: one ALU op fewer than insert+shift.)
inline __m256i unpack_nibbles(const uint8_t* qs) {
  const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  return _mm256_and_si256(_mm256_srlv_epi64(x, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

// Eight blocks' int32 partial-sum vectors -> one vector of the 8 block sums
// (in block order). Lets decode scale 8 blocks with one cvt and one FMA.
inline __m256i reduce8_i32(const __m256i s[8]) {
  const __m256i q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
  const __m256i q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20), _mm256_permute2x128_si256(q0, q1, 0x31));
}

// Scale fields of 8 consecutive blocks (stride bytes apart) -> floats. With
// kPair, each block starts with two fp16 (d, m or d, s): returns d in *first
// and the second field in *second; otherwise only d.
template <bool kPair>
inline void load_scales8(const uint8_t* p, size_t stride, __m256* first, __m256* second) {
  if constexpr (kPair) {
    uint32_t v[8];
    for (int j = 0; j < 8; ++j) std::memcpy(&v[j], p + j * stride, 4);
    const __m256i pk = _mm256_setr_epi32(int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5]), int(v[6]),
                                         int(v[7]));
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256 a = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(pk)), idx);
    const __m256 b = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(pk, 1)), idx);
    *first = _mm256_permute2f128_ps(a, b, 0x20);
    *second = _mm256_permute2f128_ps(a, b, 0x31);
  } else {
    uint16_t v[8];
    for (int j = 0; j < 8; ++j) std::memcpy(&v[j], p + j * stride, 2);
    *first = _mm256_cvtph_ps(_mm_setr_epi16(short(v[0]), short(v[1]), short(v[2]), short(v[3]), short(v[4]),
                                            short(v[5]), short(v[6]), short(v[7])));
  }
}

// 32 bits -> 32 bytes: byte j is 0xFF if bit j is set.
inline __m256i expand_bits(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), shuf);
  const __m256i mask = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, mask), mask);
}

inline __m256i ones16() { return _mm256_set1_epi16(1); }

// Sum of products of unsigned bytes u with signed bytes s, as 8 int32.
inline __m256i dot_us(__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones16()); }
// Same for two signed operands (|w| <= 128, |a| <= 127).
inline __m256i dot_ss(__m256i w, __m256i a) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)), ones16());
}

template <class T>
inline const T* row_at(const void* base, uint64_t stride, int64_t i) {
  return reinterpret_cast<const T*>(static_cast<const uint8_t*>(base) + uint64_t(i) * stride);
}

// Per-thread scratch that only grows, so steady-state calls do not allocate.
template <class T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}
thread_local std::vector<float> tl_floats;
struct alignas(32) Vec32 { uint8_t b[32]; };
thread_local std::vector<Vec32> tl_vecs;

// ---------------------------------------------------------------- quantize

// q = roundf(x / d) with d = amax / 127 (stored as fp16), id = 1 / d.
// Returns the block's sum of q and the unrounded d (for Q8_1).
inline int quantize_block_q8(const float* x, uint16_t* d_out, int8_t* qs, float* d_f32 = nullptr) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4];
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
  }
  const float amax = hmax(m);
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  *d_out = f32_to_fp16(d);
  if (d_f32) *d_f32 = d;
  const __m256 vid = _mm256_set1_ps(id);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(round_half_away(_mm256_mul_ps(v[i], vid)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), pack_i32x4_to_i8(q[0], q[1], q[2], q[3]));
  return hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
}

void quantize_row_q8_0(const float* x, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ8_0*>(dst);
  for (int64_t i = 0; i < n / QK; ++i) quantize_block_q8(x + i * QK, &y[i].d, y[i].qs);
}

void quantize_row_q8_1(const float* x, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ8_1*>(dst);
  for (int64_t i = 0; i < n / QK; ++i) {
    float d;
    const int sum = quantize_block_q8(x + i * QK, &y[i].d, y[i].qs, &d);
    // s = d * sum with the unrounded d, as the reference does.
    y[i].s = f32_to_fp16(d * float(sum));
  }
}

// Q8_K: one scale per 256; d = max / -127 where max is the element of largest
// magnitude (first one on ties), q = nearest-even(x * (-127 / max)) capped at 127.
void quantize_row_q8_k(const float* x, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ8_K*>(dst);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K) {
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < QK_K; j += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask));
    const float amax = hmax(m);
    if (amax == 0.0f) {
      y[i].d = 0.0f;
      std::memset(y[i].qs, 0, sizeof(y[i].qs));
      std::memset(y[i].bsums, 0, sizeof(y[i].bsums));
      continue;
    }
    float max = 0.0f;
    const __m256 vamax = _mm256_set1_ps(amax);
    for (int j = 0; j < QK_K; j += 8) {
      const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask), vamax, _CMP_EQ_OQ));
      if (hit) {
        max = x[j + __builtin_ctz(unsigned(hit))];
        break;
      }
    }
    const float iscale = -127.0f / max;
    const __m256 vis = _mm256_set1_ps(iscale);
    const __m256i cap = _mm256_set1_epi32(127);
    for (int j = 0; j < QK_K; j += 32) {
      __m256i q[4];
      for (int k = 0; k < 4; ++k)
        q[k] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * k), vis)), cap);
      const __m256i packed = pack_i32x4_to_i8(q[0], q[1], q[2], q[3]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[i].qs + j), packed);
      // bsums of the two groups of 16
      const __m256i s01 = _mm256_add_epi32(q[0], q[1]), s23 = _mm256_add_epi32(q[2], q[3]);
      y[i].bsums[j / 16] = int16_t(hsum_i32(s01));
      y[i].bsums[j / 16 + 1] = int16_t(hsum_i32(s23));
    }
    y[i].d = 1.0f / iscale;
  }
}

void quantize_row_f16(const float* x, void* dst, int64_t n) {
  auto* y = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) y[i] = f32_to_fp16(x[i]);
}

void quantize_row_bf16(const float* x, void* dst, int64_t n) {
  auto* y = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i r = _mm256_blendv_epi8(rounded, quiet, is_nan);
    // 8 x int32 (each < 65536) -> 8 x uint16
    const __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm_packus_epi32(lo, hi));
  }
  for (; i < n; ++i) y[i] = f32_to_bf16(x[i]);
}

void quantize_row_f32(const float* x, void* dst, int64_t n) { std::memcpy(dst, x, size_t(n) * sizeof(float)); }

// ---------------------------------------------------------------- dequantize

void dequantize_row_q8_0(const void* src, float* y, int64_t n) {
  const auto* x = static_cast<const BlockQ8_0*>(src);
  for (int64_t i = 0; i < n / QK; ++i, y += QK) {
    const __m256 d = _mm256_set1_ps(h2f(x[i].d));
    for (int j = 0; j < QK; j += 8) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x[i].qs + j));
      _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
    }
  }
}

// Dequantizes 32 unsigned bytes q as q * d + m (two roundings) or, with m
// absent, (q - off) * d.
inline void store_scaled_u8(__m256i q, __m256 d, __m256 m, bool has_min, int off, float* y) {
  const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
  const __m256i voff = _mm256_set1_epi32(off);
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 2; ++k) {
      __m256i v = _mm256_cvtepu8_epi32(k == 0 ? halves[h] : _mm_srli_si128(halves[h], 8));
      if (!has_min) v = _mm256_sub_epi32(v, voff);
      __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), d);
      if (has_min) f = _mm256_add_ps(no_fuse(f), m);
      _mm256_storeu_ps(y + 16 * h + 8 * k, f);
    }
}

void dequantize_row_q4_0(const void* src, float* y, int64_t n) {
  const auto* x = static_cast<const BlockQ4_0*>(src);
  for (int64_t i = 0; i < n / QK; ++i, y += QK)
    store_scaled_u8(unpack_nibbles(x[i].qs), _mm256_set1_ps(h2f(x[i].d)), _mm256_setzero_ps(), false, 8, y);
}

void dequantize_row_q4_1(const void* src, float* y, int64_t n) {
  const auto* x = static_cast<const BlockQ4_1*>(src);
  for (int64_t i = 0; i < n / QK; ++i, y += QK)
    store_scaled_u8(unpack_nibbles(x[i].qs), _mm256_set1_ps(h2f(x[i].d)), _mm256_set1_ps(h2f(x[i].m)), true, 0, y);
}

void dequantize_row_f16(const void* src, float* y, int64_t n) {
  const auto* x = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  for (; i < n; ++i) y[i] = fp16_to_f32(x[i]);
}

inline __m256 load_bf16x8(const uint16_t* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

void dequantize_row_bf16(const void* src, float* y, int64_t n) {
  const auto* x = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, load_bf16x8(x + i));
  for (; i < n; ++i) y[i] = bf16_to_f32(x[i]);
}

void dequantize_row_f32(const void* src, float* y, int64_t n) { std::memcpy(y, src, size_t(n) * sizeof(float)); }

// ---------------------------------------------------------------- single-row dots, legacy types

// R weight rows against one activation row. Q4_1 x Q8_1:
// sum = sum_b d_w d_a sum(q_w q_a) + m_w s_a.
// How far ahead a weight row stream is requested. A thread's rows are
// contiguous, so 8 KiB ahead reaches into the rows it takes next (a row is
// 360-960 bytes here); nearer and farther both measured slower
// (docs/BENCHMARKS.md, "Kernel choices").
constexpr int kPrefetchBytes = 8192;

template <int R>
void rows_q4_1_q8_1(int64_t nb, const BlockQ4_1* const* w, const BlockQ8_1* a, float* out) {
  __m256 acc[R];
  __m128 mins[R];
  // (Reducing 8 blocks at once with reduce8_i32 measured slower here than
  // scaling each block: the unpacking already keeps the vector ports busy.)
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    mins[r] = _mm_setzero_ps();
  }
  int64_t b = 0;
  for (; b < nb; ++b) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].qs));
    uint32_t ads;
    std::memcpy(&ads, &a[b], 4);
    const __m128 da_sa = _mm_cvtph_ps(_mm_cvtsi32_si128(int(ads)));  // [d_a, s_a, 0, 0]
    for (int r = 0; r < R; ++r) {
      const BlockQ4_1& blk = w[r][b];
      // Stream ahead: rows are read once per token, from memory.
      _mm_prefetch(reinterpret_cast<const char*>(&w[r][b]) + kPrefetchBytes, _MM_HINT_T0);
      uint32_t dm;
      std::memcpy(&dm, &blk, 4);
      const __m128 sc = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(int(dm))), da_sa);  // [d d_a, m s_a]
      const __m256i s = dot_us(unpack_nibbles(blk.qs), av);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcastss_ps(sc), acc[r]);
      mins[r] = _mm_add_ps(mins[r], sc);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + _mm_cvtss_f32(_mm_shuffle_ps(mins[r], mins[r], 1));
}

// Q8_0 x Q8_0: sum = sum_b d_w d_a sum(q_w q_a).
template <int R>
void rows_q8_0_q8_0(int64_t nb, const BlockQ8_0* const* w, const BlockQ8_0* a, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256 da;
    load_scales8<false>(reinterpret_cast<const uint8_t*>(a + b), sizeof(BlockQ8_0), &da, nullptr);
    for (int r = 0; r < R; ++r) {
      // 8 blocks = 272 bytes = ~4.25 lines per row per step: stream ahead.
      const char* ahead = reinterpret_cast<const char*>(w[r] + b) + kPrefetchBytes;
      for (int line = 0; line < 5; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
      __m256i s[8];
      for (int j = 0; j < 8; ++j)
        s[j] = dot_ss(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r][b + j].qs)),
                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b + j].qs)));
      __m256 dw;
      load_scales8<false>(reinterpret_cast<const uint8_t*>(w[r] + b), sizeof(BlockQ8_0), &dw, nullptr);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8_i32(s)), _mm256_mul_ps(dw, da), acc[r]);
    }
  }
  for (; b < nb; ++b) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].qs));
    const float da = h2f(a[b].d);
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r][b].qs));
      const __m256 d = _mm256_set1_ps(h2f(w[r][b].d) * da);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_ss(wv, av)), d, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

float vec_dot_q4_1_q8_1(int64_t n, const void* w, const void* a) {
  const auto* wr = static_cast<const BlockQ4_1*>(w);
  float out;
  rows_q4_1_q8_1<1>(n / QK, &wr, static_cast<const BlockQ8_1*>(a), &out);
  return out;
}

float vec_dot_q8_0_q8_0(int64_t n, const void* w, const void* a) {
  const auto* wr = static_cast<const BlockQ8_0*>(w);
  float out;
  rows_q8_0_q8_0<1>(n / QK, &wr, static_cast<const BlockQ8_0*>(a), &out);
  return out;
}

float vec_dot_q4_0_q8_0(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ4_0*>(w);
  const auto* y = static_cast<const BlockQ8_0*>(a);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / QK; ++b) {
    const __m256i q = _mm256_sub_epi8(unpack_nibbles(x[b].qs), _mm256_set1_epi8(8));
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_ss(q, av)), _mm256_set1_ps(h2f(x[b].d) * h2f(y[b].d)), acc);
  }
  return hsum(acc);
}

float vec_dot_q5_0_q8_0(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ5_0*>(w);
  const auto* y = static_cast<const BlockQ8_0*>(a);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / QK; ++b) {
    // q - 16 with the 5th bit: nibble - 16 if bit clear, nibble if set.
    const __m256i hi = _mm256_andnot_si256(expand_bits(x[b].qh), _mm256_set1_epi8(16));
    const __m256i q = _mm256_sub_epi8(unpack_nibbles(x[b].qs), hi);
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_ss(q, av)), _mm256_set1_ps(h2f(x[b].d) * h2f(y[b].d)), acc);
  }
  return hsum(acc);
}

float vec_dot_q5_1_q8_1(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ5_1*>(w);
  const auto* y = static_cast<const BlockQ8_1*>(a);
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  for (int64_t b = 0; b < n / QK; ++b) {
    const __m256i hi = _mm256_and_si256(expand_bits(x[b].qh), _mm256_set1_epi8(16));
    const __m256i q = _mm256_or_si256(unpack_nibbles(x[b].qs), hi);
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(q, av)), _mm256_set1_ps(h2f(x[b].d) * h2f(y[b].d)), acc);
    mins += h2f(x[b].m) * h2f(y[b].s);
  }
  return hsum(acc) + mins;
}

// ---------------------------------------------------------------- k-quants x Q8_K

// 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
inline void k_scale_min(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = uint8_t((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Q4_K / Q5_K: x = d sc_j q - dmin m_j per sub-block j of 32.
template <bool kFive>
float vec_dot_q45_k(int64_t n, const void* w, const void* a) {
  const auto* y = static_cast<const BlockQ8_K*>(a);
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const uint8_t *scales, *qs, *qh = nullptr;
    uint16_t dh, dminh;
    if constexpr (kFive) {
      const auto& x = static_cast<const BlockQ5_K*>(w)[i];
      scales = x.scales, qs = x.qs, qh = x.qh, dh = x.d, dminh = x.dmin;
    } else {
      const auto& x = static_cast<const BlockQ4_K*>(w)[i];
      scales = x.scales, qs = x.qs, dh = x.d, dminh = x.dmin;
    }
    uint8_t sc[8], m[8];
    int summ = 0;
    for (int j = 0; j < 8; ++j) {
      k_scale_min(j, scales, &sc[j], &m[j]);
      summ += m[j] * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
    }
    const __m256i hb = kFive ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh)) : _mm256_setzero_si256();
    __m256i isum = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
      __m256i lo = _mm256_and_si256(q, low4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
      if constexpr (kFive) {
        const __m256i b0 = _mm256_set1_epi8(char(1 << (2 * j))), b1 = _mm256_set1_epi8(char(2 << (2 * j)));
        const __m256i sixteen = _mm256_set1_epi8(16);
        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, b0), b0), sixteen));
        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, b1), b1), sixteen));
      }
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[i].qs + 64 * j));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[i].qs + 64 * j + 32));
      const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_set1_epi16(sc[2 * j]));
      const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a1), _mm256_set1_epi16(sc[2 * j + 1]));
      isum = _mm256_add_epi32(isum, _mm256_add_epi32(p0, p1));
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(dh) * y[i].d), _mm256_cvtepi32_ps(isum), acc);
    mins += h2f(dminh) * y[i].d * float(summ);
  }
  return hsum(acc) - mins;
}

// Q6_K: x = d sc_g (q - 32) per group g of 16; sum(q - 32) a = sum q a - 32 bsum.
float vec_dot_q6_k(int64_t n, const void* w, const void* a) {
  const auto* x = static_cast<const BlockQ6_K*>(w);
  const auto* y = static_cast<const BlockQ8_K*>(a);
  __m256 acc = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const int8_t* sc = x[i].scales;
    __m256i isum = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = x[i].ql + 64 * h;
      const uint8_t* qh = x[i].qh + 32 * h;
      const int8_t* aq = y[i].qs + 128 * h;
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
      __m256i q[4];
      q[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
      q[1] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(hb, m30));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                             _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
      for (int k = 0; k < 4; ++k) {
        const int g = 8 * h + 2 * k;  // groups g, g+1 cover these 32 elements
        const __m256i scv = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(sc[g])),
                                                    _mm_set1_epi16(sc[g + 1]), 1);
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq + 32 * k));
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], av), scv));
      }
    }
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
    const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[i].bsums));
    isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * y[i].d), _mm256_cvtepi32_ps(isum), acc);
  }
  return hsum(acc);
}

// ---------------------------------------------------------------- float dots

template <class LoadW, class LoadA, class ScalarW, class ScalarA>
inline float float_dot(int64_t n, LoadW lw, LoadA la, ScalarW sw, ScalarA sa) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_fmadd_ps(lw(i + 8 * k), la(i + 8 * k), acc[k]);
  for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(lw(i), la(i), acc[0]);
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) sum += sw(i) * sa(i);
  return sum;
}

inline auto f32_loader(const void* p) {
  const auto* f = static_cast<const float*>(p);
  return [f](int64_t i) { return _mm256_loadu_ps(f + i); };
}
inline auto f16_loader(const void* p) {
  const auto* h = static_cast<const uint16_t*>(p);
  return [h](int64_t i) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))); };
}
inline auto bf16_loader(const void* p) {
  const auto* h = static_cast<const uint16_t*>(p);
  return [h](int64_t i) { return load_bf16x8(h + i); };
}
inline auto f32_scalar(const void* p) {
  const auto* f = static_cast<const float*>(p);
  return [f](int64_t i) { return f[i]; };
}
inline auto f16_scalar(const void* p) {
  const auto* h = static_cast<const uint16_t*>(p);
  return [h](int64_t i) { return fp16_to_f32(h[i]); };
}
inline auto bf16_scalar(const void* p) {
  const auto* h = static_cast<const uint16_t*>(p);
  return [h](int64_t i) { return bf16_to_f32(h[i]); };
}

float vec_dot_f32_f32(int64_t n, const void* w, const void* a) {
  return float_dot(n, f32_loader(w), f32_loader(a), f32_scalar(w), f32_scalar(a));
}
float vec_dot_f16_f16(int64_t n, const void* w, const void* a) {
  return float_dot(n, f16_loader(w), f16_loader(a), f16_scalar(w), f16_scalar(a));
}
float vec_dot_f16_f32(int64_t n, const void* w, const void* a) {
  return float_dot(n, f16_loader(w), f32_loader(a), f16_scalar(w), f32_scalar(a));
}
float vec_dot_bf16_bf16(int64_t n, const void* w, const void* a) {
  return float_dot(n, bf16_loader(w), bf16_loader(a), bf16_scalar(w), bf16_scalar(a));
}
float vec_dot_bf16_f32(int64_t n, const void* w, const void* a) {
  return float_dot(n, bf16_loader(w), f32_loader(a), bf16_scalar(w), f32_scalar(a));
}

// ---------------------------------------------------------------- tiled GEMM (prefill)
//
// A call covers nr rows x nt tokens. Weight rows are unpacked once per group of
// kR rows into 32-byte vectors (plus float scales), then reused by every token
// group; activation scales are converted once per call. The microkernel keeps
// kR x kT accumulators of 8 lanes in registers; per (row, token, block) it
// issues maddubs, madd, cvt and one FMA with a precomputed d_w * d_a.

// Unsigned weights with a min (Q4_1, Q5_1) against Q8_1.
struct PolicyUnsignedMin {
  using ABlock = BlockQ8_1;
  static constexpr bool kHasMin = true;
  static __m256i idot(__m256i wv, __m256i av) { return dot_us(wv, av); }
};
// Signed weights (Q8_0, Q4_0, Q5_0) against Q8_0; the packed vector holds w.
struct PolicySigned {
  using ABlock = BlockQ8_0;
  static constexpr bool kHasMin = false;
  static __m256i idot(__m256i wv, __m256i av) { return dot_ss(wv, av); }
};

// Unpacks one weight row into 32-byte vectors and float scales (d, and m if
// the type has one).
template <class WBlock>
void pack_row(const WBlock* x, int64_t nb, __m256i* q, float* d, float* m);

template <>
void pack_row<BlockQ4_1>(const BlockQ4_1* x, int64_t nb, __m256i* q, float* d, float* m) {
  for (int64_t b = 0; b < nb; ++b) {
    q[b] = unpack_nibbles(x[b].qs);
    d[b] = h2f(x[b].d);
    m[b] = h2f(x[b].m);
  }
}
template <>
void pack_row<BlockQ5_1>(const BlockQ5_1* x, int64_t nb, __m256i* q, float* d, float* m) {
  for (int64_t b = 0; b < nb; ++b) {
    q[b] = _mm256_or_si256(unpack_nibbles(x[b].qs), _mm256_and_si256(expand_bits(x[b].qh), _mm256_set1_epi8(16)));
    d[b] = h2f(x[b].d);
    m[b] = h2f(x[b].m);
  }
}
template <>
void pack_row<BlockQ8_0>(const BlockQ8_0* x, int64_t nb, __m256i* q, float* d, float*) {
  for (int64_t b = 0; b < nb; ++b) {
    q[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
    d[b] = h2f(x[b].d);
  }
}
template <>
void pack_row<BlockQ4_0>(const BlockQ4_0* x, int64_t nb, __m256i* q, float* d, float*) {
  for (int64_t b = 0; b < nb; ++b) {
    q[b] = _mm256_sub_epi8(unpack_nibbles(x[b].qs), _mm256_set1_epi8(8));
    d[b] = h2f(x[b].d);
  }
}
template <>
void pack_row<BlockQ5_0>(const BlockQ5_0* x, int64_t nb, __m256i* q, float* d, float*) {
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i hi = _mm256_andnot_si256(expand_bits(x[b].qh), _mm256_set1_epi8(16));
    q[b] = _mm256_sub_epi8(unpack_nibbles(x[b].qs), hi);
    d[b] = h2f(x[b].d);
  }
}

constexpr int kTileR = 2;
constexpr int kTileT = 4;
static_assert(kTileR * kTileT == 8, "d products of one block fill one vector");

// kR rows (packed, row stride nb vectors) x kT tokens over all nb blocks.
// dd: per block, the 8 products d_w[r] * d_a[t] at [r * kTileT + t].
template <class P, int kR, int kT>
void micro(int64_t nb, int64_t nbp, const __m256i* wq, const float* dd, const typename P::ABlock* const* arow,
           const float* wm, const float* as, float* y, int64_t ldy) {
  // Flat array + forced unrolling: lets GCC keep every accumulator in a
  // register (with a 2-D array it kept storing them to the stack each block).
  __m256 acc[kR * kT];
#pragma GCC unroll 16
  for (int i = 0; i < kR * kT; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const float* ddb = dd + b * (kTileR * kTileT);
#pragma GCC unroll 8
    for (int t = 0; t < kT; ++t) {
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow[t][b].qs));
#pragma GCC unroll 8
      for (int r = 0; r < kR; ++r) {
        const __m256i s = P::idot(wq[r * nb + b], av);
        acc[r * kT + t] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(ddb + r * kTileT + t), acc[r * kT + t]);
      }
    }
  }
  if constexpr (P::kHasMin) {
    // sum_b m_w s_a, 8 blocks at a time (buffers are zero-padded to nbp).
    for (int64_t c = 0; c < nbp; c += 8) {
#pragma GCC unroll 8
      for (int r = 0; r < kR; ++r) {
        const __m256 mv = _mm256_loadu_ps(wm + r * nbp + c);
#pragma GCC unroll 8
        for (int t = 0; t < kT; ++t)
          acc[r * kT + t] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(as + t * nbp + c), acc[r * kT + t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < kT; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) y[t * ldy + r] = hsum(acc[r * kT + t]);
}

// Edge tiles (fewer rows or tokens) use smaller instantiations.
template <class P>
void call_micro(int r_n, int t_n, int64_t nb, int64_t nbp, const __m256i* wq, const float* dd,
                const typename P::ABlock* const* arow, const float* wm, const float* as, float* y, int64_t ldy) {
  static_assert(kTileR == 2 && kTileT == 4, "update the edge table");
  using Fn = void (*)(int64_t, int64_t, const __m256i*, const float*, const typename P::ABlock* const*, const float*,
                      const float*, float*, int64_t);
  static constexpr Fn table[kTileR][kTileT] = {
      {&micro<P, 1, 1>, &micro<P, 1, 2>, &micro<P, 1, 3>, &micro<P, 1, 4>},
      {&micro<P, 2, 1>, &micro<P, 2, 2>, &micro<P, 2, 3>, &micro<P, 2, 4>},
  };
  table[r_n - 1][t_n - 1](nb, nbp, wq, dd, arow, wm, as, y, ldy);
}

template <class WBlock, class P>
void gemm_tiled(int64_t k, const void* w, uint64_t w_stride, int64_t nr, const void* a, uint64_t a_stride, int64_t nt,
                float* y, int64_t ldy) {
  using ABlock = typename P::ABlock;
  const int64_t nb = k / QK;
  const int64_t nbp = (nb + 7) / 8 * 8;
  const int64_t ntg = (nt + kTileT - 1) / kTileT;
  // Float scratch: activation d per token group as [group][block][4 tokens]
  // and s as [token][nbp]; weight d and m per row ([kTileR][nbp]); the weight
  // d's of a row group spread as [block][r * kTileT + t]; d products likewise.
  float* fl = scratch(tl_floats, size_t(ntg * nb * kTileT + nt * nbp + 2 * kTileR * nbp + 2 * nb * 8));
  float* ad4 = fl;
  float* as = ad4 + ntg * nb * kTileT;
  float* wd = as + nt * nbp;
  float* wm = wd + kTileR * nbp;
  float* wdx = wm + kTileR * nbp;
  float* dd = wdx + nb * 8;
  __m256i* wq = reinterpret_cast<__m256i*>(scratch(tl_vecs, size_t(kTileR * nb)));
  for (int64_t t = 0; t < ntg * kTileT; ++t) {
    const ABlock* ab = t < nt ? row_at<ABlock>(a, a_stride, t) : nullptr;
    for (int64_t b = 0; b < nb; ++b) ad4[((t / kTileT) * nb + b) * kTileT + t % kTileT] = ab ? h2f(ab[b].d) : 0.0f;
    if (!ab) continue;
    for (int64_t b = 0; b < nbp; ++b)
      if constexpr (P::kHasMin) as[t * nbp + b] = b < nb ? h2f(ab[b].s) : 0.0f;
  }
  for (int64_t r0 = 0; r0 < nr; r0 += kTileR) {
    const int rn = int(std::min<int64_t>(kTileR, nr - r0));
    for (int r = 0; r < rn; ++r) {
      pack_row<WBlock>(row_at<WBlock>(w, w_stride, r0 + r), nb, wq + r * nb, wd + r * nbp, wm + r * nbp);
      for (int64_t b = nb; b < nbp; ++b) wd[r * nbp + b] = wm[r * nbp + b] = 0.0f;
    }
    for (int64_t b = 0; b < nb; ++b)
      for (int r = 0; r < kTileR; ++r)
        for (int t = 0; t < kTileT; ++t) wdx[b * 8 + r * kTileT + t] = r < rn ? wd[r * nbp + b] : 0.0f;
    for (int64_t tg = 0; tg < ntg; ++tg) {
      const int64_t t0 = tg * kTileT;
      const int tn = int(std::min<int64_t>(kTileT, nt - t0));
      const ABlock* arow[kTileT];
      for (int t = 0; t < tn; ++t) arow[t] = row_at<ABlock>(a, a_stride, t0 + t);
      const float* adg = ad4 + tg * nb * kTileT;
      for (int64_t b = 0; b < nb; ++b)
        _mm256_storeu_ps(dd + b * 8, _mm256_mul_ps(_mm256_loadu_ps(wdx + b * 8), _mm256_broadcast_ps(
                                                                                   reinterpret_cast<const __m128*>(adg + b * kTileT))));
      call_micro<P>(rn, tn, nb, nbp, wq, dd, arow, wm, as + t0 * nbp, y + t0 * ldy + r0, ldy);
    }
  }
}

// Decode: one token, stream R weight rows at a time straight from memory.
template <class WBlock, class ABlock, int R, void (*Rows)(int64_t, const WBlock* const*, const ABlock*, float*),
          void (*Rows1)(int64_t, const WBlock* const*, const ABlock*, float*)>
void gemm_rows(int64_t k, const void* w, uint64_t w_stride, int64_t nr, const void* a, uint64_t a_stride,
               int64_t nt, float* y, int64_t ldy) {
  const int64_t nb = k / QK;
  for (int64_t t = 0; t < nt; ++t) {
    const ABlock* at = row_at<ABlock>(a, a_stride, t);
    int64_t r = 0;
    for (; r + R <= nr; r += R) {
      const WBlock* rows[R];
      for (int i = 0; i < R; ++i) rows[i] = row_at<WBlock>(w, w_stride, r + i);
      Rows(nb, rows, at, y + t * ldy + r);
    }
    for (; r < nr; ++r) {
      const WBlock* row = row_at<WBlock>(w, w_stride, r);
      Rows1(nb, &row, at, y + t * ldy + r);
    }
  }
}

template <class WBlock, class P, class DecodeFn>
void gemm_dispatch(int64_t k, const void* w, uint64_t w_stride, int64_t nr, const void* a, uint64_t a_stride,
                   int64_t nt, float* y, int64_t ldy, DecodeFn decode) {
  if (nt == 1)
    decode(k, w, w_stride, nr, a, a_stride, nt, y, ldy);
  else
    gemm_tiled<WBlock, P>(k, w, w_stride, nr, a, a_stride, nt, y, ldy);
}

constexpr int kDecodeRows = 4;

void gemm_q4_1_q8_1(int64_t k, const void* w, uint64_t ws, int64_t nr, const void* a, uint64_t as, int64_t nt,
                    float* y, int64_t ldy) {
  gemm_dispatch<BlockQ4_1, PolicyUnsignedMin>(
      k, w, ws, nr, a, as, nt, y, ldy,
      &gemm_rows<BlockQ4_1, BlockQ8_1, kDecodeRows, &rows_q4_1_q8_1<kDecodeRows>, &rows_q4_1_q8_1<1>>);
}

void gemm_q8_0_q8_0(int64_t k, const void* w, uint64_t ws, int64_t nr, const void* a, uint64_t as, int64_t nt,
                    float* y, int64_t ldy) {
  gemm_dispatch<BlockQ8_0, PolicySigned>(
      k, w, ws, nr, a, as, nt, y, ldy,
      &gemm_rows<BlockQ8_0, BlockQ8_0, kDecodeRows, &rows_q8_0_q8_0<kDecodeRows>, &rows_q8_0_q8_0<1>>);
}

template <class WBlock, class P>
void gemm_tiled_only(int64_t k, const void* w, uint64_t ws, int64_t nr, const void* a, uint64_t as, int64_t nt,
                     float* y, int64_t ldy) {
  gemm_tiled<WBlock, P>(k, w, ws, nr, a, as, nt, y, ldy);
}

}  // namespace

// ---------------------------------------------------------------- lookups

ToFloatFn avx2_to_float(GgmlType type) {
  switch (type) {
    case GgmlType::Q8_0: return &dequantize_row_q8_0;
    case GgmlType::Q4_0: return &dequantize_row_q4_0;
    case GgmlType::Q4_1: return &dequantize_row_q4_1;
    case GgmlType::F16: return &dequantize_row_f16;
    case GgmlType::BF16: return &dequantize_row_bf16;
    case GgmlType::F32: return &dequantize_row_f32;
    default: return nullptr;
  }
}

FromFloatFn avx2_from_float(GgmlType type) {
  switch (type) {
    case GgmlType::Q8_0: return &quantize_row_q8_0;
    case GgmlType::Q8_1: return &quantize_row_q8_1;
    case GgmlType::Q8_K: return &quantize_row_q8_k;
    case GgmlType::F16: return &quantize_row_f16;
    case GgmlType::BF16: return &quantize_row_bf16;
    case GgmlType::F32: return &quantize_row_f32;
    default: return nullptr;
  }
}

VecDotFn avx2_vec_dot(GgmlType w, GgmlType a) {
  using T = GgmlType;
  if (w == T::Q4_1 && a == T::Q8_1) return &vec_dot_q4_1_q8_1;
  if (w == T::Q8_0 && a == T::Q8_0) return &vec_dot_q8_0_q8_0;
  if (w == T::Q4_0 && a == T::Q8_0) return &vec_dot_q4_0_q8_0;
  if (w == T::Q5_0 && a == T::Q8_0) return &vec_dot_q5_0_q8_0;
  if (w == T::Q5_1 && a == T::Q8_1) return &vec_dot_q5_1_q8_1;
  if (w == T::Q4_K && a == T::Q8_K) return &vec_dot_q45_k<false>;
  if (w == T::Q5_K && a == T::Q8_K) return &vec_dot_q45_k<true>;
  if (w == T::Q6_K && a == T::Q8_K) return &vec_dot_q6_k;
  if (w == T::F32 && a == T::F32) return &vec_dot_f32_f32;
  if (w == T::F16 && a == T::F16) return &vec_dot_f16_f16;
  if (w == T::F16 && a == T::F32) return &vec_dot_f16_f32;
  if (w == T::BF16 && a == T::BF16) return &vec_dot_bf16_bf16;
  if (w == T::BF16 && a == T::F32) return &vec_dot_bf16_f32;
  return nullptr;
}

GemmFn avx2_gemm(GgmlType w, GgmlType a) {
  using T = GgmlType;
  if (w == T::Q4_1 && a == T::Q8_1) return &gemm_q4_1_q8_1;
  if (w == T::Q8_0 && a == T::Q8_0) return &gemm_q8_0_q8_0;
  if (w == T::Q5_1 && a == T::Q8_1) return &gemm_tiled_only<BlockQ5_1, PolicyUnsignedMin>;
  if (w == T::Q4_0 && a == T::Q8_0) return &gemm_tiled_only<BlockQ4_0, PolicySigned>;
  if (w == T::Q5_0 && a == T::Q8_0) return &gemm_tiled_only<BlockQ5_0, PolicySigned>;
  return nullptr;
}

uint64_t avx2_read_bandwidth_probe(const void* p, uint64_t bytes) {
  const auto* v = static_cast<const __m256i*>(p);
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (uint64_t i = 0; i < bytes / 32; i += 4) {
    s0 = _mm256_add_epi64(s0, _mm256_load_si256(v + i));
    s1 = _mm256_add_epi64(s1, _mm256_load_si256(v + i + 1));
    s2 = _mm256_add_epi64(s2, _mm256_load_si256(v + i + 2));
    s3 = _mm256_add_epi64(s3, _mm256_load_si256(v + i + 3));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
  alignas(32) uint64_t out[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), s);
  return out[0] + out[1] + out[2] + out[3];
}

}  // namespace kvq::simd

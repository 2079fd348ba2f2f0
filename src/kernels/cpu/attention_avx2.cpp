// AVX2 + FMA tile step of the attention kernel (see attention_tile.h).
#include <immintrin.h>

#include "base/avx2_reduce.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/attention_tile.h"
#include "kernels/cpu/softmax_state.h"
#include "kernels/cpu/kv_lookup_avx2.h"

namespace kvq::attn {

namespace {

using avx2::hmax;
using avx2::hsum;


// exp(x) for a vector, |rel err| < 2e-7 on [-87, 88]; exp(-inf) = 0.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  // x = n*ln2 + r, |r| <= ln2/2
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  // exp(r) by a degree-6 polynomial (Taylor/minimax coefficients)
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  // Underflow to exactly zero (covers -inf inputs).
  return _mm256_and_ps(res, _mm256_cmp_ps(x, lo, _CMP_GT_OQ));
}

// The inner kernels keep their accumulators in named variables rather than
// __m256 arrays: GCC does not promote such arrays to registers and stores
// every accumulator back to the stack each iteration (12 extra stores per 12
// FMAs, which halved the kernel's speed).
#define KVQ_ACC4(name) __m256 name##0 = _mm256_setzero_ps(), name##1 = name##0, name##2 = name##0, name##3 = name##0

// s[r][0..31] (one half of the tile) for up to 3 rows at once: 12 accumulators,
// each key vector loaded once per channel and reused across rows.
template <int R>
inline void scores_half(const float* q, int hd, const float* kt, float* s) {
  KVQ_ACC4(a);
  KVQ_ACC4(b);
  KVQ_ACC4(c);
  for (int d = 0; d < hd; ++d) {
    const float* krow = kt + d * kTile;
    const __m256 k0 = _mm256_loadu_ps(krow), k1 = _mm256_loadu_ps(krow + 8);
    const __m256 k2 = _mm256_loadu_ps(krow + 16), k3 = _mm256_loadu_ps(krow + 24);
    const __m256 qa = _mm256_broadcast_ss(q + d);
    a0 = _mm256_fmadd_ps(qa, k0, a0);
    a1 = _mm256_fmadd_ps(qa, k1, a1);
    a2 = _mm256_fmadd_ps(qa, k2, a2);
    a3 = _mm256_fmadd_ps(qa, k3, a3);
    if constexpr (R > 1) {
      const __m256 qb = _mm256_broadcast_ss(q + hd + d);
      b0 = _mm256_fmadd_ps(qb, k0, b0);
      b1 = _mm256_fmadd_ps(qb, k1, b1);
      b2 = _mm256_fmadd_ps(qb, k2, b2);
      b3 = _mm256_fmadd_ps(qb, k3, b3);
    }
    if constexpr (R > 2) {
      const __m256 qc = _mm256_broadcast_ss(q + 2 * hd + d);
      c0 = _mm256_fmadd_ps(qc, k0, c0);
      c1 = _mm256_fmadd_ps(qc, k1, c1);
      c2 = _mm256_fmadd_ps(qc, k2, c2);
      c3 = _mm256_fmadd_ps(qc, k3, c3);
    }
  }
  _mm256_storeu_ps(s, a0);
  _mm256_storeu_ps(s + 8, a1);
  _mm256_storeu_ps(s + 16, a2);
  _mm256_storeu_ps(s + 24, a3);
  if constexpr (R > 1) {
    _mm256_storeu_ps(s + kTile, b0);
    _mm256_storeu_ps(s + kTile + 8, b1);
    _mm256_storeu_ps(s + kTile + 16, b2);
    _mm256_storeu_ps(s + kTile + 24, b3);
  }
  if constexpr (R > 2) {
    _mm256_storeu_ps(s + 2 * kTile, c0);
    _mm256_storeu_ps(s + 2 * kTile + 8, c1);
    _mm256_storeu_ps(s + 2 * kTile + 16, c2);
    _mm256_storeu_ps(s + 2 * kTile + 24, c3);
  }
}

// acc[r][c0..c0+8*NV) += sum_j p[r][j] * v[j][c0..] for up to 3 rows, NV <= 4 vectors.
template <int R, int NV>
inline void accumulate_chunk(const float* p, int n, const float* v, int hd, int col, float* acc) {
  float* ra = acc + col;
  float* rb = acc + hd + col;
  float* rc = acc + 2 * hd + col;
  KVQ_ACC4(a);
  KVQ_ACC4(b);
  KVQ_ACC4(c);
#define KVQ_LD(row, name)                                            \
  name##0 = _mm256_loadu_ps(row);                                    \
  if constexpr (NV > 1) name##1 = _mm256_loadu_ps(row + 8);          \
  if constexpr (NV > 2) name##2 = _mm256_loadu_ps(row + 16);         \
  if constexpr (NV > 3) name##3 = _mm256_loadu_ps(row + 24);
#define KVQ_ST(row, name)                                            \
  _mm256_storeu_ps(row, name##0);                                    \
  if constexpr (NV > 1) _mm256_storeu_ps(row + 8, name##1);          \
  if constexpr (NV > 2) _mm256_storeu_ps(row + 16, name##2);         \
  if constexpr (NV > 3) _mm256_storeu_ps(row + 24, name##3);
#define KVQ_FMA(pb, name)                                            \
  name##0 = _mm256_fmadd_ps(pb, v0, name##0);                        \
  if constexpr (NV > 1) name##1 = _mm256_fmadd_ps(pb, v1, name##1);  \
  if constexpr (NV > 2) name##2 = _mm256_fmadd_ps(pb, v2, name##2);  \
  if constexpr (NV > 3) name##3 = _mm256_fmadd_ps(pb, v3, name##3);
  KVQ_LD(ra, a)
  if constexpr (R > 1) { KVQ_LD(rb, b) }
  if constexpr (R > 2) { KVQ_LD(rc, c) }
  for (int j = 0; j < n; ++j) {
    const float* vrow = v + j * hd + col;
    const __m256 v0 = _mm256_loadu_ps(vrow);
    const __m256 v1 = NV > 1 ? _mm256_loadu_ps(vrow + 8) : v0;
    const __m256 v2 = NV > 2 ? _mm256_loadu_ps(vrow + 16) : v0;
    const __m256 v3 = NV > 3 ? _mm256_loadu_ps(vrow + 24) : v0;
    const __m256 pa = _mm256_broadcast_ss(p + j);
    KVQ_FMA(pa, a)
    if constexpr (R > 1) {
      const __m256 pb = _mm256_broadcast_ss(p + kTile + j);
      KVQ_FMA(pb, b)
    }
    if constexpr (R > 2) {
      const __m256 pc = _mm256_broadcast_ss(p + 2 * kTile + j);
      KVQ_FMA(pc, c)
    }
  }
  KVQ_ST(ra, a)
  if constexpr (R > 1) { KVQ_ST(rb, b) }
  if constexpr (R > 2) { KVQ_ST(rc, c) }
#undef KVQ_LD
#undef KVQ_ST
#undef KVQ_FMA
}
#undef KVQ_ACC4

// Levels L[c] of codes d0..d0+31 of one packed value run, as 4 vectors (or
// the NK of them from K0 on), and where each vector's elements sit: element
// order (kLanes false: vector k holds d0+8k..+7) or the 4-bit lookup's lane
// order (kLanes true: vector k holds d0+4k..+3 and d0+16+4k..+3; see
// Lut4Bytes::lookup32_lanes).
template <int B>
struct RunLevels {
  static constexpr bool kLanes = false;
  simd::kvx::Lut<B> lut;
  explicit RunLevels(const KvCodecLayout& L) : lut(L.levels) {}
  using Codes = const uint8_t*;
  static inline Codes codes(const uint8_t* run, int d0) { return run + d0 / 8 * B; }
  template <int K0, int NK>
  inline void vectors(Codes p, __m256* l) const {
#pragma GCC unroll 4
    for (int k = 0; k < NK; ++k) l[k] = lut(simd::kvx::unpack8<B>(p + (K0 + k) * B));
  }
};
template <>
struct RunLevels<4> {
  static constexpr bool kLanes = true;
  simd::kvx::Lut4Bytes lut;
  explicit RunLevels(const KvCodecLayout& L) : lut(L.level_planes) {}
  using Codes = __m256i;
  static inline Codes codes(const uint8_t* run, int d0) { return simd::kvx::Lut4Bytes::codes32(run + d0 / 2); }
  template <int K0, int NK>
  inline void vectors(Codes c, __m256* l) const {
    static_assert(NK == 4 || (NK == 2 && K0 % 2 == 0), "whole lookups or halves");
    if constexpr (NK == 4) lut.lanes_all(c, l);
    else lut.lanes_half<K0 / 2>(c, l[0], l[1]);
  }
};

// Vector k of the 32 floats at a, in RunLevels' order.
template <bool kLanes>
inline __m256 load_block(const float* a, int k) {
  return kLanes ? _mm256_loadu2_m128(a + 16 + 4 * k, a + 4 * k) : _mm256_loadu_ps(a + 8 * k);
}
template <bool kLanes>
inline void store_block(float* a, int k, __m256 v) {
  if (kLanes) _mm256_storeu2_m128(a + 16 + 4 * k, a + 4 * k, v);
  else _mm256_storeu_ps(a + 8 * k, v);
}

// acc[r][d0..d0+32) += sum_j pr[r][j] L[code_jd] + zsum[r] for the vectors
// K0..K0+NK of the block (RunLevels' order), one pass over the slots.
template <int R, int K0, int NK, typename Levels>
inline void accumulate_vectors(const Levels& levels, const uint8_t* runs, int64_t run_bytes, int n, const float* pr,
                               int d0, const float* zsum, float* acc, int hd) {
  constexpr bool lanes = Levels::kLanes;
  __m256 a[R][NK];  // in registers (but what does not fit): every index is a constant once unrolled
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int k = 0; k < NK; ++k) a[r][k] = load_block<lanes>(acc + r * hd + d0, K0 + k);
  for (int j = 0; j < n; ++j) {
    __m256 l[NK];
    levels.template vectors<K0, NK>(Levels::codes(runs + j * run_bytes, d0), l);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 pv = _mm256_broadcast_ss(pr + r * kTile + j);
#pragma GCC unroll 4
      for (int k = 0; k < NK; ++k) a[r][k] = _mm256_fmadd_ps(pv, l[k], a[r][k]);
    }
  }
  // The zero-point term, once per element.
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 z = _mm256_set1_ps(zsum[r]);
#pragma GCC unroll 4
    for (int k = 0; k < NK; ++k) store_block<lanes>(acc + r * hd + d0, K0 + k, _mm256_add_ps(a[r][k], z));
  }
}

// The value half of a tile step read from the packed page (see
// packed_values_supported): p holds the rows' probabilities, acc their
// (already rescaled) outputs.
template <int R, int B>
void accumulate_packed(const TileStep& t, const float* p, float* acc) {
  const KvCodecLayout& L = *t.v_layout;
  const int hd = t.hd, n = t.n;
  // Slot scales (fp16 zp, r), then the probabilities weighted by r.
  alignas(32) float zp[kTile], rs[kTile], pr[R][kTile];
  for (int g = 0; g < (n + 7) / 8; ++g) {
    __m256 z, r;
    simd::kvx::load_scales8(t.v_page + L.codes_bytes + int64_t(g) * 32, z, r);
    _mm256_store_ps(zp + 8 * g, z);
    _mm256_store_ps(rs + 8 * g, r);
  }
  for (int j = n; j < (n + 7) / 8 * 8; ++j) zp[j] = rs[j] = 0;  // slots past n: whatever they hold, weight 0
  float zsum[R];
  for (int r = 0; r < R; ++r) {
    __m256 zs = _mm256_setzero_ps();
    for (int g = 0; g < (n + 7) / 8; ++g) {
      const __m256 pv = _mm256_loadu_ps(p + r * kTile + 8 * g);
      zs = _mm256_fmadd_ps(pv, _mm256_load_ps(zp + 8 * g), zs);
      _mm256_store_ps(pr[r] + 8 * g, _mm256_mul_ps(pv, _mm256_load_ps(rs + 8 * g)));
    }
    zsum[r] = hsum(zs);
  }
  // Sparse outliers: p_j * residual on their element.
  simd::kvx::for_each_outlier(L, t.v_page, t.v_head, n, [&](int j, int d, float e) {
    for (int r = 0; r < R; ++r) acc[r * hd + d] += p[r * kTile + j] * e;
  });
  using Levels = RunLevels<B>;
  const Levels levels(L);
  const uint8_t* runs = t.v_page + int64_t(t.v_head) * kTile * L.run_bytes;
  for (int d0 = 0; d0 < hd; d0 += 32) {
    // A block's 4 vectors x R rows of accumulators in one pass when the lookup
    // is dear to repeat (4-bit byte shuffles; 12 accumulators then spill one,
    // which measured cheaper than looking up twice), else in two
    // passes of 2 vectors (8-entry lookups are cheap, and 4 rows need them).
    if constexpr (B == 4 && R <= 3) {
      accumulate_vectors<R, 0, 4>(levels, runs, L.run_bytes, n, pr[0], d0, zsum, acc, hd);
    } else {
      accumulate_vectors<R, 0, 2>(levels, runs, L.run_bytes, n, pr[0], d0, zsum, acc, hd);
      accumulate_vectors<R, 2, 2>(levels, runs, L.run_bytes, n, pr[0], d0, zsum, acc, hd);
    }
  }
}

template <int R>
void accumulate_packed(const TileStep& t, const float* p, float* acc) {
  switch (t.v_layout->bits) {
    case 2: accumulate_packed<R, 2>(t, p, acc); break;
    case 3: accumulate_packed<R, 3>(t, p, acc); break;
    default: accumulate_packed<R, 4>(t, p, acc); break;
  }
}

// Decoded values t.v into up to 3 rows.
template <int R>
void accumulate_decoded(const float* p, int n, const float* v, int hd, float* acc) {
  int c0 = 0;
  for (; c0 + 32 <= hd; c0 += 32) accumulate_chunk<R, 4>(p, n, v, hd, c0, acc);
  switch ((hd - c0) / 8) {
    case 3: accumulate_chunk<R, 3>(p, n, v, hd, c0, acc); break;
    case 2: accumulate_chunk<R, 2>(p, n, v, hd, c0, acc); break;
    case 1: accumulate_chunk<R, 1>(p, n, v, hd, c0, acc); break;
    default: break;
  }
}

template <int R>
void rows_block(const TileStep& t, int r0) {
  const float* q = t.q + int64_t(r0) * t.hd;
  float* s = t.s + int64_t(r0) * kTile;
  if constexpr (R == 4) {  // 2 + 2 rows: 16 accumulators would not fit 16 registers
    for (int r = 0; r < 4; r += 2) {
      scores_half<2>(q + r * t.hd, t.hd, t.kt, s + r * kTile);
      scores_half<2>(q + r * t.hd, t.hd, t.kt + 32, s + r * kTile + 32);
    }
  } else {
    scores_half<R>(q, t.hd, t.kt, s);
    scores_half<R>(q, t.hd, t.kt + 32, s + 32);
  }

  const float neg_inf = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * kTile;
    mask_row(t, r0 + r, sr);
    __m256 mx = _mm256_set1_ps(neg_inf);
    for (int j = 0; j < kTile; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sr + j));
    const float tile_max = hmax(mx);
    float* acc = t.acc + int64_t(r0 + r) * t.hd;
    if (tile_max == neg_inf) {
      // No visible key for this row: p = 0, state unchanged.
      for (int j = 0; j < kTile; ++j) sr[j] = 0;
      continue;
    }
    any = true;
    const SoftmaxUpdate u = SoftmaxUpdate::open(t.m[r0 + r], tile_max);
    const __m256 mv = _mm256_set1_ps(u.m_new);
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < kTile; j += 8) {
      const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));
      _mm256_storeu_ps(sr + j, p);
      sum = _mm256_add_ps(sum, p);
    }
    u.close(t.m[r0 + r], t.l[r0 + r], hsum(sum));
    const __m256 cv = _mm256_set1_ps(u.corr);
    for (int d = 0; d < t.hd; d += 8) _mm256_storeu_ps(acc + d, _mm256_mul_ps(cv, _mm256_loadu_ps(acc + d)));
  }
  if (!any) return;
  float* acc = t.acc + int64_t(r0) * t.hd;
  if constexpr (R == 4) {
    accumulate_packed<4>(t, s, acc);  // 4-row blocks are taken over packed values only
  } else if (t.v_page) {
    accumulate_packed<R>(t, s, acc);
  } else {
    accumulate_decoded<R>(s, t.n, t.v, t.hd, acc);
  }
}

}  // namespace

void tile_step_avx2(const TileStep& t) {
  int r = 0;
  // Decode over packed values, GQA groups of 4 (and 8): blocks of 4 rows, each
  // packed value looked up once per block rather than once per 3 + 1. (Decoded
  // values and keys gain nothing from it: their 4-row blocks run as 2 + 2 rows,
  // which load each key and value vector once per 2 rows instead of per 3.)
  if (t.v_page && t.rows % 4 == 0)
    for (; r < t.rows; r += 4) rows_block<4>(t, r);
  for (; r + 3 <= t.rows; r += 3) rows_block<3>(t, r);
  if (t.rows - r == 2) rows_block<2>(t, r);
  else if (t.rows - r == 1) rows_block<1>(t, r);
}

}  // namespace kvq::attn

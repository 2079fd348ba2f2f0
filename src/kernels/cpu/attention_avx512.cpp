// AVX-512 tile step of the attention kernel (see attention_tile.h), for head
// sizes that are a multiple of 16: the AVX2 step's stages at twice the width.
// A row of 64 scores is 4 vectors, so 3 (or 4) GQA rows score a whole tile
// with 12 (16) accumulators of 32 registers, each key vector loaded once per
// channel; packed 2/3/4-bit values are looked up 16 codes per instruction (the
// level table fits one register) and accumulated for 3 (4) rows without spilling.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/attention_tile.h"
#include "kernels/cpu/softmax_state.h"
#include "kernels/cpu/kv_lookup_avx2.h"
#include "kernels/cpu/kv_lookup_avx512.h"

namespace kvq::attn {

namespace {

using simd::kvx512::levels16;
using simd::kvx512::lookup;
using simd::kvx512::Unpack16;

// exp(x) for a vector, |rel err| < 2e-7 on [-87, 88]; exp(-inf) = 0 (the
// AVX2 step's polynomial).
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.3f);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  // Underflow to exactly zero (covers -inf inputs).
  return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GT_OQ), p, _mm512_castsi512_ps(e));
}

// R rows x NV vectors of accumulators, kept in registers: GCC promotes these
// small fixed arrays once every index is a compile-time constant (the loops
// over them are fully unrolled).
template <int R, int NV>
struct Acc {
  __m512 v[R][NV];
};

// s[r][0..63] for up to 4 rows: each channel's 4 key vectors loaded once and
// multiplied into every row.
template <int R>
inline void scores(const float* q, int hd, const float* kt, float* s) {
  Acc<R, 4> a;
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < 4; ++k) a.v[r][k] = _mm512_setzero_ps();
  for (int d = 0; d < hd; ++d) {
    const float* krow = kt + d * kTile;
    const __m512 k0 = _mm512_loadu_ps(krow), k1 = _mm512_loadu_ps(krow + 16);
    const __m512 k2 = _mm512_loadu_ps(krow + 32), k3 = _mm512_loadu_ps(krow + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 qr = _mm512_set1_ps(q[r * hd + d]);
      a.v[r][0] = _mm512_fmadd_ps(qr, k0, a.v[r][0]);
      a.v[r][1] = _mm512_fmadd_ps(qr, k1, a.v[r][1]);
      a.v[r][2] = _mm512_fmadd_ps(qr, k2, a.v[r][2]);
      a.v[r][3] = _mm512_fmadd_ps(qr, k3, a.v[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(s + r * kTile + 16 * k, a.v[r][k]);
}

// acc[r][col..col+16*NV) += sum_j p[r][j] * v[j][col..] (decoded values).
template <int R, int NV>
inline void accumulate_chunk(const float* p, int n, const float* v, int hd, int col, float* acc) {
  Acc<R, NV> a;
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NV; ++k) a.v[r][k] = _mm512_loadu_ps(acc + r * hd + col + 16 * k);
  for (int j = 0; j < n; ++j) {
    __m512 vv[NV];
    for (int k = 0; k < NV; ++k) vv[k] = _mm512_loadu_ps(v + j * hd + col + 16 * k);
    for (int r = 0; r < R; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * kTile + j]);
      for (int k = 0; k < NV; ++k) a.v[r][k] = _mm512_fmadd_ps(pr, vv[k], a.v[r][k]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NV; ++k) _mm512_storeu_ps(acc + r * hd + col + 16 * k, a.v[r][k]);
}

// The levels of 16 * NV codes from col on, for every slot, times the rows'
// weights pr[r][j] (probability x the slot's range), into acc.
template <int R, int NV, int B>
inline void accumulate_levels(const Unpack16<B>& unpack, __m512 table, const uint8_t* runs, int64_t run_bytes, int n,
                              const float (*pr)[kTile], int hd, int col, float* acc) {
  Acc<R, NV> a;
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NV; ++k) a.v[r][k] = _mm512_loadu_ps(acc + r * hd + col + 16 * k);
  for (int j = 0; j < n; ++j) {
    const uint8_t* run = runs + j * run_bytes + col / 8 * B;
    __m512 lv[NV];
    for (int k = 0; k < NV; ++k) lv[k] = lookup(table, unpack(run + 2 * B * k));
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(pr[r][j]);
      for (int k = 0; k < NV; ++k) a.v[r][k] = _mm512_fmadd_ps(w, lv[k], a.v[r][k]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NV; ++k) _mm512_storeu_ps(acc + r * hd + col + 16 * k, a.v[r][k]);
}


// The value outliers of a packed tile step: acc[r][d] += p[r][j] e for each
// residual e of element (j, d), 16 hits' weights at once (p[r][j] looked up
// among the row's 64 probabilities in registers), the adds one by one (hits of
// different slots can share a channel).
template <int R>
void add_value_outliers(const TileStep& t, const float* p, float* acc) {
  static_assert(kTile <= 64, "one row's probabilities fit four registers (row_lookup's permutes)");
  const __mmask16 all = 0xffff;
  simd::kvx512::for_each_hit_list(*t.v_layout, t.v_page, t.v_head, t.n, [&](const simd::kvx512::OutlierHits& hits) {
    alignas(64) float w[R][16];
    for (int k0 = 0; k0 < hits.count; k0 += 16) {
      const __m512i j = _mm512_load_si512(hits.slot + k0);  // lanes past count: junk, never added
      const __m512 e = _mm512_load_ps(hits.res + k0);
      for (int r = 0; r < R; ++r)
        _mm512_store_ps(w[r], _mm512_mul_ps(simd::kvx512::row_lookup(p + r * kTile, kTile, j, all), e));
      const int m = std::min(16, hits.count - k0);
      for (int k = 0; k < m; ++k) {
        const int d = hits.chan[k0 + k];
        for (int r = 0; r < R; ++r) acc[r * t.hd + d] += w[r][k];
      }
    }
  });
}

// The value half of a tile step read from the packed page (see
// packed_values_supported; head_dim % 32 == 0): sum_j p_j (zp_j + r_j L[c]) as
// sum_j (p_j r_j) L[c] + sum_j p_j zp_j, plus p_j e for each outlier residual.
template <int R, int B>
void accumulate_packed(const TileStep& t, const float* p, float* acc) {
  const KvCodecLayout& L = *t.v_layout;
  const int hd = t.hd, n = t.n, groups = (n + 15) / 16;
  alignas(64) float zp[kTile], rs[kTile], pr[R][kTile];
  for (int g = 0; g < groups; ++g) {
    __m512 z, r;
    simd::kvx512::load_scales16(t.v_page + L.codes_bytes + int64_t(g) * 64, z, r);
    _mm512_store_ps(zp + 16 * g, z);
    _mm512_store_ps(rs + 16 * g, r);
  }
  for (int j = n; j < groups * 16; ++j) zp[j] = rs[j] = 0;  // slots past n: whatever they hold, weight 0
  float zsum[R];
  for (int r = 0; r < R; ++r) {
    __m512 zs = _mm512_setzero_ps();
    for (int g = 0; g < groups; ++g) {
      const __m512 pv = _mm512_loadu_ps(p + r * kTile + 16 * g);
      zs = _mm512_fmadd_ps(pv, _mm512_load_ps(zp + 16 * g), zs);
      _mm512_store_ps(pr[r] + 16 * g, _mm512_mul_ps(pv, _mm512_load_ps(rs + 16 * g)));
    }
    zsum[r] = _mm512_reduce_add_ps(zs);
  }
  add_value_outliers<R>(t, p, acc);
  const Unpack16<B> unpack;
  const __m512 table = levels16<B>(L.levels);
  const uint8_t* runs = t.v_page + int64_t(t.v_head) * kTile * L.run_bytes;
  int col = 0;
  for (; col + 64 <= hd; col += 64) accumulate_levels<R, 4, B>(unpack, table, runs, L.run_bytes, n, pr, hd, col, acc);
  if (col < hd) accumulate_levels<R, 2, B>(unpack, table, runs, L.run_bytes, n, pr, hd, col, acc);  // 32 left
  for (int r = 0; r < R; ++r) {
    const __m512 z = _mm512_set1_ps(zsum[r]);
    for (int d = 0; d < hd; d += 16) _mm512_storeu_ps(acc + r * hd + d, _mm512_add_ps(z, _mm512_loadu_ps(acc + r * hd + d)));
  }
}

template <int R>
void rows_block(const TileStep& t, int r0) {
  const float* q = t.q + int64_t(r0) * t.hd;
  float* s = t.s + int64_t(r0) * kTile;
  if (!t.scored) scores<R>(q, t.hd, t.kt, s);

  const float neg_inf = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * kTile;
    mask_row(t, r0 + r, sr);
    __m512 mx = _mm512_loadu_ps(sr);
    for (int j = 16; j < kTile; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + j));
    const float tile_max = _mm512_reduce_max_ps(mx);
    float* acc = t.acc + int64_t(r0 + r) * t.hd;
    if (tile_max == neg_inf) {
      // No visible key for this row: p = 0, state unchanged.
      for (int j = 0; j < kTile; ++j) sr[j] = 0;
      continue;
    }
    any = true;
    const SoftmaxUpdate u = SoftmaxUpdate::open(t.m[r0 + r], tile_max);
    const __m512 mv = _mm512_set1_ps(u.m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < kTile; j += 16) {
      const __m512 pj = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mv));
      _mm512_storeu_ps(sr + j, pj);
      sum = _mm512_add_ps(sum, pj);
    }
    u.close(t.m[r0 + r], t.l[r0 + r], _mm512_reduce_add_ps(sum));
    const __m512 cv = _mm512_set1_ps(u.corr);
    for (int d = 0; d < t.hd; d += 16) _mm512_storeu_ps(acc + d, _mm512_mul_ps(cv, _mm512_loadu_ps(acc + d)));
  }
  if (!any) return;
  float* acc = t.acc + int64_t(r0) * t.hd;
  if (t.v_page) {
    switch (t.v_layout->bits) {
      case 2: accumulate_packed<R, 2>(t, s, acc); break;
      case 3: accumulate_packed<R, 3>(t, s, acc); break;
      default: accumulate_packed<R, 4>(t, s, acc); break;
    }
    return;
  }
  int col = 0;
  for (; col + 64 <= t.hd; col += 64) accumulate_chunk<R, 4>(s, t.n, t.v, t.hd, col, acc);
  switch ((t.hd - col) / 16) {
    case 3: accumulate_chunk<R, 3>(s, t.n, t.v, t.hd, col, acc); break;
    case 2: accumulate_chunk<R, 2>(s, t.n, t.v, t.hd, col, acc); break;
    case 1: accumulate_chunk<R, 1>(s, t.n, t.v, t.hd, col, acc); break;
    default: break;
  }
}

}  // namespace

void tile_step_avx512(const TileStep& t) {
  int r = 0;
  // GQA groups of 4 (and 8) in blocks of 4 rows: 16 score accumulators, and
  // each packed value looked up once per block rather than once per 3 + 1.
  if (t.rows % 4 == 0)
    for (; r < t.rows; r += 4) rows_block<4>(t, r);
  for (; r + 3 <= t.rows; r += 3) rows_block<3>(t, r);
  if (t.rows - r == 2) rows_block<2>(t, r);
  else if (t.rows - r == 1) rows_block<1>(t, r);
}

}  // namespace kvq::attn

// AVX-512 tile decoders for 2/3/4-bit quant codes (see kv_decode.h): the
// same stages as the AVX2 ones, 16 codes at a time, and one instruction per
// level lookup: a 16-entry float table fits one register, and vpermps reads
// only the low 4 bits of each index (tables of 4 or 8 levels are repeated to
// fill it, so codes need no masking). Compiled with -ffp-contract=off: each
// zp + r * L is a multiply then an add, as in the scalar codecs, so tiles are
// bit-identical to KvCodec::decode (the fused key decode + rotation equal up
// to rounding, as on AVX2). Other layouts go to the AVX2 decoders.
#include <immintrin.h>

#include "kernels/cpu/kv_decode.h"
#include "kernels/cpu/kv_lookup_avx2.h"
#include "kernels/cpu/kv_lookup_avx512.h"

namespace kvq::simd {

namespace {

using namespace kvx512;
using kvx::ld16;
constexpr int T = kKvPageTokens;

// Stage "outlier residuals" of a decoded tile (keys channel-major, values
// token-major), from the compressed lists.
void add_outliers_listed(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const bool key = L.role == KvRole::key;
  for_each_hit_list(L, page, head, n, [&](const OutlierHits& h) { add_hits(h, dst, key ? T : 1, key ? 1 : L.head_dim); });
}

// Keys, channel-major dst[d * T + j]: each channel's 64 codes are one run of
// 8 * B bytes, 16 slots per lookup.
template <int B>
void keys_quant(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const Unpack16<B> unpack;
  const int D = L.head_dim, groups = (n + 15) / 16;
  if (L.per_channel) {
    for (int d = 0; d < D; ++d) {
      const int c = head * D + d;
      const __m512 table = channel_table<B>(L, c);
      const uint8_t* run = page + int64_t(c) * L.run_bytes;
      for (int g = 0; g < groups; ++g) _mm512_storeu_ps(dst + int64_t(d) * T + 16 * g, lookup(table, unpack(run + 2 * B * g)));
    }
  } else {
    alignas(64) float zps[T], rs[T];
    for (int g = 0; g < groups; ++g) {
      __m512 z, r;
      load_scales16(page + L.codes_bytes + int64_t(g) * 64, z, r);
      _mm512_store_ps(zps + 16 * g, z);
      _mm512_store_ps(rs + 16 * g, r);
    }
    const __m512 table = levels16<B>(L.levels);
    for (int d = 0; d < D; ++d) {
      const uint8_t* run = page + int64_t(head * D + d) * L.run_bytes;
      for (int g = 0; g < groups; ++g) {
        const __m512 lv = lookup(table, unpack(run + 2 * B * g));
        _mm512_storeu_ps(dst + int64_t(d) * T + 16 * g,
                         _mm512_add_ps(_mm512_load_ps(zps + 16 * g), _mm512_mul_ps(_mm512_load_ps(rs + 16 * g), lv)));
      }
    }
  }
  add_outliers_listed(L, page, head, n, dst);
}

// Values, token-major dst[j * D + d] (head_dim % 16 == 0): each slot's head
// vector is one packed run; the slot's fp16 zp and range broadcast over it.
template <int B>
void values_quant(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const Unpack16<B> unpack;
  const int D = L.head_dim;
  const __m512 table = levels16<B>(L.levels);
  for (int j = 0; j < n; ++j) {
    const uint8_t* sc = page + L.codes_bytes + int64_t(j) * 4;
    const __m512 zv = _mm512_set1_ps(_cvtsh_ss(ld16(sc))), rv = _mm512_set1_ps(_cvtsh_ss(ld16(sc + 2)));
    const uint8_t* run = page + (int64_t(head) * T + j) * L.run_bytes;
    float* out = dst + int64_t(j) * D;
    for (int d0 = 0; d0 < D; d0 += 16)
      _mm512_storeu_ps(out + d0, _mm512_add_ps(zv, _mm512_mul_ps(rv, lookup(table, unpack(run + d0 / 8 * B)))));
  }
  add_outliers_listed(L, page, head, n, dst);
}

// Rotated pair i of a head's pre-RoPE per-channel keys (channels a and b),
// 16 slots at a time: both channels looked up (zp + r L[code]) and rotated by
// the slots' angles in registers, fused multiply-adds.
template <int B>
struct RotatedPair {
  int a, b;
  const uint8_t *ra, *rb;
  __m512 ta, tb;
  const float *c, *sn;
  RotatedPair(const KvCodecLayout& L, const uint8_t* page, int head, int i, const float* cs, int half, bool neox)
      : a(rope_channel(i, false, half, neox)), b(rope_channel(i, true, half, neox)),
        ra(page + int64_t(head * L.head_dim + a) * L.run_bytes), rb(page + int64_t(head * L.head_dim + b) * L.run_bytes),
        ta(channel_table<B>(L, head * L.head_dim + a)), tb(channel_table<B>(L, head * L.head_dim + b)),
        c(cs + i * T), sn(cs + (half + i) * T) {}
  // Slots 16g..16g+15: x' = x c - y s, y' = x s + y c.
  void operator()(const Unpack16<B>& unpack, int g, __m512& xr, __m512& yr) const {
    const __m512 x = lookup(ta, unpack(ra + 2 * B * g)), y = lookup(tb, unpack(rb + 2 * B * g));
    const __m512 cv = _mm512_loadu_ps(c + 16 * g), sv = _mm512_loadu_ps(sn + 16 * g);
    xr = _mm512_fmsub_ps(x, cv, _mm512_mul_ps(y, sv));
    yr = _mm512_fmadd_ps(x, sv, _mm512_mul_ps(y, cv));
  }
};

// Pre-RoPE per-channel keys, stages fused (as keys_quant_rotated on AVX2):
// both channels of each rotated pair looked up, rotated in registers, stored
// once; then the sparse residuals, rotated like their elements.
template <int B>
void keys_quant_rotated(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst, const float* cs,
                        int half, bool neox) {
  const Unpack16<B> unpack;
  const int D = L.head_dim, groups = (n + 15) / 16;
  for (int i = 0; i < half; ++i) {
    const RotatedPair<B> pair(L, page, head, i, cs, half, neox);
    for (int g = 0; g < groups; ++g) {
      __m512 x, y;
      pair(unpack, g, x, y);
      _mm512_storeu_ps(dst + int64_t(pair.a) * T + 16 * g, x);
      _mm512_storeu_ps(dst + int64_t(pair.b) * T + 16 * g, y);
    }
  }
  // Channels past the rotated ones (n_rot < head_dim) pass through.
  for (int d = 2 * half; d < D; ++d) {
    const int c = head * D + d;
    const __m512 table = channel_table<B>(L, c);
    const uint8_t* run = page + int64_t(c) * L.run_bytes;
    for (int g = 0; g < groups; ++g) _mm512_storeu_ps(dst + int64_t(d) * T + 16 * g, lookup(table, unpack(run + 2 * B * g)));
  }
  for_each_hit_list(L, page, head, n, [&](const OutlierHits& h) { add_rotated_hits(h, dst, cs, half, neox); });
}

// The outlier residuals' shares of R rows' scores: q_r[ch_a] va + q_r[ch_b] vb
// for 16 hits at once (the rows' elements looked up by channel), then added to
// each hit's slot one by one (hits of a slot share its scores).
template <int R>
void add_hit_shares(const OutlierHits& hits, const float* q, int D, const float* cs, int half, bool neox, float* s) {
  RotatedHits16 rh;
  alignas(64) float share[R][16];
  for (int k0 = 0; k0 < hits.count; k0 += 16) {
    rotate_hits(hits, k0, cs, half, neox, rh);
    const __mmask16 live = __mmask16((1u << rh.m) - 1);
    const __m512i ia = _mm512_load_si512(rh.ch_a), ib = _mm512_load_si512(rh.ch_b);
    for (int r = 0; r < R; ++r) {
      const __m512 qa = row_lookup(q + r * D, D, ia, live), qb = row_lookup(q + r * D, D, ib, live);
      _mm512_store_ps(share[r], _mm512_fmadd_ps(qb, _mm512_load_ps(rh.vb), _mm512_mul_ps(qa, _mm512_load_ps(rh.va))));
    }
    for (int k = 0; k < rh.m; ++k) {
      const int j = hits.slot[k0 + k];
      for (int r = 0; r < R; ++r) s[r * T + j] += share[r][k];
    }
  }
}

// Pre-RoPE per-channel keys scored by R query rows where they are decoded:
// per rotated pair, 16 slots at a time, both channels looked up and rotated
// (as keys_quant_rotated) and multiplied into the rows' R x 4 score
// accumulators; the outlier residuals' shares added to the stored scores.
template <int B, int R>
void score_keys_rotated(const KvCodecLayout& L, const uint8_t* page, int head, int n, const float* cs, int half,
                        bool neox, const float* q, float* s) {
  static_assert(T == 64, "a row's scores are four registers");
  const Unpack16<B> unpack;
  const int D = L.head_dim;
  __m512 acc[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int i = 0; i < half; ++i) {
    const RotatedPair<B> pair(L, page, head, i, cs, half, neox);
    __m512 qa[R], qb[R];
    for (int r = 0; r < R; ++r) {
      qa[r] = _mm512_set1_ps(q[r * D + pair.a]);
      qb[r] = _mm512_set1_ps(q[r * D + pair.b]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {  // slots past n: finite codes of a zeroed page, masked by the step
      __m512 x, y;
      pair(unpack, g, x, y);
      for (int r = 0; r < R; ++r) acc[r][g] = _mm512_fmadd_ps(qb[r], y, _mm512_fmadd_ps(qa[r], x, acc[r][g]));
    }
  }
  for (int d = 2 * half; d < D; ++d) {  // channels past the rotated ones
    const int c = head * D + d;
    const __m512 table = channel_table<B>(L, c);
    const uint8_t* run = page + int64_t(c) * L.run_bytes;
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m512 x = lookup(table, unpack(run + 2 * B * g));
      for (int r = 0; r < R; ++r) acc[r][g] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + d]), x, acc[r][g]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) _mm512_storeu_ps(s + r * T + 16 * g, acc[r][g]);
  for_each_hit_list(L, page, head, n, [&](const OutlierHits& h) { add_hit_shares<R>(h, q, D, cs, half, neox, s); });
}

template <int B>
void score_keys_rotated_rows(const KvCodecLayout& L, const uint8_t* page, int head, int n, const float* cs, int half,
                             bool neox, const float* q, int rows, float* s) {
  switch (rows) {
    case 1: return score_keys_rotated<B, 1>(L, page, head, n, cs, half, neox, q, s);
    case 2: return score_keys_rotated<B, 2>(L, page, head, n, cs, half, neox, q, s);
    case 3: return score_keys_rotated<B, 3>(L, page, head, n, cs, half, neox, q, s);
    default: return score_keys_rotated<B, 4>(L, page, head, n, cs, half, neox, q, s);
  }
}

}  // namespace

bool kv_scores_rotated_keys_avx512(const KvCodecLayout& L, int rows) {
  return L.scheme == KvScheme::quant && L.role == KvRole::key && L.per_channel && L.levels && L.zp && L.range &&
         L.bits >= 2 && L.bits <= 4 && rows >= 1 && rows <= 4;
}

bool kv_score_rotated_keys_avx512(const KvCodecLayout& L, const uint8_t* page, int head, int n, const float* cs,
                                  int half, bool neox, const float* q, int rows, float* s) {
  if (!kv_scores_rotated_keys_avx512(L, rows)) return false;
  switch (L.bits) {
    case 2: score_keys_rotated_rows<2>(L, page, head, n, cs, half, neox, q, rows, s); return true;
    case 3: score_keys_rotated_rows<3>(L, page, head, n, cs, half, neox, q, rows, s); return true;
    case 4: score_keys_rotated_rows<4>(L, page, head, n, cs, half, neox, q, rows, s); return true;
    default: return false;
  }
}

bool kv_decode_rotate_keys_avx512(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst,
                                  const float* cs, int half, bool neox) {
  if (L.scheme != KvScheme::quant || L.role != KvRole::key || !L.per_channel || !L.levels || !L.zp || !L.range)
    return false;
  switch (L.bits) {
    case 2: keys_quant_rotated<2>(L, page, head, n, dst, cs, half, neox); return true;
    case 3: keys_quant_rotated<3>(L, page, head, n, dst, cs, half, neox); return true;
    case 4: keys_quant_rotated<4>(L, page, head, n, dst, cs, half, neox); return true;
    default: return false;
  }
}

bool kv_decode_tile_avx512(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  if (L.scheme != KvScheme::quant || !L.levels) return false;
  const bool key = L.role == KvRole::key;
  if (key ? (L.per_channel && (!L.zp || !L.range)) : L.head_dim % 16 != 0) return false;
  switch (L.bits) {
    case 2: key ? keys_quant<2>(L, page, head, n, dst) : values_quant<2>(L, page, head, n, dst); return true;
    case 3: key ? keys_quant<3>(L, page, head, n, dst) : values_quant<3>(L, page, head, n, dst); return true;
    case 4: key ? keys_quant<4>(L, page, head, n, dst) : values_quant<4>(L, page, head, n, dst); return true;
    default: return false;
  }
}

}  // namespace kvq::simd

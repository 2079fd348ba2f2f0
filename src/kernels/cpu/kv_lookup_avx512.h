// Private to the AVX-512 kernels that read packed KV pages
// (kv_decode_avx512.cpp, attention_avx512.cpp): unpacking 2/3/4-bit codes 16 at
// a time, level lookups, per-slot scales. Include only from *_avx512.cpp files.
// Internal linkage throughout (see kv_lookup_avx2.h for why).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "formats/kv_format.h"

namespace kvq::simd::kvx512 {
namespace {

// Stage "unpack": the 16 LSB-first codes of B bits at p (2B bytes, read with a
// masked load: never a byte past them) into the low bits of 16 dword lanes.
// Every 128-bit lane holds the same 16 bytes, so one byte shuffle gives lane i
// the two bytes its code straddles and a variable shift aligns the code; the
// bits above it are left (the lookup ignores them).
template <int B>
struct Unpack16Tables {
  alignas(64) uint8_t shuffle[64] = {};
  alignas(64) uint32_t shifts[16] = {};
  constexpr Unpack16Tables() {
    for (int i = 0; i < 16; ++i) {
      const int bit = B * i;
      shuffle[4 * i] = uint8_t(bit / 8);
      shuffle[4 * i + 1] = uint8_t(bit / 8 + 1 < 16 ? bit / 8 + 1 : 0x80);
      shuffle[4 * i + 2] = shuffle[4 * i + 3] = 0x80;  // zero
      shifts[i] = uint32_t(bit % 8);
    }
  }
};
template <int B>
inline constexpr Unpack16Tables<B> kUnpack16{};

template <int B>
struct Unpack16 {
  __m512i shuffle = _mm512_load_si512(kUnpack16<B>.shuffle), shifts = _mm512_load_si512(kUnpack16<B>.shifts);
  __m512i operator()(const uint8_t* p) const {
    const __m128i bytes = _mm_maskz_loadu_epi8(__mmask16((1u << (2 * B)) - 1), p);
    return _mm512_srlv_epi32(_mm512_shuffle_epi8(_mm512_broadcast_i32x4(bytes), shuffle), shifts);
  }
};

// The 2^B levels repeated to 16 entries (index bits above B ignored).
template <int B>
inline __m512 levels16(const float* levels) {
  if constexpr (B == 4) return _mm512_loadu_ps(levels);
  else if constexpr (B == 3) return _mm512_broadcast_f32x8(_mm256_loadu_ps(levels));
  else return _mm512_broadcast_f32x4(_mm_loadu_ps(levels));
}

// Stage "level lookup" with the channel's constants folded in: zp + r * L[l]
// for every level (a multiply then an add, as the codec's table).
template <int B>
inline __m512 channel_table(const KvCodecLayout& L, int c) {
  return _mm512_add_ps(_mm512_set1_ps(L.zp[c]), _mm512_mul_ps(_mm512_set1_ps(L.range[c]), levels16<B>(L.levels)));
}

inline __m512 lookup(__m512 table, __m512i idx) { return _mm512_permutexvar_ps(idx, table); }

// Per-slot fp16 (zp, range) pairs of 16 slots -> two float vectors.
inline void load_scales16(const uint8_t* sc, __m512& zp, __m512& r) {
  const __m512i w = _mm512_loadu_si512(sc);
  zp = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_and_si512(w, _mm512_set1_epi32(0xffff))));
  r = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
}

// One head's sparse outliers of a page as flat lists in the codec's order:
// slot j, channel d within the head, residual e. The stored indices are
// compared 16 at a time and each group's hits compressed together
// (vpcompressd), so finding them costs no branch per entry or per hit, and the
// passes over the lists compute 16 hits' addresses and weights at once.
struct OutlierHits {
  static constexpr int kMaxEntries = 1024;  // stored entries examined per list
  alignas(64) int32_t slot[kMaxEntries + 16];
  alignas(64) int32_t chan[kMaxEntries + 16];
  alignas(64) float res[kMaxEntries + 16];
  int count = 0;
};

// Fills `h` with the hits among stored entries [e_begin, e_end) (at most
// kMaxEntries) that fall in `head`.
inline void collect_outliers(const KvCodecLayout& L, const uint8_t* page, int head, int e_begin, int e_end,
                             OutlierHits& h) {
  int count = 0;  // a local: kept in h, each group's stores would wait on the last one's count
  const uint8_t* res = page + L.res_off;
  const uint8_t* idx = page + L.idx_off;
  const __m512i first = _mm512_set1_epi32(head * L.head_dim), dim = _mm512_set1_epi32(L.head_dim);
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Entry e belongs to slot e / 2k = floor((e + 0.5) / 2k): exact in floats
  // while e + 2k < 2^22 (a page holds 64 x 2k entries, so rows up to millions
  // of elements).
  const __m512 inv_k2 = _mm512_set1_ps(1.0f / float(2 * L.outliers_per_tail));
  for (int e0 = e_begin; e0 < e_end; e0 += 16) {
    const __mmask16 valid = e_end - e0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (e_end - e0)) - 1);
    const __m512i index = L.idx_bytes == 1 ? _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, idx + e0))
                                           : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, idx + 2 * e0));
    const __m512i d = _mm512_sub_epi32(index, first);
    const __mmask16 hit = _mm512_mask_cmplt_epu32_mask(valid, d, dim);  // index - first wraps when below
    const __m512 e_mid = _mm512_add_ps(_mm512_set1_ps(float(e0) + 0.5f), lanes);
    const __m512i j = _mm512_cvttps_epi32(_mm512_mul_ps(e_mid, inv_k2));
    const __m512 e = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, res + 2 * e0));
    _mm512_storeu_si512(h.slot + count, _mm512_maskz_compress_epi32(hit, j));
    _mm512_storeu_si512(h.chan + count, _mm512_maskz_compress_epi32(hit, d));
    _mm512_storeu_ps(h.res + count, _mm512_maskz_compress_ps(hit, e));
    count += __builtin_popcount(hit);
  }
  h.count = count;
}

// Calls fn(const OutlierHits&) with the outliers of slots [0, n) that fall in
// `head`, in the codec's order: one list per kMaxEntries stored entries (one
// list for rows up to ~1,400 elements at 1 %), none when there are no hits.
template <typename Fn>
inline void for_each_hit_list(const KvCodecLayout& L, const uint8_t* page, int head, int n, Fn&& fn) {
  const int entries = n * 2 * L.outliers_per_tail;
  OutlierHits h;
  for (int e0 = 0; e0 < entries; e0 += OutlierHits::kMaxEntries) {
    collect_outliers(L, page, head, e0, std::min(entries, e0 + OutlierHits::kMaxEntries), h);
    if (h.count) fn(h);
  }
}

// row[idx] for the live lanes (idx < D): by permutes across the row's (up to)
// 8 registers when D <= 128 (a 16-lane gather costs ~14 cycles here, the
// permutes and selects of 128 entries about half that), else gathered.
inline __m512 row_lookup(const float* row, int D, __m512i idx, __mmask16 live) {
  if (D > 128) return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, row, 4);
  auto part = [&](int k) {
    const int left = std::clamp(D - 16 * k, 0, 16);
    return _mm512_maskz_loadu_ps(__mmask16((1u << left) - 1), row + 16 * k);
  };
  // Entries 32m..32m+31 by one two-register permute each; then bits 5 and 6 of idx pick.
  auto quarter = [&](int m) { return _mm512_permutex2var_ps(part(2 * m), idx, part(2 * m + 1)); };
  const __mmask16 bit5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __m512 low = _mm512_mask_mov_ps(quarter(0), bit5, quarter(1));
  if (D <= 64) return low;
  const __m512 high = _mm512_mask_mov_ps(quarter(2), bit5, quarter(3));
  return _mm512_mask_mov_ps(low, _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64)), high);
}

// Stage "outlier residuals" of a decoded tile from the lists: element (j, d)
// at dst[d * ds + j * js] += e, in the codec's order (as kvx::add_outliers).
inline void add_hits(const OutlierHits& h, float* dst, int64_t ds, int64_t js) {
  for (int k = 0; k < h.count; ++k) dst[h.chan[k] * ds + h.slot[k] * js] += h.res[k];
}

// Where 16 listed residuals (hits k0.., m of them) land once rotated by the
// page's angles, as add_rotated_residual places one: e * wa on channel ch_a and
// e * wb on ch_b of slot j (a channel past the rotated ones: e on itself, 0 on
// itself again).
struct RotatedHits16 {
  alignas(64) int32_t ch_a[16], ch_b[16];
  alignas(64) float va[16], vb[16];
  int m = 0;
};

inline void rotate_hits(const OutlierHits& h, int k0, const float* cs, int half, bool neox, RotatedHits16& out) {
  constexpr int T = kKvPageTokens;
  out.m = std::min(16, h.count - k0);
  const __mmask16 live = __mmask16((1u << out.m) - 1);
  const __m512i vhalf = _mm512_set1_epi32(half), one_i = _mm512_set1_epi32(1), vT = _mm512_set1_epi32(T);
  const __m512i j = _mm512_load_si512(h.slot + k0), d = _mm512_load_si512(h.chan + k0);
  const __m512 e = _mm512_load_ps(h.res + k0);
  // Pair i and which of its channels d is.
  const __mmask16 rotated = _mm512_mask_cmplt_epi32_mask(live, d, _mm512_add_epi32(vhalf, vhalf));
  __m512i i, ch_a, ch_b;
  __mmask16 second;
  if (neox) {
    second = _mm512_cmpge_epi32_mask(d, vhalf);
    i = _mm512_mask_sub_epi32(d, second, d, vhalf);
    ch_a = i;
    ch_b = _mm512_add_epi32(i, vhalf);
  } else {
    second = _mm512_test_epi32_mask(d, one_i);
    i = _mm512_srli_epi32(d, 1);
    ch_a = _mm512_andnot_si512(one_i, d);
    ch_b = _mm512_or_si512(d, one_i);
  }
  second &= rotated;
  const __m512i at_c = _mm512_add_epi32(_mm512_mullo_epi32(i, vT), j);
  const __m512 c = _mm512_mask_i32gather_ps(_mm512_set1_ps(1.0f), rotated, at_c, cs, 4);
  const __m512 sn =
      _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rotated, _mm512_add_epi32(at_c, _mm512_mullo_epi32(vhalf, vT)), cs, 4);
  // First channel of its pair: (x' += e c, y' += e s); second: (x' -= e s, y' += e c).
  const __m512 neg_sn = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sn), _mm512_set1_epi32(int32_t(0x80000000u))));
  _mm512_store_si512(out.ch_a, _mm512_mask_mov_epi32(d, rotated, ch_a));
  _mm512_store_si512(out.ch_b, _mm512_mask_mov_epi32(d, rotated, ch_b));
  _mm512_store_ps(out.va, _mm512_mul_ps(e, _mm512_mask_mov_ps(c, second, neg_sn)));
  _mm512_store_ps(out.vb, _mm512_mul_ps(e, _mm512_mask_mov_ps(sn, second, c)));
}

// The residuals added to a channel-major key tile already rotated by the
// page's angles, each rotated as its element is (add_rotated_residual: the same
// products, added in the same order); the adds one by one, since two hits of a
// slot can fall on the same rotated pair.
inline void add_rotated_hits(const OutlierHits& h, float* kt, const float* cs, int half, bool neox) {
  constexpr int T = kKvPageTokens;
  RotatedHits16 r;
  for (int k0 = 0; k0 < h.count; k0 += 16) {
    rotate_hits(h, k0, cs, half, neox, r);
    for (int k = 0; k < r.m; ++k) {
      const int j = h.slot[k0 + k];
      kt[r.ch_a[k] * T + j] += r.va[k];
      kt[r.ch_b[k] * T + j] += r.vb[k];
    }
  }
}

}  // namespace
}  // namespace kvq::simd::kvx512

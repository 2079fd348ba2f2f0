// Private to the AVX2 kernels that read packed KV pages (kv_decode_avx2.cpp,
// attention_avx2.cpp): unpacking codes, level lookups, per-slot scales and the
// sparse outlier walk. Include only from *_avx2.cpp and *_avx512.cpp files.
//
// Everything here has internal linkage (an unnamed namespace): the including
// files are compiled with different floating-point contraction settings, and
// one shared inline definition would let the linker pick either.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "formats/kv_format.h"

namespace kvq::simd::kvx {
namespace {

inline uint16_t ld16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Stage "unpack": 8 LSB-first codes of B bits starting at byte p (8 codes
// are exactly B bytes, so a group never straddles a byte it does not own).
template <int B>
inline __m256i unpack8(const uint8_t* p) {
  if constexpr (B == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else {
    // Assembled in a register: a 2+1-byte memcpy into a stack word and a
    // 4-byte reload of it defeats store forwarding (a ~15-cycle stall).
    uint32_t u;
    if constexpr (B == 4) std::memcpy(&u, p, 4);
    else if constexpr (B == 3) u = uint32_t(ld16(p)) | uint32_t(p[2]) << 16;
    else if constexpr (B == 2) u = ld16(p);
    else u = p[0];
    const __m256i sh = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(u)), sh), _mm256_set1_epi32((1 << B) - 1));
  }
}

// Stage "level lookup": a table of 2^B floats indexed by 8 codes. Up to 8
// entries: one vpermps; 16: two and a blend on bit 3; 256: a gather.
template <int B>
struct Lut {
  __m256 lo, hi;
  const float* full;
  // The table itself (2^B floats at `table`; for B == 8 it must outlive the Lut).
  explicit Lut(const float* table) : full(table) {
    if constexpr (B <= 2) {
      lo = _mm256_castps128_ps256(_mm_loadu_ps(table));  // lanes 4..7 never indexed
    } else if constexpr (B == 3) {
      lo = _mm256_loadu_ps(table);
    } else if constexpr (B == 4) {
      lo = _mm256_loadu_ps(table);
      hi = _mm256_loadu_ps(table + 8);
    }
  }
  // zp + r * levels[l] for every level, in registers (B <= 4; a multiply then
  // an add, as the codec's table). B == 8 writes them to `scratch` (256 floats).
  Lut(const float* levels, float zp, float r, float* scratch) : full(scratch) {
    const __m256 z = _mm256_set1_ps(zp), rr = _mm256_set1_ps(r);
    if constexpr (B <= 2) {
      lo = _mm256_castps128_ps256(_mm_add_ps(_mm256_castps256_ps128(z),
                                             _mm_mul_ps(_mm256_castps256_ps128(rr), _mm_loadu_ps(levels))));
    } else if constexpr (B == 3) {
      lo = _mm256_add_ps(z, _mm256_mul_ps(rr, _mm256_loadu_ps(levels)));
    } else if constexpr (B == 4) {
      lo = _mm256_add_ps(z, _mm256_mul_ps(rr, _mm256_loadu_ps(levels)));
      hi = _mm256_add_ps(z, _mm256_mul_ps(rr, _mm256_loadu_ps(levels + 8)));
    } else {
      for (int l = 0; l < (1 << B); l += 8)
        _mm256_store_ps(scratch + l, _mm256_add_ps(z, _mm256_mul_ps(rr, _mm256_loadu_ps(levels + l))));
    }
  }
  __m256 operator()(__m256i idx) const {
    if constexpr (B <= 3) {
      return _mm256_permutevar8x32_ps(lo, idx);
    } else if constexpr (B == 4) {
      const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
      return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    } else {
      return _mm256_i32gather_ps(full, idx, 4);
    }
  }
};

// Per-slot fp16 (zp, range) pairs of 8 slots -> two float vectors.
inline void load_scales8(const uint8_t* sc, __m256& zp, __m256& r) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc));
  const __m256i z16 = _mm256_and_si256(w, _mm256_set1_epi32(0xffff)), r16 = _mm256_srli_epi32(w, 16);
  zp = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(z16), _mm256_extracti128_si256(z16, 1)));
  r = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(r16), _mm256_extracti128_si256(r16, 1)));
}

// Calls fn(slot j, channel d of `head`, residual e) for each stored outlier of
// slots [0, n) that falls in `head`, in the codec's order. The page's indices
// are compared with the head's range 32 (8-bit) or 16 (16-bit) at a time and
// only the hits are visited: a head holds about a third of a page's outliers,
// and a branch per entry mispredicted often enough to cost more than the hits.
template <typename Fn>
inline void for_each_outlier(const KvCodecLayout& L, const uint8_t* page, int head, int n, Fn&& fn) {
  const int k2 = 2 * L.outliers_per_tail;
  if (k2 == 0) return;
  const int D = L.head_dim, first = head * D;
  const uint8_t* res = page + L.res_off;
  const uint8_t* idx = page + L.idx_off;
  const int64_t entries = int64_t(n) * k2;
  // Entry e is slot e / k2 (a shift when k2 is a power of two, as for any row <= 256 at 1%).
  const bool pow2 = (k2 & (k2 - 1)) == 0;
  const int shift = __builtin_ctz(unsigned(k2));
  auto visit = [&](int64_t e, unsigned d) {
    fn(int(pow2 ? e >> shift : e / k2), int(d), _cvtsh_ss(ld16(res + 2 * e)));
  };
  int64_t e0 = 0;
  if (L.idx_bytes == 1) {
    // index - first, wrapped to a byte, is < D exactly for this head's indices
    // (first + D <= 256 when indices are bytes).
    const __m256i base = _mm256_set1_epi8(char(first)), last = _mm256_set1_epi8(char(D - 1));
    for (; e0 + 32 <= entries; e0 += 32) {
      const __m256i t = _mm256_sub_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + e0)), base);
      uint32_t hits = uint32_t(_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_min_epu8(t, last), t)));
      while (hits) {
        const int b = __builtin_ctz(hits);
        hits &= hits - 1;
        visit(e0 + b, unsigned(idx[e0 + b]) - unsigned(first));
      }
    }
  } else {
    // The same in 16-bit lanes, 16 at a time (first + D <= 65536; two mask bits per entry).
    const __m256i base = _mm256_set1_epi16(short(first)), last = _mm256_set1_epi16(short(D - 1));
    for (; e0 + 16 <= entries; e0 += 16) {
      const __m256i t = _mm256_sub_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + 2 * e0)), base);
      uint32_t hits = uint32_t(_mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_min_epu16(t, last), t))) & 0x55555555u;
      while (hits) {
        const int b = __builtin_ctz(hits) / 2;
        hits &= hits - 1;
        visit(e0 + b, unsigned(ld16(idx + 2 * (e0 + b))) - unsigned(first));
      }
    }
  }
  for (int64_t e = e0; e < entries; ++e) {
    const int index = L.idx_bytes == 1 ? idx[e] : ld16(idx + 2 * e);
    const unsigned d = unsigned(index - first);
    if (d < unsigned(D)) visit(e, d);
  }
}

// Stage "outlier residuals" of a decoded tile (keys channel-major, values
// token-major): adds each stored fp16 residual whose index falls in `head` to
// its element. (A branch-free variant, misses adding to a ring of dummies,
// measured no faster: the sparse entries cost the same either way.)
inline void add_outliers(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const bool key = L.role == KvRole::key;
  const int64_t ds = key ? kKvPageTokens : 1, js = key ? 1 : L.head_dim;
  for_each_outlier(L, page, head, n, [&](int j, int d, float e) { dst[int64_t(d) * ds + j * js] += e; });
}

// 4-bit codes, 32 at a time, looked up with byte shuffles (FAISS fast-scan
// style): the 16-entry float table split into 4 byte planes, one vpshufb per
// plane gives byte k of every element's level, and unpacks reassemble the
// floats (bit-exact: the very bytes of L[c]). ~9 uops per 8 elements against
// ~12 for unpack-by-shift + two vpermps + blend.
struct Lut4Bytes {
  __m256i plane[4];
  // From the table's byte planes (64 bytes: byte b of entry l at planes[16 * b + l];
  // KvCodecLayout::level_planes, channel_planes).
  explicit Lut4Bytes(const uint8_t* planes) {
    for (int b = 0; b < 4; ++b)
      plane[b] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(planes + 16 * b)));
  }
  // Levels of the 32 codes packed LSB-first in 16 bytes at p, in element order.
  inline void lookup32(const uint8_t* p, __m256 out[4]) const {
    __m256 f[4];
    lookup32_lanes(p, f);
    out[0] = _mm256_permute2f128_ps(f[0], f[1], 0x20);
    out[1] = _mm256_permute2f128_ps(f[2], f[3], 0x20);
    out[2] = _mm256_permute2f128_ps(f[0], f[1], 0x31);
    out[3] = _mm256_permute2f128_ps(f[2], f[3], 0x31);
  }
  // The same levels in the order the unpacks leave them, per 128-bit lane:
  // out[k] holds elements 4k..4k+3 (low lane) and 16+4k..16+4k+3 (high lane).
  // For a caller that keeps its own vectors in that order (a sum over slots
  // into per-element accumulators), four cross-lane permutes fewer per call.
  // The 32 codes at p as bytes, element order per 128-bit lane (what the shuffles index).
  static inline __m256i codes32(const uint8_t* p) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
    // Element 2i is the low nibble of byte i, 2i+1 the high one.
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
  }
  // Half H of lookup32_lanes: out[2H] and out[2H + 1] only. Two halves take
  // four byte shuffles more than one whole lookup, for a caller that keeps one
  // half's accumulators at a time (4 rows x 2 vectors fit 16 registers, 4 x 4
  // do not).
  template <int H>
  inline void lanes_half(__m256i codes, __m256& o0, __m256& o1) const {
    const __m256i b0 = _mm256_shuffle_epi8(plane[0], codes), b1 = _mm256_shuffle_epi8(plane[1], codes);
    const __m256i w01 = H == 0 ? _mm256_unpacklo_epi8(b0, b1) : _mm256_unpackhi_epi8(b0, b1);
    const __m256i b2 = _mm256_shuffle_epi8(plane[2], codes), b3 = _mm256_shuffle_epi8(plane[3], codes);
    const __m256i w23 = H == 0 ? _mm256_unpacklo_epi8(b2, b3) : _mm256_unpackhi_epi8(b2, b3);
    o0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01, w23));
    o1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01, w23));
  }
  inline void lookup32_lanes(const uint8_t* p, __m256 out[4]) const { lanes_all(codes32(p), out); }
  inline void lanes_all(__m256i codes, __m256 out[4]) const {
    const __m256i b0 = _mm256_shuffle_epi8(plane[0], codes), b1 = _mm256_shuffle_epi8(plane[1], codes);
    const __m256i b2 = _mm256_shuffle_epi8(plane[2], codes), b3 = _mm256_shuffle_epi8(plane[3], codes);
    const __m256i w01l = _mm256_unpacklo_epi8(b0, b1), w01h = _mm256_unpackhi_epi8(b0, b1);
    const __m256i w23l = _mm256_unpacklo_epi8(b2, b3), w23h = _mm256_unpackhi_epi8(b2, b3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01l, w23l));  // 0..3   | 16..19
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01l, w23l));  // 4..7   | 20..23
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01h, w23h));  // 8..11  | 24..27
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01h, w23h));  // 12..15 | 28..31
  }
};

}  // namespace
}  // namespace kvq::simd::kvx

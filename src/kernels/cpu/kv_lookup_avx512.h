// Private to the AVX-512 kernels that read packed KV pages
// (kv_decode_avx512.cpp, attention_avx512.cpp): unpacking 2/3/4-bit codes 16 at
// a time, level lookups, per-slot scales. Include only from *_avx512.cpp files.
// Internal linkage throughout (see kv_lookup_avx2.h for why).
#pragma once
#include <immintrin.h>

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

}  // namespace
}  // namespace kvq::simd::kvx512

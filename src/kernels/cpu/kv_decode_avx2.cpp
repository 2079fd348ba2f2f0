// AVX2 tile decoders (see kv_decode.h). Compiled with -ffp-contract=off: each
// zp + r * L is a multiply then an add, as in the scalar codecs, so tiles are
// bit-identical to KvCodec::decode.
#include <immintrin.h>

#include <cstring>

#include "base/fp16.h"
#include "kernels/cpu/kv_decode.h"

namespace kvq::simd {

namespace {

constexpr int T = kKvPageTokens;

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
// slots [0, n) that falls in `head`, in the codec's order.
template <typename Fn>
inline void for_each_outlier(const KvCodecLayout& L, const uint8_t* page, int head, int n, Fn&& fn) {
  const int k2 = 2 * L.outliers_per_tail;
  if (k2 == 0) return;
  const int D = L.head_dim, first = head * D;
  for (int j = 0; j < n; ++j) {
    const uint8_t* res = page + L.res_off + int64_t(j) * k2 * 2;
    const uint8_t* idx = page + L.idx_off + int64_t(j) * k2 * L.idx_bytes;
    for (int s = 0; s < k2; ++s) {
      const int index = L.idx_bytes == 1 ? idx[s] : ld16(idx + 2 * s);
      const unsigned d = unsigned(index - first);
      if (d < unsigned(D)) fn(j, int(d), _cvtsh_ss(ld16(res + 2 * s)));
    }
  }
}

// Stage "outlier residuals": adds each stored fp16 residual whose index falls
// in `head` to its element. (A branch-free variant, misses adding to a ring of
// dummies, measured no faster: the sparse entries cost the same either way.)
void add_outliers(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const bool key = L.role == KvRole::key;
  const int64_t ds = key ? T : 1, js = key ? 1 : L.head_dim;
  for_each_outlier(L, page, head, n, [&](int j, int d, float e) { dst[int64_t(d) * ds + j * js] += e; });
}

// Keys, channel-major dst[d * T + j]: each channel's 64 codes are one run of
// 8 * B bytes. Per-channel scaling folds zp and range into the channel's
// level table once (2^B entries), so each code is a single lookup.
template <int B>
void keys_quant(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int D = L.head_dim;
  const int groups = (n + 7) / 8;
  if (L.per_channel) {
    alignas(32) float table[256];
    for (int d = 0; d < D; ++d) {
      const int c = head * D + d;
      const Lut<B> lut(L.levels, L.zp[c], L.range[c], table);
      const uint8_t* run = page + int64_t(c) * L.run_bytes;
      float* out = dst + int64_t(d) * T;
      for (int g = 0; g < groups; ++g) _mm256_storeu_ps(out + 8 * g, lut(unpack8<B>(run + g * B)));
    }
  } else {
    alignas(32) float zps[T], rs[T];
    for (int g = 0; g < groups; ++g) {
      __m256 z, r;
      load_scales8(page + L.codes_bytes + int64_t(g) * 32, z, r);
      _mm256_store_ps(zps + 8 * g, z);
      _mm256_store_ps(rs + 8 * g, r);
    }
    const Lut<B> lut(L.levels);
    for (int d = 0; d < D; ++d) {
      const uint8_t* run = page + int64_t(head * D + d) * L.run_bytes;
      float* out = dst + int64_t(d) * T;
      for (int g = 0; g < groups; ++g) {
        const __m256 lv = lut(unpack8<B>(run + g * B));
        _mm256_storeu_ps(out + 8 * g, _mm256_add_ps(_mm256_load_ps(zps + 8 * g), _mm256_mul_ps(_mm256_load_ps(rs + 8 * g), lv)));
      }
    }
  }
  add_outliers(L, page, head, n, dst);
}

// 4-bit codes, 32 at a time, looked up with byte shuffles (FAISS fast-scan
// style): the 16-entry float table split into 4 byte planes, one vpshufb per
// plane gives byte k of every element's level, and unpacks reassemble the
// floats (bit-exact: the very bytes of L[c]). ~9 uops per 8 elements against
// ~12 for unpack-by-shift + two vpermps + blend.
struct Lut4Bytes {
  __m256i plane[4];
  explicit Lut4Bytes(const float* table) {
    alignas(16) uint8_t pl[4][16];
    for (int l = 0; l < 16; ++l) {
      uint32_t u;
      std::memcpy(&u, table + l, 4);
      for (int b = 0; b < 4; ++b) pl[b][l] = uint8_t(u >> (8 * b));
    }
    for (int b = 0; b < 4; ++b)
      plane[b] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(pl[b])));
  }
  // Levels of the 32 codes packed LSB-first in 16 bytes at p, in element order.
  inline void lookup32(const uint8_t* p, __m256 out[4]) const {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
    // Element 2i is the low nibble of byte i, 2i+1 the high one.
    const __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
    const __m256i b0 = _mm256_shuffle_epi8(plane[0], codes), b1 = _mm256_shuffle_epi8(plane[1], codes);
    const __m256i b2 = _mm256_shuffle_epi8(plane[2], codes), b3 = _mm256_shuffle_epi8(plane[3], codes);
    const __m256i w01l = _mm256_unpacklo_epi8(b0, b1), w01h = _mm256_unpackhi_epi8(b0, b1);
    const __m256i w23l = _mm256_unpacklo_epi8(b2, b3), w23h = _mm256_unpackhi_epi8(b2, b3);
    // Per 128-bit lane (lane 0: elements 0..15, lane 1: 16..31):
    const __m256i f0 = _mm256_unpacklo_epi16(w01l, w23l);  // 0..3   | 16..19
    const __m256i f1 = _mm256_unpackhi_epi16(w01l, w23l);  // 4..7   | 20..23
    const __m256i f2 = _mm256_unpacklo_epi16(w01h, w23h);  // 8..11  | 24..27
    const __m256i f3 = _mm256_unpackhi_epi16(w01h, w23h);  // 12..15 | 28..31
    out[0] = _mm256_castsi256_ps(_mm256_permute2x128_si256(f0, f1, 0x20));
    out[1] = _mm256_castsi256_ps(_mm256_permute2x128_si256(f2, f3, 0x20));
    out[2] = _mm256_castsi256_ps(_mm256_permute2x128_si256(f0, f1, 0x31));
    out[3] = _mm256_castsi256_ps(_mm256_permute2x128_si256(f2, f3, 0x31));
  }
};

// Values, token-major dst[j * D + d]: each slot's head vector is one packed
// run; the slot's fp16 zp and range broadcast over it.
template <int B>
void values_quant(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int D = L.head_dim;
  if constexpr (B == 4) {
    if (D % 32 == 0) {
      const Lut4Bytes lut(L.levels);
      for (int j = 0; j < n; ++j) {
        const uint8_t* sc = page + L.codes_bytes + int64_t(j) * 4;
        const __m256 zv = _mm256_set1_ps(_cvtsh_ss(ld16(sc))), rv = _mm256_set1_ps(_cvtsh_ss(ld16(sc + 2)));
        const uint8_t* run = page + (int64_t(head) * T + j) * L.run_bytes;
        float* out = dst + int64_t(j) * D;
        for (int d0 = 0; d0 < D; d0 += 32) {
          __m256 lv[4];
          lut.lookup32(run + d0 / 2, lv);
          for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + d0 + 8 * k, _mm256_add_ps(zv, _mm256_mul_ps(rv, lv[k])));
        }
      }
      add_outliers(L, page, head, n, dst);
      return;
    }
  }
  const int full = D / 8 * 8;
  const Lut<B> lut(L.levels);
  for (int j = 0; j < n; ++j) {
    const uint8_t* sc = page + L.codes_bytes + int64_t(j) * 4;
    const float zp = fp16_to_f32(ld16(sc)), r = fp16_to_f32(ld16(sc + 2));
    const __m256 zv = _mm256_set1_ps(zp), rv = _mm256_set1_ps(r);
    const uint8_t* run = page + (int64_t(head) * T + j) * L.run_bytes;
    float* out = dst + int64_t(j) * D;
    for (int d0 = 0; d0 < full; d0 += 8)
      _mm256_storeu_ps(out + d0, _mm256_add_ps(zv, _mm256_mul_ps(rv, lut(unpack8<B>(run + d0 / 8 * B)))));
    for (int d = full; d < D; ++d) {  // tail codes: bit-serial, as kv_unpack
      const int bit = d * B;
      uint32_t w = run[bit / 8];
      if (bit % 8 + B > 8) w |= uint32_t(run[bit / 8 + 1]) << 8;
      out[d] = zp + r * L.levels[(w >> (bit % 8)) & ((1u << B) - 1)];
    }
  }
  add_outliers(L, page, head, n, dst);
}

// ggml blocks of 32: element i of a block -> float, 8 at a time.
template <bool Q8>
inline void block_row(const uint8_t* blocks, int nb, float* out) {
  constexpr int bytes = Q8 ? 34 : 18;
  for (int i = 0; i < nb; ++i) {
    const uint8_t* b = blocks + i * bytes;
    const __m256 dv = _mm256_set1_ps(fp16_to_f32(ld16(b)));
    for (int k = 0; k < 4; ++k) {
      __m256i e;
      if constexpr (Q8) {
        e = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * k)));
      } else {
        // Elements 0..15: low nibbles of bytes 0..15; 16..31: high nibbles.
        e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * (k & 1))));
        if (k >= 2) e = _mm256_srli_epi32(e, 4);
        e = _mm256_sub_epi32(_mm256_and_si256(e, _mm256_set1_epi32(15)), _mm256_set1_epi32(8));
      }
      _mm256_storeu_ps(out + 32 * i + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(e), dv));
    }
  }
}

// 8x8 transpose: dst[c * ds + r] = src[r * ss + c].
inline void transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

template <bool Q8>
void blocks_tile(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int D = L.head_dim, nb = D / 32;
  const uint8_t* base = page + int64_t(head) * T * L.slot_bytes;
  if (L.role == KvRole::value) {
    for (int j = 0; j < n; ++j) block_row<Q8>(base + j * L.slot_bytes, nb, dst + int64_t(j) * D);
    return;
  }
  // Keys: 8 slots token-major into a small buffer, then 8x8 transposes into
  // the channel-major tile.
  alignas(32) float buf[8 * 512];
  for (int j0 = 0; j0 < n; j0 += 8) {
    for (int jj = 0; jj < 8; ++jj) block_row<Q8>(base + (j0 + jj) * L.slot_bytes, nb, buf + jj * D);
    for (int d0 = 0; d0 < D; d0 += 8) transpose8(buf + d0, D, dst + int64_t(d0) * T + j0, T);
  }
}

// Pre-RoPE per-channel keys, stages fused: unpack + lookup of both channels
// of each rotated pair, rotation in registers, one store; then this head's
// sparse outlier residuals, rotated the same way and added (the rotation is
// linear: R(x + e) = R(x) + R(e)). Equal to decode -> add outliers -> rotate
// up to the rounding of that reordering (not bit for bit).
template <int B>
void keys_quant_rotated(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst, const float* cs,
                        int half, bool neox) {
  const int D = L.head_dim;
  const int groups = (n + 7) / 8;
  alignas(32) float ta[256], tb[256];
  auto channel_of = [&](int i, bool second) { return neox ? (second ? i + half : i) : (second ? 2 * i + 1 : 2 * i); };
  for (int i = 0; i < half; ++i) {
    const int a = channel_of(i, false), b = channel_of(i, true);
    const int ca = head * D + a, cb = head * D + b;
    const Lut<B> la(L.levels, L.zp[ca], L.range[ca], ta), lb(L.levels, L.zp[cb], L.range[cb], tb);
    const uint8_t* ra = page + int64_t(ca) * L.run_bytes;
    const uint8_t* rb = page + int64_t(cb) * L.run_bytes;
    const float* c = cs + i * T;
    const float* sn = cs + (half + i) * T;
    float* xa = dst + int64_t(a) * T;
    float* xb = dst + int64_t(b) * T;
    for (int g = 0; g < groups; ++g) {
      const __m256 x = la(unpack8<B>(ra + g * B)), y = lb(unpack8<B>(rb + g * B));
      const __m256 cv = _mm256_loadu_ps(c + 8 * g), sv = _mm256_loadu_ps(sn + 8 * g);
      _mm256_storeu_ps(xa + 8 * g, _mm256_sub_ps(_mm256_mul_ps(x, cv), _mm256_mul_ps(y, sv)));
      _mm256_storeu_ps(xb + 8 * g, _mm256_add_ps(_mm256_mul_ps(x, sv), _mm256_mul_ps(y, cv)));
    }
  }
  // Channels past the rotated ones (n_rot < head_dim) pass through.
  for (int d = 2 * half; d < D; ++d) {
    const int c = head * D + d;
    const Lut<B> lut(L.levels, L.zp[c], L.range[c], ta);
    const uint8_t* run = page + int64_t(c) * L.run_bytes;
    for (int g = 0; g < groups; ++g) _mm256_storeu_ps(dst + int64_t(d) * T + 8 * g, lut(unpack8<B>(run + g * B)));
  }
  // Outlier residuals, rotated like the element they belong to.
  for_each_outlier(L, page, head, n, [&](int j, int d, float e) {
    if (d >= 2 * half) {
      dst[int64_t(d) * T + j] += e;
      return;
    }
    const int i = neox ? d % half : d / 2;
    const bool second = neox ? d >= half : (d & 1) != 0;
    const float c = cs[i * T + j], sn = cs[(half + i) * T + j];
    float* xa = dst + int64_t(channel_of(i, false)) * T + j;
    float* xb = dst + int64_t(channel_of(i, true)) * T + j;
    if (!second) {  // e on x: (x + e, y) -> x' += e c, y' += e s
      *xa += e * c;
      *xb += e * sn;
    } else {  // e on y: x' -= e s, y' += e c
      *xa -= e * sn;
      *xb += e * c;
    }
  });
}

}  // namespace

bool kv_decode_rotate_keys_avx2(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst,
                                const float* cs, int half, bool neox) {
  if (L.scheme != KvScheme::quant || L.role != KvRole::key || !L.per_channel || !L.levels || !L.zp || !L.range)
    return false;
  switch (L.bits) {
    case 2: keys_quant_rotated<2>(L, page, head, n, dst, cs, half, neox); return true;
    case 3: keys_quant_rotated<3>(L, page, head, n, dst, cs, half, neox); return true;
    case 4: keys_quant_rotated<4>(L, page, head, n, dst, cs, half, neox); return true;
    case 8: keys_quant_rotated<8>(L, page, head, n, dst, cs, half, neox); return true;
    default: return false;
  }
}

bool kv_decode_tile_avx2(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const bool key = L.role == KvRole::key;
  switch (L.scheme) {
    case KvScheme::quant:
      if (!L.levels || (key && L.per_channel && (!L.zp || !L.range))) return false;
      switch (L.bits) {
        case 2: key ? keys_quant<2>(L, page, head, n, dst) : values_quant<2>(L, page, head, n, dst); return true;
        case 3: key ? keys_quant<3>(L, page, head, n, dst) : values_quant<3>(L, page, head, n, dst); return true;
        case 4: key ? keys_quant<4>(L, page, head, n, dst) : values_quant<4>(L, page, head, n, dst); return true;
        case 8: key ? keys_quant<8>(L, page, head, n, dst) : values_quant<8>(L, page, head, n, dst); return true;
        default: return false;
      }
    case KvScheme::q8_0:
      if (L.head_dim % 32 != 0 || L.head_dim > 512) return false;
      blocks_tile<true>(L, page, head, n, dst);
      return true;
    case KvScheme::q4_0:
      if (L.head_dim % 32 != 0 || L.head_dim > 512) return false;
      blocks_tile<false>(L, page, head, n, dst);
      return true;
    default: return false;  // f32 (a copy) and f16 (F16C row conversion) are fast already
  }
}

// Stage "RoPE at each key's position": per rotated pair, 8 slots at a time
// against the page-transposed angle table.
void kv_rotate_key_tile_avx2(float* kt, int n, const float* cs, int half, bool neox) {
  const int n8 = (n + 7) / 8 * 8;
  for (int i = 0; i < half; ++i) {
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float* c = cs + i * T;
    const float* s = cs + (half + i) * T;
    float* xa = kt + a * T;
    float* xb = kt + b * T;
    for (int j = 0; j < n8; j += 8) {
      const __m256 x = _mm256_loadu_ps(xa + j), y = _mm256_loadu_ps(xb + j);
      const __m256 cv = _mm256_loadu_ps(c + j), sv = _mm256_loadu_ps(s + j);
      _mm256_storeu_ps(xa + j, _mm256_sub_ps(_mm256_mul_ps(x, cv), _mm256_mul_ps(y, sv)));
      _mm256_storeu_ps(xb + j, _mm256_add_ps(_mm256_mul_ps(x, sv), _mm256_mul_ps(y, cv)));
    }
  }
}

}  // namespace kvq::simd

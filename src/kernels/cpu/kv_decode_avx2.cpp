// AVX2 tile decoders (see kv_decode.h). Compiled with -ffp-contract=off: each
// zp + r * L is a multiply then an add, as in the scalar codecs, so tiles are
// bit-identical to KvCodec::decode.
#include <immintrin.h>

#include <cstring>

#include "base/fp16.h"
#include "kernels/cpu/kv_decode.h"
#include "kernels/cpu/kv_lookup_avx2.h"

namespace kvq::simd {

namespace {

using namespace kvx;
constexpr int T = kKvPageTokens;

// Keys, channel-major dst[d * T + j]: each channel's 64 codes are one run of
// 8 * B bytes. Per-channel scaling folds zp and range into the channel's
// level table once (2^B entries), so each code is a single lookup.
template <int B>
void keys_quant(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int D = L.head_dim;
  const int groups = (n + 7) / 8;
  if constexpr (B == 4) {
    if (L.per_channel && L.channel_planes) {
      // The channel's decoded levels as byte planes: 32 slots per lookup.
      for (int d = 0; d < D; ++d) {
        const int c = head * D + d;
        const Lut4Bytes lut(L.channel_planes + int64_t(c) * 64);
        const uint8_t* run = page + int64_t(c) * L.run_bytes;
        float* out = dst + int64_t(d) * T;
        for (int h = 0; h < 2 && 32 * h < n; ++h) {
          __m256 lv[4];
          lut.lookup32(run + 16 * h, lv);
          for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + 32 * h + 8 * k, lv[k]);
        }
      }
      add_outliers(L, page, head, n, dst);
      return;
    }
  }
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

// Values, token-major dst[j * D + d]: each slot's head vector is one packed
// run; the slot's fp16 zp and range broadcast over it.
template <int B>
void values_quant(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int D = L.head_dim;
  if constexpr (B == 4) {
    if (D % 32 == 0) {
      const Lut4Bytes lut(L.level_planes);
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
  // 4-bit codes with per-channel byte planes: 32 slots per lookup (byte shuffles);
  // otherwise 8 per lookup (shifts + vpermps).
  const bool planes = B == 4 && L.channel_planes;
  for (int i = 0; i < half; ++i) {
    const int a = rope_channel(i, false, half, neox), b = rope_channel(i, true, half, neox);
    const int ca = head * D + a, cb = head * D + b;
    const uint8_t* ra = page + int64_t(ca) * L.run_bytes;
    const uint8_t* rb = page + int64_t(cb) * L.run_bytes;
    const float* c = cs + i * T;
    const float* sn = cs + (half + i) * T;
    float* xa = dst + int64_t(a) * T;
    float* xb = dst + int64_t(b) * T;
    // Rotates slots j..j+7 of the pair (x, y) at their angles and stores them.
    // (Fused multiply-adds: this pass is equal to the staged one up to rounding anyway.)
    auto rotate8 = [&](int j, __m256 x, __m256 y) {
      const __m256 cv = _mm256_loadu_ps(c + j), sv = _mm256_loadu_ps(sn + j);
      _mm256_storeu_ps(xa + j, _mm256_fmsub_ps(x, cv, _mm256_mul_ps(y, sv)));
      _mm256_storeu_ps(xb + j, _mm256_fmadd_ps(x, sv, _mm256_mul_ps(y, cv)));
    };
    if (planes) {
      const Lut4Bytes la(L.channel_planes + int64_t(ca) * 64), lb(L.channel_planes + int64_t(cb) * 64);
      for (int h = 0; h < 2 && 32 * h < n; ++h) {
        __m256 x[4], y[4];
        la.lookup32(ra + 16 * h, x);
        lb.lookup32(rb + 16 * h, y);
        for (int k = 0; k < 4; ++k) rotate8(32 * h + 8 * k, x[k], y[k]);
      }
    } else {
      const Lut<B> la(L.levels, L.zp[ca], L.range[ca], ta), lb(L.levels, L.zp[cb], L.range[cb], tb);
      for (int g = 0; g < groups; ++g) rotate8(8 * g, la(unpack8<B>(ra + g * B)), lb(unpack8<B>(rb + g * B)));
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
  for_each_outlier(L, page, head, n, [&](int j, int d, float e) { add_rotated_residual(dst, j, d, e, cs, half, neox); });
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
    const int a = rope_channel(i, false, half, neox), b = rope_channel(i, true, half, neox);
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

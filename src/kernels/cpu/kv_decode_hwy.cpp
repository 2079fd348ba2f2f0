// Portable SIMD tile decoders (see kv_decode.h), written once with Google
// Highway for the CPUs the AVX2 decoders do not cover: Arm (NEON, SVE), x86
// without AVX2 (SSE4, SSSE3). The same named stages as the AVX2 file: unpack
// codes to bytes -> level lookup by byte shuffles (the 16-entry table as 4 byte
// planes, FAISS fast-scan style) -> per-channel or per-token scale/offset ->
// sparse outlier residuals; pre-RoPE keys then rotated, or all of it fused.
//
// 128-bit vectors throughout: byte shuffles look up within 128-bit blocks, and
// at that width the unpacks leave the elements in their natural order. Built
// with -ffp-contract=off: each zp + r * L is a multiply then an add, so tiles
// are bit-identical to KvCodec::decode (the fused key path excepted, as in
// AVX2). The one-lane baseline target declines (returns false): the codecs
// decode there.
//
// This file is included once per target by Highway's foreach_target.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/kv_decode_hwy.cpp"
#ifndef HWY_COMPILE_ALL_ATTAINABLE
#define HWY_COMPILE_ALL_ATTAINABLE
#endif
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/highway.h>

#include "base/fp16.h"
#include "kernels/cpu/kv_decode.h"
#include "kernels/cpu/kv_lookup_hwy-inl.h"

HWY_BEFORE_NAMESPACE();
namespace kvq::simd::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

#if HWY_TARGET == HWY_SCALAR

bool DecodeTileHwy(const KvCodecLayout&, const uint8_t*, int, int, float*) { return false; }
bool DecodeRotateKeysHwy(const KvCodecLayout&, const uint8_t*, int, int, float*, const float*, int, bool) { return false; }
bool RotateKeyTileHwy(float*, int, const float*, int, bool) { return false; }

#else

using kvh::T;
using kvh::ld16;
using namespace kvh::HWY_NAMESPACE;  // DF, D8, VF, V8, unpack, load_planes, lookup16

// Stage "outlier residuals": adds each of this head's residuals to its element.
void add_outliers(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const bool key = L.role == KvRole::key;
  const int64_t ds = key ? T : 1, js = key ? 1 : L.head_dim;
  kvh::for_each_outlier(L, page, head, n, [&](int j, int d, float e) { dst[int64_t(d) * ds + j * js] += e; });
}

// Keys, channel-major dst[d * T + j]: each channel's 64 codes are one run;
// per-channel keys look up the channel's decoded levels directly, per-token
// keys look up L and scale by each slot's (zp, r).
template <int B>
void keys_quant(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const DF df;
  const int D = L.head_dim;
  const int n16 = (n + 15) / 16 * 16;
  alignas(16) uint8_t codes[T];
  alignas(16) float zps[T] = {}, rs[T] = {};
  if (!L.per_channel)
    for (int j = 0; j < n; ++j) {
      const uint8_t* sc = page + L.codes_bytes + int64_t(j) * 4;
      zps[j] = fp16_to_f32(ld16(sc));
      rs[j] = fp16_to_f32(ld16(sc + 2));
    }
  for (int d = 0; d < D; ++d) {
    const int64_t c = int64_t(head) * D + d;
    unpack<B>(page + c * L.run_bytes, T, codes);
    float* out = dst + int64_t(d) * T;
    V8 p0, p1, p2, p3;
    load_planes(L.per_channel ? L.channel_planes + c * 64 : L.level_planes, p0, p1, p2, p3);
    // Per-channel: the levels are the keys; per-token: zp_j + r_j * L[c].
    auto put = [&](int s, VF lv) {
      if (!L.per_channel) lv = hn::Add(hn::LoadU(df, zps + s), hn::Mul(hn::LoadU(df, rs + s), lv));
      hn::StoreU(lv, df, out + s);
    };
    for (int j = 0; j < n16; j += 16) {
      VF l0, l1, l2, l3;
      lookup16(p0, p1, p2, p3, codes + j, l0, l1, l2, l3);
      put(j, l0), put(j + 4, l1), put(j + 8, l2), put(j + 12, l3);
    }
  }
  add_outliers(L, page, head, n, dst);
}

// Values, token-major dst[j * D + d]: each slot's head vector is one run; the
// slot's fp16 zp and range broadcast over it.
template <int B>
void values_quant(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const DF df;
  const int D = L.head_dim, full = D / 16 * 16;
  uint8_t codes[512 + 16];
  V8 p0, p1, p2, p3;
  load_planes(L.level_planes, p0, p1, p2, p3);
  for (int j = 0; j < n; ++j) {
    const uint8_t* sc = page + L.codes_bytes + int64_t(j) * 4;
    const float zp = fp16_to_f32(ld16(sc)), r = fp16_to_f32(ld16(sc + 2));
    const VF zv = hn::Set(df, zp), rv = hn::Set(df, r);
    unpack<B>(page + (int64_t(head) * T + j) * L.run_bytes, D, codes);
    float* out = dst + int64_t(j) * D;
    auto put = [&](int d, VF lv) { hn::StoreU(hn::Add(zv, hn::Mul(rv, lv)), df, out + d); };
    for (int d0 = 0; d0 < full; d0 += 16) {
      VF l0, l1, l2, l3;
      lookup16(p0, p1, p2, p3, codes + d0, l0, l1, l2, l3);
      put(d0, l0), put(d0 + 4, l1), put(d0 + 8, l2), put(d0 + 12, l3);
    }
    for (int d = full; d < D; ++d) out[d] = zp + r * L.levels[codes[d]];
  }
  add_outliers(L, page, head, n, dst);
}

// ggml blocks of 32 of one head vector -> floats (d * q, as the codec).
template <bool Q8>
HWY_INLINE void block_row(const uint8_t* HWY_RESTRICT blocks, int nb, float* HWY_RESTRICT out) {
  const DF df;
  const hn::Rebind<int32_t, DF> di;
  const hn::Rebind<int8_t, DF> dq;  // 4 int8 lanes
  const D8 d8;
  constexpr int bytes = Q8 ? 34 : 18;
  alignas(16) int8_t q[32];
  for (int i = 0; i < nb; ++i) {
    const uint8_t* b = blocks + i * bytes;
    const VF dv = hn::Set(df, fp16_to_f32(ld16(b)));
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    if constexpr (!Q8) {
      // Elements 0..15: low nibbles of bytes 0..15, minus 8; 16..31: high nibbles.
      const V8 x = hn::LoadU(d8, b + 2), eight = hn::Set(d8, 8);
      hn::StoreU(hn::Sub(hn::And(x, hn::Set(d8, 0x0f)), eight), d8, reinterpret_cast<uint8_t*>(q));
      hn::StoreU(hn::Sub(hn::ShiftRight<4>(x), eight), d8, reinterpret_cast<uint8_t*>(q + 16));
      qs = q;
    }
    for (int k = 0; k < 32; k += 4)
      hn::StoreU(hn::Mul(hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(dq, qs + k))), dv), df, out + 32 * i + k);
  }
}

// 4x4 transpose: dst[c * ds + r] = src[r * ss + c].
HWY_INLINE void transpose4(const float* src, int64_t ss, float* dst, int64_t ds) {
  const DF df;
  const VF r0 = hn::LoadU(df, src), r1 = hn::LoadU(df, src + ss);
  const VF r2 = hn::LoadU(df, src + 2 * ss), r3 = hn::LoadU(df, src + 3 * ss);
  const VF t0 = hn::InterleaveLower(df, r0, r1), t1 = hn::InterleaveLower(df, r2, r3);  // a0 b0 a1 b1 | c0 d0 c1 d1
  const VF t2 = hn::InterleaveUpper(df, r0, r1), t3 = hn::InterleaveUpper(df, r2, r3);  // a2 b2 a3 b3 | c2 d2 c3 d3
  hn::StoreU(hn::ConcatLowerLower(df, t1, t0), df, dst);
  hn::StoreU(hn::ConcatUpperUpper(df, t1, t0), df, dst + ds);
  hn::StoreU(hn::ConcatLowerLower(df, t3, t2), df, dst + 2 * ds);
  hn::StoreU(hn::ConcatUpperUpper(df, t3, t2), df, dst + 3 * ds);
}

template <bool Q8>
void blocks_tile(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int D = L.head_dim, nb = D / 32;
  const uint8_t* base = page + int64_t(head) * T * L.slot_bytes;
  if (L.role == KvRole::value) {
    for (int j = 0; j < n; ++j) block_row<Q8>(base + j * L.slot_bytes, nb, dst + int64_t(j) * D);
    return;
  }
  // Keys: 4 slots token-major into a small buffer, then 4x4 transposes into
  // the channel-major tile (slots up to n rounded to 4: all within the page).
  alignas(16) float buf[4 * 512];
  for (int j0 = 0; j0 < n; j0 += 4) {
    for (int jj = 0; jj < 4; ++jj) block_row<Q8>(base + (j0 + jj) * L.slot_bytes, nb, buf + jj * D);
    for (int d0 = 0; d0 < D; d0 += 4) transpose4(buf + d0, D, dst + int64_t(d0) * T + j0, T);
  }
}

// Half -> float, exact: with the hardware conversion where the target has one
// (F16C in Highway's AVX2 and AVX-512 targets, Arm's fcvt), else shifted into
// a float's bits and scaled by 2^112, which is exact for normals and
// subnormals alike, infinities and NaNs patched (Highway's own emulation
// maps the half infinity to 65536).
#if HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3 || HWY_TARGET == HWY_EMU128 || \
    (HWY_TARGET == HWY_NEON && !(__ARM_FP & 2))
HWY_INLINE VF half_to_float(const uint16_t* HWY_RESTRICT p) {
  const DF df;
  const hn::RebindToUnsigned<DF> du;
  const hn::Rebind<uint16_t, DF> dh;
  const auto h = hn::PromoteTo(du, hn::LoadU(dh, p));
  const auto mag = hn::ShiftLeft<13>(hn::And(h, hn::Set(du, 0x7fff)));
  const VF scaled = hn::Mul(hn::BitCast(df, mag), hn::Set(df, 5.192296858534828e+33f));  // 2^112
  const auto special = hn::Eq(hn::And(h, hn::Set(du, 0x7c00)), hn::Set(du, 0x7c00));
  const VF f = hn::IfThenElse(hn::RebindMask(df, special), hn::BitCast(df, hn::Or(mag, hn::Set(du, 0x7f800000))), scaled);
  return hn::Or(f, hn::BitCast(df, hn::ShiftLeft<16>(hn::And(h, hn::Set(du, 0x8000)))));
}
#else
HWY_INLINE VF half_to_float(const uint16_t* HWY_RESTRICT p) {
  const hn::Rebind<hwy::float16_t, DF> dh;
  return hn::PromoteTo(DF(), hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(p)));
}
#endif

// f16 (keys or values): the head's contiguous block, every slot.
void f16_tile(const KvCodecLayout& L, const uint8_t* page, int head, float* dst) {
  const DF df;
  const int64_t count = int64_t(L.head_dim) * T;
  const auto* src = reinterpret_cast<const uint16_t*>(page) + int64_t(head) * count;
  for (int64_t i = 0; i < count; i += 4) hn::StoreU(half_to_float(src + i), df, dst + i);
}

bool DecodeTileHwy(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const bool key = L.role == KvRole::key;
  switch (L.scheme) {
    case KvScheme::quant:
      if (!L.levels || !L.level_planes || (key && L.per_channel && !L.channel_planes)) return false;
      if (!key && L.head_dim > 512) return false;
      switch (L.bits) {
        case 2: key ? keys_quant<2>(L, page, head, n, dst) : values_quant<2>(L, page, head, n, dst); return true;
        case 3: key ? keys_quant<3>(L, page, head, n, dst) : values_quant<3>(L, page, head, n, dst); return true;
        case 4: key ? keys_quant<4>(L, page, head, n, dst) : values_quant<4>(L, page, head, n, dst); return true;
        default: return false;  // 8-bit codes (256-entry tables): the codec
      }
    case KvScheme::q8_0:
      if (L.head_dim % 32 != 0 || L.head_dim > 512) return false;
      blocks_tile<true>(L, page, head, n, dst);
      return true;
    case KvScheme::q4_0:
      if (L.head_dim % 32 != 0 || L.head_dim > 512) return false;
      blocks_tile<false>(L, page, head, n, dst);
      return true;
    case KvScheme::f16: f16_tile(L, page, head, dst); return true;
    default: return false;  // f32: the codec's copy
  }
}

// Stage "RoPE at each key's position": per rotated pair, 4 slots at a time
// against the page-transposed angle table (a multiply, a multiply, an add:
// as the scalar rotation).
bool RotateKeyTileHwy(float* kt, int n, const float* cs, int half, bool neox) {
  const DF df;
  const int n4 = (n + 3) / 4 * 4;
  for (int i = 0; i < half; ++i) {
    const int a = rope_channel(i, false, half, neox), b = rope_channel(i, true, half, neox);
    const float* c = cs + i * T;
    const float* s = cs + (half + i) * T;
    float* xa = kt + a * T;
    float* xb = kt + b * T;
    for (int j = 0; j < n4; j += 4) {
      const VF x = hn::LoadU(df, xa + j), y = hn::LoadU(df, xb + j);
      const VF cv = hn::LoadU(df, c + j), sv = hn::LoadU(df, s + j);
      hn::StoreU(hn::Sub(hn::Mul(x, cv), hn::Mul(y, sv)), df, xa + j);
      hn::StoreU(hn::Add(hn::Mul(x, sv), hn::Mul(y, cv)), df, xb + j);
    }
  }
  return true;
}

// Pre-RoPE per-channel keys, stages fused: both channels of each rotated pair
// looked up, rotated in registers, stored once; then this head's outlier
// residuals, rotated the same way and added (R(x + e) = R(x) + R(e)). Equal to
// decode -> outliers -> rotate up to the rounding of that reordering.
template <int B>
void keys_quant_rotated(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst, const float* cs,
                        int half, bool neox) {
  const DF df;
  const int D = L.head_dim;
  const int n16 = (n + 15) / 16 * 16;
  alignas(16) uint8_t ca[T], cb[T];
  for (int i = 0; i < half; ++i) {
    const int a = rope_channel(i, false, half, neox), b = rope_channel(i, true, half, neox);
    const int64_t ra = int64_t(head) * D + a, rb = int64_t(head) * D + b;
    unpack<B>(page + ra * L.run_bytes, T, ca);
    unpack<B>(page + rb * L.run_bytes, T, cb);
    V8 a0, a1, a2, a3, b0, b1, b2, b3;
    load_planes(L.channel_planes + ra * 64, a0, a1, a2, a3);
    load_planes(L.channel_planes + rb * 64, b0, b1, b2, b3);
    const float* c = cs + i * T;
    const float* sn = cs + (half + i) * T;
    float* xa = dst + int64_t(a) * T;
    float* xb = dst + int64_t(b) * T;
    // Rotates slots s..s+3 of the pair (x, y) at their angles and stores them.
    auto rotate4 = [&](int s, VF x, VF y) {
      const VF cv = hn::LoadU(df, c + s), sv = hn::LoadU(df, sn + s);
      hn::StoreU(hn::MulSub(x, cv, hn::Mul(y, sv)), df, xa + s);
      hn::StoreU(hn::MulAdd(x, sv, hn::Mul(y, cv)), df, xb + s);
    };
    for (int j = 0; j < n16; j += 16) {
      VF x0, x1, x2, x3, y0, y1, y2, y3;
      lookup16(a0, a1, a2, a3, ca + j, x0, x1, x2, x3);
      lookup16(b0, b1, b2, b3, cb + j, y0, y1, y2, y3);
      rotate4(j, x0, y0), rotate4(j + 4, x1, y1), rotate4(j + 8, x2, y2), rotate4(j + 12, x3, y3);
    }
  }
  // Channels past the rotated ones (n_rot < head_dim) pass through.
  for (int d = 2 * half; d < D; ++d) {
    const int64_t r = int64_t(head) * D + d;
    unpack<B>(page + r * L.run_bytes, T, ca);
    V8 p0, p1, p2, p3;
    load_planes(L.channel_planes + r * 64, p0, p1, p2, p3);
    float* out = dst + int64_t(d) * T;
    for (int j = 0; j < n16; j += 16) {
      VF x0, x1, x2, x3;
      lookup16(p0, p1, p2, p3, ca + j, x0, x1, x2, x3);
      hn::StoreU(x0, df, out + j), hn::StoreU(x1, df, out + j + 4);
      hn::StoreU(x2, df, out + j + 8), hn::StoreU(x3, df, out + j + 12);
    }
  }
  // Outlier residuals, rotated like the element they belong to.
  kvh::for_each_outlier(L, page, head, n,
                        [&](int j, int d, float e) { add_rotated_residual(dst, j, d, e, cs, half, neox); });
}

bool DecodeRotateKeysHwy(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst, const float* cs,
                         int half, bool neox) {
  if (L.scheme != KvScheme::quant || L.role != KvRole::key || !L.per_channel || !L.channel_planes) return false;
  switch (L.bits) {
    case 2: keys_quant_rotated<2>(L, page, head, n, dst, cs, half, neox); return true;
    case 3: keys_quant_rotated<3>(L, page, head, n, dst, cs, half, neox); return true;
    case 4: keys_quant_rotated<4>(L, page, head, n, dst, cs, half, neox); return true;
    default: return false;
  }
}

#endif  // HWY_TARGET == HWY_SCALAR

}  // namespace kvq::simd::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "kernels/cpu/hwy_dispatch.h"

namespace kvq::simd {

HWY_EXPORT(DecodeTileHwy);
HWY_EXPORT(RotateKeyTileHwy);
HWY_EXPORT(DecodeRotateKeysHwy);

bool kv_decode_tile_portable(int64_t target, const KvCodecLayout& layout, const uint8_t* page, int head, int n,
                             float* dst) {
  return KVQ_HWY_AT_TARGET(DecodeTileHwy, target)(layout, page, head, n, dst);
}

bool kv_rotate_key_tile_portable(int64_t target, float* kt, int n, const float* cs, int half, bool neox) {
  return KVQ_HWY_AT_TARGET(RotateKeyTileHwy, target)(kt, n, cs, half, neox);
}

bool kv_decode_rotate_keys_portable(int64_t target, const KvCodecLayout& layout, const uint8_t* page, int head, int n,
                                    float* dst, const float* cs, int half, bool neox) {
  return KVQ_HWY_AT_TARGET(DecodeRotateKeysHwy, target)(layout, page, head, n, dst, cs, half, neox);
}

}  // namespace kvq::simd
#endif  // HWY_ONCE

// Private to the portable (Highway) kernels that read packed KV pages
// (kv_decode_hwy.cpp, attention_hwy.cpp): the sparse outlier walk, and per
// Highway target the unpacking of codes to bytes and the byte-plane level
// lookups, on 128-bit vectors (byte shuffles look up within 128-bit blocks,
// and at that width the interleaves leave elements in their natural order).
// Integer and bit operations only, so the includers' floating-point
// contraction settings do not matter here.
//
// Highway's per-target header convention: included once per target by the
// includer's foreach_target pass (the toggled guard below), the shared part once.
#ifndef KVQ_KV_LOOKUP_HWY_SHARED
#define KVQ_KV_LOOKUP_HWY_SHARED
#include <cstdint>
#include <cstring>

#include "base/fp16.h"
#include "formats/kv_bitpack.h"
#include "formats/kv_format.h"

namespace kvq::kvh {
namespace {

constexpr int T = kKvPageTokens;

inline uint16_t ld16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Calls fn(slot j, channel d of `head`, residual e) for each stored outlier of
// slots [0, n) that falls in `head`, in the codec's order.
template <typename Fn>
void for_each_outlier(const KvCodecLayout& L, const uint8_t* page, int head, int n, Fn&& fn) {
  const int k2 = 2 * L.outliers_per_tail;
  const int D = L.head_dim, first = head * D;
  const uint8_t* res = page + L.res_off;
  const uint8_t* idx = page + L.idx_off;
  for (int j = 0; j < n; ++j)
    for (int s = 0; s < k2; ++s) {
      const int64_t e = int64_t(j) * k2 + s;
      const int index = L.idx_bytes == 1 ? idx[e] : ld16(idx + 2 * e);
      const unsigned d = unsigned(index - first);
      if (d < unsigned(D)) fn(j, int(d), fp16_to_f32(ld16(res + 2 * e)));
    }
}

}  // namespace
}  // namespace kvq::kvh
#endif  // KVQ_KV_LOOKUP_HWY_SHARED

#if defined(KVQ_KV_LOOKUP_HWY_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef KVQ_KV_LOOKUP_HWY_INL_H_
#undef KVQ_KV_LOOKUP_HWY_INL_H_
#else
#define KVQ_KV_LOOKUP_HWY_INL_H_
#endif

#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace kvq::kvh::HWY_NAMESPACE {
#if HWY_TARGET != HWY_SCALAR  // 128-bit vectors: not on the one-lane baseline

namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::Full128<float>;
using D8 = hn::Full128<uint8_t>;
using D16 = hn::Full128<uint16_t>;
using VF = hn::Vec<DF>;
using V8 = hn::Vec<D8>;

// Stage "unpack": m codes of B bits (LSB-first) at `run` into bytes, 32 or 64
// at a time from one 16-byte load (4 and 2 bits: shifts and interleaves; 3
// bits: byte shuffles and multiplies), the tails by the scalar unpacker; reads
// no byte past the m codes.
template <int B>
HWY_INLINE void unpack(const uint8_t* HWY_RESTRICT run, int m, uint8_t* HWY_RESTRICT codes) {
  const D8 d8;
  const D16 d16;
  int done = 0;
  if constexpr (B == 4) {
    for (; done + 32 <= m; done += 32) {
      // Element 2i is the low nibble of byte i, 2i+1 the high one.
      const V8 x = hn::LoadU(d8, run + done / 2);
      const V8 lo = hn::And(x, hn::Set(d8, 0x0f)), hi = hn::ShiftRight<4>(x);
      hn::StoreU(hn::InterleaveLower(d8, lo, hi), d8, codes + done);
      hn::StoreU(hn::InterleaveUpper(d8, lo, hi), d8, codes + done + 16);
    }
  } else if constexpr (B == 2) {
    for (; done + 64 <= m; done += 64) {
      // Element 4i + k is bits 2k, 2k+1 of byte i.
      const V8 x = hn::LoadU(d8, run + done / 4), three = hn::Set(d8, 3);
      const V8 c0 = hn::And(x, three), c1 = hn::And(hn::ShiftRight<2>(x), three);
      const V8 c2 = hn::And(hn::ShiftRight<4>(x), three), c3 = hn::ShiftRight<6>(x);
      const auto p01l = hn::BitCast(d16, hn::InterleaveLower(d8, c0, c1));
      const auto p01h = hn::BitCast(d16, hn::InterleaveUpper(d8, c0, c1));
      const auto p23l = hn::BitCast(d16, hn::InterleaveLower(d8, c2, c3));
      const auto p23h = hn::BitCast(d16, hn::InterleaveUpper(d8, c2, c3));
      hn::StoreU(hn::BitCast(d8, hn::InterleaveLower(d16, p01l, p23l)), d8, codes + done);
      hn::StoreU(hn::BitCast(d8, hn::InterleaveUpper(d16, p01l, p23l)), d8, codes + done + 16);
      hn::StoreU(hn::BitCast(d8, hn::InterleaveLower(d16, p01h, p23h)), d8, codes + done + 32);
      hn::StoreU(hn::BitCast(d8, hn::InterleaveUpper(d16, p01h, p23h)), d8, codes + done + 48);
    }
  }
  if constexpr (B == 3) {
    // 32 codes = 12 bytes, within one 16-byte load (placed to end at the run's
    // last byte where it would run past it). Each 16-bit lane takes the two
    // bytes holding its code (a byte shuffle), a multiply by 2^(7 - shift)
    // brings the code to bits 7..9, a shift and a mask extract it.
    const int bytes = m * 3 / 8;
    alignas(16) static constexpr uint8_t kPairs[16] = {0, 1, 0, 1, 0, 1, 1, 2, 1, 2, 1, 2, 2, 3, 2, 2};
    alignas(16) static constexpr uint16_t kMul[8] = {128, 16, 2, 64, 8, 1, 32, 4};  // 2^(7 - (3i mod 8))
    const V8 pairs = hn::Load(d8, kPairs);
    const auto mul = hn::Load(d16, kMul), seven = hn::Set(d16, 7);
    auto group = [&](const V8& x, int first_byte) {
      const auto w = hn::BitCast(d16, hn::TableLookupBytes(x, hn::Add(pairs, hn::Set(d8, uint8_t(first_byte)))));
      return hn::And(hn::ShiftRight<7>(hn::Mul(w, mul)), seven);
    };
    for (; done + 32 <= m && bytes >= 16; done += 32) {
      const int first = done / 8 * 3, at = first + 16 <= bytes ? first : bytes - 16, o = first - at;
      const V8 x = hn::LoadU(d8, run + at);
      hn::StoreU(hn::ConcatEven(d8, hn::BitCast(d8, group(x, o + 3)), hn::BitCast(d8, group(x, o))), d8, codes + done);
      hn::StoreU(hn::ConcatEven(d8, hn::BitCast(d8, group(x, o + 9)), hn::BitCast(d8, group(x, o + 6))), d8,
                 codes + done + 16);
    }
  }
  if (done < m) kv_unpack(run + int64_t(done) * B / 8, m - done, B, codes + done);
}

// Stage "level lookup": a 16-entry float table as 4 byte planes (byte b of
// entry l at planes[16 * b + l], KvCodecLayout::level_planes / channel_planes);
// one byte shuffle per plane gives byte b of every element's level, and two
// rounds of interleaves reassemble the floats (the very bytes of the table).
// (Vectors stay in locals and parameters: SVE's sizeless vector types cannot
// be class members or array elements.)
HWY_INLINE void load_planes(const uint8_t* HWY_RESTRICT planes, V8& p0, V8& p1, V8& p2, V8& p3) {
  const D8 d8;
  p0 = hn::LoadU(d8, planes), p1 = hn::LoadU(d8, planes + 16);
  p2 = hn::LoadU(d8, planes + 32), p3 = hn::LoadU(d8, planes + 48);
}

// The levels of 16 codes (bytes at `codes`): elements 4k..4k+3 in o<k>.
HWY_INLINE void lookup16(V8 p0, V8 p1, V8 p2, V8 p3, const uint8_t* HWY_RESTRICT codes, VF& o0, VF& o1, VF& o2,
                         VF& o3) {
  const D8 d8;
  const D16 d16;
  const DF df;
  const V8 c = hn::LoadU(d8, codes);
  const V8 b0 = hn::TableLookupBytes(p0, c), b1 = hn::TableLookupBytes(p1, c);
  const V8 b2 = hn::TableLookupBytes(p2, c), b3 = hn::TableLookupBytes(p3, c);
  const auto w01l = hn::BitCast(d16, hn::InterleaveLower(d8, b0, b1));
  const auto w01h = hn::BitCast(d16, hn::InterleaveUpper(d8, b0, b1));
  const auto w23l = hn::BitCast(d16, hn::InterleaveLower(d8, b2, b3));
  const auto w23h = hn::BitCast(d16, hn::InterleaveUpper(d8, b2, b3));
  o0 = hn::BitCast(df, hn::InterleaveLower(d16, w01l, w23l));
  o1 = hn::BitCast(df, hn::InterleaveUpper(d16, w01l, w23l));
  o2 = hn::BitCast(df, hn::InterleaveLower(d16, w01h, w23h));
  o3 = hn::BitCast(df, hn::InterleaveUpper(d16, w01h, w23h));
}

#endif  // HWY_TARGET != HWY_SCALAR
}  // namespace kvq::kvh::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // KVQ_KV_LOOKUP_HWY_INL_H_

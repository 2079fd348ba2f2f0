// Dense packing of b-bit codes (1 <= b <= 8), the layout every quant KV format
// uses for its codes. LSB-first: bit t of code i is bit (i*b + t) of the byte
// stream, byte m holds stream bits 8m..8m+7 (bit 0 = its LSB). n codes take
// ceil(n*b/8) bytes. The layout does not depend on any SIMD width, so a fast
// path can be checked against these scalar helpers byte for byte.
#pragma once
#include <cstdint>

namespace kvq {

constexpr int64_t kv_packed_bytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

// Packs n codes (each < 2^bits) into kv_packed_bytes(n, bits) bytes at dst,
// overwriting them (the pad bits of the last byte become 0).
inline void kv_pack(const uint8_t* codes, int64_t n, int bits, uint8_t* dst) {
  // A 32-bit accumulator never holds more than 7 + 8 pending bits.
  uint32_t acc = 0;
  int have = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc |= uint32_t(codes[i]) << have;
    have += bits;
    if (have >= 8) {
      *dst++ = uint8_t(acc);
      acc >>= 8;
      have -= 8;
    }
  }
  if (have > 0) *dst = uint8_t(acc);
}

// Unpacks n codes from kv_packed_bytes(n, bits) bytes at src. Reads no byte
// past that length.
inline void kv_unpack(const uint8_t* src, int64_t n, int bits, uint8_t* codes) {
  if (bits == 8) {  // the common 8-bit case is a plain copy
    for (int64_t i = 0; i < n; ++i) codes[i] = src[i];
    return;
  }
  const uint32_t mask = (1u << bits) - 1;
  uint32_t acc = 0;
  int have = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (have < bits) {  // bits < 8, so one byte always completes a code
      acc |= uint32_t(*src++) << have;
      have += 8;
    }
    codes[i] = uint8_t(acc & mask);
    acc >>= bits;
    have -= bits;
  }
}

// Writes code i of a packed run in place (the other codes are kept). A code
// spans at most two bytes; the second one is only touched when it must be,
// so the run's last byte is never overrun.
inline void kv_store_code(uint8_t* run, int64_t i, int bits, uint32_t code) {
  const int64_t bit = i * bits;
  uint8_t* p = run + bit / 8;
  const int shift = int(bit % 8);
  const uint32_t mask = ((1u << bits) - 1) << shift;  // up to 15 bits wide
  const uint32_t v = code << shift;
  p[0] = uint8_t((p[0] & ~mask) | (v & mask));
  if (shift + bits > 8) p[1] = uint8_t((p[1] & ~(mask >> 8)) | ((v & mask) >> 8));
}

}  // namespace kvq

// Block layouts of the GGUF weight quantization types, bit-exact to the format.
// Every struct is packed by construction (only uint8/uint16 members, or a float
// first) and its size is asserted against the GGUF block size.
#pragma once
#include <cstdint>

namespace kvq {

constexpr int QK = 32;    // elements per block of the legacy types
constexpr int QK_K = 256; // elements per super-block of the k-quants

// x = d * (q - 8); q: low nibbles hold elements 0..15, high nibbles 16..31.
struct BlockQ4_0 { uint16_t d; uint8_t qs[QK / 2]; };
// x = d * q + m
struct BlockQ4_1 { uint16_t d; uint16_t m; uint8_t qs[QK / 2]; };
// 5th bit of element j in bit j of qh (little-endian uint32); x = d * (q - 16)
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; };
// x = d * q + m
struct BlockQ5_1 { uint16_t d; uint16_t m; uint8_t qh[4]; uint8_t qs[QK / 2]; };
// x = d * q
struct BlockQ8_0 { uint16_t d; int8_t qs[QK]; };
// Activation type for *_1 dots: s = d * sum(qs)
struct BlockQ8_1 { uint16_t d; uint16_t s; int8_t qs[QK]; };
// 8 sub-blocks of 32, 6-bit scales and mins packed in 12 bytes.
struct BlockQ4_K { uint16_t d; uint16_t dmin; uint8_t scales[12]; uint8_t qs[QK_K / 2]; };
struct BlockQ5_K { uint16_t d; uint16_t dmin; uint8_t scales[12]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; };
// 16 sub-blocks of 16, 8-bit signed scales; x = d * scale * (q - 32)
struct BlockQ6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; uint16_t d; };
// Activation type for k-quant dots; bsums: sums of each group of 16 qs.
struct BlockQ8_K { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; };

static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);
static_assert(sizeof(BlockQ8_K) == 292);

}  // namespace kvq

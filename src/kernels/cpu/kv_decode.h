// Fast tile decode: the named stages that turn one head of one cache page into
// the float tile attention scores against, read straight from the packed page
// (unpack -> level lookup -> per-channel or per-token scale/offset -> sparse
// outlier residuals; keys of pre-RoPE formats then rotated at each slot's
// position). The tile lives in L1 for one tile step; nothing is dequantized
// into a whole-tensor buffer.
//
// Every stage reproduces KvCodec::decode (the scalar oracle) bit for bit: the
// same binary32 operations in the same order (multiply, then add; no fused
// multiply-add), so the fast path and the reference path give identical tiles
// and differ only in how attention then sums them.
#pragma once
#include <cstdint>

#include "formats/kv_format.h"

namespace kvq {

// KvCodec::decode, dispatched from simd_level() (AVX2 for quant formats of
// 2, 3, 4 and 8 bits, q8_0/q4_0 with head_dim % 32 == 0, f16; the codec's own
// decode otherwise).
void kv_decode_tile(const KvCodec& codec, const uint8_t* page, int head, int n, float* dst);

// Rotates a channel-major key tile kt[d * kKvPageTokens + j] (slots [0, n);
// the slots past n are rotated too when that is cheaper, so they must hold
// finite or unspecified-but-harmless floats) by the page's angles, stored
// page-transposed: cs[i * kKvPageTokens + j] = cos of pair i at slot j,
// cs[(half + i) * kKvPageTokens + j] its sin.
void kv_rotate_key_tile(float* kt, int n, const float* cs, int half, bool neox);

// Keys of a pre-RoPE format, the decode, outlier and rotation stages fused
// (one pass over the tile): equals kv_decode_tile then kv_rotate_key_tile up
// to rounding (the outlier residuals are rotated and added after the dense
// codes, not before). Returns false when the layout has no fused path (the
// caller then runs the stages one by one).
bool kv_decode_rotate_keys(const KvCodec& codec, const uint8_t* page, int head, int n, float* dst, const float* cs,
                           int half, bool neox);

// Tests only: when on, attention and the tile decoders take their scalar
// stages (codec decode, scalar rotation and tile step) whatever simd_level()
// says, so a whole-model run can compare the two attention paths with every
// other kernel (the weight matmuls above all) unchanged. Off by default.
void set_attention_scalar(bool on);
bool attention_scalar();

namespace simd {
// Return false when the layout has no fast path (the caller falls back).
bool kv_decode_tile_avx2(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst);
void kv_rotate_key_tile_avx2(float* kt, int n, const float* cs, int half, bool neox);
bool kv_decode_rotate_keys_avx2(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst,
                                const float* cs, int half, bool neox);
}  // namespace simd

}  // namespace kvq

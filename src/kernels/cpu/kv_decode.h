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
#include "kernels/cpu/kernel_set.h"

namespace kvq {

// Which decoders run is the KernelSet's `decoders`: the AVX-512 ones for
// 2/3/4-bit quant codes (they hand every other layout to AVX2's), the AVX2
// ones, the portable ones (Google Highway: NEON, SVE, SSE4, ... at the set's
// portable_target), or `codec`: the formats' reference decode
// (kv_decode_ref), which also takes every layout a fast decoder has no path
// for.
//
// kv_decode_ref, fast: AVX-512 for quant formats of 2, 3 and 4 bits (values:
// head_dim % 16 == 0); AVX2 for quant formats of 2, 3, 4 and 8 bits,
// q8_0/q4_0 with head_dim % 32 == 0 (f16: the reference's F16C row
// conversion); portable for quant formats of 2, 3 and 4 bits, q8_0/q4_0
// (head_dim % 32 == 0) and f16.
void kv_decode_tile(const KernelSet& ks, const KvCodecLayout& layout, const uint8_t* page, int head, int n,
                    float* dst);

// Rotates a channel-major key tile kt[d * kKvPageTokens + j] (slots [0, n);
// the slots past n are rotated too when that is cheaper, so they must hold
// finite or unspecified-but-harmless floats) by the page's angles, stored
// page-transposed: cs[i * kKvPageTokens + j] = cos of pair i at slot j,
// cs[(half + i) * kKvPageTokens + j] its sin.
void kv_rotate_key_tile(const KernelSet& ks, float* kt, int n, const float* cs, int half, bool neox);

// Keys of a pre-RoPE format, the decode, outlier and rotation stages fused
// (one pass over the tile): equals kv_decode_tile then kv_rotate_key_tile up
// to rounding (the outlier residuals are rotated and added after the dense
// codes, not before). Returns false when the layout has no fused path (the
// caller then runs the stages one by one).
bool kv_decode_rotate_keys(const KernelSet& ks, const KvCodecLayout& layout, const uint8_t* page, int head, int n,
                           float* dst, const float* cs, int half, bool neox);

// Scores of `rows` query rows (q[r * head_dim + d], 1 <= rows <= 4) against
// one head's keys of a pre-RoPE format, every stage fused: decode, rotation by
// cs, the dot products, then the outlier residuals' share; the key tile never
// leaves registers. s[r * kKvPageTokens + j] = q_r . k_j for slots j < n
// (slots past n unspecified). Equals kv_decode_rotate_keys followed by the dot
// products up to floating-point reordering. False when there is no such path
// (it needs the AVX-512 decoders and per-channel quant keys of 2-4 bits): the
// caller then decodes the tile and scores it.
bool kv_score_rotated_keys(const KernelSet& ks, const KvCodecLayout& layout, const uint8_t* page, int head, int n,
                           const float* cs, int half, bool neox, const float* q, int rows, float* s);
// Whether kv_score_rotated_keys has a path for these keys and `rows` query
// rows with the set's decoders: a caller decides once, before composing any
// page's angles for it.
bool kv_scores_rotated_keys(const KernelSet& ks, const KvCodecLayout& layout, int rows);

namespace simd {
namespace {  // internal linkage: the includers are compiled for different ISAs
// Channel of rotated pair i: the pair's first or second element (interleaved
// pairs 2i, 2i+1, or NeoX halves i, i + half).
inline int rope_channel(int i, bool second, int half, bool neox) {
  return neox ? (second ? i + half : i) : (second ? 2 * i + 1 : 2 * i);
}
// Adds a sparse residual e of key element (slot j, channel d) to a
// channel-major tile already rotated by the page's angles (kv_rotate_key_tile's
// cs): rotated as its element is (the rotation is linear), e on the pair's
// first channel gives (x' += e c, y' += e s), on its second (x' -= e s, y' += e c).
inline void add_rotated_residual(float* kt, int j, int d, float e, const float* cs, int half, bool neox) {
  constexpr int T = kKvPageTokens;
  if (d >= 2 * half) {  // past the rotated channels
    kt[int64_t(d) * T + j] += e;
    return;
  }
  const int i = neox ? (d >= half ? d - half : d) : d / 2;
  const int second = neox ? int(d >= half) : d & 1;
  const float c = cs[i * T + j], sn = cs[(half + i) * T + j];
  // The weights picked by index, not by a branch: which channel of its pair an
  // outlier falls on is a coin toss, and the mispredictions cost more than the adds.
  const float w[4] = {c, sn, -sn, c};
  kt[int64_t(rope_channel(i, false, half, neox)) * T + j] += e * w[2 * second];
  kt[int64_t(rope_channel(i, true, half, neox)) * T + j] += e * w[2 * second + 1];
}
}  // namespace

// Return false when the layout has no fast path (the caller falls back).
bool kv_decode_tile_avx2(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst);
void kv_rotate_key_tile_avx2(float* kt, int n, const float* cs, int half, bool neox);
bool kv_decode_rotate_keys_avx2(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst,
                                const float* cs, int half, bool neox);
// AVX-512 (kv_decode_avx512.cpp): 2/3/4-bit quant codes only.
bool kv_decode_tile_avx512(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst);
bool kv_decode_rotate_keys_avx512(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst,
                                  const float* cs, int half, bool neox);
bool kv_score_rotated_keys_avx512(const KvCodecLayout& layout, const uint8_t* page, int head, int n, const float* cs,
                                  int half, bool neox, const float* q, int rows, float* s);
bool kv_scores_rotated_keys_avx512(const KvCodecLayout& layout, int rows);
// The portable decoders (kv_decode_hwy.cpp), compiled for Highway target
// `target` (one of portable_targets()); false: no path for this layout or
// target (the one-lane baseline declines everything).
bool kv_decode_tile_portable(int64_t target, const KvCodecLayout& layout, const uint8_t* page, int head, int n,
                             float* dst);
bool kv_rotate_key_tile_portable(int64_t target, float* kt, int n, const float* cs, int half, bool neox);
bool kv_decode_rotate_keys_portable(int64_t target, const KvCodecLayout& layout, const uint8_t* page, int head, int n,
                                    float* dst, const float* cs, int half, bool neox);
}  // namespace simd

}  // namespace kvq

// Which kernels a session runs: resolved once, when the session is made, and
// carried in the arguments of every kernel call. Nothing here is process-wide
// state, so two sessions in one process (a server; a test comparing paths) run
// each its own kernels.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "base/cpu.h"

namespace kvq {

// The tile-step kernels attention can run (the online-softmax step over one
// 64-key tile for a group of query rows):
//   scalar    plain C++, the reference the others are tested against;
//   avx2      hand-written AVX2+FMA (x86-64, head_dim % 8 == 0);
//   avx512    hand-written AVX-512 (x86-64, head_dim % 16 == 0);
//   portable  written once with Google Highway, compiled for every target of
//             the architecture (AVX-512, SSE4, NEON, SVE), one picked per set.
// `automatic` follows the SIMD level and the head size (attention_kernel_for).
enum class AttentionKernel { automatic, scalar, avx2, portable, avx512 };

// The tile decoders (kv_decode.h): `codec` is the formats' scalar reference.
enum class TileDecoders { automatic, codec, avx2, portable, avx512 };

struct KernelSet {
  // Cap on every kernel's instruction set: weight matmuls, tile decoders,
  // attention. Never above detected_simd_level().
  SimdLevel simd = detected_simd_level();
  // A pin for tests and benchmarks; automatic: by `simd` and the head size.
  AttentionKernel attention = AttentionKernel::automatic;
  // A pin; resolved to a concrete set of decoders (never automatic).
  TileDecoders decoders = TileDecoders::automatic;
  // The Highway target the portable kernels run (a HWY_* bit); resolved to the
  // best this CPU runs when 0.
  int64_t portable_target = 0;
  // Attention and the tile decoders on their scalar references whatever
  // `simd` says, every other kernel as `simd` allows: a whole-model run then
  // compares the attention paths alone.
  bool scalar_attention = false;
};

// Checks a request against this CPU (a one-line error naming the pin it
// cannot run) and resolves its automatic parts. Idempotent.
KernelSet resolve_kernels(KernelSet wanted);
// The resolved set at a SIMD cap (the CLI's --simd), nothing pinned.
KernelSet kernels_at(SimdLevel simd);
// "auto" (the best this CPU runs), "avx512", "avx2" or "scalar" -> a level;
// one-line error for an unknown name or a level above the CPU's.
SimdLevel parse_simd_level(const std::string& name);

// What attention runs for this head size under `ks`; `packed_values`: the
// call's values could be read from their packed codes (decode over per-token
// quant values of 2-4 bits).
AttentionKernel attention_kernel_for(const KernelSet& ks, int head_dim, bool packed_values = false);
// "scalar", "avx2", "avx512" or "portable/<Highway target>", e.g. "portable/AVX3".
std::string attention_kernel_name(const KernelSet& ks, AttentionKernel kernel);

// The Highway targets compiled in that this CPU runs, best first (defined in
// attention_hwy.cpp, the unit that decides which targets are compiled).
std::vector<int64_t> portable_targets();
const char* portable_target_name(int64_t target);

}  // namespace kvq

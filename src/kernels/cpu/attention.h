// Causal attention of a block of queries over one layer of the KV cache.
// Stages per tile of kKvPageTokens keys: decode keys (and rotate pre-RoPE keys)
// -> score -> online-softmax update -> decode values -> accumulate. Work is
// split over KV heads x query blocks x key ranges; partial softmax states of a
// split key range are merged exactly (SoftmaxState::merge).
#pragma once
#include <cstdint>
#include <string>

#include "kvcache/kv_cache.h"

namespace kvq {

class ThreadPool;

struct AttentionArgs {
  const float* q;          // [n_q][n_heads][head_dim], already rotated
  int64_t n_q;
  int n_heads;             // query heads; head i reads KV head i / (n_heads / n_kv_heads)
  const int32_t* q_pos;    // position of each query; it sees keys at positions <= its own
  float scale;             // usually 1/sqrt(head_dim)
  KvLayerView kv;
  float* out;              // [n_q][n_heads][head_dim]
};

// Dispatched fast path (SIMD level from simd_level()), all threads of the pool.
void attention(const AttentionArgs& args, ThreadPool& pool);

// The tile-step kernels attention() can run (the online-softmax step over one
// 64-key tile for a group of query rows; the keys and values are decoded by the
// AVX2 tile decoders where the CPU has AVX2, else by the portable decoders
// beside the portable step and by the codecs beside the scalar one, kv_decode.h):
//   scalar    plain C++, the reference the others are tested against;
//   avx2      hand-written AVX2+FMA (x86-64, head_dim % 8 == 0);
//   avx512    hand-written AVX-512 (x86-64, head_dim % 16 == 0);
//   portable  written once with Google Highway, compiled for every target of
//             the architecture and chosen at run time (AVX-512, SSE4, NEON, SVE).
// All accumulate 2/3/4-bit per-token values straight from their codes in
// decode (the portable one with 128-bit lookups on every target).
// `automatic` (the default) picks avx512 on AVX-512 CPUs and avx2 where AVX2 is
// the CPU's top level (for head sizes they take), portable on CPUs without
// AVX2 and for other head sizes, and scalar when set_attention_scalar(true) is
// on or the SIMD level was lowered to scalar (set_simd_level; tests compare
// paths that way). Pinning avx2 gives what an AVX2 CPU runs (portable for other
// head sizes), pinning avx512 what an AVX-512 one runs.
enum class AttentionKernel { automatic, scalar, avx2, portable, avx512 };
void set_attention_kernel(AttentionKernel kernel);  // process-wide; for tests and benchmarks
// What attention() runs now for this head size; `packed_values`: the call's
// values could be read from their packed codes (decode over per-token quant values).
AttentionKernel attention_kernel_for(int head_dim, bool packed_values = false);
// "scalar", "avx2", "avx512" or "portable/<Highway target>", e.g. "portable/AVX3": the
// kernel for prefill, or (decode_values: the cache's value format) for decode.
std::string attention_kernel_name(int head_dim, const KvFormat* decode_values = nullptr);

// The oracle: per query and head, a two-pass softmax in double over keys and
// values decoded with the formats' reference codecs. Single thread, slow.
void attention_ref(const AttentionArgs& args);

}  // namespace kvq

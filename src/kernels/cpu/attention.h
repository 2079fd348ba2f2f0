// Causal attention of a block of queries over one layer of the KV cache.
// Stages per tile of kKvPageTokens keys: decode keys (and rotate pre-RoPE keys)
// -> score -> online-softmax update -> decode values -> accumulate. Work is
// split over KV heads x query blocks x key ranges; partial softmax states of a
// split key range are merged exactly (SoftmaxState::merge).
#pragma once
#include <cstdint>
#include <string>

#include "kernels/cpu/kernel_set.h"
#include "kernels/cpu/kv_view.h"

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
  KernelSet kernels;       // resolved (resolve_kernels)
};

// The fast path the kernel set picks, all threads of the pool. Every tile
// kernel accumulates 2/3/4-bit per-token values straight from their codes in
// decode (the portable one with 128-bit lookups on every target).
void attention(const AttentionArgs& args, ThreadPool& pool);

// The attention kernel decode runs over a cache of this value format ("avx512",
// "portable/AVX2", ...): `decode_values` null gives prefill's.
std::string attention_kernel_name(const KernelSet& ks, int head_dim, const KvFormat* decode_values = nullptr);

// The oracle: per query and head, a two-pass softmax in double over keys and
// values decoded with the formats' reference codecs. Single thread, slow.
void attention_ref(const AttentionArgs& args);

}  // namespace kvq

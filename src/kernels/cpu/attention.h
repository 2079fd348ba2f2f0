// Causal attention of a block of queries over one layer of the KV cache.
// Stages per tile of kKvPageTokens keys: decode keys (and rotate pre-RoPE keys)
// -> score -> online-softmax update -> decode values -> accumulate. Work is
// split over KV heads x query blocks x key ranges; partial softmax states of a
// split key range are merged exactly (SoftmaxState::merge).
#pragma once
#include <cstdint>

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

// The oracle: per query and head, a two-pass softmax in double over keys and
// values decoded with the formats' reference codecs. Single thread, slow.
void attention_ref(const AttentionArgs& args);

}  // namespace kvq

// The paged KV cache of one layer as the attention kernels read it: plain data
// (pointers, sizes, the formats' layouts), no virtual calls and nothing that
// decodes. The cache (src/kvcache) fills it; kv_tile.h turns its pages into
// tiles. Copyable as it is to another device along with what it points to.
#pragma once
#include <climits>
#include <cstdint>

#include "formats/kv_format.h"
#include "kernels/cpu/rope.h"

namespace kvq {

// No slot of a page is read from the recent-window store.
constexpr int64_t kKvNoWindow = INT64_MAX;

struct KvLayerView {
  KvCodecLayout k, v;               // how keys / values sit in a page (docs/formats.md)
  bool keys_pre_rope;               // rotate keys at their positions after decoding
  // Keys / values stored Walsh-Hadamard rotated (KvFormat::rotate_k/v), tiles
  // and side stores alike: attention rotates its queries / outputs instead.
  bool k_rotated;
  bool v_rotated;
  int n_kv_heads;
  int head_dim;
  int64_t n_tokens;                 // readable slots (committed + current batch)
  const uint8_t* const* pages;      // pages[p]: the key part, then the value part
  uint64_t v_offset;                // where values start within a page
  uint64_t page_bytes;              // keys + values of one page
  const int32_t* positions;         // position of each slot (increasing)
  const Rope* rope;
  // RoPE angles of pre-RoPE keys (post-RoPE formats rotated them on the way
  // in). No per-token table is kept: slot j of a page whose positions run p0,
  // p0+1, ... sits at angle (p0 + j) w, so q . R(p0 + j) k = (R(-p0) q) . (R(j) k).
  // rope_rel_cs: the angles of the offsets 0..63, page-transposed (n_rot/2 rows
  // of 64 cosines, then n_rot/2 rows of 64 sines), shared by every page: a
  // caller that turns its queries back by the page's first position rotates
  // every page's keys with it, and it stays in cache.
  // rope_page_back[p * n_rot + i]: cos of pair i at page p's first position,
  // then its -sin n_rot/2 further (Rope::rotate with them turns a vector back).
  // Absolute angles of a page are composed from the two (kv_page_angles).
  const float* rope_rel_cs;
  const float* rope_page_back;
  // Full-precision side stores, binary16 rows [slot][n_kv_heads * head_dim]; keys
  // in the format's domain (unrotated for pre-RoPE formats).
  int sink_tokens;                  // slots [0, sink_tokens) come from sink_k / sink_v
  const uint16_t* sink_k;
  const uint16_t* sink_v;
  int64_t window_tokens;            // 0: no recent window
  int64_t window_first;             // oldest slot the window ring holds
  int64_t window_capacity;          // ring rows; slot s lives in row s % window_capacity
  const uint16_t* window_k;
  const uint16_t* window_v;

  // Slots held by page p.
  int page_tokens(int64_t p) const {
    const int64_t left = n_tokens - p * kKvPageTokens;
    return int(left < kKvPageTokens ? left : kKvPageTokens);
  }
  // Page p's positions run consecutively (positions increase, so the span
  // decides): its keys can be rotated relative to the page (rope_rel_cs).
  bool page_consecutive(int64_t p) const {
    const int64_t first = p * kKvPageTokens, n = page_tokens(p);
    return int64_t(positions[first + n - 1]) - positions[first] == n - 1;
  }
  // No slot of page p is served from the sink or (from fp_from on) the window
  // store: every one is read from the page's codes.
  bool all_quantized(int64_t p, int64_t fp_from = kKvNoWindow) const {
    const int64_t first = p * kKvPageTokens;
    return first >= sink_tokens && (fp_from == kKvNoWindow || fp_from >= first + page_tokens(p));
  }
};

}  // namespace kvq

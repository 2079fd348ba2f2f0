// Where K and V live. Storage grows in pages of kKvPageTokens tokens as tokens
// arrive, so the bytes reported are the bytes really allocated. The model hands
// the cache keys *before* RoPE together with their positions; a format that
// stores post-RoPE keys rotates them on the way in, a pre-RoPE format stores
// them as they are and attention rotates after reading. Attention reads keys
// and values only through a KvLayerView of this cache.
#pragma once
#include <cstdint>
#include <functional>
#include <climits>
#include <memory>
#include <span>
#include <vector>

#include "formats/kv_format.h"
#include "kernels/cpu/rope.h"

namespace kvq {

struct KvCacheConfig {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int64_t n_ctx = 0;               // capacity in tokens
  const KvFormat* k_format = nullptr;
  const KvFormat* v_format = nullptr;
  RopeSpec rope;                   // how the model rotates keys
  // Full-precision (binary16) side stores, read instead of the codes:
  int sink_tokens = 0;             // the first tokens (attention sink), always
  int64_t window_tokens = 0;       // the most recent tokens: for a query at position P,
                                   // every key/value at a position > P - window_tokens
  // Per-layer calibration for formats that need it (empty otherwise).
  std::vector<KvTensorCalibration> k_calibration, v_calibration;
};

// No slot of a page is read from the recent-window store.
constexpr int64_t kKvNoWindow = INT64_MAX;

// A plain description of one layer's cache for the attention kernels.
struct KvLayerView {
  const KvCodec* k_codec;
  const KvCodec* v_codec;
  bool keys_pre_rope;               // rotate keys at their positions after decoding
  int n_kv_heads;
  int head_dim;
  int64_t n_tokens;                 // readable slots (committed + current batch)
  const uint8_t* const* pages;      // pages[p]: the key part, then the value part
  uint64_t v_offset;                // where values start within a page
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
  // Absolute angles of a page are composed from the two (page_angles).
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

  int page_tokens(int64_t p) const;
  // First slot read in full precision (through the window) by a query at
  // position `pos`; kKvNoWindow when there is no window.
  int64_t window_from(int32_t pos) const;
  // Decoded tiles of page p for one head (see KvCodec::decode for the layouts):
  // codes decoded, sink slots and window slots >= fp_from patched from the side
  // stores, then (keys of a pre-RoPE format) rotated at each slot's position,
  // or with page_relative (only where page_consecutive(p)) at its offset in
  // the page alone (see rope_rel_cs).
  void decode_keys(int64_t p, int head, float* kt, int64_t fp_from = kKvNoWindow, bool page_relative = false) const;
  void decode_values(int64_t p, int head, float* v, int64_t fp_from = kKvNoWindow) const;
  // The scores s[r * 64 + j] = q_r . k_j of `rows` query rows (q[r * head_dim
  // + d]) against page p's keys of one head, as decode_keys would give them,
  // computed where the keys are decoded (kv_score_rotated_keys). False, with
  // nothing written, where that has no path: keys not pre-RoPE, a slot in full
  // precision, a layout or decoder without it.
  bool score_keys(int64_t p, int head, const float* q, int rows, float* s, int64_t fp_from = kKvNoWindow,
                  bool page_relative = false) const;
  // Page p's absolute angles in rope_rel_cs's layout, written to `cs` (n_rot x
  // 64 floats): composed from the page's first angle and the offsets' angles
  // where its positions run consecutively (cos(a+b) = cos a cos b - sin a sin b,
  // within a few float roundings of computing them at each position), computed
  // at each slot's position where they jump (then slots past the page's
  // tokens hold zeros).
  void page_angles(int64_t p, float* cs) const;
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

// Bytes a cache holds, by what they hold (all layers, keys and values).
struct KvMemory {
  uint64_t k = 0, v = 0;        // everything for keys / for values (but positions)
  uint64_t codes = 0;           // dense codes or plain elements
  uint64_t scales = 0;          // per-token / per-block scales and zero-points
  uint64_t outliers = 0;        // sparse outlier slots
  uint64_t full_precision = 0;  // sink and recent-window side stores
  uint64_t calibration = 0;     // per-layer constants (per-channel ranges, codebooks)
  uint64_t positions = 0;       // shared by the layers: positions (and pre-RoPE keys' per-page angles)
  uint64_t total() const { return k + v + positions; }
};

class KvCache {
 public:
  explicit KvCache(const KvCacheConfig& config);

  const KvCacheConfig& config() const { return config_; }
  int64_t n_tokens() const { return n_tokens_; }

  // A batch appends n tokens at the given positions (strictly increasing, after
  // every position already held). Throws if the context would overflow; nothing
  // changes until end_batch(), and abort_batch() forgets the batch.
  void begin_batch(std::span<const int32_t> positions);
  // Stores the batch's keys (pre-RoPE) and values for one layer:
  // k, v: [n][n_kv_heads * head_dim].
  void store(int layer, const float* k, const float* v);
  void end_batch();
  void abort_batch();
  int64_t batch_size() const { return batch_n_; }

  // The layer's readable tokens: committed ones plus the current batch (if stored).
  KvLayerView view(int layer) const;

  void clear();  // forget every token; pages stay allocated for reuse

  // Sees every batch stored, before encoding: (layer, n tokens, their positions,
  // keys pre-RoPE [n][row], values [n][row]). Calibration captures activations
  // through it; empty by default.
  using StoreObserver =
      std::function<void(int layer, int64_t n, const int32_t* positions, const float* k, const float* v)>;
  void set_observer(StoreObserver observer) { observer_ = std::move(observer); }

  uint64_t bytes_k() const { return memory().k; }  // bytes really allocated
  uint64_t bytes_v() const { return memory().v; }
  KvMemory memory() const;
  // What a cache of this configuration holds once n_tokens tokens arrived in
  // batches of at most max_batch, computed without allocating it (codecs built
  // for accounting, so no calibration is needed). Equals memory() of a real cache.
  static KvMemory memory_for(const KvCacheConfig& config, int64_t n_tokens, int64_t max_batch);

 private:
  void ensure_pages(int64_t n_tokens);

  KvCacheConfig config_;
  Rope rope_;
  uint64_t k_page_bytes_ = 0, v_page_bytes_ = 0;
  void ensure_window(int64_t batch);

  struct Layer {
    std::unique_ptr<KvCodec> k_codec, v_codec;
    std::vector<uint16_t> sink_k, sink_v;      // [sink_tokens][row]
    std::vector<uint16_t> window_k, window_v;  // ring [window_capacity_][row]
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    std::vector<const uint8_t*> pages;
    int64_t stored = 0;  // tokens written in this layer
  };
  std::vector<Layer> layers_;
  std::vector<int32_t> positions_;
  std::vector<float> rope_rel_cs_;     // KvLayerView::rope_rel_cs (pre-RoPE formats)
  std::vector<float> rope_page_back_;  // KvLayerView::rope_page_back (pre-RoPE formats)
  std::vector<float> batch_cs_;  // scratch (post-RoPE formats): the batch's angles, per token cos then sin
  int64_t n_tokens_ = 0;
  int64_t batch_n_ = 0;
  int64_t window_capacity_ = 0;
  int64_t window_first_ = 0;    // oldest slot whose window row is intact
  std::vector<float> rotated_;  // scratch for post-RoPE formats
  StoreObserver observer_;
};

}  // namespace kvq

// Where K and V live. Storage grows in pages of kKvPageTokens tokens as tokens
// arrive, so the bytes reported are the bytes really allocated. The model hands
// the cache keys *before* RoPE together with their positions; a format that
// stores post-RoPE keys rotates them on the way in, a pre-RoPE format stores
// them as they are and attention rotates after reading. Attention reads keys
// and values only through a KvLayerView of this cache.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "formats/kv_format.h"
#include "kernels/cpu/kv_view.h"
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
  // Values Walsh-Hadamard rotated before encoding whatever the format (as
  // KvFormat::rotate_v does for its rows): per-token value formats, KVQuant's
  // included, then quantize vectors whose outlier channels are spread out.
  bool rotate_values = false;
  // Values stored Walsh-Hadamard rotated: the format's rows or rotate_values.
  bool values_rotated() const { return v_format->rotate_v || rotate_values; }
  // Per-layer calibration for formats that need it (empty otherwise).
  std::vector<KvTensorCalibration> k_calibration, v_calibration;
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
  std::vector<float> rotated_;    // scratch: keys of post-RoPE or rotated formats
  std::vector<float> rotated_v_;  // scratch: values of rotated formats
  StoreObserver observer_;
};

}  // namespace kvq

#include "kvcache/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "base/error.h"
#include "base/fp16.h"
#include "base/fp16_row.h"
#include "kernels/cpu/kv_tile.h"

namespace kvq {

KvCache::KvCache(const KvCacheConfig& config) : config_(config) {
  if (!config.k_format || !config.v_format) fail("KV cache: no format given");
  if (config.n_layers <= 0 || config.n_kv_heads <= 0 || config.head_dim <= 0 || config.n_ctx <= 0)
    fail("KV cache: invalid shape (layers {}, kv heads {}, head dim {}, context {})", config.n_layers,
         config.n_kv_heads, config.head_dim, config.n_ctx);
  if (config.rope.head_dim != config.head_dim)
    fail("KV cache: RoPE head size {} differs from the cache's {}", config.rope.head_dim, config.head_dim);
  rope_ = Rope(config.rope);
  if (config.k_format->rotate_k && config.k_format->keys_pre_rope)
    fail("KV cache type '{}': keys stored before RoPE cannot be rotated", config.k_format->name);
  for (const KvFormat* f : {config.k_format, config.v_format})
    if ((f->rotate_k || f->rotate_v) && !kv_is_power_of_two(config.head_dim))
      fail("KV cache type '{}' rotates head vectors and needs a head size that is a power of two (this model's is {})",
           f->name, config.head_dim);
  if (config.rotate_values && !kv_is_power_of_two(config.head_dim))
    fail("KV cache: rotated values need a head size that is a power of two (this model's is {})", config.head_dim);
  const KvGeometry geometry{config.n_kv_heads, config.head_dim};
  auto calibration = [&](const KvFormat& f, KvRole role, const std::vector<KvTensorCalibration>& c, int layer,
                         const char* what) -> const KvTensorCalibration* {
    if (!f.needs_calibration(role)) return nullptr;
    if (int(c.size()) != config.n_layers)
      fail("KV cache type '{}' needs calibration for the {} of all {} layers (have {})", f.name, what,
           config.n_layers, c.size());
    return &c[size_t(layer)];
  };
  layers_.resize(config.n_layers);
  for (int l = 0; l < config.n_layers; ++l) {
    layers_[l].k_codec = make_kv_codec(*config.k_format, KvRole::key, geometry,
                                       calibration(*config.k_format, KvRole::key, config.k_calibration, l, "keys"));
    layers_[l].v_codec = make_kv_codec(*config.v_format, KvRole::value, geometry,
                                       calibration(*config.v_format, KvRole::value, config.v_calibration, l, "values"));
  }
  if (config.sink_tokens < 0 || config.window_tokens < 0)
    fail("KV cache: sink ({}) and window ({}) token counts must be >= 0", config.sink_tokens, config.window_tokens);
  const size_t sink_elems = size_t(std::min<int64_t>(config.sink_tokens, config.n_ctx)) * size_t(geometry.row());
  for (auto& layer : layers_) {
    layer.sink_k.assign(sink_elems, 0);
    layer.sink_v.assign(sink_elems, 0);
  }
  k_page_bytes_ = layers_[0].k_codec->page_bytes();
  v_page_bytes_ = layers_[0].v_codec->page_bytes();
  positions_.reserve(size_t(std::min<int64_t>(config.n_ctx, 1 << 16)));
  // The page-relative angles (KvLayerView::rope_rel_cs), for keys rotated on reading.
  if (!config.k_format->keys_pre_rope) return;
  const int half = config.rope.n_rot / 2;
  rope_rel_cs_.resize(size_t(2 * half) * kKvPageTokens);
  std::vector<float> c(static_cast<size_t>(half)), s(c.size());
  for (int j = 0; j < kKvPageTokens; ++j) {
    rope_.angles(j, c.data(), s.data());
    kv_put_slot_angles(rope_rel_cs_.data(), j, c.data(), s.data(), half);
  }
}

void KvCache::ensure_pages(int64_t n_tokens) {
  const int64_t need = (n_tokens + kKvPageTokens - 1) / kKvPageTokens;
  for (auto& layer : layers_) {
    while (int64_t(layer.pages.size()) < need) {
      // Zeroed so padding slots of a partial page never hold NaN garbage.
      layer.owned.emplace_back(new uint8_t[k_page_bytes_ + v_page_bytes_]());
      layer.pages.push_back(layer.owned.back().get());
    }
  }
}

// The window ring must hold the R tokens before a batch plus the whole batch:
// the batch's first query still reads R - 1 older tokens in full precision.
void KvCache::ensure_window(int64_t batch) {
  const int64_t r = config_.window_tokens;
  if (r == 0 || window_capacity_ >= r + batch) return;
  const int64_t capacity = (r + batch + kKvPageTokens - 1) / kKvPageTokens * kKvPageTokens;
  const size_t row = size_t(config_.n_kv_heads) * size_t(config_.head_dim);
  const int64_t keep_from = std::max<int64_t>(0, n_tokens_ - r);
  for (auto& layer : layers_) {
    for (auto* ring : {&layer.window_k, &layer.window_v}) {
      std::vector<uint16_t> grown(size_t(capacity) * row);
      for (int64_t s = keep_from; s < n_tokens_; ++s)
        std::copy_n(ring->data() + size_t(s % window_capacity_) * row, row, grown.data() + size_t(s % capacity) * row);
      *ring = std::move(grown);
    }
  }
  window_capacity_ = capacity;
  window_first_ = keep_from;
}

void KvCache::begin_batch(std::span<const int32_t> positions) {
  KVQ_ASSERT(batch_n_ == 0);
  const int64_t n = int64_t(positions.size());
  if (n == 0) return;
  if (n_tokens_ + n > config_.n_ctx)
    fail("context full: {} tokens held + {} new > context size {}", n_tokens_, n, config_.n_ctx);
  int32_t last = positions_.empty() ? -1 : positions_.back();
  for (int32_t p : positions) {
    if (p <= last) fail("KV cache: positions must increase (got {} after {})", p, last);
    last = p;
  }
  ensure_pages(n_tokens_ + n);
  ensure_window(n);
  positions_.insert(positions_.end(), positions.begin(), positions.end());
  const size_t half = size_t(config_.rope.n_rot / 2);
  const size_t first_new = positions_.size() - size_t(n);
  if (config_.k_format->keys_pre_rope) {
    // Each new page's first angle, turned back (KvLayerView::rope_page_back).
    const size_t n_pages = (positions_.size() + kKvPageTokens - 1) / kKvPageTokens;
    rope_page_back_.resize(n_pages * 2 * half);
    for (size_t i = (first_new + kKvPageTokens - 1) / kKvPageTokens * kKvPageTokens; i < positions_.size();
         i += kKvPageTokens) {
      float* back = &rope_page_back_[i / kKvPageTokens * 2 * half];
      rope_.angles(positions_[i], back, back + half);
      for (size_t k = 0; k < half; ++k) back[half + k] = -back[half + k];
    }
  } else {
    // Post-RoPE formats rotate keys on the way in: the batch's angles, once
    // for every layer's store().
    batch_cs_.resize(size_t(n) * 2 * half);
    for (int64_t i = 0; i < n; ++i)
      rope_.angles(positions_[first_new + size_t(i)], &batch_cs_[size_t(i) * 2 * half],
                   &batch_cs_[size_t(i) * 2 * half + half]);
  }
  batch_n_ = n;
}

void KvCache::store(int layer_index, const float* k, const float* v) {
  KVQ_ASSERT(layer_index >= 0 && layer_index < config_.n_layers);
  Layer& layer = layers_[layer_index];
  KVQ_ASSERT(layer.stored == n_tokens_);
  const int64_t row = int64_t(config_.n_kv_heads) * config_.head_dim;
  if (observer_) observer_(layer_index, batch_n_, positions_.data() + n_tokens_, k, v);
  const bool rope = !config_.k_format->keys_pre_rope;
  const bool hadamard_k = config_.k_format->rotate_k, hadamard_v = config_.values_rotated();
  const int hd = config_.head_dim;
  rotated_.resize(size_t(row));
  rotated_v_.resize(size_t(row));
  for (int64_t i = 0; i < batch_n_; ++i) {
    const int64_t slot = n_tokens_ + i;
    uint8_t* page = const_cast<uint8_t*>(layer.pages[slot / kKvPageTokens]);
    const int in_page = int(slot % kKvPageTokens);
    const float* krow = k + i * row;
    if (rope || hadamard_k) {  // post-RoPE format: rotate on the way in (then Walsh-Hadamard, if it says so)
      std::memcpy(rotated_.data(), krow, size_t(row) * sizeof(float));
      const size_t half = size_t(config_.rope.n_rot / 2);
      const float* cs = &batch_cs_[size_t(i) * 2 * half];
      for (int h = 0; h < config_.n_kv_heads; ++h) {
        if (rope) rope_.rotate(rotated_.data() + h * hd, cs, cs + half);
        if (hadamard_k) kv_hadamard(rotated_.data() + h * hd, hd);
      }
      krow = rotated_.data();
    }
    const float* vrow = v + i * row;
    if (hadamard_v) {
      std::memcpy(rotated_v_.data(), vrow, size_t(row) * sizeof(float));
      for (int h = 0; h < config_.n_kv_heads; ++h) kv_hadamard(rotated_v_.data() + h * hd, hd);
      vrow = rotated_v_.data();
    }
    layer.k_codec->encode(krow, in_page, page);
    layer.v_codec->encode(vrow, in_page, page + k_page_bytes_);
    if (slot < config_.sink_tokens) {
      f32_to_fp16_row(krow, layer.sink_k.data() + slot * row, row);
      f32_to_fp16_row(vrow, layer.sink_v.data() + slot * row, row);
    }
    if (window_capacity_ > 0) {
      const int64_t at = (slot % window_capacity_) * row;
      f32_to_fp16_row(krow, layer.window_k.data() + at, row);
      f32_to_fp16_row(vrow, layer.window_v.data() + at, row);
    }
  }
  layer.stored = n_tokens_ + batch_n_;
}

void KvCache::end_batch() {
  for (const auto& layer : layers_) KVQ_ASSERT(layer.stored == n_tokens_ + batch_n_);
  n_tokens_ += batch_n_;
  batch_n_ = 0;
}

void KvCache::abort_batch() {
  positions_.resize(size_t(n_tokens_));
  const size_t n_pages = size_t((n_tokens_ + kKvPageTokens - 1) / kKvPageTokens);
  if (config_.k_format->keys_pre_rope) rope_page_back_.resize(n_pages * size_t(config_.rope.n_rot));
  for (auto& layer : layers_) layer.stored = n_tokens_;
  batch_n_ = 0;
}

KvLayerView KvCache::view(int layer_index) const {
  const Layer& layer = layers_[layer_index];
  KvLayerView v;
  v.k = layer.k_codec->layout();
  v.v = layer.v_codec->layout();
  v.keys_pre_rope = config_.k_format->keys_pre_rope;
  v.k_rotated = config_.k_format->rotate_k;
  v.v_rotated = config_.values_rotated();
  v.n_kv_heads = config_.n_kv_heads;
  v.head_dim = config_.head_dim;
  v.n_tokens = layer.stored;
  v.pages = layer.pages.data();
  v.v_offset = k_page_bytes_;
  v.page_bytes = k_page_bytes_ + v_page_bytes_;
  v.positions = positions_.data();
  v.rope = &rope_;
  v.rope_rel_cs = rope_rel_cs_.data();
  v.rope_page_back = rope_page_back_.data();
  v.sink_tokens = int(std::min<int64_t>(config_.sink_tokens, config_.n_ctx));
  v.sink_k = layer.sink_k.data();
  v.sink_v = layer.sink_v.data();
  v.window_tokens = config_.window_tokens;
  v.window_capacity = window_capacity_;
  v.window_first = std::max<int64_t>(window_first_, layer.stored - window_capacity_);
  v.window_k = layer.window_k.data();
  v.window_v = layer.window_v.data();
  return v;
}

void KvCache::clear() {
  KVQ_ASSERT(batch_n_ == 0);
  n_tokens_ = 0;
  window_first_ = 0;
  positions_.clear();
  rope_page_back_.clear();
  for (auto& layer : layers_) layer.stored = 0;
}

namespace {

// Positions and RoPE angles held for n tokens: per token its position; for
// pre-RoPE keys also per page the angles of its first position, and the table
// of the offsets in a page (KvLayerView::rope_rel_cs).
uint64_t angle_table_bytes(const KvCacheConfig& c, int64_t n_tokens) {
  const uint64_t pages = uint64_t((n_tokens + kKvPageTokens - 1) / kKvPageTokens), n_rot = uint64_t(c.rope.n_rot);
  const uint64_t angles = c.k_format->keys_pre_rope ? (pages + kKvPageTokens) * n_rot * sizeof(float) : 0;
  return uint64_t(n_tokens) * sizeof(int32_t) + angles;
}

}  // namespace

KvMemory KvCache::memory_for(const KvCacheConfig& c, int64_t n_tokens, int64_t max_batch) {
  const KvGeometry g{c.n_kv_heads, c.head_dim};
  const auto kc = make_kv_codec(*c.k_format, KvRole::key, g, nullptr, true);
  const auto vc = make_kv_codec(*c.v_format, KvRole::value, g, nullptr, true);
  const uint64_t pages = uint64_t((n_tokens + kKvPageTokens - 1) / kKvPageTokens);
  const uint64_t row = uint64_t(g.row());
  const uint64_t sink_rows = uint64_t(std::min<int64_t>(c.sink_tokens, c.n_ctx));
  const uint64_t window_rows =
      c.window_tokens > 0 && n_tokens > 0
          ? uint64_t((c.window_tokens + std::min(max_batch, n_tokens) + kKvPageTokens - 1) / kKvPageTokens * kKvPageTokens)
          : 0;
  const uint64_t side = (sink_rows + window_rows) * row * sizeof(uint16_t);
  const KvPageBytes kp = kc->page_layout(), vp = vc->page_layout();
  const uint64_t layers = uint64_t(c.n_layers);
  KvMemory m;
  m.codes = layers * pages * (kp.codes + vp.codes);
  m.scales = layers * pages * (kp.scales + vp.scales);
  m.outliers = layers * pages * (kp.outliers + vp.outliers);
  m.full_precision = layers * 2 * side;
  m.calibration = layers * (kc->fixed_bytes() + vc->fixed_bytes());
  m.positions = angle_table_bytes(c, n_tokens);
  m.k = layers * (pages * kp.total() + side + kc->fixed_bytes());
  m.v = layers * (pages * vp.total() + side + vc->fixed_bytes());
  return m;
}

KvMemory KvCache::memory() const {
  KvMemory m;
  for (const auto& l : layers_) {
    const uint64_t pages = l.pages.size();
    const KvPageBytes kp = l.k_codec->page_layout(), vp = l.v_codec->page_layout();
    const uint64_t k_side = (l.sink_k.size() + l.window_k.size()) * sizeof(uint16_t);
    const uint64_t v_side = (l.sink_v.size() + l.window_v.size()) * sizeof(uint16_t);
    m.codes += pages * (kp.codes + vp.codes);
    m.scales += pages * (kp.scales + vp.scales);
    m.outliers += pages * (kp.outliers + vp.outliers);
    m.full_precision += k_side + v_side;
    m.calibration += l.k_codec->fixed_bytes() + l.v_codec->fixed_bytes();
    m.k += pages * kp.total() + k_side + l.k_codec->fixed_bytes();
    m.v += pages * vp.total() + v_side + l.v_codec->fixed_bytes();
  }
  m.positions = angle_table_bytes(config_, int64_t(positions_.size()));
  return m;
}

}  // namespace kvq

#include "kvcache/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "base/error.h"

namespace kvq {

KvCache::KvCache(const KvCacheConfig& config) : config_(config) {
  if (!config.k_format || !config.v_format) fail("KV cache: no format given");
  if (config.n_layers <= 0 || config.n_kv_heads <= 0 || config.head_dim <= 0 || config.n_ctx <= 0)
    fail("KV cache: invalid shape (layers {}, kv heads {}, head dim {}, context {})", config.n_layers,
         config.n_kv_heads, config.head_dim, config.n_ctx);
  if (config.rope.head_dim != config.head_dim)
    fail("KV cache: RoPE head size {} differs from the cache's {}", config.rope.head_dim, config.head_dim);
  rope_ = Rope(config.rope);
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
  k_page_bytes_ = layers_[0].k_codec->page_bytes();
  v_page_bytes_ = layers_[0].v_codec->page_bytes();
  positions_.reserve(size_t(std::min<int64_t>(config.n_ctx, 1 << 16)));
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
  positions_.insert(positions_.end(), positions.begin(), positions.end());
  batch_n_ = n;
}

void KvCache::store(int layer_index, const float* k, const float* v) {
  KVQ_ASSERT(layer_index >= 0 && layer_index < config_.n_layers);
  Layer& layer = layers_[layer_index];
  KVQ_ASSERT(layer.stored == n_tokens_);
  const int64_t row = int64_t(config_.n_kv_heads) * config_.head_dim;
  if (observer_) observer_(layer_index, batch_n_, positions_.data() + n_tokens_, k, v);
  const bool rotate = !config_.k_format->keys_pre_rope;
  rotated_.resize(size_t(row));
  for (int64_t i = 0; i < batch_n_; ++i) {
    const int64_t slot = n_tokens_ + i;
    uint8_t* page = const_cast<uint8_t*>(layer.pages[slot / kKvPageTokens]);
    const int in_page = int(slot % kKvPageTokens);
    const float* krow = k + i * row;
    if (rotate) {  // post-RoPE format: rotate on the way in
      std::memcpy(rotated_.data(), krow, size_t(row) * sizeof(float));
      rope_.apply(rotated_.data(), config_.n_kv_heads, positions_[slot]);
      krow = rotated_.data();
    }
    layer.k_codec->encode(krow, in_page, page);
    layer.v_codec->encode(v + i * row, in_page, page + k_page_bytes_);
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
  for (auto& layer : layers_) layer.stored = n_tokens_;
  batch_n_ = 0;
}

KvLayerView KvCache::view(int layer_index) const {
  const Layer& layer = layers_[layer_index];
  return KvLayerView{layer.k_codec.get(),      layer.v_codec.get(), config_.k_format->keys_pre_rope,
                     config_.n_kv_heads,       config_.head_dim,    layer.stored,
                     layer.pages.data(),       k_page_bytes_,       positions_.data(),
                     &rope_};
}

void KvCache::clear() {
  KVQ_ASSERT(batch_n_ == 0);
  n_tokens_ = 0;
  positions_.clear();
  for (auto& layer : layers_) layer.stored = 0;
}

uint64_t KvCache::bytes_k() const {
  uint64_t pages = 0;
  for (const auto& l : layers_) pages += l.pages.size();
  return pages * k_page_bytes_;
}

uint64_t KvCache::bytes_v() const {
  uint64_t pages = 0;
  for (const auto& l : layers_) pages += l.pages.size();
  return pages * v_page_bytes_;
}

}  // namespace kvq

namespace kvq {

int KvLayerView::page_tokens(int64_t p) const {
  return int(std::min<int64_t>(kKvPageTokens, n_tokens - p * kKvPageTokens));
}

void KvLayerView::decode_keys(int64_t p, int head, float* kt) const {
  const int n = page_tokens(p);
  k_codec->decode(pages[p], head, n, kt);
  if (!keys_pre_rope) return;
  // Rotate each decoded key at its own position (the tile is channel-major).
  const RopeSpec& spec = rope->spec();
  const int half = spec.n_rot / 2;
  float c[512], s[512];
  for (int j = 0; j < n; ++j) {
    rope->angles(positions[p * kKvPageTokens + j], c, s);
    for (int i = 0; i < half; ++i) {
      const int a = spec.neox ? i : 2 * i, b = spec.neox ? i + half : 2 * i + 1;
      const float x = kt[a * kKvPageTokens + j], y = kt[b * kKvPageTokens + j];
      kt[a * kKvPageTokens + j] = x * c[i] - y * s[i];
      kt[b * kKvPageTokens + j] = x * s[i] + y * c[i];
    }
  }
}

void KvLayerView::decode_values(int64_t p, int head, float* v) const {
  v_codec->decode(pages[p] + v_offset, head, page_tokens(p), v);
}

}  // namespace kvq

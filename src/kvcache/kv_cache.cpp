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
  rope_ = Rope(config.rope);
  k_head_bytes_ = kv_page_head_bytes(*config.k_format, config.head_dim);
  v_head_bytes_ = kv_page_head_bytes(*config.v_format, config.head_dim);
  v_offset_ = k_head_bytes_ * config.n_kv_heads;
  page_bytes_ = v_offset_ + v_head_bytes_ * config.n_kv_heads;
  layers_.resize(config.n_layers);
  positions_.reserve(size_t(std::min<int64_t>(config.n_ctx, 1 << 16)));
}

void KvCache::ensure_pages(int64_t n_tokens) {
  const int64_t need = (n_tokens + kKvPageTokens - 1) / kKvPageTokens;
  for (auto& layer : layers_) {
    while (int64_t(layer.pages.size()) < need) {
      // Zeroed so padding slots of a partial page never hold NaN garbage.
      layer.owned.emplace_back(new uint8_t[page_bytes_]());
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
  const int hd = config_.head_dim, nkv = config_.n_kv_heads;
  const int64_t row = int64_t(nkv) * hd;
  const KvFormat& kf = *config_.k_format;
  const KvFormat& vf = *config_.v_format;
  rotated_.resize(size_t(row));
  for (int64_t i = 0; i < batch_n_; ++i) {
    const int64_t slot = n_tokens_ + i;
    const int64_t page = slot / kKvPageTokens, in_page = slot % kKvPageTokens;
    uint8_t* base = const_cast<uint8_t*>(layer.pages[page]);
    const float* krow = k + i * row;
    if (!kf.keys_pre_rope) {
      std::memcpy(rotated_.data(), krow, size_t(row) * sizeof(float));
      rope_.apply(rotated_.data(), nkv, positions_[slot]);
      krow = rotated_.data();
    }
    for (int h = 0; h < nkv; ++h) {
      // Keys: channel-major within the page, one element per channel row.
      uint8_t* kb = base + k_head_bytes_ * h;
      for (int d = 0; d < hd; ++d)
        kf.encode(krow + h * hd + d, kb + (int64_t(d) * kKvPageTokens + in_page) * kf.element_bytes, 1);
      // Values: token-major.
      uint8_t* vb = base + v_offset_ + v_head_bytes_ * h;
      vf.encode(v + i * row + h * hd, vb + in_page * int64_t(hd) * vf.element_bytes, hd);
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
  for (auto& layer : layers_) layer.stored = n_tokens_;
  batch_n_ = 0;
}

KvLayerView KvCache::view(int layer_index) const {
  const Layer& layer = layers_[layer_index];
  return KvLayerView{config_.k_format, config_.v_format, config_.n_kv_heads, config_.head_dim,
                     layer.stored,     layer.pages.data(), k_head_bytes_,   v_head_bytes_,
                     v_offset_,        positions_.data(),  &rope_};
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
  return pages * k_head_bytes_ * config_.n_kv_heads;
}

uint64_t KvCache::bytes_v() const {
  uint64_t pages = 0;
  for (const auto& l : layers_) pages += l.pages.size();
  return pages * v_head_bytes_ * config_.n_kv_heads;
}

}  // namespace kvq

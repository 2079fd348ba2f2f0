// What a KV cache format IS: one row per format in a table. The cache stores
// K and V in pages of kKvPageTokens tokens; within a page each KV head owns a
// contiguous block. Key blocks are channel-major ([head_dim][page tokens]:
// one channel's values for every token of the page are adjacent — what
// per-channel key quantization wants, and what lets attention score a whole
// tile with broadcasts and no transposes); value blocks are token-major
// ([page tokens][head_dim]). docs/formats.md specifies each format bit-exactly.
#pragma once
#include <cstdint>
#include <span>
#include <string_view>

namespace kvq {

constexpr int kKvPageTokens = 64;

enum class KvFormatId { f32, f16 };

struct KvFormat {
  KvFormatId id;
  std::string_view name;          // what users type
  std::string_view description;
  double bits_per_element;        // storage cost, everything included
  bool keys_pre_rope;             // keys stored before RoPE (rotated after reading)
  int element_bytes;              // plain (non-block) formats
  // Scalar reference codecs for n contiguous elements.
  void (*encode)(const float* src, void* dst, int64_t n);
  void (*decode)(const void* src, float* dst, int64_t n);
};

std::span<const KvFormat> kv_format_table();
const KvFormat* find_kv_format(std::string_view name);  // nullptr if unknown
const KvFormat& kv_format(std::string_view name);      // throws listing valid names

// Bytes of one page for one KV head (keys or values).
inline uint64_t kv_page_head_bytes(const KvFormat& f, int head_dim) {
  return uint64_t(f.element_bytes) * uint64_t(head_dim) * kKvPageTokens;
}

}  // namespace kvq

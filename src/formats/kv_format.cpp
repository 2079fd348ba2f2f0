#include "formats/kv_format.h"

#include <array>
#include <cstring>
#include <string>

#include "base/error.h"
#include "base/fp16.h"

namespace kvq {

namespace {
void encode_f32(const float* src, void* dst, int64_t n) { std::memcpy(dst, src, size_t(n) * 4); }
void decode_f32(const void* src, float* dst, int64_t n) { std::memcpy(dst, src, size_t(n) * 4); }
void encode_f16(const float* src, void* dst, int64_t n) {
  auto* d = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = f32_to_fp16(src[i]);
}
void decode_f16(const void* src, float* dst, int64_t n) {
  const auto* s = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_f32(s[i]);
}

constexpr std::array<KvFormat, 2> kFormats = {{
    {KvFormatId::f32, "f32", "32-bit float, post-RoPE keys (exact)", 32.0, false, 4, encode_f32, decode_f32},
    {KvFormatId::f16, "f16", "IEEE half, post-RoPE keys", 16.0, false, 2, encode_f16, decode_f16},
}};
}  // namespace

std::span<const KvFormat> kv_format_table() { return kFormats; }

const KvFormat* find_kv_format(std::string_view name) {
  for (const auto& f : kFormats)
    if (f.name == name) return &f;
  return nullptr;
}

const KvFormat& kv_format(std::string_view name) {
  if (const KvFormat* f = find_kv_format(name)) return *f;
  std::string valid;
  for (const auto& f : kFormats) valid += (valid.empty() ? "" : ", ") + std::string(f.name);
  fail("unknown KV cache type '{}' (valid: {})", name, valid);
}

}  // namespace kvq

#include "formats/kv_format.h"

#include <array>
#include <cstring>
#include <string>

#include "base/error.h"
#include "base/fp16.h"
#include "base/fp16_row.h"

namespace kvq {

namespace {

// Plain formats: one element per value. Keys [head][d][slot], values [head][slot][d].
template <class T>
class PlainCodec final : public KvCodec {
 public:
  PlainCodec(KvRole role, const KvGeometry& g) : role_(role), g_(g) {}
  uint64_t page_bytes() const override { return uint64_t(g_.row()) * kKvPageTokens * sizeof(T); }

  void encode(const float* row, int slot, uint8_t* page) const override {
    T* base = reinterpret_cast<T*>(page);
    const int hd = g_.head_dim;
    for (int h = 0; h < g_.n_kv_heads; ++h) {
      T* block = base + int64_t(h) * hd * kKvPageTokens;
      const float* x = row + int64_t(h) * hd;
      if (role_ == KvRole::key)
        for (int d = 0; d < hd; ++d) block[int64_t(d) * kKvPageTokens + slot] = from_float(x[d]);
      else
        for (int d = 0; d < hd; ++d) block[int64_t(slot) * hd + d] = from_float(x[d]);
    }
  }

  void decode(const uint8_t* page, int head, int n, float* dst) const override {
    // Both layouts are one contiguous block per head; decode it whole (the
    // slots past n are zero-initialised page memory, harmless to convert).
    const int64_t count = int64_t(g_.head_dim) * kKvPageTokens;
    const T* block = reinterpret_cast<const T*>(page) + int64_t(head) * count;
    if constexpr (sizeof(T) == 4) {
      std::memcpy(dst, block, size_t(count) * 4);
    } else {
      fp16_to_f32_row(block, dst, count);
    }
  }

 private:
  static T from_float(float x) {
    if constexpr (sizeof(T) == 4) return x;
    else return f32_to_fp16(x);
  }
  KvRole role_;
  KvGeometry g_;
};

template <class T>
std::unique_ptr<KvCodec> make_plain(KvRole role, const KvGeometry& g, const KvTensorCalibration*) {
  return std::make_unique<PlainCodec<T>>(role, g);
}

constexpr std::array<KvFormat, 2> kFormats = {{
    {"f32", "32-bit float, post-RoPE keys (exact)", false, false, make_plain<float>},
    {"f16", "IEEE half, post-RoPE keys", false, false, make_plain<uint16_t>},
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

double kv_bits_per_element(const KvFormat& format, KvRole role, const KvGeometry& g) {
  const auto codec = format.make_codec(role, g, nullptr);
  return double(codec->page_bytes()) * 8.0 / (double(g.row()) * kKvPageTokens);
}

}  // namespace kvq

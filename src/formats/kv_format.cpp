#include "formats/kv_format.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>

#include "base/error.h"
#include "base/fp16.h"
#include "base/fp16_row.h"
#include "formats/kv_codecs.h"

namespace kvq {

namespace {

// Plain formats: one element per value. Keys [head][d][slot], values [head][slot][d].
template <class T>
class PlainCodec final : public KvCodec {
 public:
  PlainCodec(KvRole role, const KvGeometry& g) : role_(role), g_(g) {
    layout_.scheme = sizeof(T) == 4 ? KvScheme::f32 : KvScheme::f16;
    layout_.role = role;
    layout_.n_kv_heads = g.n_kv_heads;
    layout_.head_dim = g.head_dim;
  }
  KvPageBytes page_layout() const override { return {uint64_t(g_.row()) * kKvPageTokens * sizeof(T), 0, 0}; }

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
    kv_decode_ref(layout_, page, head, n, dst);
  }

 private:
  static T from_float(float x) {
    if constexpr (sizeof(T) == 4) return x;
    else return f32_to_fp16(x);
  }
  KvRole role_;
  KvGeometry g_;
};

}  // namespace

// The format table. Rows are specs; make_kv_codec builds the codec a row describes.
// Unused fields of non-quant rows are filled with neutral values.
constexpr KvLevels kU = KvLevels::uniform;
constexpr KvKeyScaling kTok = KvKeyScaling::per_token;
constexpr std::array<KvFormat, 28> kFormats = {{
    {"f32", "32-bit float, post-RoPE keys (exact)", KvScheme::f32, 32, kU, kTok, false, 0.0f, false},
    {"f16", "IEEE half, post-RoPE keys", KvScheme::f16, 16, kU, kTok, false, 0.0f, false},
    {"q8_0", "ggml Q8_0 blocks of 32 along the head dimension (fp16 scale, int8), post-RoPE keys", KvScheme::q8_0, 8, kU, kTok, false, 0.0f, false},
    {"q4_0", "ggml Q4_0 blocks of 32 along the head dimension (fp16 scale, 4-bit), post-RoPE keys", KvScheme::q4_0, 4, kU, kTok, false, 0.0f, false},
    {"q8_0-rot", "q8_0 after a Walsh-Hadamard rotation of each head vector (keys and values), as llama.cpp does by default", KvScheme::q8_0, 8, kU, kTok, false, 0.0f, false, true, true},
    {"q4_0-rot", "q4_0 after a Walsh-Hadamard rotation of each head vector (keys and values), as llama.cpp does by default", KvScheme::q4_0, 4, kU, kTok, false, 0.0f, false, true, true},
    {"int4", "4-bit uniform, per-token zero-point/range (keys and values), post-RoPE keys", KvScheme::quant, 4, KvLevels::uniform, KvKeyScaling::per_token, false, 0.0f, false},
    {"int3", "3-bit uniform, per-token zero-point/range (keys and values), post-RoPE keys", KvScheme::quant, 3, KvLevels::uniform, KvKeyScaling::per_token, false, 0.0f, false},
    {"int2", "2-bit uniform, per-token zero-point/range (keys and values), post-RoPE keys", KvScheme::quant, 2, KvLevels::uniform, KvKeyScaling::per_token, false, 0.0f, false},
    {"int4-rot", "int4 after a Walsh-Hadamard rotation of each head vector (keys and values)", KvScheme::quant, 4, KvLevels::uniform, KvKeyScaling::per_token, false, 0.0f, false, true, true},
    {"int3-rot", "int3 after a Walsh-Hadamard rotation of each head vector (keys and values)", KvScheme::quant, 3, KvLevels::uniform, KvKeyScaling::per_token, false, 0.0f, false, true, true},
    {"int4-ch-post", "4-bit uniform; keys per channel (calibrated), post-RoPE; values per token", KvScheme::quant, 4, KvLevels::uniform, KvKeyScaling::per_channel, false, 0.0f, true},
    {"int3-ch-post", "3-bit uniform; keys per channel (calibrated), post-RoPE; values per token", KvScheme::quant, 3, KvLevels::uniform, KvKeyScaling::per_channel, false, 0.0f, true},
    {"int2-ch-post", "2-bit uniform; keys per channel (calibrated), post-RoPE; values per token", KvScheme::quant, 2, KvLevels::uniform, KvKeyScaling::per_channel, false, 0.0f, true},
    {"int8-ch", "8-bit uniform; keys per channel (calibrated), pre-RoPE; values per token", KvScheme::quant, 8, KvLevels::uniform, KvKeyScaling::per_channel, true, 0.0f, true},
    {"int4-ch", "4-bit uniform; keys per channel (calibrated), pre-RoPE; values per token", KvScheme::quant, 4, KvLevels::uniform, KvKeyScaling::per_channel, true, 0.0f, true},
    {"int3-ch", "3-bit uniform; keys per channel (calibrated), pre-RoPE; values per token", KvScheme::quant, 3, KvLevels::uniform, KvKeyScaling::per_channel, true, 0.0f, true},
    {"int2-ch", "2-bit uniform; keys per channel (calibrated), pre-RoPE; values per token", KvScheme::quant, 2, KvLevels::uniform, KvKeyScaling::per_channel, true, 0.0f, true},
    {"int4-ch-1%", "4-bit uniform; keys per channel, pre-RoPE; values per token; 1% outliers kept exactly", KvScheme::quant, 4, KvLevels::uniform, KvKeyScaling::per_channel, true, 0.01f, true},
    {"int3-ch-1%", "3-bit uniform; keys per channel, pre-RoPE; values per token; 1% outliers kept exactly", KvScheme::quant, 3, KvLevels::uniform, KvKeyScaling::per_channel, true, 0.01f, true},
    {"int2-ch-1%", "2-bit uniform; keys per channel, pre-RoPE; values per token; 1% outliers kept exactly", KvScheme::quant, 2, KvLevels::uniform, KvKeyScaling::per_channel, true, 0.01f, true},
    {"nuq8", "KVQuant 8-bit non-uniform codebook; keys per channel, pre-RoPE; values per token", KvScheme::quant, 8, KvLevels::codebook, KvKeyScaling::per_channel, true, 0.0f, true},
    {"nuq4", "KVQuant 4-bit non-uniform codebook; keys per channel, pre-RoPE; values per token", KvScheme::quant, 4, KvLevels::codebook, KvKeyScaling::per_channel, true, 0.0f, true},
    {"nuq3", "KVQuant 3-bit non-uniform codebook; keys per channel, pre-RoPE; values per token", KvScheme::quant, 3, KvLevels::codebook, KvKeyScaling::per_channel, true, 0.0f, true},
    {"nuq2", "KVQuant 2-bit non-uniform codebook; keys per channel, pre-RoPE; values per token", KvScheme::quant, 2, KvLevels::codebook, KvKeyScaling::per_channel, true, 0.0f, true},
    {"nuq4-1%", "KVQuant 4-bit non-uniform codebook + 1% dense-and-sparse outliers; keys per channel, pre-RoPE", KvScheme::quant, 4, KvLevels::codebook, KvKeyScaling::per_channel, true, 0.01f, true},
    {"nuq3-1%", "KVQuant 3-bit non-uniform codebook + 1% dense-and-sparse outliers; keys per channel, pre-RoPE", KvScheme::quant, 3, KvLevels::codebook, KvKeyScaling::per_channel, true, 0.01f, true},
    {"nuq2-1%", "KVQuant 2-bit non-uniform codebook + 1% dense-and-sparse outliers; keys per channel, pre-RoPE", KvScheme::quant, 2, KvLevels::codebook, KvKeyScaling::per_channel, true, 0.01f, true},
}};

std::unique_ptr<KvCodec> make_kv_codec(const KvFormat& f, KvRole role, const KvGeometry& g,
                                       const KvTensorCalibration* calibration, bool for_accounting) {
  if (g.n_kv_heads <= 0 || g.head_dim <= 0) fail("KV cache: invalid geometry {} x {}", g.n_kv_heads, g.head_dim);
  if (f.needs_calibration(role) && !calibration && !for_accounting)
    fail("KV cache type '{}' needs calibration for its {} (run kvq calibrate, or pass --kv-calib FILE)", f.name,
         role == KvRole::key ? "keys" : "values");
  switch (f.scheme) {
    case KvScheme::f32: return std::make_unique<PlainCodec<float>>(role, g);
    case KvScheme::f16: return std::make_unique<PlainCodec<uint16_t>>(role, g);
    case KvScheme::q8_0:
    case KvScheme::q4_0: return make_block_kv_codec(f, role, g);
    case KvScheme::quant: return make_quant_kv_codec(f, role, g, calibration, for_accounting);
  }
  fail("KV cache type '{}' is not implemented", f.name);
}

void kv_decode_ref(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst) {
  switch (layout.scheme) {
    case KvScheme::f32:
    case KvScheme::f16: {
      // Both plain layouts are one contiguous block per head; decode it whole
      // (the slots past n are zero-initialised page memory, harmless to convert).
      const int64_t count = int64_t(layout.head_dim) * kKvPageTokens;
      if (layout.scheme == KvScheme::f32)
        std::memcpy(dst, reinterpret_cast<const float*>(page) + int64_t(head) * count, size_t(count) * 4);
      else
        fp16_to_f32_row(reinterpret_cast<const uint16_t*>(page) + int64_t(head) * count, dst, count);
      return;
    }
    case KvScheme::q8_0:
    case KvScheme::q4_0: return kv_block_decode(layout, page, head, n, dst);
    case KvScheme::quant: return kv_quant_decode(layout, page, head, n, dst);
  }
}

bool kv_is_power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

void kv_hadamard(float* x, int n) {
  KVQ_ASSERT(kv_is_power_of_two(n));
  for (int h = 1; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const float scale = float(1.0 / std::sqrt(double(n)));
  for (int i = 0; i < n; ++i) x[i] *= scale;
}

int kv_outliers_per_tail(float fraction, int width) {
  if (!(fraction > 0)) return 0;
  return std::max(1, int(std::ceil(double(fraction) / 2 * width - 1e-9)));
}

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
  const auto codec = make_kv_codec(format, role, g, nullptr, true);
  return double(codec->page_bytes()) * 8.0 / (double(g.row()) * kKvPageTokens);
}

}  // namespace kvq

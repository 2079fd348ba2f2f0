// q8_0 / q4_0: the llama.cpp-style baselines. Each head vector of each token is
// cut into blocks of 32 along the head dimension (the last one zero-padded),
// stored in ggml's exact Q8_0 / Q4_0 block layouts, so the bytes are what
// ggml's reference quantizer produces. Layout of both the key and the value
// part: [head][slot][block]. Keys are stored post-RoPE; decoding a key tile
// transposes it into the channel-major layout attention wants.
//
// The quantizers are written here rather than taken from src/quant because
// formats sits below quant in the dependency order; the tests check both
// produce the same bytes.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/error.h"
#include "base/fp16.h"
#include "formats/kv_codecs.h"

namespace kvq {
namespace {

constexpr int kBlock = 32;

inline void store_fp16(uint8_t* p, float f) {
  const uint16_t h = f32_to_fp16(f);
  std::memcpy(p, &h, 2);
}
inline float load_fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_f32(h);
}

// Q8_0: fp16 d = amax / 127, then 32 int8 q = round(x / d) (half away from
// zero). As in ggml, q uses the binary32 d, not its fp16 rounding.
struct Q8_0 {
  static constexpr int kBytes = 2 + kBlock;
  static void quantize(const float* x, uint8_t* b) {
    float amax = 0.0f;
    for (int j = 0; j < kBlock; ++j) amax = std::fmax(amax, std::fabs(x[j]));  // fmax skips NaN
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_fp16(b, d);
    for (int j = 0; j < kBlock; ++j) {
      const float v = x[j] * id;
      // Finite inputs give |v| <= 127 (+ rounding). Clamp before converting so
      // NaN/inf rows (0 * inf, inf * id) never reach a float->int conversion.
      int q = 0;
      if (v >= 127.0f) q = 127;
      else if (v <= -127.0f) q = -127;
      else if (v == v) q = int(std::round(v));
      b[2 + j] = uint8_t(int8_t(q));
    }
  }
  // Elements [0, n) of a block.
  static void dequantize(const uint8_t* b, int n, float* dst, int64_t stride) {
    const float d = load_fp16(b);
    for (int j = 0; j < n; ++j) dst[j * stride] = float(int8_t(b[2 + j])) * d;
  }
};

// Q4_0: fp16 d = max / -8 with max the signed element of largest magnitude
// (first on ties), q = min(15, trunc(x / d + 8.5)), x = d * (q - 8). Element
// i sits in the low nibble of byte i, element i + 16 in the high nibble.
struct Q4_0 {
  static constexpr int kBytes = 2 + kBlock / 2;
  static int code(float x, float id) {
    const float v = x * id + 8.5f;  // in [0.5, 16.5] for finite inputs
    if (v >= 15.0f) return 15;
    if (v >= 0.0f) return int(v);
    if (v < 0.0f) return 0;
    return 8;  // NaN: the zero code
  }
  static void quantize(const float* x, uint8_t* b) {
    float max = 0.0f, amax = 0.0f;
    for (int j = 0; j < kBlock; ++j) {
      const float a = std::fabs(x[j]);
      if (amax < a) {
        amax = a;
        max = x[j];
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_fp16(b, d);
    for (int j = 0; j < kBlock / 2; ++j)
      b[2 + j] = uint8_t(code(x[j], id) | (code(x[j + kBlock / 2], id) << 4));
  }
  static void dequantize(const uint8_t* b, int n, float* dst, int64_t stride) {
    const float d = load_fp16(b);
    for (int j = 0; j < n; ++j) {
      const int q = j < kBlock / 2 ? (b[2 + j] & 0x0f) : (b[2 + j - kBlock / 2] >> 4);
      dst[j * stride] = float(q - 8) * d;
    }
  }
};

// The decoder reads only the layout (the kernels' scalar fallback is this function).
template <class B>
void decode_blocks(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int D = L.head_dim, nb = (D + kBlock - 1) / kBlock;
  const uint8_t* base = page + int64_t(head) * kKvPageTokens * L.slot_bytes;
  for (int j = 0; j < n; ++j) {
    const uint8_t* blocks = base + int64_t(j) * L.slot_bytes;
    for (int i = 0; i < nb; ++i) {
      const int count = std::min(kBlock, D - i * kBlock);
      const int d0 = i * kBlock;
      if (L.role == KvRole::key)  // channel-major: dst[d * T + j]
        B::dequantize(blocks + i * B::kBytes, count, dst + int64_t(d0) * kKvPageTokens + j, kKvPageTokens);
      else  // token-major: dst[j * D + d]
        B::dequantize(blocks + i * B::kBytes, count, dst + int64_t(j) * D + d0, 1);
    }
  }
}

template <class B>
class BlockCodec final : public KvCodec {
 public:
  BlockCodec(KvRole role, const KvGeometry& g)
      : role_(role), g_(g), nb_((g.head_dim + kBlock - 1) / kBlock), slot_bytes_(int64_t(nb_) * B::kBytes) {
    layout_.scheme = B::kBytes == 2 + kBlock ? KvScheme::q8_0 : KvScheme::q4_0;
    layout_.role = role;
    layout_.n_kv_heads = g.n_kv_heads;
    layout_.head_dim = g.head_dim;
    layout_.slot_bytes = slot_bytes_;
  }

  KvPageBytes page_layout() const override {
    const uint64_t blocks = uint64_t(g_.n_kv_heads) * kKvPageTokens * uint64_t(nb_);
    return {blocks * (B::kBytes - 2), blocks * 2, 0};
  }

  void encode(const float* row, int slot, uint8_t* page) const override {
    const int D = g_.head_dim;
    for (int h = 0; h < g_.n_kv_heads; ++h) {
      const float* x = row + int64_t(h) * D;
      uint8_t* out = page + (int64_t(h) * kKvPageTokens + slot) * slot_bytes_;
      for (int i = 0; i < nb_; ++i) {
        const int n = std::min(kBlock, D - i * kBlock);
        if (n == kBlock) {
          B::quantize(x + i * kBlock, out + i * B::kBytes);
        } else {  // the zero-padded tail block
          float tmp[kBlock] = {};
          std::memcpy(tmp, x + i * kBlock, size_t(n) * 4);
          B::quantize(tmp, out + i * B::kBytes);
        }
      }
    }
  }

  void decode(const uint8_t* page, int head, int n, float* dst) const override {
    kv_block_decode(layout_, page, head, n, dst);
  }

 private:
  KvRole role_;
  KvGeometry g_;
  int nb_;              // blocks per head vector
  int64_t slot_bytes_;  // one head vector of one token
};

}  // namespace

void kv_block_decode(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst) {
  KVQ_ASSERT(layout.scheme == KvScheme::q8_0 || layout.scheme == KvScheme::q4_0);
  if (layout.scheme == KvScheme::q8_0) decode_blocks<Q8_0>(layout, page, head, n, dst);
  else decode_blocks<Q4_0>(layout, page, head, n, dst);
}

std::unique_ptr<KvCodec> make_block_kv_codec(const KvFormat& f, KvRole role, const KvGeometry& g) {
  switch (f.scheme) {
    case KvScheme::q8_0: return std::make_unique<BlockCodec<Q8_0>>(role, g);
    case KvScheme::q4_0: return std::make_unique<BlockCodec<Q4_0>>(role, g);
    default: break;
  }
  fail("KV cache type '{}' is not a block format", f.name);
}

}  // namespace kvq

#include "kernels/cpu/kv_decode.h"

#include <atomic>

#include "base/cpu.h"

namespace kvq {

namespace {
std::atomic<bool> g_attention_scalar{false};
[[maybe_unused]] bool fast() { return simd_level() >= SimdLevel::avx2 && !g_attention_scalar.load(std::memory_order_relaxed); }
}  // namespace

void set_attention_scalar(bool on) { g_attention_scalar.store(on); }
bool attention_scalar() { return g_attention_scalar.load(std::memory_order_relaxed); }

void kv_decode_tile(const KvCodec& codec, const uint8_t* page, int head, int n, float* dst) {
#if defined(__x86_64__)
  if (fast() && simd::kv_decode_tile_avx2(codec.layout(), page, head, n, dst)) return;
#endif
  codec.decode(page, head, n, dst);
}

bool kv_decode_rotate_keys(const KvCodec& codec, const uint8_t* page, int head, int n, float* dst, const float* cs,
                           int half, bool neox) {
#if defined(__x86_64__)
  if (fast()) return simd::kv_decode_rotate_keys_avx2(codec.layout(), page, head, n, dst, cs, half, neox);
#endif
  return false;
}

void kv_rotate_key_tile(float* kt, int n, const float* cs, int half, bool neox) {
#if defined(__x86_64__)
  if (fast()) return simd::kv_rotate_key_tile_avx2(kt, n, cs, half, neox);
#endif
  constexpr int T = kKvPageTokens;
  for (int i = 0; i < half; ++i) {
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float* c = cs + i * T;
    const float* s = cs + (half + i) * T;
    for (int j = 0; j < n; ++j) {
      const float x = kt[a * T + j], y = kt[b * T + j];
      kt[a * T + j] = x * c[j] - y * s[j];
      kt[b * T + j] = x * s[j] + y * c[j];
    }
  }
}

}  // namespace kvq

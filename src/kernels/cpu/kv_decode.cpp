#include "kernels/cpu/kv_decode.h"

#include <atomic>

#include "base/cpu.h"
#include "base/error.h"
#include "kernels/cpu/attention.h"

namespace kvq {

namespace {
std::atomic<bool> g_attention_scalar{false};
std::atomic<TileDecoders> g_decoders{TileDecoders::automatic};
}  // namespace

void set_attention_scalar(bool on) { g_attention_scalar.store(on); }
bool attention_scalar() { return g_attention_scalar.load(std::memory_order_relaxed); }

void set_tile_decoders(TileDecoders decoders) {
  if (decoders == TileDecoders::avx2 && detected_simd_level() < SimdLevel::avx2)
    fail("tile decoders: the AVX2 decoders were asked for on a CPU without AVX2");
  if (decoders == TileDecoders::avx512 && detected_simd_level() < SimdLevel::avx512)
    fail("tile decoders: the AVX-512 decoders were asked for on a CPU without AVX-512");
  g_decoders.store(decoders);
}

TileDecoders tile_decoders() {
  if (attention_scalar()) return TileDecoders::codec;
  const TileDecoders pinned = g_decoders.load(std::memory_order_relaxed);
  if (pinned != TileDecoders::automatic) return pinned;
#if defined(__x86_64__)
  if (simd_level() >= SimdLevel::avx512) return TileDecoders::avx512;
  if (simd_level() >= SimdLevel::avx2) return TileDecoders::avx2;
#endif
  // Without AVX2 the decoders go with the tile kernel: portable beside the
  // portable step, the codecs beside the scalar reference. (Below AVX2 that
  // choice does not depend on the head size; only the AVX2 kernel's does.)
  constexpr int kAnyHeadDim = kKvPageTokens;
  return attention_kernel_for(kAnyHeadDim) == AttentionKernel::portable ? TileDecoders::portable : TileDecoders::codec;
}

void kv_decode_tile(const KvCodec& codec, const uint8_t* page, int head, int n, float* dst) {
  const KvCodecLayout& L = codec.layout();
  switch (tile_decoders()) {
#if defined(__x86_64__)
    case TileDecoders::avx512:
      if (simd::kv_decode_tile_avx512(L, page, head, n, dst)) return;
      [[fallthrough]];  // the AVX2 decoders take the other layouts
    case TileDecoders::avx2:
      if (simd::kv_decode_tile_avx2(L, page, head, n, dst)) return;
      break;
#endif
    case TileDecoders::portable:
      if (simd::kv_decode_tile_portable(L, page, head, n, dst)) return;
      break;
    default: break;
  }
  codec.decode(page, head, n, dst);
}

bool kv_decode_rotate_keys(const KvCodec& codec, const uint8_t* page, int head, int n, float* dst, const float* cs,
                           int half, bool neox) {
  const KvCodecLayout& L = codec.layout();
  switch (tile_decoders()) {
#if defined(__x86_64__)
    case TileDecoders::avx512:
      if (simd::kv_decode_rotate_keys_avx512(L, page, head, n, dst, cs, half, neox)) return true;
      [[fallthrough]];
    case TileDecoders::avx2: return simd::kv_decode_rotate_keys_avx2(L, page, head, n, dst, cs, half, neox);
#endif
    case TileDecoders::portable: return simd::kv_decode_rotate_keys_portable(L, page, head, n, dst, cs, half, neox);
    default: return false;
  }
}

bool kv_score_rotated_keys(const KvCodec& codec, const uint8_t* page, int head, int n, const float* cs, int half,
                           bool neox, const float* q, int rows, float* s) {
#if defined(__x86_64__)
  if (tile_decoders() == TileDecoders::avx512)
    return simd::kv_score_rotated_keys_avx512(codec.layout(), page, head, n, cs, half, neox, q, rows, s);
#endif
  (void)codec, (void)page, (void)head, (void)n, (void)cs, (void)half, (void)neox, (void)q, (void)rows, (void)s;
  return false;
}

bool kv_scores_rotated_keys(const KvCodec& codec, int rows) {
#if defined(__x86_64__)
  if (tile_decoders() == TileDecoders::avx512) return simd::kv_scores_rotated_keys_avx512(codec.layout(), rows);
#endif
  (void)codec, (void)rows;
  return false;
}

void kv_rotate_key_tile(float* kt, int n, const float* cs, int half, bool neox) {
  switch (tile_decoders()) {
#if defined(__x86_64__)
    case TileDecoders::avx512:  // (a rotation is multiplies and adds: AVX2's does)
    case TileDecoders::avx2: return simd::kv_rotate_key_tile_avx2(kt, n, cs, half, neox);
#endif
    case TileDecoders::portable:
      if (simd::kv_rotate_key_tile_portable(kt, n, cs, half, neox)) return;
      break;
    default: break;
  }
  constexpr int T = kKvPageTokens;
  for (int i = 0; i < half; ++i) {
    const int a = simd::rope_channel(i, false, half, neox), b = simd::rope_channel(i, true, half, neox);
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

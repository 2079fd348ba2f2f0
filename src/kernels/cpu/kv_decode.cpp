#include "kernels/cpu/kv_decode.h"

#include "base/error.h"

namespace kvq {

void kv_decode_tile(const KernelSet& ks, const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  switch (ks.decoders) {
#if defined(__x86_64__)
    case TileDecoders::avx512:
      if (simd::kv_decode_tile_avx512(L, page, head, n, dst)) return;
      [[fallthrough]];  // the AVX2 decoders take the other layouts
    case TileDecoders::avx2:
      if (simd::kv_decode_tile_avx2(L, page, head, n, dst)) return;
      break;
#endif
    case TileDecoders::portable:
      if (simd::kv_decode_tile_portable(ks.portable_target, L, page, head, n, dst)) return;
      break;
    default: break;
  }
  kv_decode_ref(L, page, head, n, dst);
}

bool kv_decode_rotate_keys(const KernelSet& ks, const KvCodecLayout& L, const uint8_t* page, int head, int n,
                           float* dst, const float* cs, int half, bool neox) {
  switch (ks.decoders) {
#if defined(__x86_64__)
    case TileDecoders::avx512:
      if (simd::kv_decode_rotate_keys_avx512(L, page, head, n, dst, cs, half, neox)) return true;
      [[fallthrough]];
    case TileDecoders::avx2: return simd::kv_decode_rotate_keys_avx2(L, page, head, n, dst, cs, half, neox);
#endif
    case TileDecoders::portable: return simd::kv_decode_rotate_keys_portable(ks.portable_target, L, page, head, n, dst, cs, half, neox);
    default: return false;
  }
}

bool kv_score_rotated_keys(const KernelSet& ks, const KvCodecLayout& L, const uint8_t* page, int head, int n,
                           const float* cs, int half, bool neox, const float* q, int rows, float* s) {
#if defined(__x86_64__)
  if (ks.decoders == TileDecoders::avx512)
    return simd::kv_score_rotated_keys_avx512(L, page, head, n, cs, half, neox, q, rows, s);
#endif
  (void)ks, (void)L, (void)page, (void)head, (void)n, (void)cs, (void)half, (void)neox, (void)q, (void)rows, (void)s;
  return false;
}

bool kv_scores_rotated_keys(const KernelSet& ks, const KvCodecLayout& L, int rows) {
#if defined(__x86_64__)
  if (ks.decoders == TileDecoders::avx512) return simd::kv_scores_rotated_keys_avx512(L, rows);
#endif
  (void)ks, (void)L, (void)rows;
  return false;
}

void kv_rotate_key_tile(const KernelSet& ks, float* kt, int n, const float* cs, int half, bool neox) {
  switch (ks.decoders) {
#if defined(__x86_64__)
    case TileDecoders::avx512:  // (a rotation is multiplies and adds: AVX2's does)
    case TileDecoders::avx2: return simd::kv_rotate_key_tile_avx2(kt, n, cs, half, neox);
#endif
    case TileDecoders::portable:
      if (simd::kv_rotate_key_tile_portable(ks.portable_target, kt, n, cs, half, neox)) return;
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

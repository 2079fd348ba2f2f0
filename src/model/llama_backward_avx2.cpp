// The backward pass's inner loops compiled for AVX2+FMA (float only); the
// dispatcher in llama_backward.cpp picks them when the caller's SIMD level allows.
// The weight-gradient product has an explicit FMA kernel (the biggest cost:
// the output head); the attention loops are the shared templates, auto-vectorised.
#include <immintrin.h>

#include "model/llama_backward_kernels.h"

namespace kvq::bwd_avx2 {

void linear_bwd_block(const float* chunk, int64_t nr, int64_t cols, const float* dy, int64_t rows, int64_t r0,
                      float* dx, int64_t t0, int64_t t1) {
  if (cols % 8 != 0) return bwd::linear_bwd_block(chunk, nr, cols, dy, rows, r0, dx, t0, t1);
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    float* x0 = dx + t * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      const bool two = c + 16 <= cols;
      __m256 acc[4][2];
      for (int u = 0; u < 4; ++u) {
        acc[u][0] = _mm256_loadu_ps(x0 + u * cols + c);
        acc[u][1] = two ? _mm256_loadu_ps(x0 + u * cols + c + 8) : _mm256_setzero_ps();
      }
      for (int64_t r = 0; r < nr; ++r) {
        const float* wr = chunk + r * cols + c;
        const __m256 w0 = _mm256_loadu_ps(wr), w1 = two ? _mm256_loadu_ps(wr + 8) : _mm256_setzero_ps();
        for (int u = 0; u < 4; ++u) {
          const __m256 a = _mm256_broadcast_ss(dy + (t + u) * rows + r0 + r);
          acc[u][0] = _mm256_fmadd_ps(a, w0, acc[u][0]);
          acc[u][1] = _mm256_fmadd_ps(a, w1, acc[u][1]);
        }
      }
      for (int u = 0; u < 4; ++u) {
        _mm256_storeu_ps(x0 + u * cols + c, acc[u][0]);
        if (two) _mm256_storeu_ps(x0 + u * cols + c + 8, acc[u][1]);
      }
    }
  }
  if (t < t1) bwd::linear_bwd_block(chunk, nr, cols, dy, rows, r0, dx, t, t1);
}

void attn_fwd_rows(const AttnShape& s, const float* q, const float* kt, const float* v, float* o, float* lse, int h,
                   int64_t i0, int64_t i1, float* S, float* qs) {
  bwd::attn_fwd_rows(s, q, kt, v, o, lse, h, i0, i1, S, qs);
}

void attn_bwd_head(const AttnShape& s, const float* q, const float* k, const float* kt, const float* vt, const float* o,
                   const float* lse, const float* d_o, float* dq, float* dkl, float* dvl, int h, float* P, float* dP,
                   float* qs, float* dos) {
  bwd::attn_bwd_head(s, q, k, kt, vt, o, lse, d_o, dq, dkl, dvl, h, P, dP, qs, dos);
}

}  // namespace kvq::bwd_avx2

// Inner loops of the backward pass (src/model/llama_backward.cpp), written so the
// compiler vectorises them (inner loops are multiply-adds over contiguous rows,
// never reductions). Included by llama_backward.cpp (baseline ISA, float and
// double) and llama_backward_avx2.cpp (float, AVX2+FMA): everything here has
// internal linkage so the two compilations never mix.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "model/llama_backward.h"

namespace kvq::bwd {
namespace {

// sc[j] = sum_d a[d] * bt[d][j] for j < m; bt is [hd][n] (keys or values transposed).
template <class T>
void dot_rows(const T* a, const T* bt, int64_t n, int hd, int64_t m, T* sc) {
  std::fill(sc, sc + m, T(0));
  for (int d = 0; d < hd; ++d) {
    const T ad = a[d];
    const T* __restrict b = bt + d * n;
    T* __restrict s = sc;
    for (int64_t j = 0; j < m; ++j) s[j] += ad * b[j];
  }
}

// dx[t][c] += sum_{r < nr} dy[t][r0 + r] * chunk[r][c] for t in [t0, t1); dy rows
// have `rows` elements. Four tokens share each loaded weight row.
template <class T>
void linear_bwd_block(const float* chunk, int64_t nr, int64_t cols, const T* dy, int64_t rows, int64_t r0, T* dx,
                      int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    T* __restrict x0 = dx + t * cols;
    T* __restrict x1 = x0 + cols;
    T* __restrict x2 = x1 + cols;
    T* __restrict x3 = x2 + cols;
    for (int64_t r = 0; r < nr; ++r) {
      const T a0 = dy[t * rows + r0 + r], a1 = dy[(t + 1) * rows + r0 + r];
      const T a2 = dy[(t + 2) * rows + r0 + r], a3 = dy[(t + 3) * rows + r0 + r];
      const float* __restrict wr = chunk + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const T wc = T(wr[c]);
        x0[c] += a0 * wc;
        x1[c] += a1 * wc;
        x2[c] += a2 * wc;
        x3[c] += a3 * wc;
      }
    }
  }
  for (; t < t1; ++t) {
    T* __restrict xt = dx + t * cols;
    for (int64_t r = 0; r < nr; ++r) {
      const T a = dy[t * rows + r0 + r];
      const float* __restrict wr = chunk + r * cols;
      for (int64_t c = 0; c < cols; ++c) xt[c] += a * T(wr[c]);
    }
  }
}

// Attention forward, query head h, rows [i0, i1): o and lse (see attention_fwd).
// kt: the head's KV head keys transposed [hd][n]; v: all values [n][n_head_kv][hd].
// sc: scratch of >= i1 elements, qs: scratch of hd.
template <class T>
void attn_fwd_rows(const AttnShape& s, const T* q, const T* kt, const T* v, T* o, T* lse, int h, int64_t i0, int64_t i1,
                   T* sc, T* qs) {
  const int hd = s.head_dim, g = h / (s.n_head / s.n_head_kv);
  const int64_t q_stride = int64_t(s.n_head) * hd, kv_stride = int64_t(s.n_head_kv) * hd;
  for (int64_t i = i0; i < i1; ++i) {
    const T* qi = q + i * q_stride + h * hd;
    for (int d = 0; d < hd; ++d) qs[d] = qi[d] * T(s.scale);
    const int64_t m = i + 1;
    dot_rows(qs, kt, s.n, hd, m, sc);
    T mx = sc[0];
    for (int64_t j = 1; j < m; ++j) mx = std::max(mx, sc[j]);
    T sum = 0;
    for (int64_t j = 0; j < m; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
    T* __restrict oi = o + i * q_stride + h * hd;
    std::fill(oi, oi + hd, T(0));
    const T inv = T(1) / sum;
    for (int64_t j = 0; j < m; ++j) {
      const T p = sc[j] * inv;
      const T* __restrict vj = v + j * kv_stride + g * hd;
      for (int d = 0; d < hd; ++d) oi[d] += p * vj[d];
    }
    lse[h * s.n + i] = mx + std::log(sum);
  }
}

// Attention backward for query head h over every row (see attention_bwd): dq rows
// of head h (overwritten); dkl, dvl [n][hd] this head's contributions (accumulated).
// kt, vt: its KV head transposed [hd][n]; p, dp: scratch of n; qs: scratch of hd.
template <class T>
void attn_bwd_head(const AttnShape& s, const T* q, const T* k, const T* kt, const T* vt, const T* o, const T* lse,
                   const T* d_o, T* dq, T* dkl, T* dvl, int h, T* p, T* dp, T* qs) {
  const int hd = s.head_dim, g = h / (s.n_head / s.n_head_kv);
  const int64_t q_stride = int64_t(s.n_head) * hd, kv_stride = int64_t(s.n_head_kv) * hd;
  const T scale = T(s.scale);
  for (int64_t i = 0; i < s.n; ++i) {
    const T* qi = q + i * q_stride + h * hd;
    const T* doi = d_o + i * q_stride + h * hd;
    const T* oi = o + i * q_stride + h * hd;
    for (int d = 0; d < hd; ++d) qs[d] = qi[d] * scale;
    const int64_t m = i + 1;
    dot_rows(qs, kt, s.n, hd, m, p);
    const T l = lse[h * s.n + i];
    for (int64_t j = 0; j < m; ++j) p[j] = std::exp(p[j] - l);
    dot_rows(doi, vt, s.n, hd, m, dp);
    T di = 0;
    for (int d = 0; d < hd; ++d) di += doi[d] * oi[d];
    T* __restrict dqi = dq + i * q_stride + h * hd;
    std::fill(dqi, dqi + hd, T(0));
    for (int64_t j = 0; j < m; ++j) {
      const T pj = p[j];
      const T ds = pj * (dp[j] - di);
      const T* __restrict kj = k + j * kv_stride + g * hd;
      T* __restrict dkj = dkl + j * hd;
      T* __restrict dvj = dvl + j * hd;
      for (int d = 0; d < hd; ++d) {
        dqi[d] += ds * kj[d];
        dkj[d] += ds * qs[d];  // scale folded into qs
        dvj[d] += pj * doi[d];
      }
    }
    for (int d = 0; d < hd; ++d) dqi[d] *= scale;
  }
}

}  // namespace
}  // namespace kvq::bwd

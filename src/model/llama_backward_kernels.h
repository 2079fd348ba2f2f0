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

// y[i] += a * x[i]. A function of its own so that `restrict` on its parameters
// tells the compiler the rows do not overlap (it will not vectorise otherwise).
template <class T>
inline void axpy(int64_t n, T a, const T* __restrict x, T* __restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
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
  for (; t < t1; ++t)
    for (int64_t r = 0; r < nr; ++r) {
      const T a = dy[t * rows + r0 + r];
      const float* __restrict wr = chunk + r * cols;
      T* __restrict xt = dx + t * cols;
      for (int64_t c = 0; c < cols; ++c) xt[c] += a * T(wr[c]);
    }
}

constexpr int kRowBlock = 16;  // query rows that share each loaded key/value row
constexpr int kKeyTile = 64;   // keys per tile of the score computation (tile of kt: hd x 64, L1)

// S[r][j] = sum_d a[r][d] * bt[d][j] for r < b, j < m (rows of S have stride n).
// a: b rows of hd. Key tiles keep a hd x kKeyTile block of bt in L1 for all b rows.
template <class T>
void scores_block(const T* a, int b, const T* bt, int64_t n, int hd, int64_t m, T* S) {
  for (int64_t j0 = 0; j0 < m; j0 += kKeyTile) {
    const int64_t w = std::min<int64_t>(kKeyTile, m - j0);
    for (int r = 0; r < b; ++r) {
      T* sr = S + r * n + j0;
      std::fill(sr, sr + w, T(0));
      const T* ar = a + r * hd;
      for (int d = 0; d < hd; ++d) axpy(w, ar[d], bt + d * n + j0, sr);
    }
  }
}

// Attention forward, query head h, rows [i0, i1): o and lse (see attention_fwd).
// kt: the head's KV head keys transposed [hd][n]; v: all values [n][n_head_kv][hd].
// S: scratch of kRowBlock * n, qs: scratch of kRowBlock * hd.
template <class T>
void attn_fwd_rows(const AttnShape& s, const T* q, const T* kt, const T* v, T* o, T* lse, int h, int64_t i0, int64_t i1,
                   T* S, T* qs) {
  const int hd = s.head_dim, g = h / (s.n_head / s.n_head_kv);
  const int64_t q_stride = int64_t(s.n_head) * hd, kv_stride = int64_t(s.n_head_kv) * hd;
  for (int64_t b0 = i0; b0 < i1; b0 += kRowBlock) {
    const int b = int(std::min<int64_t>(kRowBlock, i1 - b0));
    const int64_t m = b0 + b;  // keys [0, m) cover every row of the block; row i uses j <= i
    for (int r = 0; r < b; ++r)
      for (int d = 0; d < hd; ++d) qs[r * hd + d] = q[(b0 + r) * q_stride + h * hd + d] * T(s.scale);
    scores_block(qs, b, kt, s.n, hd, m, S);
    for (int r = 0; r < b; ++r) {
      T* sr = S + r * s.n;
      const int64_t mi = b0 + r + 1;
      T mx = sr[0];
      for (int64_t j = 1; j < mi; ++j) mx = std::max(mx, sr[j]);
      T sum = 0;
      for (int64_t j = 0; j < mi; ++j) sum += (sr[j] = std::exp(sr[j] - mx));
      const T inv = T(1) / sum;
      for (int64_t j = 0; j < mi; ++j) sr[j] *= inv;
      for (int64_t j = mi; j < m; ++j) sr[j] = 0;  // causal
      lse[h * s.n + b0 + r] = mx + std::log(sum);
      std::fill(o + (b0 + r) * q_stride + h * hd, o + (b0 + r) * q_stride + (h + 1) * hd, T(0));
    }
    for (int64_t j = 0; j < m; ++j) {
      const T* vj = v + j * kv_stride + g * hd;
      for (int r = std::max(0, int(j - b0)); r < b; ++r) axpy(hd, S[r * s.n + j], vj, o + (b0 + r) * q_stride + h * hd);
    }
  }
}

// Attention backward for query head h over every row (see attention_bwd): dq rows
// of head h (overwritten); dkl, dvl [n][hd] this head's contributions (accumulated).
// kt, vt: its KV head transposed [hd][n]. Scratch: P, dP of kRowBlock * n; qs, dos
// of kRowBlock * hd. Rows go in blocks of kRowBlock so each k_j, dk_j, dv_j is
// loaded once per block.
template <class T>
void attn_bwd_head(const AttnShape& s, const T* q, const T* k, const T* kt, const T* vt, const T* o, const T* lse,
                   const T* d_o, T* dq, T* dkl, T* dvl, int h, T* P, T* dP, T* qs, T* dos) {
  const int hd = s.head_dim, g = h / (s.n_head / s.n_head_kv);
  const int64_t q_stride = int64_t(s.n_head) * hd, kv_stride = int64_t(s.n_head_kv) * hd;
  const T scale = T(s.scale);
  for (int64_t b0 = 0; b0 < s.n; b0 += kRowBlock) {
    const int b = int(std::min<int64_t>(kRowBlock, s.n - b0));
    const int64_t m = b0 + b;
    for (int r = 0; r < b; ++r)
      for (int d = 0; d < hd; ++d) {
        qs[r * hd + d] = q[(b0 + r) * q_stride + h * hd + d] * scale;
        dos[r * hd + d] = d_o[(b0 + r) * q_stride + h * hd + d];
      }
    scores_block(qs, b, kt, s.n, hd, m, P);
    scores_block(dos, b, vt, s.n, hd, m, dP);
    for (int r = 0; r < b; ++r) {
      const int64_t i = b0 + r, mi = i + 1;
      const T* oi = o + i * q_stride + h * hd;
      T di = 0;
      for (int d = 0; d < hd; ++d) di += dos[r * hd + d] * oi[d];
      const T l = lse[h * s.n + i];
      T* pr = P + r * s.n;
      T* dpr = dP + r * s.n;
      for (int64_t j = 0; j < mi; ++j) {
        pr[j] = std::exp(pr[j] - l);
        dpr[j] = pr[j] * (dpr[j] - di);  // dS
      }
      for (int64_t j = mi; j < m; ++j) pr[j] = dpr[j] = 0;  // causal
      std::fill(dq + i * q_stride + h * hd, dq + i * q_stride + (h + 1) * hd, T(0));
    }
    for (int64_t j = 0; j < m; ++j) {
      const T* kj = k + j * kv_stride + g * hd;
      T* dkj = dkl + j * hd;
      T* dvj = dvl + j * hd;
      for (int r = std::max(0, int(j - b0)); r < b; ++r) {
        const T pj = P[r * s.n + j], ds = dP[r * s.n + j];
        axpy(hd, ds, kj, dq + (b0 + r) * q_stride + h * hd);
        axpy(hd, ds, qs + r * hd, dkj);  // scale folded into qs
        axpy(hd, pj, dos + r * hd, dvj);
      }
    }
    for (int64_t i = b0; i < m; ++i)
      for (int d = 0; d < hd; ++d) dq[i * q_stride + h * hd + d] *= scale;
  }
}

}  // namespace
}  // namespace kvq::bwd

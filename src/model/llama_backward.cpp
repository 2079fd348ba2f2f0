#include "model/llama_backward.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include <type_traits>

#include "base/cpu.h"
#include "base/error.h"
#include "model/llama.h"
#include "model/llama_backward_kernels.h"

namespace kvq::bwd_avx2 {  // llama_backward_avx2.cpp
void linear_bwd_block(const float* chunk, int64_t nr, int64_t cols, const float* dy, int64_t rows, int64_t r0,
                      float* dx, int64_t t0, int64_t t1);
void attn_fwd_rows(const AttnShape& s, const float* q, const float* kt, const float* v, float* o, float* lse, int h,
                   int64_t i0, int64_t i1, float* sc, float* qs);
void attn_bwd_head(const AttnShape& s, const float* q, const float* k, const float* kt, const float* vt, const float* o,
                   const float* lse, const float* d_o, float* dq, float* dkl, float* dvl, int h, float* P, float* dP,
                   float* qs, float* dos);
}  // namespace kvq::bwd_avx2

namespace kvq {
namespace {

constexpr int64_t kHeadChunk = 256;  // output-head tokens at once (logits: 256 x vocab)
constexpr int64_t kWeightChunk = 32; // weight rows dequantized at once in linear_bwd
constexpr int64_t kAttnBlock = 64;   // query rows per attention forward task

[[maybe_unused]] bool use_avx2(SimdLevel simd) { return simd >= SimdLevel::avx2; }

template <class T>
bool all_finite(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

// Runs task(i) for i in [0, n) on the pool, handing tasks out dynamically
// (attention rows cost O(i), so contiguous splits would be unbalanced).
void dynamic_for(int64_t n, ThreadPool& pool, const std::function<void(int64_t)>& task) {
  std::atomic<int64_t> next{0};
  pool.run([&](int, int) {
    for (int64_t i; (i = next.fetch_add(1)) < n;) task(i);
  });
}

}  // namespace

// ---- pieces ---------------------------------------------------------------------

template <class T>
void rmsnorm_fwd(const T* x, const float* w, T* y, int64_t n, int dim, float eps) {
  for (int64_t r = 0; r < n; ++r) {
    const T* xr = x + r * dim;
    T* yr = y + r * dim;
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += double(xr[i]) * double(xr[i]);
    const T scale = T(1.0 / std::sqrt(ss / dim + double(eps)));
    for (int i = 0; i < dim; ++i) yr[i] = xr[i] * scale * T(w[i]);
  }
}

// y_i = x_i r w_i, r = (mean x^2 + eps)^-1/2, dr/dx_j = -r^3 x_j / dim
// dx_j = r w_j dy_j - x_j r^3 / dim * sum_i dy_i w_i x_i
template <class T>
void rmsnorm_bwd(const T* x, const float* w, const T* dy, T* dx, int64_t n, int dim, float eps) {
  for (int64_t r = 0; r < n; ++r) {
    const T* xr = x + r * dim;
    const T* dyr = dy + r * dim;
    T* dxr = dx + r * dim;
    double ss = 0, dot = 0;
    for (int i = 0; i < dim; ++i) {
      ss += double(xr[i]) * double(xr[i]);
      dot += double(dyr[i]) * double(w[i]) * double(xr[i]);
    }
    const double rs = 1.0 / std::sqrt(ss / dim + double(eps));
    const T a = T(rs), b = T(rs * rs * rs * dot / dim);
    for (int i = 0; i < dim; ++i) dxr[i] += a * T(w[i]) * dyr[i] - b * xr[i];
  }
}

template <class T>
RopeAngles<T> rope_angles(const RopeSpec& spec, const int32_t* positions, int64_t n) {
  RopeAngles<T> a;
  a.half = spec.n_rot / 2;
  a.cos.resize(size_t(n) * size_t(a.half));
  a.sin.resize(a.cos.size());
  std::vector<double> inv(size_t(a.half));
  for (int i = 0; i < a.half; ++i) {
    double f = std::pow(double(spec.freq_base), -2.0 * i / spec.n_rot);
    if (!spec.freq_factors.empty()) f /= spec.freq_factors[size_t(i)];
    inv[size_t(i)] = f;
  }
  for (int64_t t = 0; t < n; ++t) {
    const double p = double(positions[t]) * spec.freq_scale;
    for (int i = 0; i < a.half; ++i) {
      a.cos[size_t(t * a.half + i)] = T(std::cos(p * inv[size_t(i)]));
      a.sin[size_t(t * a.half + i)] = T(std::sin(p * inv[size_t(i)]));
    }
  }
  return a;
}

template <class T>
void rope_rotate(const RopeSpec& spec, const RopeAngles<T>& a, T* x, int64_t n, int n_heads, bool inverse) {
  const int half = a.half;
  const int i_stride = spec.neox ? 1 : 2, j_off = spec.neox ? half : 1;
  for (int64_t t = 0; t < n; ++t) {
    const T* c = a.cos.data() + t * half;
    const T* s = a.sin.data() + t * half;
    for (int h = 0; h < n_heads; ++h) {
      T* v = x + (t * n_heads + h) * spec.head_dim;
      for (int i = 0; i < half; ++i) {
        T& p = v[i * i_stride];
        T& q = v[i * i_stride + j_off];
        const T pa = p, qb = q, si = inverse ? -s[i] : s[i];
        p = pa * c[i] - qb * si;
        q = pa * si + qb * c[i];
      }
    }
  }
}

template <class T>
void swiglu_fwd(const T* g, const T* u, T* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
}

template <class T>
void swiglu_bwd(const T* g, const T* u, const T* dh, T* dg, T* du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T sg = T(1) / (T(1) + std::exp(-g[i]));
    const T silu = g[i] * sg;
    dg[i] = dh[i] * u[i] * sg * (T(1) + g[i] * (T(1) - sg));
    du[i] = dh[i] * silu;
  }
}

namespace {

// Keys or values of one KV head, transposed: out[d][j] = x[j][head][d].
template <class T>
void transpose_head(const AttnShape& s, const T* x, int g, std::vector<T>& out) {
  out.resize(size_t(s.head_dim) * size_t(s.n));
  const int64_t stride = int64_t(s.n_head_kv) * s.head_dim;
  for (int64_t j = 0; j < s.n; ++j)
    for (int d = 0; d < s.head_dim; ++d) out[size_t(d * s.n + j)] = x[j * stride + g * s.head_dim + d];
}

}  // namespace

template <class T>
void attention_fwd(const AttnShape& s, const T* q, const T* k, const T* v, T* o, T* lse, ThreadPool& pool, SimdLevel simd) {
  const int hd = s.head_dim, group = s.n_head / s.n_head_kv;
  std::vector<std::vector<T>> kt(size_t(s.n_head_kv));
  for (int g = 0; g < s.n_head_kv; ++g) transpose_head(s, k, g, kt[size_t(g)]);
  const int64_t n_blocks = (s.n + kAttnBlock - 1) / kAttnBlock;
  dynamic_for(int64_t(s.n_head) * n_blocks, pool, [&](int64_t task) {
    const int h = int(task / n_blocks), g = h / group;
    const int64_t i0 = (task % n_blocks) * kAttnBlock, i1 = std::min(s.n, i0 + kAttnBlock);
    std::vector<T> sc(static_cast<size_t>(bwd::kRowBlock) * size_t(s.n)), qs(size_t(bwd::kRowBlock) * size_t(hd));
    if constexpr (std::is_same_v<T, float>) {
#if defined(__x86_64__)
      if (use_avx2(simd))
        return bwd_avx2::attn_fwd_rows(s, q, kt[size_t(g)].data(), v, o, lse, h, i0, i1, sc.data(), qs.data());
#endif
    }
    bwd::attn_fwd_rows(s, q, kt[size_t(g)].data(), v, o, lse, h, i0, i1, sc.data(), qs.data());
  });
}

// Per row i of head h (p_j recomputed from lse): dp_j = dO_i.v_j, D_i = dO_i.O_i,
// ds_j = p_j (dp_j - D_i); dq_i = scale sum_j ds_j k_j; dk_j += scale ds_j q_i;
// dv_j += p_j dO_i.
template <class T>
void attention_bwd(const AttnShape& s, const T* q, const T* k, const T* v, const T* o, const T* lse, const T* d_o,
                   T* dq, T* dk, T* dv, ThreadPool& pool, SimdLevel simd) {
  const int hd = s.head_dim, group = s.n_head / s.n_head_kv;
  const int64_t kv_stride = int64_t(s.n_head_kv) * hd;
  std::vector<std::vector<T>> kt(size_t(s.n_head_kv)), vt(size_t(s.n_head_kv));
  for (int g = 0; g < s.n_head_kv; ++g) {
    transpose_head(s, k, g, kt[size_t(g)]);
    transpose_head(s, v, g, vt[size_t(g)]);
  }
  // Per query head: its contribution to its KV head's dK, dV [n][hd].
  std::vector<std::vector<T>> dkh(size_t(s.n_head)), dvh(size_t(s.n_head));
  dynamic_for(s.n_head, pool, [&](int64_t task) {
    const int h = int(task), g = h / group;
    std::vector<T>& dkl = dkh[size_t(h)];
    std::vector<T>& dvl = dvh[size_t(h)];
    dkl.assign(size_t(s.n * hd), T(0));
    dvl.assign(size_t(s.n * hd), T(0));
    const size_t big = size_t(bwd::kRowBlock) * size_t(s.n), small = size_t(bwd::kRowBlock) * size_t(hd);
    std::vector<T> P(big), dP(big), qs(small), dos(small);
    if constexpr (std::is_same_v<T, float>) {
#if defined(__x86_64__)
      if (use_avx2(simd))
        return bwd_avx2::attn_bwd_head(s, q, k, kt[size_t(g)].data(), vt[size_t(g)].data(), o, lse, d_o, dq, dkl.data(),
                                       dvl.data(), h, P.data(), dP.data(), qs.data(), dos.data());
#endif
    }
    bwd::attn_bwd_head(s, q, k, kt[size_t(g)].data(), vt[size_t(g)].data(), o, lse, d_o, dq, dkl.data(), dvl.data(), h,
                       P.data(), dP.data(), qs.data(), dos.data());
  });
  std::fill(dk, dk + s.n * kv_stride, T(0));
  std::fill(dv, dv + s.n * kv_stride, T(0));
  for (int h = 0; h < s.n_head; ++h) {  // fixed order: deterministic for any thread count
    const int g = h / group;
    for (int64_t j = 0; j < s.n; ++j)
      for (int d = 0; d < hd; ++d) {
        dk[j * kv_stride + g * hd + d] += dkh[size_t(h)][size_t(j * hd + d)];
        dv[j * kv_stride + g * hd + d] += dvh[size_t(h)][size_t(j * hd + d)];
      }
  }
}

template <>
void linear_fwd<float>(const WeightView& w, const float* x, float* y, int64_t n, ThreadPool& pool, SimdLevel simd) {
  matmul(w, x, y, n, pool, simd);
}

template <>
void linear_fwd<double>(const WeightView& w, const double* x, double* y, int64_t n, ThreadPool& pool, SimdLevel simd) {
  pool.parallel_for(w.rows, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(static_cast<size_t>(w.cols));
    for (int64_t r = r0; r < r1; ++r) {
      dequantize_row(w.type, static_cast<const uint8_t*>(w.data) + uint64_t(r) * w.row_bytes, row.data(), w.cols, simd);
      for (int64_t t = 0; t < n; ++t) {
        double acc = 0;
        const double* xt = x + t * w.cols;
        for (int64_t c = 0; c < w.cols; ++c) acc += double(row[size_t(c)]) * xt[c];
        y[t * w.rows + r] = acc;
      }
    }
  });
}

// dx[t][c] = sum_r dy[t][r] W[r][c]. Each thread owns a range of tokens and walks
// all of W in chunks of kWeightChunk dequantized rows (L2-resident); the block
// kernel (llama_backward_kernels.h, FMA version in llama_backward_avx2.cpp) lets
// four tokens share each loaded weight row.
template <class T>
void linear_bwd(const WeightView& w, const T* dy, T* dx, int64_t n, bool accumulate, ThreadPool& pool, SimdLevel simd) {
  const int64_t cols = w.cols, rows = w.rows;
  if (!accumulate) std::fill(dx, dx + n * cols, T(0));
  pool.parallel_for(n, [&](int64_t t0, int64_t t1) {
    std::vector<float> chunk(static_cast<size_t>(kWeightChunk * cols));
    for (int64_t r0 = 0; r0 < rows; r0 += kWeightChunk) {
      const int64_t nr = std::min(kWeightChunk, rows - r0);
      for (int64_t r = 0; r < nr; ++r)
        dequantize_row(w.type, static_cast<const uint8_t*>(w.data) + uint64_t(r0 + r) * w.row_bytes,
                       chunk.data() + r * cols, cols, simd);
      if constexpr (std::is_same_v<T, float>) {
#if defined(__x86_64__)
        if (use_avx2(simd)) {
          bwd_avx2::linear_bwd_block(chunk.data(), nr, cols, dy, rows, r0, dx, t0, t1);
          continue;
        }
#endif
      }
      bwd::linear_bwd_block(chunk.data(), nr, cols, dy, rows, r0, dx, t0, t1);
    }
  }, 4);
}

// ---- the whole model --------------------------------------------------------------

namespace {

// One layer's activations for a window (recomputed during the backward pass).
template <class T>
struct LayerActs {
  std::vector<T> xn, q, k, kr, v, o, lse, h, hn, g, u, a, tmp;
};

template <class T>
struct Window {
  const LlamaModel& model;
  const LlamaHparams& hp;
  int64_t n;
  RopeAngles<T> angles;
  AttnShape shape;
  ThreadPool& pool;
  SimdLevel simd;

  Window(const LlamaModel& m, int64_t n_tokens, ThreadPool& p, SimdLevel level)
      : model(m), hp(m.hparams()), n(n_tokens), pool(p), simd(level) {
    std::vector<int32_t> pos(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(i);
    angles = rope_angles<T>(hp.rope, pos.data(), n);
    shape = AttnShape{n, hp.n_head, hp.n_head_kv, hp.head_dim, 1.0 / std::sqrt(double(hp.head_dim))};
  }

  void embed(const int32_t* tokens, T* x) const {
    const WeightView& e = model.weights().token_embd;
    std::vector<float> row(static_cast<size_t>(hp.n_embd));
    for (int64_t i = 0; i < n; ++i) {
      if (tokens[i] < 0 || tokens[i] >= hp.n_vocab) fail("token id {} is outside the vocabulary", tokens[i]);
      dequantize_row(e.type, static_cast<const uint8_t*>(e.data) + uint64_t(tokens[i]) * e.row_bytes, row.data(),
                     hp.n_embd, simd);
      for (int c = 0; c < hp.n_embd; ++c) x[i * hp.n_embd + c] = T(row[size_t(c)]);
    }
  }

  // x_out = layer(x_in); acts filled. x_out may not alias x_in. With `saved`
  // (the attention output and lse of an earlier run of this layer) attention is
  // not recomputed.
  struct SavedAttention {
    const T* o;
    const T* lse;
  };
  void layer_fwd(int li, const T* x_in, T* x_out, LayerActs<T>& A, const KvPerturb<T>* perturb,
                 const SavedAttention* saved = nullptr) const {
    const LlamaLayer& L = model.weights().layers[size_t(li)];
    const int d = hp.n_embd, qd = hp.q_dim(), kvd = hp.kv_dim(), ff = hp.n_ff;
    auto sz = [&](std::vector<T>& v, int64_t w) { v.resize(size_t(n * w)); };
    sz(A.xn, d), sz(A.q, qd), sz(A.k, kvd), sz(A.kr, kvd), sz(A.v, kvd), sz(A.o, qd), sz(A.h, d), sz(A.hn, d);
    sz(A.g, ff), sz(A.u, ff), sz(A.a, ff), sz(A.tmp, std::max(d, qd));
    A.lse.resize(size_t(n) * size_t(hp.n_head));
    rmsnorm_fwd(x_in, L.attn_norm.data(), A.xn.data(), n, d, hp.rms_eps);
    linear_fwd(L.wq, A.xn.data(), A.q.data(), n, pool, simd);
    linear_fwd(L.wk, A.xn.data(), A.k.data(), n, pool, simd);
    linear_fwd(L.wv, A.xn.data(), A.v.data(), n, pool, simd);
    if (perturb && *perturb) (*perturb)(li, A.k.data(), A.v.data());
    rope_rotate(hp.rope, angles, A.q.data(), n, hp.n_head, false);
    A.kr = A.k;
    rope_rotate(hp.rope, angles, A.kr.data(), n, hp.n_head_kv, false);
    if (saved) {
      std::copy(saved->o, saved->o + n * qd, A.o.begin());
      std::copy(saved->lse, saved->lse + n * hp.n_head, A.lse.begin());
    } else {
      attention_fwd(shape, A.q.data(), A.kr.data(), A.v.data(), A.o.data(), A.lse.data(), pool, simd);
    }
    linear_fwd(L.wo, A.o.data(), A.tmp.data(), n, pool, simd);
    for (int64_t i = 0; i < n * d; ++i) A.h[size_t(i)] = x_in[i] + A.tmp[size_t(i)];
    rmsnorm_fwd(A.h.data(), L.ffn_norm.data(), A.hn.data(), n, d, hp.rms_eps);
    linear_fwd(L.w_gate, A.hn.data(), A.g.data(), n, pool, simd);
    linear_fwd(L.w_up, A.hn.data(), A.u.data(), n, pool, simd);
    swiglu_fwd(A.g.data(), A.u.data(), A.a.data(), n * ff);
    linear_fwd(L.w_down, A.a.data(), A.tmp.data(), n, pool, simd);
    for (int64_t i = 0; i < n * d; ++i) x_out[i] = A.h[size_t(i)] + A.tmp[size_t(i)];
    if (!all_finite(x_out, n * d)) fail("non-finite activation (NaN or Inf) after layer {}", li);
  }

  // dx (in: gradient wrt the layer output; out: wrt its input), A from layer_fwd.
  // G: scratch gradients. Calls sink with the layer's K/V gradients.
  void layer_bwd(int li, const T* x_in, T* dx, LayerActs<T>& A, LayerActs<T>& G, const KvGradSink<T>& sink) const {
    const LlamaLayer& L = model.weights().layers[size_t(li)];
    const int d = hp.n_embd, qd = hp.q_dim(), kvd = hp.kv_dim(), ff = hp.n_ff;
    auto sz = [&](std::vector<T>& v, int64_t w) { v.resize(size_t(n * w)); };
    sz(G.a, ff), sz(G.g, ff), sz(G.u, ff), sz(G.hn, d), sz(G.o, qd), sz(G.q, qd), sz(G.kr, kvd), sz(G.v, kvd);
    sz(G.xn, d);
    // MLP: x_out = h + W_down a, a = swiglu(W_gate hn, W_up hn), hn = norm(h).
    linear_bwd(L.w_down, dx, G.a.data(), n, false, pool, simd);
    swiglu_bwd(A.g.data(), A.u.data(), G.a.data(), G.g.data(), G.u.data(), n * ff);
    linear_bwd(L.w_gate, G.g.data(), G.hn.data(), n, false, pool, simd);
    linear_bwd(L.w_up, G.u.data(), G.hn.data(), n, true, pool, simd);
    rmsnorm_bwd(A.h.data(), L.ffn_norm.data(), G.hn.data(), dx, n, d, hp.rms_eps);  // dx is now dL/dh
    // Attention: h = x_in + W_o o.
    linear_bwd(L.wo, dx, G.o.data(), n, false, pool, simd);
    attention_bwd(shape, A.q.data(), A.kr.data(), A.v.data(), A.o.data(), A.lse.data(), G.o.data(), G.q.data(),
                  G.kr.data(), G.v.data(), pool, simd);
    rope_rotate(hp.rope, angles, G.q.data(), n, hp.n_head, true);
    rope_rotate(hp.rope, angles, G.kr.data(), n, hp.n_head_kv, true);  // now dL/dK pre-RoPE
    if (sink) sink(li, A.k.data(), A.v.data(), G.kr.data(), G.v.data());
    linear_bwd(L.wq, G.q.data(), G.xn.data(), n, false, pool, simd);
    linear_bwd(L.wk, G.kr.data(), G.xn.data(), n, true, pool, simd);
    linear_bwd(L.wv, G.v.data(), G.xn.data(), n, true, pool, simd);
    rmsnorm_bwd(x_in, L.attn_norm.data(), G.xn.data(), dx, n, d, hp.rms_eps);
    if (!all_finite(dx, n * d)) fail("non-finite gradient (NaN or Inf) below layer {}", li);
  }

  // Loss of the final residual stream x; when dx is given, dx = dL/dx.
  double head(const int32_t* tokens, const T* x, T* dx) const {
    const int d = hp.n_embd, V = hp.n_vocab;
    const WeightView& W = model.weights().output;
    const float* nw = model.weights().output_norm.data();
    if (dx) std::fill(dx, dx + n * d, T(0));
    std::vector<T> xn(size_t(std::min(n, kHeadChunk)) * size_t(d)), logits(size_t(std::min(n, kHeadChunk)) * size_t(V));
    std::vector<T> dxn(xn.size());
    double loss = 0;
    for (int64_t c0 = 0; c0 < n - 1; c0 += kHeadChunk) {
      const int64_t rows = std::min(kHeadChunk, n - 1 - c0);  // the last token has no target
      rmsnorm_fwd(x + c0 * d, nw, xn.data(), rows, d, hp.rms_eps);
      linear_fwd(W, xn.data(), logits.data(), rows, pool, simd);
      for (int64_t r = 0; r < rows; ++r) {
        T* lg = logits.data() + r * V;
        if (!all_finite(lg, V)) fail("non-finite logits at token {}", c0 + r);
        const int32_t target = tokens[c0 + r + 1];
        T mx = lg[0];
        for (int j = 1; j < V; ++j) mx = std::max(mx, lg[j]);
        double sum = 0;
        for (int j = 0; j < V; ++j) sum += std::exp(double(lg[j] - mx));
        loss -= double(lg[target] - mx) - std::log(sum);
        if (dx) {  // d(-log softmax[target]) / d logits = softmax - onehot
          const double inv = 1.0 / sum;
          for (int j = 0; j < V; ++j) lg[j] = T(std::exp(double(lg[j] - mx)) * inv);
          lg[target] -= T(1);
        }
      }
      if (dx) {
        linear_bwd(W, logits.data(), dxn.data(), rows, false, pool, simd);
        rmsnorm_bwd(x + c0 * d, nw, dxn.data(), dx + c0 * d, rows, d, hp.rms_eps);
      }
    }
    return loss;
  }
};

void check_window(const LlamaModel& model, int64_t n) {
  if (n < 2) fail("backward: a window needs at least 2 tokens, got {}", n);
  (void)model;
}

}  // namespace

template <class T>
double llama_window_loss(const LlamaModel& model, const int32_t* tokens, int64_t n, ThreadPool& pool, SimdLevel simd,
                         const KvPerturb<T>& perturb) {
  check_window(model, n);
  Window<T> w(model, n, pool, simd);
  const int d = w.hp.n_embd;
  std::vector<T> x(size_t(n * d)), y(x.size());
  w.embed(tokens, x.data());
  LayerActs<T> A;
  for (int li = 0; li < w.hp.n_layer; ++li) {
    w.layer_fwd(li, x.data(), y.data(), A, &perturb);
    std::swap(x, y);
  }
  return w.head(tokens, x.data(), nullptr);
}

template <class T>
double llama_window_kv_grads(const LlamaModel& model, const int32_t* tokens, int64_t n, ThreadPool& pool,
                             SimdLevel simd, const KvGradSink<T>& sink) {
  check_window(model, n);
  Window<T> w(model, n, pool, simd);
  const int d = w.hp.n_embd, n_layer = w.hp.n_layer;
  const size_t nd = size_t(n) * size_t(d);
  // Residual stream entering each layer, plus the final one: [(n_layer + 1)][n][d].
  std::vector<T> xs(nd * size_t(n_layer + 1));
  // Each layer's attention output and log-sum-exp [n_layer][n][q_dim], [n_layer][n_head][n]:
  // the recomputation below skips the attention forward (the costliest part at n = 2048).
  const size_t no = size_t(n) * size_t(w.hp.q_dim()), nl = size_t(n) * size_t(w.hp.n_head);
  std::vector<T> os(no * size_t(n_layer)), lses(nl * size_t(n_layer));
  w.embed(tokens, xs.data());
  LayerActs<T> A, G;
  for (int li = 0; li < n_layer; ++li) {
    w.layer_fwd(li, xs.data() + nd * li, xs.data() + nd * (li + 1), A, nullptr);
    std::copy(A.o.begin(), A.o.end(), os.begin() + std::ptrdiff_t(no * li));
    std::copy(A.lse.begin(), A.lse.end(), lses.begin() + std::ptrdiff_t(nl * li));
  }
  std::vector<T> dx(nd);
  const double loss = w.head(tokens, xs.data() + nd * n_layer, dx.data());
  for (int li = n_layer - 1; li >= 0; --li) {
    const typename Window<T>::SavedAttention saved{os.data() + no * li, lses.data() + nl * li};
    w.layer_fwd(li, xs.data() + nd * li, xs.data() + nd * (li + 1), A, nullptr, &saved);  // recompute
    w.layer_bwd(li, xs.data() + nd * li, dx.data(), A, G, sink);
  }
  return loss;
}

uint64_t llama_backward_bytes(const LlamaModel& model, int64_t n, size_t scalar_bytes) {
  const LlamaHparams& hp = model.hparams();
  const uint64_t d = uint64_t(hp.n_embd), qd = uint64_t(hp.q_dim()), kvd = uint64_t(hp.kv_dim()), ff = uint64_t(hp.n_ff);
  const uint64_t per_token_acts = 3 * d + 2 * qd + 4 * kvd + 3 * ff + std::max(d, qd) + uint64_t(hp.n_head);
  const uint64_t grads = 2 * d + 2 * qd + 2 * kvd + 3 * ff;
  const uint64_t attn = 2 * uint64_t(hp.n_head) * 2 * uint64_t(hp.head_dim) + 4 * kvd;  // per-head dK/dV, transposes
  const uint64_t saved = uint64_t(hp.n_layer) * (d + qd + uint64_t(hp.n_head)) + d;  // residuals, attention outputs, lse
  const uint64_t tokens = uint64_t(n) * (saved + d + per_token_acts + grads + attn);
  const uint64_t head = uint64_t(std::min<int64_t>(n, kHeadChunk)) * (uint64_t(hp.n_vocab) + 2 * d);
  return (tokens + head) * scalar_bytes;
}

#define KVQ_INSTANTIATE(T)                                                                                         \
  template void rmsnorm_fwd<T>(const T*, const float*, T*, int64_t, int, float);                                   \
  template void rmsnorm_bwd<T>(const T*, const float*, const T*, T*, int64_t, int, float);                         \
  template RopeAngles<T> rope_angles<T>(const RopeSpec&, const int32_t*, int64_t);                                 \
  template void rope_rotate<T>(const RopeSpec&, const RopeAngles<T>&, T*, int64_t, int, bool);                     \
  template void swiglu_fwd<T>(const T*, const T*, T*, int64_t);                                                    \
  template void swiglu_bwd<T>(const T*, const T*, const T*, T*, T*, int64_t);                                      \
  template void attention_fwd<T>(const AttnShape&, const T*, const T*, const T*, T*, T*, ThreadPool&, SimdLevel);  \
  template void attention_bwd<T>(const AttnShape&, const T*, const T*, const T*, const T*, const T*, const T*, T*, \
                                 T*, T*, ThreadPool&, SimdLevel);                                                  \
  template void linear_bwd<T>(const WeightView&, const T*, T*, int64_t, bool, ThreadPool&, SimdLevel);             \
  template double llama_window_loss<T>(const LlamaModel&, const int32_t*, int64_t, ThreadPool&, SimdLevel,         \
                                       const KvPerturb<T>&);                                                       \
  template double llama_window_kv_grads<T>(const LlamaModel&, const int32_t*, int64_t, ThreadPool&, SimdLevel,     \
                                           const KvGradSink<T>&);
KVQ_INSTANTIATE(float)
KVQ_INSTANTIATE(double)
#undef KVQ_INSTANTIATE

}  // namespace kvq

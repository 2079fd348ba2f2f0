// The llama forward pass in full precision over one window, and its backward
// pass with respect to activations (no weight gradients): from the language-
// model loss back to dL/dK (pre-RoPE) and dL/dV of every layer, token and
// channel. KVQuant's Fisher-weighted codebooks use (dL/dA)^2 as element weights
// (docs/calibration.md).
//
// Loss: the SUM over t in [0, n-1) of -log p(tokens[t+1] | tokens[0..t]) (not the
// mean: a constant factor does not move a weighted k-means).
//
// Every piece is templated on the scalar type T (float, double) so the gradient
// checks run the same code in double against central differences
// (tests/model/llama_backward_test.cpp). Weights stay as they are stored (quantized
// rows dequantized on the fly), so the gradients are those of the model the user
// runs; the float forward uses kvq::matmul, as inference does.
//
// Memory (window n): the residual stream entering each layer and each layer's
// attention output and log-sum-exp are kept (n_layer x n x (n_embd + q_dim +
// n_head) x sizeof(T)); everything else inside a layer (norms, projections, MLP)
// is recomputed during the backward pass, and attention never stores an n x n
// matrix (probabilities are recomputed per block of rows from the saved
// log-sum-exp, flash-attention style).
// The output head runs over row chunks of kHeadChunk tokens.
//
// Shapes: rows are tokens, row-major. q [n][n_head][head_dim], k/v
// [n][n_head_kv][head_dim]; lse [n_head][n].
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "base/threads.h"
#include "kernels/cpu/rope.h"
#include "quant/quant.h"

namespace kvq {

class LlamaModel;

// ---- pieces ---------------------------------------------------------------------

// y = x / rms(x) * w over n rows of dim.
template <class T>
void rmsnorm_fwd(const T* x, const float* w, T* y, int64_t n, int dim, float eps);
// dx += d/dx of <dy, rmsnorm(x)>  (accumulates: the residual gradient is already in dx).
template <class T>
void rmsnorm_bwd(const T* x, const float* w, const T* dy, T* dx, int64_t n, int dim, float eps);

// cos/sin of each rotated pair of each token, [n][n_rot/2], computed in double.
template <class T>
struct RopeAngles {
  int half = 0;
  std::vector<T> cos, sin;
};
template <class T>
RopeAngles<T> rope_angles(const RopeSpec& spec, const int32_t* positions, int64_t n);
// Rotates n tokens of n_heads vectors (pairing as spec.neox says) by theta, or by
// -theta when `inverse`: the backward of a rotation is its inverse (transpose).
template <class T>
void rope_rotate(const RopeSpec& spec, const RopeAngles<T>& a, T* x, int64_t n, int n_heads, bool inverse);

// h = silu(g) * u; backward: dg = dh * u * silu'(g), du = dh * silu(g) (overwrite).
template <class T>
void swiglu_fwd(const T* g, const T* u, T* h, int64_t n);
template <class T>
void swiglu_bwd(const T* g, const T* u, const T* dh, T* dg, T* du, int64_t n);

// Causal self-attention over the window (query i sees keys j <= i), GQA: query
// head h reads KV head h / (n_head / n_head_kv). q and k are post-RoPE.
struct AttnShape {
  int64_t n = 0;
  int n_head = 0, n_head_kv = 0, head_dim = 0;
  double scale = 0;  // 1/sqrt(head_dim)
};
// o [n][n_head][hd]; lse [n_head][n] = log sum_j exp(scale q_i.k_j) (saved for the backward).
template <class T>
void attention_fwd(const AttnShape& s, const T* q, const T* k, const T* v, T* o, T* lse, ThreadPool& pool, SimdLevel simd);
// dq (overwrite), dk, dv (overwrite; a KV head's gradient sums over its query heads,
// reduced in a fixed order so the result does not depend on the thread count).
template <class T>
void attention_bwd(const AttnShape& s, const T* q, const T* k, const T* v, const T* o, const T* lse, const T* d_o,
                   T* dq, T* dk, T* dv, ThreadPool& pool, SimdLevel simd);

// y[t] = W x[t] (float: kvq::matmul, the inference kernels; double: dequantized rows).
template <class T>
void linear_fwd(const WeightView& w, const T* x, T* y, int64_t n, ThreadPool& pool, SimdLevel simd);
// dx[t] (+)= W^T dy[t]: rows of W dequantized chunk by chunk into f32, tokens
// split over the pool. Overwrites dx unless `accumulate`.
template <class T>
void linear_bwd(const WeightView& w, const T* dy, T* dx, int64_t n, bool accumulate, ThreadPool& pool, SimdLevel simd);

// ---- the whole model --------------------------------------------------------------

// Called once per layer, from the last layer to the first, with the layer's
// pre-RoPE keys, values and their gradients, each [n][kv_dim].
template <class T>
using KvGradSink = std::function<void(int layer, const T* k, const T* v, const T* dk, const T* dv)>;
// Lets a test add a perturbation to a layer's pre-RoPE keys/values [n][kv_dim]
// right after they are computed (finite differences).
template <class T>
using KvPerturb = std::function<void(int layer, T* k, T* v)>;

// The loss of tokens[0..n) run as one window (positions 0..n-1) in full precision.
template <class T>
double llama_window_loss(const LlamaModel& model, const int32_t* tokens, int64_t n, ThreadPool& pool, SimdLevel simd,
                         const KvPerturb<T>& perturb = {});

// Forward, then backward; returns the loss. Throws on non-finite activations.
template <class T>
double llama_window_kv_grads(const LlamaModel& model, const int32_t* tokens, int64_t n, ThreadPool& pool,
                             SimdLevel simd, const KvGradSink<T>& sink);

// Bytes llama_window_kv_grads<T> holds for a window of n tokens (approximate peak).
uint64_t llama_backward_bytes(const LlamaModel& model, int64_t n, size_t scalar_bytes);

}  // namespace kvq

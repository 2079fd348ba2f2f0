// Weight types: one traits table describes every type kvq computes with.
// Each row has a scalar reference (the oracle in tests) and the dispatched fast
// path. Adding a type = a row here + its reference + optionally a SIMD kernel.
#pragma once
#include <cstdint>

#include "base/cpu.h"
#include "gguf/ggml_types.h"

namespace kvq {

class ThreadPool;

using ToFloatFn = void (*)(const void* src, float* dst, int64_t n);      // n % block_elems == 0
using FromFloatFn = void (*)(const float* src, void* dst, int64_t n);    // n % block_elems == 0
// Dot product of one weight row (this type) with one activation row (vec_dot_type), n elements.
using VecDotFn = float (*)(int64_t n, const void* w, const void* a);

struct QuantTraits {
  GgmlType type;
  int block_elems;
  int block_bytes;
  ToFloatFn to_float_ref;      // scalar reference dequantization
  FromFloatFn from_float_ref;  // scalar reference quantization (nullptr: not supported)
  GgmlType vec_dot_type;       // the activation type this type's dot product consumes
  VecDotFn vec_dot_ref;        // scalar reference dot product
};

// Traits of a weight type kvq can compute with; nullptr for types it cannot.
const QuantTraits* quant_traits(GgmlType type);

// Fast versions of the reference functions: the best kernel the SIMD level
// `simd` allows (a session's KernelSet::simd), picked once per call.
void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n, SimdLevel simd);
void quantize_row(GgmlType type, const float* src, void* dst, int64_t n, SimdLevel simd);
float vec_dot(GgmlType type, int64_t n, const void* w, const void* a, SimdLevel simd);

// A 2-D weight matrix as stored in GGUF: `rows` rows of `cols` elements, row-major.
struct WeightView {
  GgmlType type;
  int64_t rows;  // output features
  int64_t cols;  // input features
  const void* data;
  uint64_t row_bytes;
};

// y[t][r] = sum_c W[r][c] * x[t][c] for t < n_tokens; x and y are row-major f32
// (stride = cols and rows). Activations are quantized to vec_dot_type once.
// Uses every thread of the pool and the kernels `simd` allows.
void matmul(const WeightView& w, const float* x, float* y, int64_t n_tokens, ThreadPool& pool, SimdLevel simd);

// Several products of the same input, e.g. the Q, K and V projections:
// y_i = W_i x. Equal to calling matmul for each, but when the weights share
// their activation type and width the input is quantized once and, for a few
// tokens (decode), all rows are split over the pool in one parallel region.
struct MatmulOutput {
  const WeightView* w;
  float* y;
};
void matmul_shared_input(const MatmulOutput* outputs, int n_outputs, const float* x, int64_t n_tokens,
                         ThreadPool& pool, SimdLevel simd);

// The scalar-reference version of matmul (single thread), for tests.
void matmul_ref(const WeightView& w, const float* x, float* y, int64_t n_tokens);

}  // namespace kvq

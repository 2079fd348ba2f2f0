// Small element-wise kernels of the forward pass (memory-bound, auto-vectorised).
#pragma once
#include <cstdint>

namespace kvq {

// y = x / rms(x) * w for each of n rows of `dim` floats (y may alias x).
void rmsnorm(const float* x, const float* w, float* y, int64_t n, int dim, float eps);
// gate[i] = silu(gate[i]) * up[i]
void silu_mul(float* gate, const float* up, int64_t n);
// x[i] += y[i]
void add_inplace(float* x, const float* y, int64_t n);
// Index of the first non-finite value in x[0..n), or -1.
int64_t find_non_finite(const float* x, int64_t n);

}  // namespace kvq

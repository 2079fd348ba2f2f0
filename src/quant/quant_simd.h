// Private interface between the dispatcher (matmul.cpp, baseline ISA) and the
// SIMD kernels (quant_avx2.cpp). Only plain pointers cross this boundary so the
// baseline translation unit never sees intrinsic types.
#pragma once
#include <cstdint>

#include "quant/quant.h"

namespace kvq::simd {

// Computes y[t * ldy + r] = dot(weight row r, activation row t) for r < nr,
// t < nt. Weight row r starts at w + r * w_stride bytes, activation row t
// (already quantized to the weight type's vec_dot_type) at a + t * a_stride.
// k: elements per row. Kernels tile rows x tokens internally.
using GemmFn = void (*)(int64_t k, const void* w, uint64_t w_stride, int64_t nr, const void* a,
                        uint64_t a_stride, int64_t nt, float* y, int64_t ldy);

// AVX2 kernels; each lookup returns nullptr when there is no kernel for the
// type (pair). Callers must check their SIMD level is >= avx2 before calling these.
ToFloatFn avx2_to_float(GgmlType type);
FromFloatFn avx2_from_float(GgmlType type);
VecDotFn avx2_vec_dot(GgmlType w_type, GgmlType a_type);
GemmFn avx2_gemm(GgmlType w_type, GgmlType a_type);

// Memory-bandwidth probe for benchmarks: sums [p, p + bytes) with 256-bit
// loads (bytes % 128 == 0, p 32-byte aligned). Returns a value so the reads
// cannot be optimized away.
uint64_t avx2_read_bandwidth_probe(const void* p, uint64_t bytes);

}  // namespace kvq::simd

// Scalar reference implementations of every weight/activation type (private to
// the quant module and its tests). They are the oracles for the SIMD kernels and
// their fallbacks on CPUs without them; src/quant/quant.cpp puts them in the
// traits table.
//
// Bit-exactness (to the GGUF/ggml block definitions):
//  - to_float (dequantization) is bit-exact: each element is computed with the
//    same float32 operations, in the same order, as the format definition
//    (e.g. Q4_1: d*q + m; Q4_K: (d*sc)*q - (dmin*m); Q6_K: (d*sc)*q), with no
//    fused multiply-add.
//  - quantize_* for Q8_0, Q8_1, Q8_K, Q4_0, Q4_1, Q5_0, Q5_1 reproduce ggml's
//    reference (round-to-nearest) quantizers byte for byte; F16/BF16 round to
//    nearest even (NaN: see base/fp16.h). Checked byte for byte against the gguf
//    Python package for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/F16/BF16; the package has no
//    Q8_1/Q8_K, so those are checked against hand-derived blocks only.
//  - No quantizer for Q4_K/Q5_K/Q6_K (not needed to run models).
//
// Dot products (vec_dot_*): integer dot of the quantized values per block,
// scaled in float32 by the block scales (d_w*d_a as one float product, as the
// SIMD kernels do); block results are accumulated in double and the total is
// rounded to float once. F32/F16/BF16 weights dot against F32 activations,
// products and sum in double. So the reference is at least as accurate as any
// kernel; kernels are compared to it with a tolerance, never bit for bit.
//
// Block/weight pointers may have any alignment (fields are read with memcpy);
// float* arguments (and F32 activations) must be float-aligned.
// n must be a multiple of the type's block size.
#pragma once
#include <cstdint>

namespace kvq::ref {

// ---- dequantization: n elements of the type -> f32
void dequantize_f32(const void* src, float* dst, int64_t n);
void dequantize_f16(const void* src, float* dst, int64_t n);
void dequantize_bf16(const void* src, float* dst, int64_t n);
void dequantize_q4_0(const void* src, float* dst, int64_t n);
void dequantize_q4_1(const void* src, float* dst, int64_t n);
void dequantize_q5_0(const void* src, float* dst, int64_t n);
void dequantize_q5_1(const void* src, float* dst, int64_t n);
void dequantize_q8_0(const void* src, float* dst, int64_t n);
void dequantize_q8_1(const void* src, float* dst, int64_t n);  // d*q (s is not needed)
void dequantize_q4_k(const void* src, float* dst, int64_t n);
void dequantize_q5_k(const void* src, float* dst, int64_t n);
void dequantize_q6_k(const void* src, float* dst, int64_t n);
void dequantize_q8_k(const void* src, float* dst, int64_t n);

// ---- quantization: n f32 -> the type
void quantize_f32(const float* src, void* dst, int64_t n);
void quantize_f16(const float* src, void* dst, int64_t n);
void quantize_bf16(const float* src, void* dst, int64_t n);
// Activation quantizers. Q8_0/Q8_1: d = amax/127, q = round-half-away(x/d)
// computed as x*(1/d); Q8_1 also stores s = fp16(d * sum(q)) with the
// unrounded d. Q8_K: iscale = -127/max (max = the element of largest |x|),
// q = min(127, round-half-even(iscale*x)), d = 1/iscale (f32), bsums = sums of
// 16 consecutive q; an all-zero block has d = 0, q = 0, bsums = 0.
void quantize_q8_0(const float* src, void* dst, int64_t n);
void quantize_q8_1(const float* src, void* dst, int64_t n);
void quantize_q8_k(const float* src, void* dst, int64_t n);
// Weight fixture quantizers (ggml's simple round-to-nearest references):
// Q4_0: d = max/-8 (max: the signed element of largest |x|, first on ties),
// q = min(15, trunc(x/d + 8.5)); Q5_0 likewise with -16, 16.5, 31.
// Q4_1: d = (max-min)/15, m = min, q = min(15, trunc((x-min)/d + 0.5));
// Q5_1 likewise with 31. Divisions are x*(1/d) with 1/d = 0 when d = 0.
void quantize_q4_0(const float* src, void* dst, int64_t n);
void quantize_q4_1(const float* src, void* dst, int64_t n);
void quantize_q5_0(const float* src, void* dst, int64_t n);
void quantize_q5_1(const float* src, void* dst, int64_t n);

// ---- dot products: weight row (first type) x activation row (second type)
float vec_dot_f32_f32(int64_t n, const void* w, const void* a);
float vec_dot_f16_f32(int64_t n, const void* w, const void* a);
float vec_dot_bf16_f32(int64_t n, const void* w, const void* a);
float vec_dot_q4_0_q8_0(int64_t n, const void* w, const void* a);
float vec_dot_q4_1_q8_1(int64_t n, const void* w, const void* a);
float vec_dot_q5_0_q8_0(int64_t n, const void* w, const void* a);
float vec_dot_q5_1_q8_1(int64_t n, const void* w, const void* a);
float vec_dot_q8_0_q8_0(int64_t n, const void* w, const void* a);
// K-quants use the activation's bsums for the min term (Q4_K/Q5_K).
float vec_dot_q4_k_q8_k(int64_t n, const void* w, const void* a);
float vec_dot_q5_k_q8_k(int64_t n, const void* w, const void* a);
float vec_dot_q6_k_q8_k(int64_t n, const void* w, const void* a);

// Unpacks the 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block.
void unpack_k_scale_min(const uint8_t scales[12], int j, uint8_t* scale, uint8_t* min);

}  // namespace kvq::ref

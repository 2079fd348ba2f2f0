// The traits table (one row per type kvq computes with) and the single-thread
// reference matmul. The fast paths live in matmul.cpp and the *_avx2 kernels.
#include "quant/quant.h"

#include <array>
#include <vector>

#include "base/error.h"
#include "quant/blocks.h"
#include "quant/quant_ref.h"

namespace kvq {

namespace {

using T = GgmlType;

// vec_dot_type choices:
//  - Q4_0/Q5_0/Q8_0 dot against Q8_0, Q4_1/Q5_1 against Q8_1 (its s = d*sum(q)
//    term carries the weight's min), k-quants against Q8_K (bsums for the min).
//  - F32/F16/BF16 weights dot against F32 activations: no activation rounding
//    at all, so these are the accurate path.
//  - Q8_1 and Q8_K are activation types only: their rows exist so that
//    quant_traits(vec_dot_type)->from_float_ref quantizes activations; they
//    have no dot product (vec_dot_ref = nullptr) and are not weight types.
constexpr std::array<QuantTraits, 13> kTraits = {{
    {T::F32, 1, 4, ref::dequantize_f32, ref::quantize_f32, T::F32, ref::vec_dot_f32_f32},
    {T::F16, 1, 2, ref::dequantize_f16, ref::quantize_f16, T::F32, ref::vec_dot_f16_f32},
    {T::BF16, 1, 2, ref::dequantize_bf16, ref::quantize_bf16, T::F32, ref::vec_dot_bf16_f32},
    {T::Q4_0, QK, sizeof(BlockQ4_0), ref::dequantize_q4_0, ref::quantize_q4_0, T::Q8_0,
     ref::vec_dot_q4_0_q8_0},
    {T::Q4_1, QK, sizeof(BlockQ4_1), ref::dequantize_q4_1, ref::quantize_q4_1, T::Q8_1,
     ref::vec_dot_q4_1_q8_1},
    {T::Q5_0, QK, sizeof(BlockQ5_0), ref::dequantize_q5_0, ref::quantize_q5_0, T::Q8_0,
     ref::vec_dot_q5_0_q8_0},
    {T::Q5_1, QK, sizeof(BlockQ5_1), ref::dequantize_q5_1, ref::quantize_q5_1, T::Q8_1,
     ref::vec_dot_q5_1_q8_1},
    {T::Q8_0, QK, sizeof(BlockQ8_0), ref::dequantize_q8_0, ref::quantize_q8_0, T::Q8_0,
     ref::vec_dot_q8_0_q8_0},
    {T::Q8_1, QK, sizeof(BlockQ8_1), ref::dequantize_q8_1, ref::quantize_q8_1, T::Q8_1, nullptr},
    // K-quant quantizers are not implemented (models arrive already quantized).
    {T::Q4_K, QK_K, sizeof(BlockQ4_K), ref::dequantize_q4_k, nullptr, T::Q8_K,
     ref::vec_dot_q4_k_q8_k},
    {T::Q5_K, QK_K, sizeof(BlockQ5_K), ref::dequantize_q5_k, nullptr, T::Q8_K,
     ref::vec_dot_q5_k_q8_k},
    {T::Q6_K, QK_K, sizeof(BlockQ6_K), ref::dequantize_q6_k, nullptr, T::Q8_K,
     ref::vec_dot_q6_k_q8_k},
    {T::Q8_K, QK_K, sizeof(BlockQ8_K), ref::dequantize_q8_k, ref::quantize_q8_k, T::Q8_K, nullptr},
}};

}  // namespace

const QuantTraits* quant_traits(GgmlType type) {
  for (const auto& t : kTraits)
    if (t.type == type) return &t;
  return nullptr;
}

void matmul_ref(const WeightView& w, const float* x, float* y, int64_t n_tokens) {
  const QuantTraits* wt = quant_traits(w.type);
  if (!wt || !wt->vec_dot_ref)
    fail("matmul_ref: weight type {} has no dot product", ggml_type_name(w.type));
  const QuantTraits* at = quant_traits(wt->vec_dot_type);
  KVQ_ASSERT(at && at->from_float_ref);
  if (w.cols % wt->block_elems != 0 || w.cols % at->block_elems != 0)
    fail("matmul_ref: {} columns is not a multiple of the {} block size", w.cols,
         ggml_type_name(w.type));
  const uint64_t need = uint64_t(w.cols / wt->block_elems) * uint64_t(wt->block_bytes);
  if (w.row_bytes < need)
    fail("matmul_ref: row stride {} is smaller than a {} row of {} ({} bytes)", w.row_bytes,
         ggml_type_name(w.type), w.cols, need);

  std::vector<uint8_t> qa(size_t(w.cols / at->block_elems) * size_t(at->block_bytes));
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xt = x + t * w.cols;
    at->from_float_ref(xt, qa.data(), w.cols);
    for (int64_t r = 0; r < w.rows; ++r)
      y[t * w.rows + r] = wt->vec_dot_ref(w.cols, base + uint64_t(r) * w.row_bytes, qa.data());
  }
}

}  // namespace kvq

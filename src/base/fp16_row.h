// Row conversions between IEEE half and float: F16C where the CPU has it,
// else the scalar conversion; both exact, so no SIMD cap applies.
#pragma once
#include <cstdint>

namespace kvq {

void fp16_to_f32_row(const uint16_t* src, float* dst, int64_t n);
void f32_to_fp16_row(const float* src, uint16_t* dst, int64_t n);

namespace simd {
void fp16_to_f32_row_avx2(const uint16_t* src, float* dst, int64_t n);
}

}  // namespace kvq

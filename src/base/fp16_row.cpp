#include "base/fp16_row.h"

#include "base/cpu.h"
#include "base/fp16.h"

namespace kvq {

// Every half converts to a float exactly, so the fastest path the CPU has
// gives the same floats at any SIMD cap.
void fp16_to_f32_row(const uint16_t* src, float* dst, int64_t n) {
#if defined(__x86_64__)
  if (detected_simd_level() >= SimdLevel::avx2) return simd::fp16_to_f32_row_avx2(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_f32(src[i]);
}

// Always the scalar rounding: it is the reference encoding of stored halves.
void f32_to_fp16_row(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_fp16(src[i]);
}

}  // namespace kvq

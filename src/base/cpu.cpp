#include "base/cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace kvq {

namespace {
#if defined(__x86_64__) || defined(_M_X64)
// F16C via CPUID leaf 1 (ECX bit 29): not every compiler's
// __builtin_cpu_supports knows the name.
bool has_f16c() {
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
#endif

SimdLevel detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && has_f16c())
    return SimdLevel::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c() &&
      __builtin_cpu_supports("bmi2"))
    return SimdLevel::avx2;
#endif
  return SimdLevel::scalar;
}
}  // namespace

SimdLevel detected_simd_level() {
  static const SimdLevel level = detect();
  return level;
}
const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::avx512: return "avx512";
    case SimdLevel::avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace kvq

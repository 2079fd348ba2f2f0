// Which SIMD level this CPU runs; decided once, used by kernel dispatch.
#pragma once

namespace kvq {

enum class SimdLevel { scalar = 0, avx2 = 1, avx512 = 2 };

// Highest level both compiled in and supported by the CPU. The environment
// cannot raise it; set_simd_level() can lower it (tests compare paths).
SimdLevel simd_level();
void set_simd_level(SimdLevel level);  // clamped to what the CPU supports
SimdLevel detected_simd_level();
const char* simd_level_name(SimdLevel level);

}  // namespace kvq

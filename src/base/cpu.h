// Which SIMD level this CPU runs: detected once, never changed. What a session
// runs is its KernelSet (kernels/cpu/kernel_set.h), capped at this level.
#pragma once

namespace kvq {

enum class SimdLevel { scalar = 0, avx2 = 1, avx512 = 2 };

// Highest level both compiled in and supported by the CPU.
SimdLevel detected_simd_level();
const char* simd_level_name(SimdLevel level);

}  // namespace kvq

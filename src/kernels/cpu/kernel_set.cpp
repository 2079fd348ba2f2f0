#include "kernels/cpu/kernel_set.h"

#include <algorithm>

#include "base/error.h"

namespace kvq {

KernelSet resolve_kernels(KernelSet ks) {
  const SimdLevel cpu = detected_simd_level();
  if (ks.simd > cpu)
    fail("SIMD level {} asked for; this CPU runs at most {}", simd_level_name(ks.simd), simd_level_name(cpu));
  if ((ks.attention == AttentionKernel::avx2 || ks.decoders == TileDecoders::avx2) && ks.simd < SimdLevel::avx2)
    fail("the AVX2 kernels were asked for at SIMD level {}", simd_level_name(ks.simd));
  if ((ks.attention == AttentionKernel::avx512 || ks.decoders == TileDecoders::avx512) && ks.simd < SimdLevel::avx512)
    fail("the AVX-512 kernels were asked for at SIMD level {}", simd_level_name(ks.simd));
  const std::vector<int64_t> targets = portable_targets();
  if (ks.portable_target == 0) ks.portable_target = targets.empty() ? 0 : targets.front();
  else if (std::find(targets.begin(), targets.end(), ks.portable_target) == targets.end())
    fail("portable kernels: target {} is not compiled in or not run by this CPU", portable_target_name(ks.portable_target));
  if (ks.scalar_attention) {
    ks.decoders = TileDecoders::codec;
  } else if (ks.decoders == TileDecoders::automatic) {
    // The AVX-512 decoders where allowed (they hand the layouts they lack to
    // AVX2's), else AVX2's; below AVX2 the decoders go with the tile kernel:
    // portable beside the portable step, the codecs beside the scalar one
    // (below AVX2 that choice does not depend on the head size).
    constexpr int kAnyHeadDim = 64;
    if (ks.simd >= SimdLevel::avx512) ks.decoders = TileDecoders::avx512;
    else if (ks.simd >= SimdLevel::avx2) ks.decoders = TileDecoders::avx2;
    else
      ks.decoders = attention_kernel_for(ks, kAnyHeadDim) == AttentionKernel::portable ? TileDecoders::portable
                                                                                       : TileDecoders::codec;
  }
  return ks;
}

KernelSet kernels_at(SimdLevel simd) {
  KernelSet ks;
  ks.simd = simd;
  return resolve_kernels(ks);
}

SimdLevel parse_simd_level(const std::string& name) {
  const SimdLevel best = detected_simd_level();
  SimdLevel level;
  if (name == "auto") level = best;
  else if (name == "avx512") level = SimdLevel::avx512;
  else if (name == "avx2") level = SimdLevel::avx2;
  else if (name == "scalar") level = SimdLevel::scalar;
  else fail("unknown SIMD level '{}' (valid: auto, avx512, avx2, scalar)", name);
  if (level > best) fail("SIMD level {}: this CPU runs at most {}", name, simd_level_name(best));
  return level;
}

AttentionKernel attention_kernel_for(const KernelSet& ks, int head_dim, bool packed_values) {
  if (ks.scalar_attention) return AttentionKernel::scalar;
  // What an AVX2 CPU runs: the portable kernel takes the head sizes AVX2's cannot.
  const AttentionKernel avx2_or_portable = head_dim % 8 == 0 ? AttentionKernel::avx2 : AttentionKernel::portable;
  // What an AVX-512 CPU runs: the AVX-512 kernel; for other head sizes AVX2's
  // where it reads values from their codes (faster there than the portable
  // kernel: docs/BENCHMARKS.md, "Kernel choices"), else the portable kernel.
  const AttentionKernel avx512_or_other = head_dim % 16 == 0 ? AttentionKernel::avx512
                                          : packed_values     ? avx2_or_portable
                                                              : AttentionKernel::portable;
  switch (ks.attention) {
    case AttentionKernel::avx2: return avx2_or_portable;
    case AttentionKernel::avx512: return avx512_or_other;
    case AttentionKernel::automatic: break;
    default: return ks.attention;
  }
  switch (ks.simd) {
    case SimdLevel::avx512: return avx512_or_other;
    case SimdLevel::avx2: return avx2_or_portable;
    default:
      // Lowered to scalar on a SIMD CPU: the reference path, as for every kernel.
      return detected_simd_level() == SimdLevel::scalar ? AttentionKernel::portable : AttentionKernel::scalar;
  }
}

std::string attention_kernel_name(const KernelSet& ks, AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::avx2: return "avx2";
    case AttentionKernel::avx512: return "avx512";
    case AttentionKernel::portable: return std::string("portable/") + portable_target_name(ks.portable_target);
    default: return "scalar";
  }
}

}  // namespace kvq

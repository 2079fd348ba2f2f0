// Calls a Highway-exported function compiled for a given target, chosen by the
// caller (a KernelSet's portable_target) rather than by Highway's process-wide
// choice, so sessions in one process can run different targets. Include after
// hwy/highway.h, in the HWY_ONCE part of a *_hwy.cpp file.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kvq {

// The slot of HWY_EXPORT's table that holds `target`'s version (the layout of
// hwy/highway.h: slot 0 chooses, then one per dynamic target, the fallback last).
inline size_t hwy_table_index(int64_t target) {
  const int64_t mask = (target & (HWY_SCALAR | HWY_EMU128)) ? int64_t(HWY_CHOSEN_TARGET_MASK_SCALAR)
                                                            : int64_t(HWY_CHOSEN_TARGET_SHIFT(target));
  return hwy::Num0BitsBelowLS1Bit_Nonzero64(uint64_t(mask));
}

}  // namespace kvq

// FUNC's version for `target` (a function pointer).
#define KVQ_HWY_AT_TARGET(FUNC, target) (*(HWY_DISPATCH_TABLE(FUNC)[::kvq::hwy_table_index(target)]))

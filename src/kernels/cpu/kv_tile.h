// One head of one page of a KvLayerView turned into the tile attention reads:
// the page's codes decoded (kv_decode.h), the sink and recent-window slots
// patched from their full-precision stores, and pre-RoPE keys rotated at
// their positions. Tiles: keys channel-major [head_dim][64], values
// token-major [64][head_dim].
#pragma once
#include <cstdint>

#include "kernels/cpu/kernel_set.h"
#include "kernels/cpu/kv_view.h"

namespace kvq {

// First slot read in full precision (through the window) by a query at
// position `pos`; kKvNoWindow when there is no window.
int64_t kv_window_from(const KvLayerView& kv, int32_t pos);

// Page p's key tile: codes decoded, sink slots and window slots >= fp_from
// patched from the side stores, then (keys of a pre-RoPE format) rotated at
// each slot's position, or with page_relative (only where
// kv.page_consecutive(p)) at its offset in the page alone (rope_rel_cs).
void kv_decode_key_tile(const KernelSet& ks, const KvLayerView& kv, int64_t p, int head, float* kt,
                        int64_t fp_from = kKvNoWindow, bool page_relative = false);
void kv_decode_value_tile(const KernelSet& ks, const KvLayerView& kv, int64_t p, int head, float* v,
                          int64_t fp_from = kKvNoWindow);

// The scores s[r * 64 + j] = q_r . k_j of `rows` query rows (q[r * head_dim
// + d]) against page p's keys of one head, as kv_decode_key_tile would give
// them, computed where the keys are decoded (kv_score_rotated_keys). False,
// with nothing written, where that has no path: keys not pre-RoPE, a slot in
// full precision, a layout or decoder without it.
bool kv_score_key_tile(const KernelSet& ks, const KvLayerView& kv, int64_t p, int head, const float* q, int rows,
                       float* s, int64_t fp_from = kKvNoWindow, bool page_relative = false);

// Page p's absolute angles in rope_rel_cs's layout, written to `cs` (n_rot x
// 64 floats): composed from the page's first angle and the offsets' angles
// where its positions run consecutively (cos(a+b) = cos a cos b - sin a sin b,
// within a few float roundings of computing them at each position), computed
// at each slot's position where they jump (then slots past the page's tokens
// hold zeros).
void kv_page_angles(const KvLayerView& kv, int64_t p, float* cs);

// Slot j's cos and sin (half each) into one page of a page-transposed angle
// table (KvLayerView::rope_rel_cs's layout).
inline void kv_put_slot_angles(float* page_cs, int j, const float* c, const float* s, int half) {
  for (int k = 0; k < half; ++k) {
    page_cs[k * kKvPageTokens + j] = c[k];
    page_cs[(half + k) * kKvPageTokens + j] = s[k];
  }
}

}  // namespace kvq

#include "kernels/cpu/kv_tile.h"

#include <algorithm>
#include <vector>

#include "base/error.h"
#include "base/fp16.h"
#include "kernels/cpu/kv_decode.h"

namespace kvq {

int64_t kv_window_from(const KvLayerView& kv, int32_t pos) {
  if (kv.window_tokens == 0) return kKvNoWindow;
  // Positions increase: the first slot whose position is > pos - window_tokens.
  const int64_t threshold = int64_t(pos) - kv.window_tokens;
  const int32_t* first = std::upper_bound(kv.positions, kv.positions + kv.n_tokens, threshold,
                                          [](int64_t t, int32_t p) { return t < int64_t(p); });
  return std::max<int64_t>(first - kv.positions, kv.window_first);
}

namespace {

// Overwrites slots of a decoded tile with binary16 side-store rows. `rows(slot)`
// gives the row of a slot; keys go channel-major, values token-major.
template <class RowOf>
void patch_tile(float* tile, bool channel_major, int head, int head_dim, int64_t s0, int64_t s1, int64_t page_first,
                RowOf rows) {
  for (int64_t s = s0; s < s1; ++s) {
    const uint16_t* src = rows(s) + int64_t(head) * head_dim;
    const int64_t j = s - page_first;
    for (int d = 0; d < head_dim; ++d) {
      const float x = fp16_to_f32(src[d]);
      if (channel_major) tile[int64_t(d) * kKvPageTokens + j] = x;
      else tile[j * head_dim + d] = x;
    }
  }
}

// Sink slots, then window slots >= fp_from, of page p.
void patch_full_precision(const KvLayerView& kv, int64_t p, int head, float* tile, bool keys, int64_t fp_from) {
  const int64_t first = p * kKvPageTokens, end = first + kv.page_tokens(p);
  const int64_t row = int64_t(kv.n_kv_heads) * kv.head_dim;
  if (first < kv.sink_tokens) {
    const uint16_t* base = keys ? kv.sink_k : kv.sink_v;
    patch_tile(tile, keys, head, kv.head_dim, first, std::min<int64_t>(end, kv.sink_tokens), first,
               [&](int64_t s) { return base + s * row; });
  }
  if (fp_from != kKvNoWindow && fp_from < end) {
    KVQ_ASSERT(fp_from >= kv.window_first);
    const uint16_t* base = keys ? kv.window_k : kv.window_v;
    patch_tile(tile, keys, head, kv.head_dim, std::max(first, fp_from), end, first,
               [&](int64_t s) { return base + (s % kv.window_capacity) * row; });
  }
}

// The angles that rotate page p's pre-RoPE keys: the offsets' table when the
// caller turned its queries back by the page's first angle, else the page's
// absolute angles composed into a per-thread buffer.
const float* key_angles(const KvLayerView& kv, int64_t p, bool page_relative) {
  KVQ_ASSERT(!page_relative || (kv.keys_pre_rope && kv.page_consecutive(p)));
  if (page_relative) return kv.rope_rel_cs;
  thread_local std::vector<float> absolute;
  absolute.resize(size_t(kv.rope->spec().n_rot) * kKvPageTokens);
  kv_page_angles(kv, p, absolute.data());
  return absolute.data();
}

}  // namespace

void kv_page_angles(const KvLayerView& kv, int64_t p, float* cs) {
  const int half = kv.rope->spec().n_rot / 2;
  constexpr int T = kKvPageTokens;
  if (kv.page_consecutive(p)) {
    const float* back = kv.rope_page_back + p * 2 * half;  // cos, -sin of the first position
    for (int k = 0; k < half; ++k) {
      const float c0 = back[k], s0 = -back[half + k];
      const float *rc = kv.rope_rel_cs + k * T, *rs = kv.rope_rel_cs + (half + k) * T;
      float *oc = cs + k * T, *os = cs + (half + k) * T;
      for (int j = 0; j < T; ++j) {
        oc[j] = c0 * rc[j] - s0 * rs[j];
        os[j] = s0 * rc[j] + c0 * rs[j];
      }
    }
    return;
  }
  const int n = kv.page_tokens(p);
  std::vector<float> c(static_cast<size_t>(half)), s(c.size());
  std::fill_n(cs, size_t(2 * half) * T, 0.0f);
  for (int j = 0; j < n; ++j) {
    kv.rope->angles(kv.positions[p * T + j], c.data(), s.data());
    kv_put_slot_angles(cs, j, c.data(), s.data(), half);
  }
}

bool kv_score_key_tile(const KernelSet& ks, const KvLayerView& kv, int64_t p, int head, const float* q, int rows,
                       float* s, int64_t fp_from, bool page_relative) {
  if (!kv.keys_pre_rope || !kv.all_quantized(p, fp_from)) return false;
  const RopeSpec& spec = kv.rope->spec();
  return kv_score_rotated_keys(ks, kv.k, kv.pages[p], head, kv.page_tokens(p), key_angles(kv, p, page_relative),
                               spec.n_rot / 2, spec.neox, q, rows, s);
}

void kv_decode_key_tile(const KernelSet& ks, const KvLayerView& kv, int64_t p, int head, float* kt, int64_t fp_from,
                        bool page_relative) {
  const int n = kv.page_tokens(p);
  const RopeSpec& spec = kv.rope->spec();
  const int half = spec.n_rot / 2;
  KVQ_ASSERT(!page_relative || (kv.keys_pre_rope && kv.page_consecutive(p)));
  const float* cs = nullptr;
  if (kv.keys_pre_rope) {
    cs = key_angles(kv, p, page_relative);
    // No full-precision slot in this page: decode and rotate in one pass
    // where the format has a fused kernel.
    if (kv.all_quantized(p, fp_from) && kv_decode_rotate_keys(ks, kv.k, kv.pages[p], head, n, kt, cs, half, spec.neox))
      return;
  }
  kv_decode_tile(ks, kv.k, kv.pages[p], head, n, kt);
  patch_full_precision(kv, p, head, kt, true, fp_from);
  if (!kv.keys_pre_rope) return;
  // Rotate each decoded key at its own position (the tile is channel-major).
  kv_rotate_key_tile(ks, kt, n, cs, half, spec.neox);
}

void kv_decode_value_tile(const KernelSet& ks, const KvLayerView& kv, int64_t p, int head, float* v, int64_t fp_from) {
  kv_decode_tile(ks, kv.v, kv.pages[p] + kv.v_offset, head, kv.page_tokens(p), v);
  patch_full_precision(kv, p, head, v, false, fp_from);
}

}  // namespace kvq

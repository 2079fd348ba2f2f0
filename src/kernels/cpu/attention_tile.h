// Private to the attention kernels: one tile step of the online softmax for a
// group of query rows, implemented once per SIMD level.
#pragma once
#include <cstdint>
#include <limits>
#include <vector>

#include "formats/kv_format.h"

namespace kvq::attn {

constexpr int kTile = 64;  // == kKvPageTokens

struct TileStep {
  const float* q;         // [rows][hd], pre-multiplied by the softmax scale
  int rows;
  int hd;
  const float* kt;        // [hd][kTile] decoded keys, channel-major
  const float* v;         // [kTile][hd] decoded values, or null: packed values below
  int n;                  // valid keys in the tile (<= kTile)
  const int32_t* kpos;    // [n] key positions
  const int32_t* row_pos; // [rows] query positions
  float* m;               // [rows] running max
  float* l;               // [rows] running sum of exp
  float* acc;             // [rows][hd] running output (unnormalised)
  float* s;               // scratch [rows][kTile]
  // s already holds the rows' scores (kv_score_key_tile; kt unused):
  // only the AVX-512 step takes such a step.
  bool scored = false;
  // Values read straight from their page (the SIMD steps, when
  // packed_values_supported): the value decode fused into the accumulation.
  const KvCodecLayout* v_layout = nullptr;
  const uint8_t* v_page = nullptr;  // the page's value part
  int v_head = 0;
};

// Per-token quant values (2/3/4-bit codes, head_dim % 32 == 0) that the AVX2
// and portable steps accumulate from the packed codes in decode: sum_j p_j (zp_j + r_j L[c]) is taken
// as sum_j (p_j r_j) L[c] + sum_j p_j zp_j, plus p_j e for each outlier residual
// e; no float tile of values is written. Equal to decoding first up to
// floating-point reordering.
bool packed_values_supported(const KvCodecLayout& layout);
// The same rule from the format alone (what a cache of that value format will do).
bool packed_values_supported(KvScheme scheme, int bits, int head_dim);

namespace {  // internal linkage: the includers are compiled for different ISAs
// Sets s_row[j] = -inf for the keys row `r` of the step must not see: slots past
// the tile's end and keys after the row's position. Positions increase, so a
// full tile whose last key is visible needs no mask.
inline void mask_row(const TileStep& t, int r, float* s_row) {
  const int32_t rp = t.row_pos[r];
  if (t.n == kTile && t.kpos[kTile - 1] <= rp) return;
  for (int j = 0; j < kTile; ++j)
    if (j >= t.n || t.kpos[j] > rp) s_row[j] = -std::numeric_limits<float>::infinity();
}
}  // namespace

void tile_step_scalar(const TileStep& t);
// AVX2+FMA version (hd % 8 == 0); defined only on x86-64.
void tile_step_avx2(const TileStep& t);
// AVX-512 version (hd % 16 == 0); defined only on x86-64.
void tile_step_avx512(const TileStep& t);
// Portable SIMD version (Google Highway, any hd; t.v must be set), compiled
// for Highway target `target` (one of portable_targets(), attention_hwy.cpp).
using TileStepFn = void (*)(const TileStep&);
TileStepFn portable_tile_step(int64_t target);

}  // namespace kvq::attn

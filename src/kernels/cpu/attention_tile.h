// Private to the attention kernels: one tile step of the online softmax for a
// group of query rows, implemented once per SIMD level.
#pragma once
#include <cstdint>

namespace kvq::attn {

constexpr int kTile = 64;  // == kKvPageTokens

struct TileStep {
  const float* q;         // [rows][hd], pre-multiplied by the softmax scale
  int rows;
  int hd;
  const float* kt;        // [hd][kTile] decoded keys, channel-major
  const float* v;         // [kTile][hd] decoded values
  int n;                  // valid keys in the tile (<= kTile)
  const int32_t* kpos;    // [n] key positions
  const int32_t* row_pos; // [rows] query positions
  float* m;               // [rows] running max
  float* l;               // [rows] running sum of exp
  float* acc;             // [rows][hd] running output (unnormalised)
  float* s;               // scratch [rows][kTile]
};

void tile_step_scalar(const TileStep& t);
// AVX2+FMA version (hd % 8 == 0); defined only on x86-64.
void tile_step_avx2(const TileStep& t);

}  // namespace kvq::attn

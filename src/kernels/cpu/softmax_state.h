// The online softmax of query rows over keys seen a tile at a time, one
// definition for every path (the scalar step, the SIMD steps' row loop, the
// split-K merge). Per row: the running max m, the running sum l of exp(s - m)
// and the unnormalised output acc = sum exp(s - m) v. States over disjoint
// key ranges merge exactly in any order (up to rounding): split-K partials of
// one row today, ranks or devices later.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace kvq::attn {
namespace {  // internal linkage: the includers are compiled for different ISAs

constexpr float kNoScore = -std::numeric_limits<float>::infinity();

// One tile folded into a row's state: open() with the tile's largest visible
// score gives the max to exponentiate against and the factor the old sum and
// output are scaled by; close() adds the tile's sum of exponentials.
struct SoftmaxUpdate {
  float m_new;
  float corr;  // exp(m_old - m_new)
  static SoftmaxUpdate open(float m, float tile_max) {
    const float m_new = std::max(m, tile_max);
    return {m_new, std::exp(m - m_new)};
  }
  void close(float& m, float& l, float tile_sum) const {
    l = l * corr + tile_sum;
    m = m_new;
  }
};

// Rows' states as the tile steps hold them: m[rows], l[rows], acc[rows][hd].
struct SoftmaxRows {
  float* m;
  float* l;
  float* acc;
  int hd;

  void reset(int rows) const {
    std::fill(m, m + rows, kNoScore);
    std::fill(l, l + rows, 0.0f);
    std::fill(acc, acc + int64_t(rows) * hd, 0.0f);
  }
  // Row r's output: acc / l (zeros when no key was visible).
  void finish(int r, float* out) const {
    const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
    const float* a = acc + int64_t(r) * hd;
    for (int d = 0; d < hd; ++d) out[d] = a[d] * inv;
  }
  // The scalar update of row r by one tile: scores s[0..n) (kNoScore for keys
  // it must not see; overwritten with their probabilities) and values
  // v[j * hd + d]. The reference the SIMD steps are tested against.
  void update(int r, float* s, int n, const float* v) const {
    float tile_max = kNoScore;
    for (int j = 0; j < n; ++j) tile_max = std::max(tile_max, s[j]);
    if (tile_max == kNoScore) return;  // nothing visible in this tile
    const SoftmaxUpdate u = SoftmaxUpdate::open(m[r], tile_max);
    float* a = acc + int64_t(r) * hd;
    for (int d = 0; d < hd; ++d) a[d] *= u.corr;
    float sum = 0;
    for (int j = 0; j < n; ++j) {
      const float p = std::exp(s[j] - u.m_new);  // exp(-inf) = 0 for masked keys
      sum += p;
      for (int d = 0; d < hd; ++d) a[d] += p * v[int64_t(j) * hd + d];
    }
    u.close(m[r], l[r], sum);
  }
};

// Merges row states over disjoint key ranges into one output row: each part
// (m, l, acc[hd] at parts + i * stride) rescaled to the common max, summed,
// normalised. One pass over the parts whatever their order.
inline void softmax_merge(const float* parts, int64_t n_parts, int64_t stride, int hd, float* acc_scratch,
                          float* out) {
  float m = kNoScore;
  for (int64_t i = 0; i < n_parts; ++i) m = std::max(m, parts[i * stride]);
  float l = 0;
  std::fill(acc_scratch, acc_scratch + hd, 0.0f);
  if (m != kNoScore) {
    for (int64_t i = 0; i < n_parts; ++i) {
      const float* st = parts + i * stride;
      if (st[1] == 0) continue;
      const float w = std::exp(st[0] - m);
      l += st[1] * w;
      for (int d = 0; d < hd; ++d) acc_scratch[d] += st[2 + d] * w;
    }
  }
  const float inv = l > 0 ? 1.0f / l : 0.0f;
  for (int d = 0; d < hd; ++d) out[d] = acc_scratch[d] * inv;
}

}  // namespace
}  // namespace kvq::attn

// Portable SIMD tile step of the attention kernel (see attention_tile.h),
// written once with Google Highway and compiled for every target Highway can
// reach on this architecture (x86: AVX-512, AVX2, SSE4, SSSE3; Arm: NEON, SVE;
// and its portable baseline), one of which is chosen at run time. It runs where
// the hand-written AVX2 step does not: CPUs with AVX-512 (where it scores a
// whole 64-key tile in 4 vectors per row), CPUs without AVX2, non-x86 CPUs, and
// head sizes that are not a multiple of 8. Values come from a decoded tile
// (TileStep::v) or, for per-token 2/3/4-bit codes in decode, straight from
// the packed page (accumulate_packed).
//
// This file is included once per target by Highway's foreach_target.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/attention_hwy.cpp"
// Every attainable target, the portable baseline included, so the tests can
// run each one on this machine against the oracle.
#ifndef HWY_COMPILE_ALL_ATTAINABLE
#define HWY_COMPILE_ALL_ATTAINABLE
#endif
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/attention_tile.h"
#include "kernels/cpu/softmax_state.h"
#include "kernels/cpu/kernel_set.h"
#include "kernels/cpu/kv_lookup_hwy-inl.h"

HWY_BEFORE_NAMESPACE();
namespace kvq::attn::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// At most 16 lanes (512 bits): a 64-key tile is then a whole number of 4-vector
// chunks on every target (scalable vectors included).
using DF = hn::CappedTag<float, 16>;

// s[r][j0 .. j0 + 4N) for R <= 3 rows: 12 accumulators, each key vector loaded
// once per channel and reused by every row (the rows of a GQA group).
template <int R>
HWY_INLINE void scores_chunk(const float* HWY_RESTRICT q, int hd, const float* HWY_RESTRICT kt, int j0,
                             float* HWY_RESTRICT s) {
  const DF d;
  const size_t N = hn::Lanes(d);
  auto a0 = hn::Zero(d), a1 = a0, a2 = a0, a3 = a0;
  auto b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  auto c0 = a0, c1 = a0, c2 = a0, c3 = a0;
  for (int dd = 0; dd < hd; ++dd) {
    const float* krow = kt + dd * kTile + j0;
    const auto k0 = hn::LoadU(d, krow), k1 = hn::LoadU(d, krow + N);
    const auto k2 = hn::LoadU(d, krow + 2 * N), k3 = hn::LoadU(d, krow + 3 * N);
    const auto qa = hn::Set(d, q[dd]);
    a0 = hn::MulAdd(qa, k0, a0), a1 = hn::MulAdd(qa, k1, a1);
    a2 = hn::MulAdd(qa, k2, a2), a3 = hn::MulAdd(qa, k3, a3);
    if constexpr (R > 1) {
      const auto qb = hn::Set(d, q[hd + dd]);
      b0 = hn::MulAdd(qb, k0, b0), b1 = hn::MulAdd(qb, k1, b1);
      b2 = hn::MulAdd(qb, k2, b2), b3 = hn::MulAdd(qb, k3, b3);
    }
    if constexpr (R > 2) {
      const auto qc = hn::Set(d, q[2 * hd + dd]);
      c0 = hn::MulAdd(qc, k0, c0), c1 = hn::MulAdd(qc, k1, c1);
      c2 = hn::MulAdd(qc, k2, c2), c3 = hn::MulAdd(qc, k3, c3);
    }
  }
  float* sa = s + j0;
  hn::StoreU(a0, d, sa), hn::StoreU(a1, d, sa + N), hn::StoreU(a2, d, sa + 2 * N), hn::StoreU(a3, d, sa + 3 * N);
  if constexpr (R > 1) {
    float* sb = sa + kTile;
    hn::StoreU(b0, d, sb), hn::StoreU(b1, d, sb + N), hn::StoreU(b2, d, sb + 2 * N), hn::StoreU(b3, d, sb + 3 * N);
  }
  if constexpr (R > 2) {
    float* sc = sa + 2 * kTile;
    hn::StoreU(c0, d, sc), hn::StoreU(c1, d, sc + N), hn::StoreU(c2, d, sc + 2 * N), hn::StoreU(c3, d, sc + 3 * N);
  }
}

// acc[r][col .. col + NV*N) += sum_j p[r][j] * v[j][col ..] for R <= 3 rows,
// NV <= 4 vectors: the accumulators stay in registers over the tile's keys.
template <int R, int NV>
HWY_INLINE void accumulate_chunk(const float* HWY_RESTRICT p, int n, const float* HWY_RESTRICT v, int hd, int col,
                                 float* HWY_RESTRICT acc) {
  const DF d;
  const size_t N = hn::Lanes(d);
  float* ra = acc + col;
  float* rb = acc + hd + col;
  float* rc = acc + 2 * hd + col;
  auto load = [&](const float* x, int k) { return NV > k ? hn::LoadU(d, x + k * N) : hn::Zero(d); };
  auto store = [&](float* x, int k, decltype(hn::Zero(d)) y) {
    if (NV > k) hn::StoreU(y, d, x + k * N);
  };
  auto a0 = load(ra, 0), a1 = load(ra, 1), a2 = load(ra, 2), a3 = load(ra, 3);
  auto b0 = a0, b1 = a1, b2 = a2, b3 = a3, c0 = a0, c1 = a1, c2 = a2, c3 = a3;
  if constexpr (R > 1) b0 = load(rb, 0), b1 = load(rb, 1), b2 = load(rb, 2), b3 = load(rb, 3);
  if constexpr (R > 2) c0 = load(rc, 0), c1 = load(rc, 1), c2 = load(rc, 2), c3 = load(rc, 3);
  for (int j = 0; j < n; ++j) {
    const float* vrow = v + int64_t(j) * hd + col;
    const auto v0 = hn::LoadU(d, vrow);
    const auto v1 = NV > 1 ? hn::LoadU(d, vrow + N) : v0;
    const auto v2 = NV > 2 ? hn::LoadU(d, vrow + 2 * N) : v0;
    const auto v3 = NV > 3 ? hn::LoadU(d, vrow + 3 * N) : v0;
    const auto pa = hn::Set(d, p[j]);
    a0 = hn::MulAdd(pa, v0, a0);
    if constexpr (NV > 1) a1 = hn::MulAdd(pa, v1, a1);
    if constexpr (NV > 2) a2 = hn::MulAdd(pa, v2, a2);
    if constexpr (NV > 3) a3 = hn::MulAdd(pa, v3, a3);
    if constexpr (R > 1) {
      const auto pb = hn::Set(d, p[kTile + j]);
      b0 = hn::MulAdd(pb, v0, b0);
      if constexpr (NV > 1) b1 = hn::MulAdd(pb, v1, b1);
      if constexpr (NV > 2) b2 = hn::MulAdd(pb, v2, b2);
      if constexpr (NV > 3) b3 = hn::MulAdd(pb, v3, b3);
    }
    if constexpr (R > 2) {
      const auto pc = hn::Set(d, p[2 * kTile + j]);
      c0 = hn::MulAdd(pc, v0, c0);
      if constexpr (NV > 1) c1 = hn::MulAdd(pc, v1, c1);
      if constexpr (NV > 2) c2 = hn::MulAdd(pc, v2, c2);
      if constexpr (NV > 3) c3 = hn::MulAdd(pc, v3, c3);
    }
  }
  store(ra, 0, a0), store(ra, 1, a1), store(ra, 2, a2), store(ra, 3, a3);
  if constexpr (R > 1) store(rb, 0, b0), store(rb, 1, b1), store(rb, 2, b2), store(rb, 3, b3);
  if constexpr (R > 2) store(rc, 0, c0), store(rc, 1, c1), store(rc, 2, c2), store(rc, 3, c3);
}

// Columns of the head that do not fill a vector: plain loops.
template <int R>
HWY_INLINE void accumulate_tail(const float* p, int n, const float* v, int hd, int col, float* acc) {
  for (int r = 0; r < R; ++r)
    for (int c = col; c < hd; ++c) {
      float sum = acc[r * hd + c];
      for (int j = 0; j < n; ++j) sum += p[r * kTile + j] * v[int64_t(j) * hd + c];
      acc[r * hd + c] = sum;
    }
}

// The value half of a tile step read from the packed page (per-token 2/3/4-bit
// codes, see packed_values_supported): sum_j p_j (zp_j + r_j L[c]) taken as
// sum_j (p_j r_j) L[c] + sum_j p_j zp_j, plus p_j e per outlier residual e.
// p holds the rows' probabilities (0 for masked slots), acc their already
// rescaled outputs. Levels are looked up 16 at a time by byte shuffles on
// 128-bit vectors whatever the target's width (the lookups, not the
// multiply-adds, bound this loop); the one-lane baseline decodes each element.
// Codes are unpacked to bytes first, so only the unpacking depends on the bit
// width (one instantiation of the loop per row count, not per width too).
#if HWY_TARGET != HWY_SCALAR
// Codes of columns [d0, d0 + w) of slots [0, n) as bytes, codes[j][0 .. w).
HWY_NOINLINE void unpack_value_block(const KvCodecLayout& L, const uint8_t* runs, int n, int d0, int w,
                                     uint8_t (*codes)[64]) {
  namespace kh = kvh::HWY_NAMESPACE;
  const int B = L.bits;
  for (int j = 0; j < n; ++j) {
    const uint8_t* run = runs + int64_t(j) * L.run_bytes + d0 / 8 * B;
    if (B == 2) kh::unpack<2>(run, w, codes[j]);
    else if (B == 3) kh::unpack<3>(run, w, codes[j]);
    else kh::unpack<4>(run, w, codes[j]);
  }
}
#endif

template <int R>
HWY_NOINLINE void accumulate_packed(const TileStep& t, const float* HWY_RESTRICT p, float* HWY_RESTRICT acc) {
  const KvCodecLayout& L = *t.v_layout;
  const int hd = t.hd, n = t.n;
  alignas(16) float pr[R][kTile];
  float zsum[R] = {};
  for (int j = 0; j < n; ++j) {
    const uint8_t* sc = t.v_page + L.codes_bytes + int64_t(j) * 4;
    const float zp = fp16_to_f32(kvh::ld16(sc)), r = fp16_to_f32(kvh::ld16(sc + 2));
    for (int q = 0; q < R; ++q) {
      zsum[q] += p[q * kTile + j] * zp;
      pr[q][j] = p[q * kTile + j] * r;
    }
  }
  kvh::for_each_outlier(L, t.v_page, t.v_head, n, [&](int j, int d, float e) {
    for (int q = 0; q < R; ++q) acc[q * hd + d] += p[q * kTile + j] * e;
  });
  const uint8_t* runs = t.v_page + int64_t(t.v_head) * kTile * L.run_bytes;
#if HWY_TARGET == HWY_SCALAR
  uint8_t codes[64];
  for (int d0 = 0; d0 < hd; d0 += 64) {
    const int w = std::min(64, hd - d0);
    for (int j = 0; j < n; ++j) {
      kv_unpack(runs + int64_t(j) * L.run_bytes + d0 / 8 * L.bits, w, L.bits, codes);
      for (int q = 0; q < R; ++q)
        for (int d = 0; d < w; ++d) acc[q * hd + d0 + d] += pr[q][j] * L.levels[codes[d]];
    }
  }
  for (int q = 0; q < R; ++q)
    for (int d = 0; d < hd; ++d) acc[q * hd + d] += zsum[q];
#else
  namespace kh = kvh::HWY_NAMESPACE;
  const kh::DF df;
  kh::V8 p0, p1, p2, p3;
  kh::load_planes(L.level_planes, p0, p1, p2, p3);
  // Columns in blocks of 64: each slot's codes of the block unpacked once, then
  // 16 columns x R rows of accumulators kept in registers over the tile's slots.
  alignas(16) uint8_t codes[kTile][64];
  for (int d0 = 0; d0 < hd; d0 += 64) {
    const int w = std::min(64, hd - d0);
    unpack_value_block(L, runs, n, d0, w, codes);
    for (int c0 = 0; c0 < w; c0 += 16) {
      float* ra = acc + d0 + c0;
      float* rb = ra + hd;
      float* rc = ra + 2 * hd;
      float* re = ra + 3 * hd;
      auto a0 = hn::LoadU(df, ra), a1 = hn::LoadU(df, ra + 4), a2 = hn::LoadU(df, ra + 8), a3 = hn::LoadU(df, ra + 12);
      auto b0 = a0, b1 = a1, b2 = a2, b3 = a3, c0v = a0, c1 = a1, c2 = a2, c3 = a3, e0 = a0, e1 = a1, e2 = a2, e3 = a3;
      if constexpr (R > 1) b0 = hn::LoadU(df, rb), b1 = hn::LoadU(df, rb + 4), b2 = hn::LoadU(df, rb + 8), b3 = hn::LoadU(df, rb + 12);
      if constexpr (R > 2) c0v = hn::LoadU(df, rc), c1 = hn::LoadU(df, rc + 4), c2 = hn::LoadU(df, rc + 8), c3 = hn::LoadU(df, rc + 12);
      if constexpr (R > 3) e0 = hn::LoadU(df, re), e1 = hn::LoadU(df, re + 4), e2 = hn::LoadU(df, re + 8), e3 = hn::LoadU(df, re + 12);
      for (int j = 0; j < n; ++j) {
        kh::VF l0, l1, l2, l3;
        kh::lookup16(p0, p1, p2, p3, codes[j] + c0, l0, l1, l2, l3);
        const auto pa = hn::Set(df, pr[0][j]);
        a0 = hn::MulAdd(pa, l0, a0), a1 = hn::MulAdd(pa, l1, a1), a2 = hn::MulAdd(pa, l2, a2), a3 = hn::MulAdd(pa, l3, a3);
        if constexpr (R > 1) {
          const auto pb = hn::Set(df, pr[1][j]);
          b0 = hn::MulAdd(pb, l0, b0), b1 = hn::MulAdd(pb, l1, b1), b2 = hn::MulAdd(pb, l2, b2), b3 = hn::MulAdd(pb, l3, b3);
        }
        if constexpr (R > 2) {
          const auto pc = hn::Set(df, pr[2][j]);
          c0v = hn::MulAdd(pc, l0, c0v), c1 = hn::MulAdd(pc, l1, c1), c2 = hn::MulAdd(pc, l2, c2), c3 = hn::MulAdd(pc, l3, c3);
        }
        if constexpr (R > 3) {
          const auto pe = hn::Set(df, pr[3][j]);
          e0 = hn::MulAdd(pe, l0, e0), e1 = hn::MulAdd(pe, l1, e1), e2 = hn::MulAdd(pe, l2, e2), e3 = hn::MulAdd(pe, l3, e3);
        }
      }
      // The zero-point term, once per element.
      const auto za = hn::Set(df, zsum[0]);
      hn::StoreU(hn::Add(a0, za), df, ra), hn::StoreU(hn::Add(a1, za), df, ra + 4);
      hn::StoreU(hn::Add(a2, za), df, ra + 8), hn::StoreU(hn::Add(a3, za), df, ra + 12);
      if constexpr (R > 1) {
        const auto zb = hn::Set(df, zsum[1]);
        hn::StoreU(hn::Add(b0, zb), df, rb), hn::StoreU(hn::Add(b1, zb), df, rb + 4);
        hn::StoreU(hn::Add(b2, zb), df, rb + 8), hn::StoreU(hn::Add(b3, zb), df, rb + 12);
      }
      if constexpr (R > 2) {
        const auto zc = hn::Set(df, zsum[2]);
        hn::StoreU(hn::Add(c0v, zc), df, rc), hn::StoreU(hn::Add(c1, zc), df, rc + 4);
        hn::StoreU(hn::Add(c2, zc), df, rc + 8), hn::StoreU(hn::Add(c3, zc), df, rc + 12);
      }
      if constexpr (R > 3) {
        const auto ze = hn::Set(df, zsum[3]);
        hn::StoreU(hn::Add(e0, ze), df, re), hn::StoreU(hn::Add(e1, ze), df, re + 4);
        hn::StoreU(hn::Add(e2, ze), df, re + 8), hn::StoreU(hn::Add(e3, ze), df, re + 12);
      }
    }
  }
#endif
}

// Decoded values t.v into R <= 3 rows (p: their probabilities, acc: outputs).
template <int R>
HWY_INLINE void accumulate_decoded(const TileStep& t, const float* p, float* acc) {
  const DF d;
  const int N = int(hn::Lanes(d));
  int c0 = 0;
  for (; c0 + 4 * N <= t.hd; c0 += 4 * N) accumulate_chunk<R, 4>(p, t.n, t.v, t.hd, c0, acc);
  switch ((t.hd - c0) / N) {
    case 3: accumulate_chunk<R, 3>(p, t.n, t.v, t.hd, c0, acc); break;
    case 2: accumulate_chunk<R, 2>(p, t.n, t.v, t.hd, c0, acc); break;
    case 1: accumulate_chunk<R, 1>(p, t.n, t.v, t.hd, c0, acc); break;
    default: break;
  }
  c0 += (t.hd - c0) / N * N;
  if (c0 < t.hd) accumulate_tail<R>(p, t.n, t.v, t.hd, c0, acc);
}

template <int R>
HWY_INLINE void rows_block(const TileStep& t, int r0) {
  const DF d;
  const int N = int(hn::Lanes(d));
  const float* q = t.q + int64_t(r0) * t.hd;
  float* s = t.s + int64_t(r0) * kTile;
  for (int j0 = 0; j0 < kTile; j0 += 4 * N) {
    if constexpr (R == 4) {  // 2 + 2 rows (scores_chunk keeps 3 rows of accumulators at most)
      scores_chunk<2>(q, t.hd, t.kt, j0, s);
      scores_chunk<2>(q + 2 * t.hd, t.hd, t.kt, j0, s + 2 * kTile);
    } else {
      scores_chunk<R>(q, t.hd, t.kt, j0, s);
    }
  }

  const float neg_inf = -std::numeric_limits<float>::infinity();
  // exp(x) underflows to 0 below this; masked keys (-inf) must give exactly 0.
  const auto lo = hn::Set(d, -87.3f);
  bool any = false;
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * kTile;
    mask_row(t, r0 + r, sr);
    auto mx = hn::Set(d, neg_inf);
    for (int j = 0; j < kTile; j += N) mx = hn::Max(mx, hn::LoadU(d, sr + j));
    const float tile_max = hn::GetLane(hn::MaxOfLanes(d, mx));
    if (tile_max == neg_inf) {
      // No visible key for this row: p = 0, state unchanged.
      std::fill(sr, sr + kTile, 0.0f);
      continue;
    }
    any = true;
    const SoftmaxUpdate u = SoftmaxUpdate::open(t.m[r0 + r], tile_max);
    const auto mv = hn::Set(d, u.m_new);
    auto sum = hn::Zero(d);
    for (int j = 0; j < kTile; j += N) {
      const auto x = hn::Sub(hn::LoadU(d, sr + j), mv);
      const auto p = hn::IfThenElseZero(hn::Gt(x, lo), hn::Exp(d, hn::Max(x, lo)));
      hn::StoreU(p, d, sr + j);
      sum = hn::Add(sum, p);
    }
    u.close(t.m[r0 + r], t.l[r0 + r], hn::GetLane(hn::SumOfLanes(d, sum)));
    float* acc = t.acc + int64_t(r0 + r) * t.hd;
    const auto cv = hn::Set(d, u.corr);
    int c = 0;
    for (; c + N <= t.hd; c += N) hn::StoreU(hn::Mul(cv, hn::LoadU(d, acc + c)), d, acc + c);
    for (; c < t.hd; ++c) acc[c] *= u.corr;
  }
  if (!any) return;
  float* acc = t.acc + int64_t(r0) * t.hd;
  // (4-row blocks are taken over packed values only.)
  if (R == 4 || !t.v) return accumulate_packed<R>(t, s, acc);
  if constexpr (R < 4) accumulate_decoded<R>(t, s, acc);
}

// On targets with 32 vector registers (Arm, AVX-512), decode over packed
// values takes GQA groups of 4 (and 8) in 4-row blocks, so each packed value
// is looked up once for all 4 rows (16 value accumulators fit; on 16-register
// targets they would spill). Decoded values and keys gain nothing from it
// (their 4-row blocks run as 2 + 2 rows).
#if HWY_ARCH_ARM_A64 || (HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3)
constexpr bool kFourRowBlocks = true;
#else
constexpr bool kFourRowBlocks = false;
#endif

void TileStepHwy(const TileStep& t) {
  int r = 0;
  if (kFourRowBlocks && !t.v && t.rows % 4 == 0)
    for (; r < t.rows; r += 4) rows_block<4>(t, r);
  for (; r + 3 <= t.rows; r += 3) rows_block<3>(t, r);
  if (t.rows - r == 2) rows_block<2>(t, r);
  else if (t.rows - r == 1) rows_block<1>(t, r);
}

}  // namespace kvq::attn::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "kernels/cpu/hwy_dispatch.h"

namespace kvq::attn {

HWY_EXPORT(TileStepHwy);

TileStepFn portable_tile_step(int64_t target) { return &KVQ_HWY_AT_TARGET(TileStepHwy, target); }

}  // namespace kvq::attn

namespace kvq {

std::vector<int64_t> portable_targets() { return hwy::SupportedAndGeneratedTargets(); }

const char* portable_target_name(int64_t target) { return target ? hwy::TargetName(target) : "none"; }

}  // namespace kvq
#endif  // HWY_ONCE

// Dispatch of the weight kernels (quant.h): picks the SIMD kernel once per call
// and falls back to the scalar references; matmul splits the work over the pool.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "base/cpu.h"
#include "base/error.h"
#include "base/threads.h"
#include "quant/quant.h"
#include "quant/quant_simd.h"

namespace kvq {

namespace {

bool use_avx2(SimdLevel simd) {
#if defined(__x86_64__) || defined(_M_X64)
  return simd >= SimdLevel::avx2;
#else
  (void)simd;
  return false;
#endif
}

const QuantTraits& traits_or_fail(GgmlType type) {
  const QuantTraits* t = quant_traits(type);
  if (!t) fail("no kernels for tensor type {}", ggml_type_name(type));
  return *t;
}

ToFloatFn pick_to_float(GgmlType type, SimdLevel simd) {
  if (use_avx2(simd))
    if (ToFloatFn f = simd::avx2_to_float(type)) return f;
  return traits_or_fail(type).to_float_ref;
}

FromFloatFn pick_from_float(GgmlType type, SimdLevel simd) {
  if (use_avx2(simd))
    if (FromFloatFn f = simd::avx2_from_float(type)) return f;
  FromFloatFn f = traits_or_fail(type).from_float_ref;
  if (!f) fail("cannot quantize to tensor type {}", ggml_type_name(type));
  return f;
}

VecDotFn pick_vec_dot(const QuantTraits& t, SimdLevel simd) {
  if (use_avx2(simd))
    if (VecDotFn f = simd::avx2_vec_dot(t.type, t.vec_dot_type)) return f;
  return t.vec_dot_ref;
}

// Activation rows quantized by matmul; reused across calls (grows only).
// 64-byte aligned rows keep each token's blocks on their own cache lines.
struct ActBuffer {
  std::vector<uint64_t> storage;
  uint8_t* get(size_t bytes) {
    if (storage.size() * 8 < bytes) storage.resize((bytes + 7) / 8);
    return reinterpret_cast<uint8_t*>(storage.data());
  }
};
thread_local ActBuffer tl_act;

// Tiles for many tokens: a tile's weight rows (~kTileRows * row_bytes) stay in
// L1/L2 while its tokens stream past; its activations (kTileTokens rows) stay in L2.
constexpr int64_t kTileRows = 32;
constexpr int64_t kTileTokens = 64;
// Fewer tokens than this: split rows only (decode and tiny batches).
constexpr int64_t kRowSplitMaxTokens = 4;
// Rows per chunk when splitting rows: 16 floats of y = one cache line.
constexpr int64_t kRowGrain = 16;

}  // namespace

void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n, SimdLevel simd) {
  pick_to_float(type, simd)(src, dst, n);
}

void quantize_row(GgmlType type, const float* src, void* dst, int64_t n, SimdLevel simd) {
  pick_from_float(type, simd)(src, dst, n);
}

float vec_dot(GgmlType type, int64_t n, const void* w, const void* a, SimdLevel simd) {
  return pick_vec_dot(traits_or_fail(type), simd)(n, w, a);
}

void matmul(const WeightView& w, const float* x, float* y, int64_t n_tokens, ThreadPool& pool, SimdLevel simd) {
  if (n_tokens <= 0 || w.rows <= 0) return;
  const QuantTraits& t = traits_or_fail(w.type);
  const GgmlType at = t.vec_dot_type;
  const auto a_row_opt = ggml_row_bytes(at, w.cols);
  if (w.cols % t.block_elems != 0 || !a_row_opt) fail("matmul: {} columns do not fit type {}", w.cols, ggml_type_name(w.type));
  const uint64_t a_row = (*a_row_opt + 63) / 64 * 64;
  const int64_t cols = w.cols, rows = w.rows;

  // 1. Activations -> vec_dot_type, once, in parallel over tokens.
  const FromFloatFn quant = pick_from_float(at, simd);
  uint8_t* act = tl_act.get(size_t(a_row) * size_t(n_tokens) + 64);
  act += (64 - reinterpret_cast<uintptr_t>(act) % 64) % 64;
  pool.parallel_for(n_tokens, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; ++i) quant(x + i * cols, act + uint64_t(i) * a_row, cols);
  });

  // 2. Kernel: a tiled SIMD GEMM where there is one, else a loop of dots.
  const simd::GemmFn gemm = use_avx2(simd) ? simd::avx2_gemm(w.type, at) : nullptr;
  const VecDotFn dot = pick_vec_dot(t, simd);
  const auto* wdata = static_cast<const uint8_t*>(w.data);
  auto block = [&](int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    const uint8_t* wp = wdata + uint64_t(r0) * w.row_bytes;
    const uint8_t* ap = act + uint64_t(t0) * a_row;
    float* yp = y + t0 * rows + r0;
    if (gemm) {
      gemm(cols, wp, w.row_bytes, r1 - r0, ap, a_row, t1 - t0, yp, rows);
      return;
    }
    for (int64_t ti = 0; ti < t1 - t0; ++ti)
      for (int64_t r = 0; r < r1 - r0; ++r)
        yp[ti * rows + r] = dot(cols, wp + uint64_t(r) * w.row_bytes, ap + uint64_t(ti) * a_row);
  };

  // 3. Split the rows x tokens output over the pool.
  if (n_tokens <= kRowSplitMaxTokens) {
    pool.parallel_for(rows, [&](int64_t r0, int64_t r1) { block(r0, r1, 0, n_tokens); }, kRowGrain);
    return;
  }
  const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t tok_tiles = (n_tokens + kTileTokens - 1) / kTileTokens;
  const int64_t n_tiles = row_tiles * tok_tiles;
  // Tiles are handed out dynamically (threads may be slowed by other work);
  // consecutive indices walk the rows of one token tile, so a thread's
  // activations stay in cache while the weights come from L2/L3.
  std::atomic<int64_t> next{0};
  pool.run([&](int, int) {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_tiles) break;
      const int64_t tt = i / row_tiles, rt = i % row_tiles;
      const int64_t r0 = rt * kTileRows, t0 = tt * kTileTokens;
      block(r0, std::min(rows, r0 + kTileRows), t0, std::min(n_tokens, t0 + kTileTokens));
    }
  });
}

void matmul_shared_input(const MatmulOutput* outs, int n_outs, const float* x, int64_t n_tokens, ThreadPool& pool,
                         SimdLevel simd) {
  if (n_outs <= 0 || n_tokens <= 0) return;
  const WeightView& w0 = *outs[0].w;
  bool shared = n_tokens <= kRowSplitMaxTokens && use_avx2(simd);
  for (int i = 0; i < n_outs && shared; ++i) {
    const WeightView& w = *outs[i].w;
    shared = w.cols == w0.cols && traits_or_fail(w.type).vec_dot_type == traits_or_fail(w0.type).vec_dot_type &&
             simd::avx2_gemm(w.type, traits_or_fail(w.type).vec_dot_type) != nullptr;
  }
  if (!shared) {
    for (int i = 0; i < n_outs; ++i) matmul(*outs[i].w, x, outs[i].y, n_tokens, pool, simd);
    return;
  }
  // Decode: quantize the few input rows once (inline: too little work to fork),
  // then one parallel region over the concatenated rows of every weight.
  const GgmlType at = traits_or_fail(w0.type).vec_dot_type;
  const uint64_t a_row = (*ggml_row_bytes(at, w0.cols) + 63) / 64 * 64;
  uint8_t* act = tl_act.get(size_t(a_row) * size_t(n_tokens) + 64);
  act += (64 - reinterpret_cast<uintptr_t>(act) % 64) % 64;
  const FromFloatFn quant = pick_from_float(at, simd);
  for (int64_t i = 0; i < n_tokens; ++i) quant(x + i * w0.cols, act + uint64_t(i) * a_row, w0.cols);
  int64_t total = 0;
  for (int i = 0; i < n_outs; ++i) total += outs[i].w->rows;
  pool.parallel_for(total, [&](int64_t g0, int64_t g1) {
    int64_t base = 0;
    for (int i = 0; i < n_outs && g0 < g1; ++i) {
      const WeightView& w = *outs[i].w;
      const int64_t r0 = std::max<int64_t>(g0 - base, 0), r1 = std::min<int64_t>(g1 - base, w.rows);
      if (r0 < r1) {
        const simd::GemmFn gemm = simd::avx2_gemm(w.type, at);
        gemm(w.cols, static_cast<const uint8_t*>(w.data) + uint64_t(r0) * w.row_bytes, w.row_bytes, r1 - r0, act,
             a_row, n_tokens, outs[i].y + r0, w.rows);
      }
      base += w.rows;
    }
  }, kRowGrain);
}

}  // namespace kvq

// Decode attention over a synthetic filled cache, shaped like the default
// model (30 layers, 9 query heads over 3 KV heads, head_dim 64) or, with the
// suffix /8x128g4, like the 8B models run at long context (Llama-3-8B: 32
// layers, 32 query heads over 8 KV heads, head_dim 128): one query token per
// call, every layer, all threads. Per format and context length:
//   tok/s    generated tokens per second if attention were the only work
//            (scaled to 30 layers when fewer are held, to bound memory)
//   GB/s     packed cache bytes read (codes + scales + outliers of every page
//            of every layer) per second, against the machine's read bandwidth
//   GFLOP/s  2 * (QK + PV) multiply-adds per second, against the FMA peak
// plus the tile decode stages alone (decode of one head's key and value tile,
// RoPE included) to see what the decode costs next to the scoring.
//
// Filled through KvCache::store with random rows (calibration random but
// shaped like a real one), so pages, scales, outliers and sink are real.
#include <benchmark/benchmark.h>
#include <hwy/targets.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "base/cpu.h"
#include "base/threads.h"
#include "formats/kv_format.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_tile.h"
#include "kernels/cpu/kv_decode.h"
#include "kernels/cpu/kv_tile.h"
#include "kvq/error.h"
#include "kvcache/kv_cache.h"

namespace kvq {
namespace {

// A model's attention shape.
struct Shape {
  const char* suffix;  // of the benchmark names
  int layers, kv_heads, group, hd;
  float rope_base;
  int heads() const { return kv_heads * group; }
};
constexpr Shape kSmol{"", 30, 3, 3, 64, 100000.0f};
constexpr Shape kWide{"/8x128g4", 32, 8, 4, 128, 500000.0f};
constexpr uint64_t kMaxCacheBytes = 768ull << 20;

// All threads, or KVQ_BENCH_THREADS of them (e.g. 1: one thread over every layer).
ThreadPool& pool() {
  static ThreadPool p([] {
    const char* env = std::getenv("KVQ_BENCH_THREADS");
    return env && std::atoi(env) > 0 ? std::atoi(env) : default_thread_count();
  }());
  return p;
}

KvTensorCalibration make_cal(const KvFormat& f, int row, std::mt19937& rng) {
  KvTensorCalibration cal;
  std::normal_distribution<float> nd(0.0f, 0.4f);
  if (f.levels == KvLevels::codebook) {
    cal.codebook.resize(size_t(1) << f.bits);
    for (auto& c : cal.codebook) c = std::clamp(nd(rng), -1.0f, 1.0f);
    std::sort(cal.codebook.begin(), cal.codebook.end());
  }
  for (int c = 0; c < row; ++c) {
    cal.lower.push_back(-2.5f);
    cal.upper.push_back(2.5f);
  }
  return cal;
}

struct Filled {
  std::unique_ptr<KvCache> cache;
  int layers = 0;
  uint64_t bytes_per_layer = 0;  // pages' packed bytes (keys + values)
};

// One cache per (format, context, shape), kept across benchmark repetitions.
Filled& filled(const std::string& name, int64_t ctx, const Shape& sh = kSmol) {
  static std::map<std::tuple<std::string, int64_t, std::string>, Filled> all;
  auto it = all.find({name, ctx, sh.suffix});
  if (it != all.end()) return it->second;
  const KvFormat& f = kv_format(name);
  const KvGeometry g{sh.kv_heads, sh.hd};
  const uint64_t page = make_kv_codec(f, KvRole::key, g, nullptr, true)->page_bytes() +
                        make_kv_codec(f, KvRole::value, g, nullptr, true)->page_bytes();
  const uint64_t per_layer = uint64_t((ctx + kKvPageTokens - 1) / kKvPageTokens) * page;
  const int layers = int(std::clamp<uint64_t>(kMaxCacheBytes / per_layer, 1, uint64_t(sh.layers)));
  KvCacheConfig c;
  c.n_layers = layers;
  c.n_kv_heads = sh.kv_heads;
  c.head_dim = sh.hd;
  c.n_ctx = ctx + 1;
  c.k_format = &f;
  c.v_format = &f;
  c.rope.head_dim = sh.hd;
  c.rope.n_rot = sh.hd;
  c.rope.freq_base = sh.rope_base;
  c.sink_tokens = f.kvquant ? 1 : 0;
  std::mt19937 rng(1);
  for (int l = 0; l < layers; ++l) {
    if (f.needs_calibration(KvRole::key)) c.k_calibration.push_back(make_cal(f, g.row(), rng));
    if (f.needs_calibration(KvRole::value)) c.v_calibration.push_back(make_cal(f, g.row(), rng));
  }
  auto cache = std::make_unique<KvCache>(c);
  const int64_t batch = 512;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> k(size_t(batch) * g.row()), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int32_t> pos;
  for (int64_t t0 = 0; t0 < ctx; t0 += batch) {
    const int64_t n = std::min(batch, ctx - t0);
    pos.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(t0 + i);
    cache->begin_batch(pos);
    for (int l = 0; l < layers; ++l) cache->store(l, k.data(), v.data());
    cache->end_batch();
  }
  Filled& fl = all[{name, ctx, sh.suffix}];
  fl.cache = std::move(cache);
  fl.layers = layers;
  fl.bytes_per_layer = per_layer;
  return fl;
}

// The kernels every benchmark starts from: the best this CPU runs, unless
// KVQ_BENCH_SIMD / KVQ_BENCH_HWY_TARGET say otherwise (register_all).
KernelSet g_base;

// The next token's query (every query head, random) at position ctx, and its output.
struct DecodeQuery {
  int heads;
  float scale;
  std::vector<float> q, out;
  int32_t pos;
  DecodeQuery(int64_t ctx, const Shape& sh)
      : heads(sh.heads()), scale(1.0f / std::sqrt(float(sh.hd))), q(size_t(heads) * sh.hd), out(q.size()),
        pos(int32_t(ctx)) {
    std::mt19937 rng(2);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto& x : q) x = nd(rng);
  }
  void attend(const KvLayerView& view, ThreadPool& threads, const KernelSet& ks) {
    attention({q.data(), 1, heads, &pos, scale, view, out.data(), ks}, threads);
    benchmark::DoNotOptimize(out.data());
  }
};

// One decode step's attention over every layer (the query is the next token).
void BM_DecodeAttention(benchmark::State& state, std::string name, Shape sh) {
  const int64_t ctx = state.range(0);
  Filled& fl = filled(name, ctx, sh);
  DecodeQuery query(ctx, sh);
  const KernelSet ks = resolve_kernels(g_base);
  state.SetLabel(attention_kernel_name(ks, sh.hd, &kv_format(name)));
  for (auto _ : state)
    for (int l = 0; l < fl.layers; ++l) query.attend(fl.cache->view(l), pool(), ks);
  const double iters = double(state.iterations());
  const double flops = 4.0 * sh.heads() * sh.hd * double(ctx) * fl.layers;  // QK + PV, 2 flops per multiply-add
  state.counters["layers"] = fl.layers;
  state.counters["GB/s"] = benchmark::Counter(double(fl.bytes_per_layer) * fl.layers * iters / 1e9, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * iters / 1e9, benchmark::Counter::kIsRate);
  state.counters["tok/s"] = benchmark::Counter(iters * fl.layers / sh.layers, benchmark::Counter::kIsRate);
}

// The attention kernel's arithmetic alone: one layer of a 4K cache (about 1 MiB
// packed, mostly cache-resident) attended by one query token on one thread,
// repeated; "ns/tile" per (page, KV head) tile of keys and values. The
// /avx2, /avx512, /portable and /scalar variants pin that tile kernel (the label names
// the one run); /avx2-cpu also the AVX2 decoders (what a CPU whose top level is
// AVX2 runs); /portable+ also the portable tile decoders (what a CPU without AVX2
// runs: Arm, older x86), /portable-codecs the codecs' decode beside it (what
// such CPUs ran before the portable decoders).
void BM_DecodeAttention1T(benchmark::State& state, std::string name, AttentionKernel kernel, TileDecoders decoders,
                          Shape sh) {
  static ThreadPool one(1);
  KernelSet ks = g_base;
  ks.attention = kernel;
  ks.decoders = decoders;
  try {
    ks = resolve_kernels(ks);
  } catch (const Error& e) {
    return state.SkipWithError(e.what());
  }
  const int64_t ctx = 4096;
  Filled& fl = filled(name, ctx, sh);
  DecodeQuery query(ctx, sh);
  const KvLayerView view = fl.cache->view(0);
  const char* dec[] = {"", "+codecs", "+avx2 decoders", "+portable decoders"};
  state.SetLabel(attention_kernel_name(ks, sh.hd, &kv_format(name)) + dec[int(decoders)]);
  for (auto _ : state) query.attend(view, one, ks);
  const double tiles = double(ctx / kKvPageTokens) * sh.kv_heads;
  state.counters["ns/tile"] = benchmark::Counter(double(state.iterations()) * tiles * 1e-9,
                                                 benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// The tile decode stages alone: every page of one layer, every head, keys
// (with RoPE for pre-RoPE formats, relative to the page as decode rotates
// them) and values, one thread. Arg: 0 the codecs (scalar), 1 this CPU's
// decoders, 2 the portable (Highway) decoders, 3 the AVX2 ones (to compare on
// an AVX-512 CPU).
void BM_TileDecode(benchmark::State& state, std::string name) {
  const int64_t ctx = 4096;
  Filled& fl = filled(name, ctx);
  const KvLayerView view = fl.cache->view(0);
  KernelSet ks = g_base;
  if (state.range(0) == 0) ks.simd = SimdLevel::scalar;
  if (state.range(0) == 2) ks.decoders = TileDecoders::portable;
  if (state.range(0) == 3) {
    if (detected_simd_level() < SimdLevel::avx2) return state.SkipWithError("no AVX2 on this CPU");
    ks.decoders = TileDecoders::avx2;
  }
  ks = resolve_kernels(ks);
  if (state.range(0) == 2) state.SetLabel(std::string("portable/") + portable_target_name(ks.portable_target));
  std::vector<float> kt(size_t(kSmol.hd) * kKvPageTokens), vt(kt.size());
  const int64_t pages = (ctx + kKvPageTokens - 1) / kKvPageTokens;
  for (auto _ : state) {
    for (int64_t p = 0; p < pages; ++p)
      for (int h = 0; h < kSmol.kv_heads; ++h) {
        kv_decode_key_tile(ks, view, p, h, kt.data(), kKvNoWindow, view.keys_pre_rope && view.page_consecutive(p));
        kv_decode_value_tile(ks, view, p, h, vt.data());
        benchmark::ClobberMemory();
      }
  }
  state.counters["ns/tile"] = benchmark::Counter(double(state.iterations()) * pages * kSmol.kv_heads,
                                                 benchmark::Counter::kIsRate | benchmark::Counter::kInvert) ;
  state.counters["GB/s"] = benchmark::Counter(double(fl.bytes_per_layer) * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

// Appending one token to every layer (the cost of "fast append": encode keys
// and values, nearest level, per-token range, outlier top-k), one thread, as a
// decode step does once per generated token.
void BM_Append(benchmark::State& state, std::string name) {
  const KvFormat& f = kv_format(name);
  const KvGeometry g{kSmol.kv_heads, kSmol.hd};
  KvCacheConfig c;
  c.n_layers = kSmol.layers;
  c.n_kv_heads = kSmol.kv_heads;
  c.head_dim = kSmol.hd;
  c.n_ctx = 4096;
  c.k_format = &f;
  c.v_format = &f;
  c.rope.head_dim = kSmol.hd;
  c.rope.n_rot = kSmol.hd;
  c.sink_tokens = f.kvquant ? 1 : 0;
  std::mt19937 rng(1);
  for (int l = 0; l < kSmol.layers; ++l) {
    if (f.needs_calibration(KvRole::key)) c.k_calibration.push_back(make_cal(f, g.row(), rng));
    if (f.needs_calibration(KvRole::value)) c.v_calibration.push_back(make_cal(f, g.row(), rng));
  }
  KvCache cache(c);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> k(size_t(g.row()) * 64), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  int32_t pos = 0;
  for (auto _ : state) {
    if (cache.n_tokens() == c.n_ctx) {
      state.PauseTiming();
      cache.clear();
      pos = 0;
      state.ResumeTiming();
    }
    const int64_t row = (pos % 64) * g.row();
    cache.begin_batch(std::span<const int32_t>(&pos, 1));
    for (int l = 0; l < kSmol.layers; ++l) cache.store(l, k.data() + row, v.data() + row);
    cache.end_batch();
    ++pos;
  }
  state.counters["us/token"] = benchmark::Counter(double(state.iterations()) * 1e-6,
                                                  benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

const char* const kFormats[] = {"f16", "q8_0", "q4_0", "int4", "int4-ch-1%", "int3-ch-1%", "int2-ch-1%",
                                "nuq4-1%", "nuq3-1%", "nuq2-1%", "nuq4"};

int register_all() {
  // KVQ_BENCH_SIMD=avx2 (or scalar): cap the SIMD level every kernel dispatches
  // on, as `kvq --simd` does (e.g. DecodeAttention as an AVX2-only CPU runs it).
  if (const char* want = std::getenv("KVQ_BENCH_SIMD")) {
    const std::string w = want;
    const SimdLevel level = w == "avx512" ? SimdLevel::avx512 : w == "avx2" ? SimdLevel::avx2 : SimdLevel::scalar;
    if ((w != "avx512" && w != "avx2" && w != "scalar") || level > detected_simd_level()) {
      std::fprintf(stderr, "KVQ_BENCH_SIMD=%s: not avx512, avx2 or scalar, or above what this CPU runs\n", want);
      std::exit(2);
    }
    g_base.simd = level;
  }
  // KVQ_BENCH_HWY_TARGET=SSE4 (a Highway target name): run the portable kernels
  // at that target, e.g. to see what a CPU without AVX2 gets.
  if (const char* want = std::getenv("KVQ_BENCH_HWY_TARGET")) {
    bool found = false;
    for (int64_t t : portable_targets())
      if (std::string(hwy::TargetName(t)) == want) g_base.portable_target = t, found = true;
    if (!found) {
      std::fprintf(stderr, "KVQ_BENCH_HWY_TARGET=%s: not a Highway target this CPU runs\n", want);
      std::exit(2);
    }
  }
  for (const char* f : kFormats) {
    benchmark::RegisterBenchmark((std::string("DecodeAttention/") + f).c_str(), BM_DecodeAttention, std::string(f), kSmol)
        ->Arg(4096)->Arg(16384)->Arg(65536)->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark((std::string("DecodeAttention/") + f + kWide.suffix).c_str(), BM_DecodeAttention,
                                 std::string(f), kWide)
        ->Arg(4096)->Arg(16384)->Unit(benchmark::kMillisecond)->UseRealTime();
    struct Variant {
      const char* suffix;
      AttentionKernel kernel;
      TileDecoders decoders;
    };
    for (const Variant& v : {Variant{"", AttentionKernel::automatic, TileDecoders::automatic},
                             Variant{"/avx2", AttentionKernel::avx2, TileDecoders::automatic},
                             Variant{"/avx2-cpu", AttentionKernel::avx2, TileDecoders::avx2},
                             Variant{"/avx512", AttentionKernel::avx512, TileDecoders::automatic},
                             Variant{"/portable", AttentionKernel::portable, TileDecoders::automatic},
                             Variant{"/portable+", AttentionKernel::portable, TileDecoders::portable},
                             Variant{"/portable-codecs", AttentionKernel::portable, TileDecoders::codec},
                             Variant{"/scalar", AttentionKernel::scalar, TileDecoders::automatic}})
      benchmark::RegisterBenchmark((std::string("DecodeAttention1T/") + f + v.suffix).c_str(), BM_DecodeAttention1T,
                                   std::string(f), v.kernel, v.decoders, kSmol)
          ->Unit(benchmark::kMicrosecond);
    for (const Variant& v : {Variant{"", AttentionKernel::automatic, TileDecoders::automatic},
                             Variant{"/avx2-cpu", AttentionKernel::avx2, TileDecoders::avx2}})
      benchmark::RegisterBenchmark((std::string("DecodeAttention1T/") + f + kWide.suffix + v.suffix).c_str(),
                                   BM_DecodeAttention1T, std::string(f), v.kernel, v.decoders, kWide)
          ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark((std::string("TileDecode/") + f).c_str(), BM_TileDecode, std::string(f))
        ->Arg(1)->Arg(0)->Arg(2)->Arg(3)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark((std::string("Append/") + f).c_str(), BM_Append, std::string(f))
        ->Unit(benchmark::kMicrosecond);
  }
  return 0;
}
const int registered = register_all();

}  // namespace
}  // namespace kvq

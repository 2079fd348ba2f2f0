// Weight-kernel benchmarks: matmul at the default model's shapes (decode: one
// token, memory-bound -> bytes/s; prefill: 512 tokens, compute-bound -> FLOP/s)
// and a memory-bandwidth probe for comparison with the physical limit.
//
// Decode benchmarks rotate through enough copies of the weights (>= 128 MiB)
// that every call streams them from DRAM, as in a real forward pass where the
// whole model (~100 MB) does not fit the last-level cache.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "base/cpu.h"
#include "base/fp16.h"
#include "base/threads.h"
#include "quant/blocks.h"
#include "quant/quant.h"
#include "quant/quant_simd.h"

namespace kvq {
namespace {

using T = GgmlType;

ThreadPool& pool(int threads = 0) {
  static ThreadPool all(default_thread_count());
  static ThreadPool one(1);
  return threads == 1 ? one : all;
}

struct Aligned {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, Aligned>;
Buffer alloc(size_t bytes) {
  return Buffer(static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
}

// Weights with plausible values: quantize Gaussian rows where we can, else
// random bits with small positive scales.
Buffer make_weights(T t, int64_t rows, int64_t cols, uint64_t* row_bytes, uint32_t seed) {
  const QuantTraits* q = quant_traits(t);
  *row_bytes = uint64_t(cols / q->block_elems) * uint64_t(q->block_bytes);
  Buffer w = alloc(*row_bytes * uint64_t(rows));
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 0.05f);
  std::vector<float> x(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& v : x) v = g(rng);
    q->from_float_ref(x.data(), w.get() + uint64_t(r) * *row_bytes, cols);
  }
  return w;
}

std::vector<float> make_input(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& f : v) f = g(rng);
  return v;
}

// args: type, rows, cols, tokens, threads (0: every core). The 1-thread runs
// time CPU, so kernel speed can be read even while the machine is busy.
void BM_Matmul(benchmark::State& state) {
  const T type = T(state.range(0));
  const int64_t rows = state.range(1), cols = state.range(2), tokens = state.range(3);
  ThreadPool& tp = pool(int(state.range(4)));
  uint64_t rb = 0;
  Buffer first = make_weights(type, rows, cols, &rb, 1);
  const uint64_t wbytes = rb * uint64_t(rows);
  // Decode: enough copies to defeat the 32 MB L3 (prefill re-reads weights from cache anyway).
  const int copies = tokens == 1 ? int(std::max<uint64_t>(1, (128ull << 20) / wbytes + 1)) : 1;
  std::vector<Buffer> ws;
  ws.push_back(std::move(first));
  for (int c = 1; c < copies; ++c) {
    ws.push_back(alloc(wbytes));
    std::memcpy(ws.back().get(), ws[0].get(), wbytes);
  }
  const auto x = make_input(cols * tokens, 2);
  std::vector<float> y(size_t(rows * tokens));
  size_t i = 0;
  for (auto _ : state) {
    const WeightView w{type, rows, cols, ws[i].get(), rb};
    matmul(w, x.data(), y.data(), tokens, tp, detected_simd_level());
    benchmark::DoNotOptimize(y.data());
    i = (i + 1) % ws.size();
  }
  state.counters["weight_bytes/s"] =
      benchmark::Counter(double(wbytes) * double(state.iterations()), benchmark::Counter::kIsRate,
                         benchmark::Counter::kIs1024);
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(rows) * double(cols) * double(tokens) *
                                                    double(state.iterations()),
                                                benchmark::Counter::kIsRate);
  state.SetLabel(std::string(ggml_type_name(type)) + " " + simd_level_name(detected_simd_level()) + " threads=" +
                 std::to_string(tp.size()));
}

void MatmulArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"type", "rows", "cols", "tokens", "threads"});
  const int64_t shapes[][2] = {{576, 576}, {192, 576}, {1536, 576}, {576, 1536}};
  for (T t : {T::Q4_1, T::Q8_0})
    for (int64_t tokens : {1, 512})
      for (const auto& s : shapes) b->Args({int64_t(t), s[0], s[1], tokens, 0});
  // The tied embedding / output head.
  b->Args({int64_t(T::Q8_0), 49152, 576, 1, 0});
  b->UseRealTime();
}
BENCHMARK(BM_Matmul)->Apply(MatmulArgs);

void MatmulArgs1T(benchmark::internal::Benchmark* b) {
  b->ArgNames({"type", "rows", "cols", "tokens", "threads"});
  for (T t : {T::Q4_1, T::Q8_0}) {
    b->Args({int64_t(t), 576, 1536, 512, 1});
    b->Args({int64_t(t), 1536, 576, 512, 1});
    b->Args({int64_t(t), 1536, 576, 1, 1});
  }
}
BENCHMARK(BM_Matmul)->Apply(MatmulArgs1T);

// One decoded token's worth of layer matmuls (30 layers, all distinct weights,
// ~100 MB with the head), to compare with the generation target.
void BM_DecodeModelMatmuls(benchmark::State& state) {
  struct Mat { int64_t rows, cols; T type; };
  std::vector<Mat> mats;
  for (int l = 0; l < 30; ++l)
    for (Mat m : {Mat{576, 576, T::Q4_1}, Mat{192, 576, T::Q4_1}, Mat{192, 576, T::Q4_1}, Mat{576, 576, T::Q4_1},
                  Mat{1536, 576, T::Q4_1}, Mat{1536, 576, T::Q4_1}, Mat{576, 1536, T::Q4_1}})
      mats.push_back(m);
  mats.push_back({49152, 576, T::Q8_0});
  std::vector<Buffer> ws;
  std::vector<uint64_t> rbs;
  uint64_t total = 0;
  for (size_t i = 0; i < mats.size(); ++i) {
    uint64_t rb;
    ws.push_back(make_weights(mats[i].type, mats[i].rows, mats[i].cols, &rb, uint32_t(i)));
    rbs.push_back(rb);
    total += rb * uint64_t(mats[i].rows);
  }
  const auto x = make_input(1536, 3);
  std::vector<float> y(49152);
  for (auto _ : state)
    for (size_t i = 0; i < mats.size(); ++i) {
      const WeightView w{mats[i].type, mats[i].rows, mats[i].cols, ws[i].get(), rbs[i]};
      matmul(w, x.data(), y.data(), 1, pool(), detected_simd_level());
      benchmark::ClobberMemory();
    }
  state.counters["tokens/s"] = benchmark::Counter(double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["weight_bytes/s"] = benchmark::Counter(double(total) * double(state.iterations()),
                                                        benchmark::Counter::kIsRate, benchmark::Counter::kIs1024);
  state.SetLabel("weights=" + std::to_string(total >> 20) + "MiB threads=" + std::to_string(pool().size()));
}
BENCHMARK(BM_DecodeModelMatmuls)->UseRealTime()->Unit(benchmark::kMillisecond);

// Reads a 1 GiB buffer with 256-bit loads on range(0) threads: the ceiling
// for decode's weight streaming.
void BM_MemoryBandwidthProbe(benchmark::State& state) {
  if (detected_simd_level() < SimdLevel::avx2) {
    state.SkipWithError("needs AVX2");
    return;
  }
  const uint64_t bytes = 1ull << 30;
  Buffer buf = alloc(bytes);
  ThreadPool probe_pool(int(state.range(0)));
  // Touch every page first (on the threads that will read it).
  probe_pool.run([&](int t, int n) {
    const uint64_t chunk = bytes / uint64_t(n);
    std::memset(buf.get() + chunk * uint64_t(t), 1, chunk);
  });
  uint64_t sink = 0;
  for (auto _ : state) {
    std::vector<uint64_t> sums(size_t(probe_pool.size()));
    probe_pool.run([&](int t, int n) {
      const uint64_t chunk = bytes / uint64_t(n) / 128 * 128;
      sums[size_t(t)] = simd::avx2_read_bandwidth_probe(buf.get() + chunk * uint64_t(t), chunk);
    });
    for (uint64_t s : sums) sink += s;
  }
  benchmark::DoNotOptimize(sink);
  state.counters["read_bytes/s"] = benchmark::Counter(double(bytes) * double(state.iterations()),
                                                      benchmark::Counter::kIsRate, benchmark::Counter::kIs1024);
}
BENCHMARK(BM_MemoryBandwidthProbe)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

// Single-row kernels, cache-resident (per-call overhead and raw kernel speed).
void BM_VecDot(benchmark::State& state) {
  const T type = T(state.range(0));
  const int64_t n = state.range(1);
  const QuantTraits* q = quant_traits(type);
  uint64_t rb;
  Buffer w = make_weights(type, 1, n, &rb, 4);
  const QuantTraits* aq = quant_traits(q->vec_dot_type);
  std::vector<uint8_t> a(size_t(n / aq->block_elems) * size_t(aq->block_bytes));
  const auto x = make_input(n, 5);
  aq->from_float_ref(x.data(), a.data(), n);
  for (auto _ : state) benchmark::DoNotOptimize(vec_dot(type, n, w.get(), a.data(), detected_simd_level()));
  state.counters["weight_bytes/s"] = benchmark::Counter(double(rb) * double(state.iterations()),
                                                        benchmark::Counter::kIsRate, benchmark::Counter::kIs1024);
  state.SetLabel(std::string(ggml_type_name(type)));
}
BENCHMARK(BM_VecDot)
    ->ArgNames({"type", "n"})
    ->Args({int64_t(T::Q4_1), 1536})
    ->Args({int64_t(T::Q8_0), 1536})
    ->Args({int64_t(T::Q4_0), 1536})
    ->Args({int64_t(T::Q5_0), 1536})
    ->Args({int64_t(T::Q5_1), 1536})
    ->Args({int64_t(T::F16), 1536});

void BM_QuantizeRow(benchmark::State& state) {
  const T type = T(state.range(0));
  const int64_t n = state.range(1);
  const QuantTraits* q = quant_traits(type);
  const auto x = make_input(n, 6);
  std::vector<uint8_t> out(size_t(n / q->block_elems) * size_t(q->block_bytes));
  for (auto _ : state) {
    quantize_row(type, x.data(), out.data(), n, detected_simd_level());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * n);
  state.SetLabel(std::string(ggml_type_name(type)));
}
BENCHMARK(BM_QuantizeRow)
    ->ArgNames({"type", "n"})
    ->Args({int64_t(T::Q8_0), 1536})
    ->Args({int64_t(T::Q8_1), 1536})
    ->Args({int64_t(T::Q8_K), 1536});

// Embedding lookup: one Q8_0 row of 576 per token.
void BM_DequantizeRow(benchmark::State& state) {
  const T type = T(state.range(0));
  const int64_t n = state.range(1);
  uint64_t rb;
  Buffer w = make_weights(type, 1, n, &rb, 7);
  std::vector<float> out(static_cast<size_t>(n));
  for (auto _ : state) {
    dequantize_row(type, w.get(), out.data(), n, detected_simd_level());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * n);
  state.SetLabel(std::string(ggml_type_name(type)));
}
BENCHMARK(BM_DequantizeRow)->ArgNames({"type", "n"})->Args({int64_t(T::Q8_0), 576})->Args({int64_t(T::Q4_1), 576});

}  // namespace
}  // namespace kvq

// The fast attention path (AVX2 tile decode stages, fused decode+RoPE keys,
// values accumulated from packed codes, SIMD tile steps, split-K), and the
// portable (Highway) tile step, beside the AVX2 decoders and beside the
// portable ones ("portable+"), against the scalar reference path, through the
// model runtime with a tight bound.
//
// The model has one layer and F32 weights, so the keys and values the cache
// encodes come from the embeddings alone and are the same on both paths (no
// quantized code can flip between them), and no activation is quantized before
// a matmul: the logits differ only by how attention orders its float sums.
// Prefill in chunks (later chunks read the cached prefix), then decode, every
// format of the table, GQA group 3, head dim 32 (the packed-value and
// byte-plane paths need head_dim % 32 == 0).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "base/cpu.h"
#include "base/threads.h"
#include "formats/kv_format.h"
#include "gguf/gguf.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/kv_decode.h"
#include "kvcache/kv_cache.h"
#include "model/llama.h"
#include "runtime/model_impl.h"
#include "tiny_llama.h"

namespace kvq {
namespace {

constexpr int kEmbd = 192, kHeads = 6, kKvHeads = 2, kHeadDim = 32, kFf = 128, kVocab = 40, kCtx = 256;

gguf::File tiny_one_layer_model() {
  test::TinyLlamaSpec s;
  s.embd = kEmbd, s.n_head = kHeads, s.n_kv_head = kKvHeads, s.head_dim = kHeadDim, s.ff = kFf, s.vocab = kVocab;
  s.layers = 1, s.ctx = kCtx, s.rope_base = 10000.0f, s.untied = true, s.seed = 21;
  s.sd_norm = 0.1f, s.sd_q = s.sd_k = s.sd_v = 0.15f, s.sd_o = s.sd_gate = s.sd_up = s.sd_down = 0.1f, s.sd_output = 0.3f;
  return test::tiny_llama_gguf(s, "tiny-one-layer");
}

struct TinyRun {
  const LlamaModel& model;
  std::vector<int32_t> tokens;
  KvTensorCalibration k_cal, v_cal;
  ThreadPool pool{2};

  // Every position's logits: prefill of n_prompt tokens in chunks of 40, then
  // one token at a time.
  std::vector<float> logits(const KvFormat& f, int64_t n_prompt, const KernelSet& kernels = resolve_kernels({})) {
    KvCacheConfig cfg = model_cache_config(model.hparams(), kCtx, f.name, f.name);
    if (f.needs_calibration(KvRole::key)) cfg.k_calibration.assign(1, k_cal);
    if (f.needs_calibration(KvRole::value)) cfg.v_calibration.assign(1, v_cal);
    KvCache cache(cfg);
    LlamaScratch scratch;
    std::vector<float> out;
    auto step = [&](int64_t b0, int64_t n) {
      std::vector<int32_t> pos(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(b0 + i);
      cache.begin_batch(pos);
      model.forward(tokens.data() + b0, pos.data(), n, 0, cache, scratch, pool, kernels,
                    [&](int64_t, const float* l) { out.insert(out.end(), l, l + kVocab); });
      cache.end_batch();
    };
    for (int64_t b0 = 0; b0 < n_prompt; b0 += 40) step(b0, std::min<int64_t>(40, n_prompt - b0));
    for (int64_t i = n_prompt; i < int64_t(tokens.size()); ++i) step(i, 1);
    return out;
  }
};

TEST(AttentionPaths, OneLayerF32ModelFastEqualsScalarForEveryFormat) {
  const gguf::File file = tiny_one_layer_model();
  const LlamaModel model(file);
  TinyRun run{model, {}, {}, {}};
  std::mt19937 rng(5);
  for (int i = 0; i < 200; ++i) run.tokens.push_back(int32_t(rng() % kVocab));
  const int64_t n_prompt = 150;  // 4 chunks, then 50 decode steps

  // Key bounds inside the observed pre-RoPE range (so the 1% formats store
  // outliers), warped codebooks for the nuq formats.
  {
    KvCacheConfig cfg = model_cache_config(model.hparams(), kCtx, "f32", "f32");
    KvCache cache(cfg);
    const int row = kKvHeads * kHeadDim;
    std::vector<float> amax(size_t(row), 0.0f);
    cache.set_observer([&](int, int64_t n, const int32_t*, const float* k, const float*) {
      for (int64_t t = 0; t < n; ++t)
        for (int c = 0; c < row; ++c) amax[size_t(c)] = std::max(amax[size_t(c)], std::fabs(k[t * row + c]));
    });
    LlamaScratch scratch;
    std::vector<int32_t> pos(run.tokens.size());
    for (size_t i = 0; i < pos.size(); ++i) pos[i] = int32_t(i);
    cache.begin_batch(pos);
    model.forward(run.tokens.data(), pos.data(), int64_t(pos.size()), int64_t(pos.size()) - 1, cache, scratch, run.pool,
                  resolve_kernels({}), [](int64_t, const float*) {});
    cache.end_batch();
    for (int c = 0; c < row; ++c) {
      run.k_cal.lower.push_back(-0.8f * amax[size_t(c)]);
      run.k_cal.upper.push_back(0.8f * amax[size_t(c)]);
    }
  }

  int checked = 0;
  for (const KvFormat& f : kv_format_table()) {
    const int n_lev = f.bits > 0 && f.bits <= 8 ? 1 << f.bits : 0;
    run.k_cal.codebook.clear();
    for (int i = 0; i < n_lev; ++i) {
      const float x = -1.0f + 2.0f * float(i) / float(n_lev - 1);
      run.k_cal.codebook.push_back(x * std::fabs(x) * 0.5f + x * 0.5f);
    }
    run.v_cal.codebook = run.k_cal.codebook;
    const std::vector<float> fast = run.logits(f, n_prompt);
    // The portable (Highway) tile step at this CPU's best target, beside the AVX2
    // decoders (as on an AVX-512 CPU) and beside the portable decoders (as on a
    // CPU without AVX2: Arm, older x86).
    KernelSet portable_step;
    portable_step.attention = AttentionKernel::portable;
    const std::vector<float> portable = run.logits(f, n_prompt, resolve_kernels(portable_step));
    portable_step.decoders = TileDecoders::portable;
    const std::vector<float> portable_all = run.logits(f, n_prompt, resolve_kernels(portable_step));
    // On an AVX-512 CPU "fast" is the AVX-512 kernel and decoders: also what an
    // AVX2 CPU runs.
    std::vector<float> avx2 = fast;
    if (detected_simd_level() >= SimdLevel::avx512) avx2 = run.logits(f, n_prompt, kernels_at(SimdLevel::avx2));
    KernelSet scalar;
    scalar.scalar_attention = true;
    const std::vector<float> ref = run.logits(f, n_prompt, resolve_kernels(scalar));
    ASSERT_EQ(ref.size(), run.tokens.size() * size_t(kVocab)) << f.name;
    for (const auto& [name, got] : {std::pair<const char*, const std::vector<float>&>{"fast", fast},
                                    {"avx2", avx2},
                                    {"portable", portable},
                                    {"portable+", portable_all}}) {
      ASSERT_EQ(got.size(), ref.size()) << f.name << " " << name;
      double max_diff = 0, max_abs = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_TRUE(std::isfinite(got[i])) << f.name << " " << name << " logit " << i;
        max_diff = std::max(max_diff, std::fabs(double(got[i]) - ref[i]));
        max_abs = std::max(max_abs, std::fabs(double(ref[i])));
      }
      // Float reordering in attention (scores over <= 200 keys, split-K merges,
      // fused RoPE / value accumulation) then two matmuls: observed <= 7e-7 of the
      // largest logit (1e-5 absolute) in every format; a wrong code, scale,
      // outlier, angle or merge moves logits by 1e-3 and more.
      EXPECT_LT(max_diff, 5e-6 * max_abs) << f.name << ": max |" << name << " - scalar| " << max_diff
                                          << ", max |logit| " << max_abs;
      std::printf("%-14s max |%-8s - scalar| %.2e (max |logit| %.2e)\n", std::string(f.name).c_str(), name, max_diff,
                  max_abs);
    }
    ++checked;
  }
  EXPECT_GE(checked, 20);
}

}  // namespace
}  // namespace kvq

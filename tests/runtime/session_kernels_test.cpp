// Kernels are chosen per session (SessionParams::simd, attention_kernel), not
// per process: two sessions with different kernels, run interleaved in one
// process, each give exactly what they give when run alone.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kvq/kvq.h"
#include "test_util.h"

namespace kvq {
namespace {

constexpr int kDecodeSteps = 3;

struct GreedyRun {
  std::unique_ptr<Session> session;
  std::vector<std::vector<float>> logits;  // after the prompt, then after each decoded token
  std::vector<int32_t> generated;

  GreedyRun(const std::shared_ptr<const Model>& model, const SessionParams& p) : session(std::make_unique<Session>(model, p)) {}
  void prompt(const std::vector<int32_t>& tokens) { keep(session->eval(tokens)); }
  // Greedy: the argmax of the last logits.
  void step() {
    const std::vector<float>& last = logits.back();
    int32_t best = 0;
    for (size_t i = 1; i < last.size(); ++i)
      if (last[i] > last[size_t(best)]) best = int32_t(i);
    generated.push_back(best);
    keep(session->eval(std::vector<int32_t>{best}));
  }
  void keep(std::span<const float> l) { logits.emplace_back(l.begin(), l.end()); }
};

TEST(SessionKernels, InterleavedSessionsKeepTheirOwnKernels) {
  const std::string path = test::default_model_path();
  ASSERT_FALSE(path.empty()) << "the default model is missing: run scripts/fetch-model.sh (or set KVQ_MODEL)";
  const auto model = Model::load(path);
  const std::vector<int32_t> prompt = model->tokenize("The printing press", true);

  // Per-token 4-bit values: a format every attention kernel reads from its codes.
  SessionParams fast;
  fast.n_ctx = 64;
  fast.n_threads = 2;
  fast.cache_type_k = fast.cache_type_v = "int4";
  // The other session at the scalar level (its weight matmuls and attention
  // sum in another order than the SIMD ones; AVX2 and AVX-512 happen to give
  // the same floats here). On a CPU without SIMD kernels: the scalar attention
  // reference beside the portable kernel.
  SessionParams lower = fast;
  const std::string top = cpu_simd_level();
  lower.simd = "scalar";
  if (top == "scalar") lower.attention_kernel = "scalar";

  auto alone = [&](const SessionParams& p) {
    GreedyRun r(model, p);
    r.prompt(prompt);
    for (int i = 0; i < kDecodeSteps; ++i) r.step();
    return r;
  };
  const GreedyRun fast_alone = alone(fast), lower_alone = alone(lower);
  EXPECT_EQ(fast_alone.session->kernels().simd, cpu_simd_level());
  EXPECT_EQ(lower_alone.session->kernels().simd, lower.simd);
  if (top != "scalar") {
    EXPECT_NE(lower_alone.session->kernels().decode_attention, fast_alone.session->kernels().decode_attention);
  }
  // The two paths differ (float reordering), so equality below means each
  // session ran its own kernels.
  EXPECT_NE(fast_alone.logits, lower_alone.logits);

  GreedyRun a(model, fast), b(model, lower);
  a.prompt(prompt);
  b.prompt(prompt);
  for (int i = 0; i < kDecodeSteps; ++i) {
    b.step();
    a.step();
  }
  ASSERT_EQ(a.logits.size(), fast_alone.logits.size());
  for (size_t i = 0; i < a.logits.size(); ++i) {
    EXPECT_EQ(a.logits[i], fast_alone.logits[i]) << "fast session, step " << i;
    EXPECT_EQ(b.logits[i], lower_alone.logits[i]) << "lower session, step " << i;
  }
  EXPECT_EQ(a.generated, fast_alone.generated);
  EXPECT_EQ(b.generated, lower_alone.generated);
}

TEST(SessionKernels, BadKernelNamesAreOneLineErrors) {
  const std::string path = test::default_model_path();
  ASSERT_FALSE(path.empty()) << "the default model is missing: run scripts/fetch-model.sh (or set KVQ_MODEL)";
  const auto model = Model::load(path);
  SessionParams p;
  p.n_ctx = 64;
  p.simd = "sse9";
  EXPECT_THROW(Session(model, p), Error);
  p.simd = "auto";
  p.attention_kernel = "fastest";
  EXPECT_THROW(Session(model, p), Error);
  try {
    p.attention_kernel = "fastest";
    Session s(model, p);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fastest"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kvq

// Dumps kvq's logits for a model and a token sequence so that
// tests/python/test_forward_reference.py can compare them with an independent
// NumPy reference. Driven by environment variables (the Python test sets them):
//   KVQ_FORWARD_MODEL   GGUF path (without it the test is skipped)
//   KVQ_FORWARD_OUT     output prefix: writes PREFIX.tokens (int32) and PREFIX.logits (f32, n x vocab)
//   KVQ_FORWARD_TOKENS  file of little-endian int32 token ids, or
//   KVQ_FORWARD_TEXT    file of text, tokenized with the model's tokenizer (BOS as the model wants)
//   KVQ_FORWARD_CACHE   KV cache type for K and V (default "f32")
//   KVQ_FORWARD_SPLIT   k: evaluate tokens [0, k) then [k, n) as two calls
//   KVQ_FORWARD_DECODE  1: evaluate one token per call
//   KVQ_FORWARD_THREADS thread count (default 0 = every core)
//   KVQ_FORWARD_BATCH   n_batch (default 512)
//   KVQ_FORWARD_CTX     n_ctx (default 0 = training context)
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kvq/kvq.h"
#include "test_util.h"

namespace {

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoll(v) : fallback;
}

}  // namespace

TEST(ForwardFixture, DumpLogits) {
  const std::string model_path = env_or("KVQ_FORWARD_MODEL", "");
  if (model_path.empty()) GTEST_SKIP() << "run by tests/python/test_forward_reference.py";
  const std::string out = env_or("KVQ_FORWARD_OUT", "");
  ASSERT_FALSE(out.empty()) << "KVQ_FORWARD_OUT is not set";

  auto model = kvq::Model::load(model_path);
  std::vector<int32_t> tokens;
  if (const std::string tok_file = env_or("KVQ_FORWARD_TOKENS", ""); !tok_file.empty()) {
    const std::vector<uint8_t> bytes = kvq::test::read_file(tok_file);
    ASSERT_EQ(bytes.size() % 4, 0u) << tok_file << ": not a whole number of int32";
    tokens.resize(bytes.size() / 4);
    std::memcpy(tokens.data(), bytes.data(), bytes.size());  // little-endian host
  } else {
    const std::string text_file = env_or("KVQ_FORWARD_TEXT", "");
    ASSERT_FALSE(text_file.empty()) << "set KVQ_FORWARD_TOKENS or KVQ_FORWARD_TEXT";
    const std::vector<uint8_t> bytes = kvq::test::read_file(text_file);
    tokens = model->tokenize(std::string(bytes.begin(), bytes.end()), model->add_bos_default());
  }
  ASSERT_FALSE(tokens.empty());

  kvq::SessionParams params;
  params.cache_type_k = params.cache_type_v = env_or("KVQ_FORWARD_CACHE", "f32");
  params.n_threads = int(env_int("KVQ_FORWARD_THREADS", 0));
  params.n_batch = int(env_int("KVQ_FORWARD_BATCH", 512));
  params.n_ctx = env_int("KVQ_FORWARD_CTX", 0);
  kvq::Session session(model, params);

  const int64_t n = int64_t(tokens.size());
  const int64_t n_vocab = model->info().n_vocab;
  std::vector<float> logits(size_t(n * n_vocab), 0.0f);
  std::vector<uint8_t> seen(size_t(n), 0);
  // Evaluates tokens [b, e) as one call; indices reported are relative to b.
  auto run = [&](int64_t b, int64_t e) {
    session.eval_all(std::span<const int32_t>(tokens.data() + b, size_t(e - b)),
                     [&](int64_t i, std::span<const float> lg) {
                       ASSERT_EQ(int64_t(lg.size()), n_vocab);
                       ASSERT_TRUE(b + i >= 0 && b + i < e);
                       std::memcpy(&logits[size_t((b + i) * n_vocab)], lg.data(), lg.size_bytes());
                       seen[size_t(b + i)]++;
                     });
    ASSERT_EQ(session.n_past(), e);
  };
  const int64_t split = env_int("KVQ_FORWARD_SPLIT", 0);
  if (env_int("KVQ_FORWARD_DECODE", 0) == 1) {
    for (int64_t i = 0; i < n; ++i) run(i, i + 1);
  } else if (split > 0 && split < n) {
    run(0, split);
    run(split, n);
  } else {
    run(0, n);
  }
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[size_t(i)], 1) << "logits of token " << i << " reported " << int(seen[size_t(i)]) << " times";

  std::vector<uint8_t> tok_bytes(tokens.size() * 4), lg_bytes(logits.size() * 4);
  std::memcpy(tok_bytes.data(), tokens.data(), tok_bytes.size());
  std::memcpy(lg_bytes.data(), logits.data(), lg_bytes.size());
  kvq::test::write_file(out + ".tokens", tok_bytes);
  kvq::test::write_file(out + ".logits", lg_bytes);
}

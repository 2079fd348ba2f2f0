// A random llama-architecture GGUF with F32 weights, small enough for exact
// comparisons in tests (finite differences, one attention path against another).
#pragma once
#include <cstdint>
#include <string>

#include "gguf/gguf.h"

namespace kvq::test {

struct TinyLlamaSpec {
  int embd = 16, n_head = 4, n_kv_head = 2, head_dim = 4, ff = 24, vocab = 11, layers = 2, ctx = 64;
  float rope_base = 100.0f;
  bool untied = false;  // a separate output head (else tied to the embedding)
  uint32_t seed = 7;
  // Standard deviations of the normal draws; norm weights are 1 + sd_norm * N(0, 1).
  float sd_norm = 0.2f, sd_q = 0.6f, sd_k = 0.6f, sd_v = 0.5f, sd_o = 0.3f;
  float sd_gate = 0.4f, sd_up = 0.4f, sd_down = 0.3f, sd_output = 0.5f;
};

gguf::File tiny_llama_gguf(const TinyLlamaSpec& spec, const std::string& name = "tiny-llama");

}  // namespace kvq::test

// The `llama` architecture (LLaMA 1/2/3, SmolLM/SmolLM2, TinyLlama, Mistral
// without sliding window): hyper-parameters and weights read from GGUF, and the
// forward pass. Attention goes through the KV cache (keys handed over pre-RoPE).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/threads.h"
#include "kernels/cpu/kernel_set.h"
#include "kernels/cpu/rope.h"
#include "quant/quant.h"

namespace kvq {

namespace gguf { class File; }
class KvCache;

struct LlamaHparams {
  std::string architecture;
  int n_vocab = 0, n_ctx_train = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0;
  int head_dim = 0, n_ff = 0;
  float rms_eps = 1e-5f;
  RopeSpec rope;
  int q_dim() const { return n_head * head_dim; }
  int kv_dim() const { return n_head_kv * head_dim; }
};

struct LlamaLayer {
  std::vector<float> attn_norm, ffn_norm;
  WeightView wq, wk, wv, wo, w_gate, w_up, w_down;
};

struct LlamaWeights {
  WeightView token_embd;  // [n_vocab rows][n_embd]
  std::vector<float> output_norm;
  WeightView output;      // == token_embd when tied
  bool tied_output = false;
  std::vector<LlamaLayer> layers;
};

// Reusable activation buffers for batches of up to `capacity` tokens.
struct LlamaScratch {
  int64_t capacity = 0;
  std::vector<float> x, xn, q, k, v, attn, ff_gate, ff_up, logits;
  void reserve(const LlamaHparams& hp, int64_t n_tokens, int64_t logits_rows);
};

class LlamaModel {
 public:
  // Reads and checks hyper-parameters and every tensor's type and shape.
  // Throws kvq::Error("PATH: ...") naming what is missing or wrong.
  explicit LlamaModel(const gguf::File& file);

  const LlamaHparams& hparams() const { return hp_; }
  const LlamaWeights& weights() const { return w_; }

  // Runs tokens[0..n) at positions[0..n) (already begun as a batch in `cache`)
  // and calls on_logits(i, logits) for every i >= first_logit, in order, with
  // the kernels of `kernels` (resolved). Throws on non-finite activations,
  // naming the layer.
  void forward(const int32_t* tokens, const int32_t* positions, int64_t n, int64_t first_logit,
               KvCache& cache, LlamaScratch& scratch, ThreadPool& pool, const KernelSet& kernels,
               FunctionRef<void(int64_t, const float*)> on_logits) const;

 private:
  LlamaHparams hp_;
  LlamaWeights w_;
  Rope rope_;
};

}  // namespace kvq

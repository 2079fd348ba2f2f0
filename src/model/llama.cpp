#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "base/error.h"
#include "base/fp16.h"
#include "gguf/gguf.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/ops.h"
#include "kvcache/kv_cache.h"

namespace kvq {

namespace {

constexpr int kMaxHeadDim = 512;
constexpr int kLogitsChunk = 32;  // output-head rows computed at once (bounds logits memory)

struct Loader {
  const gguf::File& f;
  std::string arch;

  [[noreturn]] void bad(const std::string& what) const { fail("{}: {}", f.path(), what); }

  int64_t required_int(const std::string& key) const {
    auto v = f.get_int(arch + "." + key);
    if (!v) bad("missing metadata '" + arch + "." + key + "'");
    return *v;
  }
  int64_t optional_int(const std::string& key, int64_t fallback) const {
    return f.get_int(arch + "." + key).value_or(fallback);
  }
  double optional_float(const std::string& key, double fallback) const {
    return f.get_float(arch + "." + key).value_or(fallback);
  }
  int positive(const std::string& key, int64_t v, int64_t max) const {
    if (v <= 0 || v > max) bad(fmt::format("metadata '{}.{}' = {} is out of range 1..{}", arch, key, v, max));
    return int(v);
  }

  const gguf::TensorInfo& tensor(const std::string& name, std::vector<int64_t> dims, bool optional = false) const {
    const gguf::TensorInfo* t = f.find_tensor(name);
    if (!t) {
      if (optional) {
        static const gguf::TensorInfo none{};
        return none;
      }
      bad("missing tensor '" + name + "'");
    }
    if (t->dims != dims) {
      std::string got, want;
      for (auto d : t->dims) got += (got.empty() ? "" : "x") + std::to_string(d);
      for (auto d : dims) want += (want.empty() ? "" : "x") + std::to_string(d);
      bad(fmt::format("tensor '{}' has shape {}, expected {}", name, got, want));
    }
    return *t;
  }

  WeightView matrix(const std::string& name, int64_t rows, int64_t cols) const {
    const gguf::TensorInfo& t = tensor(name, {cols, rows});
    const QuantTraits* traits = quant_traits(t.type);
    if (!traits) bad(fmt::format("tensor '{}' has type {}, which kvq cannot compute with", name, ggml_type_name(t.type)));
    return WeightView{t.type, rows, cols, t.data, t.n_bytes / uint64_t(rows)};
  }

  std::vector<float> vector(const std::string& name, int64_t n) const {
    const gguf::TensorInfo& t = tensor(name, {n});
    std::vector<float> out(static_cast<size_t>(n));
    const QuantTraits* traits = quant_traits(t.type);
    if (!traits || n % traits->block_elems != 0)
      bad(fmt::format("tensor '{}' has unsupported type {}", name, ggml_type_name(t.type)));
    traits->to_float_ref(t.data, out.data(), n);
    for (float x : out)
      if (!std::isfinite(x)) bad(fmt::format("tensor '{}' holds a non-finite value", name));
    return out;
  }
};

}  // namespace

void LlamaScratch::reserve(const LlamaHparams& hp, int64_t n, int64_t logits_rows) {
  auto grow = [](std::vector<float>& v, int64_t size) {
    if (int64_t(v.size()) < size) v.resize(size_t(size));
  };
  grow(x, n * hp.n_embd);
  grow(xn, n * std::max(hp.n_embd, hp.q_dim()));
  grow(q, n * hp.q_dim());
  grow(k, n * hp.kv_dim());
  grow(v, n * hp.kv_dim());
  grow(attn, n * hp.q_dim());
  grow(ff_gate, n * hp.n_ff);
  grow(ff_up, n * hp.n_ff);
  grow(logits, std::min<int64_t>(logits_rows, kLogitsChunk) * int64_t(hp.n_vocab));
  capacity = std::max(capacity, n);
}

LlamaModel::LlamaModel(const gguf::File& f) {
  auto arch = f.get_string("general.architecture");
  if (!arch) fail("{}: missing metadata 'general.architecture'", f.path());
  if (*arch != "llama")
    fail("{}: unsupported architecture '{}' (supported: llama)", f.path(), *arch);
  Loader ld{f, std::string(*arch)};
  hp_.architecture = ld.arch;
  if (ld.optional_int("expert_count", 0) > 0) ld.bad("mixture-of-experts llama models are not supported");

  hp_.n_embd = ld.positive("embedding_length", ld.required_int("embedding_length"), 1 << 16);
  hp_.n_layer = ld.positive("block_count", ld.required_int("block_count"), 1024);
  hp_.n_ff = ld.positive("feed_forward_length", ld.required_int("feed_forward_length"), 1 << 18);
  hp_.n_head = ld.positive("attention.head_count", ld.required_int("attention.head_count"), 1024);
  hp_.n_head_kv = ld.positive("attention.head_count_kv", ld.optional_int("attention.head_count_kv", hp_.n_head), 1024);
  hp_.n_ctx_train = ld.positive("context_length", ld.optional_int("context_length", 2048), 1 << 24);
  if (hp_.n_head % hp_.n_head_kv != 0)
    ld.bad(fmt::format("{} attention heads are not a multiple of {} KV heads", hp_.n_head, hp_.n_head_kv));
  const int64_t default_hd = hp_.n_embd / hp_.n_head;
  hp_.head_dim = ld.positive("attention.key_length", ld.optional_int("attention.key_length", default_hd), kMaxHeadDim);
  if (ld.optional_int("attention.value_length", hp_.head_dim) != hp_.head_dim)
    ld.bad("different key and value head sizes are not supported");
  hp_.rms_eps = float(ld.optional_float("attention.layer_norm_rms_epsilon", 1e-5));
  if (!(hp_.rms_eps > 0 && hp_.rms_eps < 1)) ld.bad(fmt::format("RMS norm epsilon {} is out of range", hp_.rms_eps));

  RopeSpec& rope = hp_.rope;
  rope.head_dim = hp_.head_dim;
  rope.n_rot = ld.positive("rope.dimension_count", ld.optional_int("rope.dimension_count", hp_.head_dim), hp_.head_dim);
  rope.freq_base = float(ld.optional_float("rope.freq_base", 10000.0));
  rope.neox = false;  // llama GGUFs pair dims (2i, 2i+1)
  if (auto type = f.get_string(ld.arch + ".rope.scaling.type")) {
    if (*type == "linear") {
      const double factor = ld.optional_float("rope.scaling.factor", 1.0);
      if (!(factor > 0)) ld.bad("rope scaling factor must be positive");
      rope.freq_scale = float(1.0 / factor);
    } else if (*type != "none") {
      ld.bad(fmt::format("unsupported rope scaling type '{}' (supported: none, linear)", *type));
    }
  } else if (auto scale = f.get_float(ld.arch + ".rope.scale_linear")) {
    if (!(*scale > 0)) ld.bad("rope.scale_linear must be positive");
    rope.freq_scale = float(1.0 / *scale);
  }
  if (f.find_tensor("rope_freqs.weight")) rope.freq_factors = ld.vector("rope_freqs.weight", rope.n_rot / 2);

  const gguf::TensorInfo* embd = f.find_tensor("token_embd.weight");
  if (!embd) ld.bad("missing tensor 'token_embd.weight'");
  if (embd->dims.size() != 2) ld.bad("tensor 'token_embd.weight' is not a matrix");
  hp_.n_vocab = ld.positive("vocab_size", ld.optional_int("vocab_size", embd->dims[1]), 1 << 22);

  const int64_t d = hp_.n_embd;
  w_.token_embd = ld.matrix("token_embd.weight", hp_.n_vocab, d);
  w_.output_norm = ld.vector("output_norm.weight", d);
  if (f.find_tensor("output.weight")) {
    w_.output = ld.matrix("output.weight", hp_.n_vocab, d);
  } else {
    w_.output = w_.token_embd;
    w_.tied_output = true;
  }
  w_.layers.resize(size_t(hp_.n_layer));
  for (int i = 0; i < hp_.n_layer; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LlamaLayer& L = w_.layers[size_t(i)];
    L.attn_norm = ld.vector(p + "attn_norm.weight", d);
    L.wq = ld.matrix(p + "attn_q.weight", hp_.q_dim(), d);
    L.wk = ld.matrix(p + "attn_k.weight", hp_.kv_dim(), d);
    L.wv = ld.matrix(p + "attn_v.weight", hp_.kv_dim(), d);
    L.wo = ld.matrix(p + "attn_output.weight", d, hp_.q_dim());
    L.ffn_norm = ld.vector(p + "ffn_norm.weight", d);
    L.w_gate = ld.matrix(p + "ffn_gate.weight", hp_.n_ff, d);
    L.w_up = ld.matrix(p + "ffn_up.weight", hp_.n_ff, d);
    L.w_down = ld.matrix(p + "ffn_down.weight", d, hp_.n_ff);
    if (f.find_tensor(p + "attn_q.bias") || f.find_tensor(p + "attn_k.bias"))
      ld.bad("attention biases are not supported by the llama architecture implementation");
  }
  rope_ = Rope(rope);
}

void LlamaModel::forward(const int32_t* tokens, const int32_t* positions, int64_t n, int64_t first_logit,
                         KvCache& cache, LlamaScratch& s, ThreadPool& pool, const KernelSet& kernels,
                         FunctionRef<void(int64_t, const float*)> on_logits) const {
  const LlamaHparams& hp = hp_;
  const SimdLevel simd = kernels.simd;
  const int d = hp.n_embd;
  s.reserve(hp, n, n - first_logit);
  float* x = s.x.data();

  // Embedding lookup: one dequantized row per token.
  pool.parallel_for(n, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const auto* row = static_cast<const uint8_t*>(w_.token_embd.data) + uint64_t(tokens[i]) * w_.token_embd.row_bytes;
      dequantize_row(w_.token_embd.type, row, x + i * d, d, simd);
    }
  });

  // RoPE angles once per batch, shared by every layer's queries.
  const int half = hp.rope.n_rot / 2;
  std::vector<float> cos_t(size_t(n) * half), sin_t(size_t(n) * half);
  for (int64_t i = 0; i < n; ++i) rope_.angles(positions[i], &cos_t[size_t(i) * half], &sin_t[size_t(i) * half]);

  const float attn_scale = 1.0f / std::sqrt(float(hp.head_dim));
  for (int li = 0; li < hp.n_layer; ++li) {
    const LlamaLayer& L = w_.layers[size_t(li)];
    // Attention block.
    rmsnorm(x, L.attn_norm.data(), s.xn.data(), n, d, hp.rms_eps);
    const MatmulOutput qkv[3] = {{&L.wq, s.q.data()}, {&L.wk, s.k.data()}, {&L.wv, s.v.data()}};
    matmul_shared_input(qkv, 3, s.xn.data(), n, pool, simd);
    for (int64_t i = 0; i < n; ++i)
      for (int h = 0; h < hp.n_head; ++h)
        rope_.rotate(s.q.data() + (i * hp.n_head + h) * hp.head_dim, &cos_t[size_t(i) * half], &sin_t[size_t(i) * half]);
    cache.store(li, s.k.data(), s.v.data());  // keys pre-RoPE; the cache rotates if its format wants
    const AttentionArgs args{s.q.data(), n, hp.n_head, positions, attn_scale, cache.view(li), s.attn.data(), kernels};
    attention(args, pool);
    matmul(L.wo, s.attn.data(), s.xn.data(), n, pool, simd);
    add_inplace(x, s.xn.data(), n * d);
    // Feed-forward block (SwiGLU).
    rmsnorm(x, L.ffn_norm.data(), s.xn.data(), n, d, hp.rms_eps);
    const MatmulOutput gate_up[2] = {{&L.w_gate, s.ff_gate.data()}, {&L.w_up, s.ff_up.data()}};
    matmul_shared_input(gate_up, 2, s.xn.data(), n, pool, simd);
    silu_mul(s.ff_gate.data(), s.ff_up.data(), n * hp.n_ff);
    matmul(L.w_down, s.ff_gate.data(), s.xn.data(), n, pool, simd);
    add_inplace(x, s.xn.data(), n * d);
    if (int64_t bad = find_non_finite(x, n * d); bad >= 0)
      fail("non-finite activation (NaN or Inf) after layer {} at token {} of the batch", li, bad / d);
  }

  // Output head, in chunks so logits memory stays bounded.
  for (int64_t c0 = first_logit; c0 < n; c0 += kLogitsChunk) {
    const int64_t rows = std::min<int64_t>(kLogitsChunk, n - c0);
    rmsnorm(x + c0 * d, w_.output_norm.data(), s.xn.data(), rows, d, hp.rms_eps);
    matmul(w_.output, s.xn.data(), s.logits.data(), rows, pool, simd);
    for (int64_t r = 0; r < rows; ++r) {
      const float* lg = s.logits.data() + r * hp.n_vocab;
      if (find_non_finite(lg, hp.n_vocab) >= 0) fail("non-finite logits at token {} of the batch", c0 + r);
      on_logits(c0 + r, lg);
    }
  }
}

}  // namespace kvq

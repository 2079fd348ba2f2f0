#include "tiny_llama.h"

#include <random>
#include <vector>

namespace kvq::test {

gguf::File tiny_llama_gguf(const TinyLlamaSpec& s, const std::string& name) {
  std::mt19937 rng(s.seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  gguf::Writer w;
  w.add_string("general.architecture", "llama");
  w.add_uint32("llama.embedding_length", uint32_t(s.embd));
  w.add_uint32("llama.block_count", uint32_t(s.layers));
  w.add_uint32("llama.feed_forward_length", uint32_t(s.ff));
  w.add_uint32("llama.attention.head_count", uint32_t(s.n_head));
  w.add_uint32("llama.attention.head_count_kv", uint32_t(s.n_kv_head));
  w.add_uint32("llama.context_length", uint32_t(s.ctx));
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.add_float32("llama.rope.freq_base", s.rope_base);
  auto add = [&](const std::string& tensor, std::vector<int64_t> dims, float sd, float mean = 0.0f) {
    int64_t count = 1;
    for (auto x : dims) count *= x;
    std::vector<float> v(static_cast<size_t>(count));
    for (float& x : v) x = mean + sd * nd(rng);
    w.add_tensor(tensor, GgmlType::F32, dims, v.data(), v.size() * 4);
  };
  const int d = s.embd, q_dim = s.n_head * s.head_dim, kv_dim = s.n_kv_head * s.head_dim;
  add("token_embd.weight", {d, s.vocab}, 1.0f);
  add("output_norm.weight", {d}, s.sd_norm, 1.0f);
  if (s.untied) add("output.weight", {d, s.vocab}, s.sd_output);
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    add(p + "attn_norm.weight", {d}, s.sd_norm, 1.0f);
    add(p + "attn_q.weight", {d, q_dim}, s.sd_q);
    add(p + "attn_k.weight", {d, kv_dim}, s.sd_k);
    add(p + "attn_v.weight", {d, kv_dim}, s.sd_v);
    add(p + "attn_output.weight", {q_dim, d}, s.sd_o);
    add(p + "ffn_norm.weight", {d}, s.sd_norm, 1.0f);
    add(p + "ffn_gate.weight", {d, s.ff}, s.sd_gate);
    add(p + "ffn_up.weight", {d, s.ff}, s.sd_up);
    add(p + "ffn_down.weight", {s.ff, d}, s.sd_down);
  }
  return gguf::File::from_bytes(w.to_bytes(), name);
}

}  // namespace kvq::test

#include <cmath>
#include <cstring>

#include "base/error.h"
#include "formats/kv_format.h"
#include "runtime/model_impl.h"

namespace kvq {

std::string_view version() { return "0.1.0"; }

namespace {

std::string printable(const gguf::Value& v) {
  using T = gguf::ValueType;
  switch (v.type()) {
    case T::STRING: {
      std::string s(*v.as_string());
      if (s.size() > 200) s = s.substr(0, 200) + "... (" + std::to_string(s.size()) + " bytes)";
      for (char& c : s)
        if (c == '\n') c = ' ';
      return s;
    }
    case T::BOOL: return *v.as_bool() ? "true" : "false";
    case T::FLOAT32:
    case T::FLOAT64: return fmt::format("{:g}", *v.as_float());
    case T::ARRAY: {
      std::string s = fmt::format("[{} x {}]", v.array_size(), gguf::value_type_name(v.array_type()));
      return s;
    }
    default: return std::to_string(*v.as_int());
  }
}

// Four independent multiply-xorshift lanes over 8-byte words (the lanes keep the
// multiplier latency off the critical path: ~100 MB take a few tens of ms).
class Fingerprint {
 public:
  void bytes(const uint8_t* p, uint64_t n) {
    uint64_t i = 0;
    for (; i + 32 <= n; i += 32)
      for (int l = 0; l < 4; ++l) mix(lane_[l], load(p + i + 8 * l));
    for (; i + 8 <= n; i += 8) mix(lane_[0], load(p + i));
    uint64_t tail = 0;
    if (n > i) std::memcpy(&tail, p + i, size_t(n - i));
    mix(lane_[1], tail ^ (n << 56));
    length_ += n;
  }
  void word(uint64_t w) { mix(lane_[2], w); }
  std::string hex() const {
    uint64_t h = length_;
    for (uint64_t l : lane_) {
      h = (h ^ l) * 0x9E3779B97F4A7C15ull;
      h ^= h >> 29;
    }
    h ^= h >> 32;
    return fmt::format("{:016x}", h);
  }

 private:
  static uint64_t load(const uint8_t* p) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    return w;
  }
  static void mix(uint64_t& h, uint64_t w) {
    h = (h ^ w) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
  }
  uint64_t lane_[4] = {1, 2, 3, 4};
  uint64_t length_ = 0;
};

std::string model_fingerprint(const gguf::File& f) {
  Fingerprint fp;
  for (const auto& t : f.tensors()) {
    fp.bytes(reinterpret_cast<const uint8_t*>(t.name.data()), t.name.size());
    fp.word(uint64_t(t.type));
    for (int64_t d : t.dims) fp.word(uint64_t(d));
    fp.word(t.offset);
    fp.bytes(t.data, t.n_bytes);
  }
  return fp.hex();
}

ModelInfo make_info(const gguf::File& f, const LlamaModel& m, const Tokenizer& tok) {
  ModelInfo info;
  const LlamaHparams& hp = m.hparams();
  info.path = f.path();
  info.architecture = hp.architecture;
  info.name = std::string(f.get_string("general.name").value_or(""));
  info.gguf_version = f.version();
  info.fingerprint = model_fingerprint(f);
  for (const auto& t : f.tensors()) {
    info.n_params += t.n_elements();
    info.weight_bytes += t.n_bytes;
    info.tensors.push_back({std::string(t.name), std::string(ggml_type_name(t.type)), t.dims, t.n_bytes});
  }
  for (const auto& kv : f.metadata()) info.metadata.emplace_back(std::string(kv.key), printable(kv.value));
  info.n_vocab = hp.n_vocab;
  info.n_ctx_train = hp.n_ctx_train;
  info.n_embd = hp.n_embd;
  info.n_layer = hp.n_layer;
  info.n_head = hp.n_head;
  info.n_head_kv = hp.n_head_kv;
  info.head_dim = hp.head_dim;
  info.n_ff = hp.n_ff;
  info.n_rot = hp.rope.n_rot;
  info.rope_freq_base = hp.rope.freq_base;
  info.rope_freq_scale = hp.rope.freq_scale;
  info.rope_neox = hp.rope.neox;
  info.rms_eps = hp.rms_eps;
  info.tied_output = m.weights().tied_output;
  info.tokenizer_model = std::string(tok.model_name());
  info.tokenizer_pre = std::string(tok.pre_name());
  return info;
}

}  // namespace

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;

std::shared_ptr<const Model> Model::load(const std::string& path) {
  gguf::File file = gguf::File::open(path);
  LlamaModel llama(file);
  Tokenizer tokenizer = Tokenizer::from_gguf(file);
  if (tokenizer.n_vocab() != llama.hparams().n_vocab)
    fail("{}: tokenizer has {} tokens but the model's vocabulary is {}", path, tokenizer.n_vocab(),
         llama.hparams().n_vocab);
  ModelInfo info = make_info(file, llama, tokenizer);
  std::string tmpl(file.get_string("tokenizer.chat_template").value_or(""));
  auto impl = std::unique_ptr<Impl>(new Impl{std::move(file), std::move(llama), std::move(tokenizer), std::move(info),
                                             std::move(tmpl)});
  return std::shared_ptr<const Model>(new Model(std::move(impl)));
}

const ModelInfo& Model::info() const { return impl_->info; }

std::vector<int32_t> Model::tokenize(std::string_view text, bool add_bos, bool parse_special) const {
  return impl_->tokenizer.encode(text, add_bos, parse_special);
}
std::string Model::token_bytes(int32_t id) const { return impl_->tokenizer.token_bytes(id); }
std::string Model::detokenize(std::span<const int32_t> ids) const {
  return impl_->tokenizer.decode(std::vector<int32_t>(ids.begin(), ids.end()));
}
bool Model::add_bos_default() const { return impl_->tokenizer.add_bos_default(); }
int32_t Model::bos_id() const { return impl_->tokenizer.bos_id(); }
bool Model::is_end_of_generation(int32_t id) const { return impl_->tokenizer.is_end_of_generation(id); }

std::string Model::apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt) const {
  const std::string& t = impl_->chat_template;
  const Tokenizer& tok = impl_->tokenizer;
  std::string out;
  if (t.find("<|im_start|>") != std::string::npos || (t.empty() && tok.find_token("<|im_start|>"))) {
    // ChatML. Some templates (SmolLM2's) insert a default system prompt when the
    // conversation has none: take it from the template text itself.
    if (!messages.empty() && messages[0].role != "system") {
      const std::string open = "<|im_start|>system\n";
      size_t a = t.find(open);
      if (a != std::string::npos && t.find("messages[0]['role'] != 'system'") != std::string::npos) {
        a += open.size();
        const size_t b = t.find("<|im_end|>", a);
        if (b != std::string::npos) out += open + t.substr(a, b - a) + "<|im_end|>\n";
      }
    }
    for (const auto& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }
  if (t.find("<|start_header_id|>") != std::string::npos) {  // Llama 3
    // BOS comes from the tokenizer (add_bos), not from the text.
    for (const auto& m : messages)
      out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + m.content + "<|eot_id|>";
    if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
    return out;
  }
  if (t.find("[INST]") != std::string::npos) {  // Llama 2 / Mistral
    std::string system;
    for (const auto& m : messages) {
      if (m.role == "system") {
        system = m.content;
      } else if (m.role == "user") {
        out += std::string(out.empty() ? "" : "<s>") + "[INST] " + (system.empty() ? "" : "<<SYS>>\n" + system + "\n<</SYS>>\n\n") + m.content + " [/INST]";
        system.clear();
      } else {
        out += " " + m.content + " </s>";
      }
    }
    return out;
  }
  fail("{}: the model has no chat template kvq understands (supported: ChatML, Llama 3, Llama 2)", impl_->info.path);
}

std::vector<KvFormatInfo> kv_formats(int n_kv_heads, int head_dim) {
  if (n_kv_heads <= 0 || head_dim <= 0) fail("kv_formats: invalid geometry {} x {}", n_kv_heads, head_dim);
  const KvGeometry g{n_kv_heads, head_dim};
  std::vector<KvFormatInfo> out;
  for (const auto& f : kv_format_table()) {
    const double bk = kv_bits_per_element(f, KvRole::key, g), bv = kv_bits_per_element(f, KvRole::value, g);
    out.push_back({std::string(f.name), (bk + bv) / 2, bk, bv, f.keys_pre_rope, f.needs_calibration(KvRole::key) || f.needs_calibration(KvRole::value), f.kvquant, std::string(f.description)});
  }
  return out;
}

}  // namespace kvq

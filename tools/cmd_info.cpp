// kvq info: what is in a GGUF file and what its KV cache costs in each format.
#include <fmt/format.h>

#include <iterator>
#include <map>

#include "common.h"

namespace kvq::cli {
namespace {

struct InfoOptions {
  std::string model;
  int64_t n_ctx = 0;  // 0: training context
  std::string type_k = "f16", type_v = "f16";
  std::string simd = "auto";
  bool tensors = false;
  bool json = false;
};

// Metadata values such as the vocabulary are huge: show the start and the size.
std::string shorten(const std::string& value, size_t max_chars) {
  if (value.size() <= max_chars) return value;
  size_t cut = max_chars;
  while (cut > 0 && (static_cast<unsigned char>(value[cut]) & 0xC0) == 0x80) --cut;  // keep UTF-8 whole
  return fmt::format("{}... ({} chars)", value.substr(0, cut), value.size());
}

std::string dims_string(const std::vector<int64_t>& dims) {
  std::string s;
  for (int64_t d : dims) s += (s.empty() ? "" : " x ") + std::to_string(d);
  return s;
}

// What a cache of these formats really holds at ctx tokens (pages, side data, sink).
KvStats kv_at(const Model& model, const std::string& type_k, const std::string& type_v, int64_t ctx) {
  SessionParams sp;
  sp.n_ctx = ctx;
  sp.cache_type_k = type_k;
  sp.cache_type_v = type_v;
  return kv_memory_estimate(model, sp, ctx);
}

struct Lines {
  std::string text;
  template <class... A>
  void add(fmt::format_string<A...> f, A&&... a) {
    fmt::format_to(std::back_inserter(text), f, std::forward<A>(a)...);
    text += '\n';
  }
};

struct TypeSummary {
  int64_t count = 0, elements = 0;
  uint64_t bytes = 0;
};

int info(const InfoOptions& o) {
  auto model = load_model(o.model);
  const ModelInfo& m = model->info();
  const int64_t ctx = o.n_ctx > 0 ? o.n_ctx : (m.n_ctx_train > 0 ? m.n_ctx_train : 4096);
  const auto formats = kv_formats(m.n_head_kv, m.head_dim);

  std::map<std::string, TypeSummary> by_type;
  for (const auto& t : m.tensors) {
    auto& s = by_type[t.type];
    ++s.count;
    int64_t n = 1;
    for (int64_t d : t.dims) n *= d;
    s.elements += n;
    s.bytes += t.bytes;
  }
  const KvFormatInfo* fk = find_kv_format(o.type_k);
  const KvFormatInfo* fv = find_kv_format(o.type_v);
  const uint64_t selected_kv = fk && fv ? kv_at(*model, o.type_k, o.type_v, ctx).bytes() : 0;
  // The attention kernel decode runs on this CPU for each value format (it
  // depends on the SIMD level, the head size and whether values are read
  // from their codes).
  auto decode_kernel = [&](const std::string& type) {
    SessionParams sp;
    sp.simd = o.simd;
    sp.cache_type_v = type;
    return kernel_info(*model, sp).decode_attention;
  };

  if (o.json) {
    nlohmann::json meta = nlohmann::json::object();
    for (const auto& [k, v] : m.metadata) meta[k] = shorten(v, 400);
    nlohmann::json types = nlohmann::json::object();
    for (const auto& [name, s] : by_type)
      types[name] = {{"tensors", s.count}, {"elements", s.elements}, {"bytes", s.bytes}};
    nlohmann::json kv = nlohmann::json::array();
    for (const auto& f : formats) {
      const KvStats st = kv_at(*model, f.name, f.name, ctx);
      kv.push_back({{"type", f.name},
                    {"bits_per_element", f.bits_per_element},
                    {"bits_per_element_k", f.bits_per_element_k},
                    {"bits_per_element_v", f.bits_per_element_v},
                    {"pre_rope", f.pre_rope},
                    {"needs_calibration", f.needs_calibration},
                    {"description", f.description},
                    {"sink_tokens", st.sink_tokens},
                    {"bytes", st.bytes()},
                    {"bytes_k", st.bytes_k},
                    {"bytes_v", st.bytes_v},
                    {"bytes_codes", st.bytes_codes},
                    {"bytes_scales", st.bytes_scales},
                    {"bytes_outliers", st.bytes_outliers},
                    {"bytes_full_precision", st.bytes_full_precision},
                    {"bytes_calibration", st.bytes_calibration},
                    {"bytes_positions", st.bytes_positions},
                    {"bytes_per_token", double(st.bytes()) / double(ctx)},
                    {"decode_attention_kernel", decode_kernel(f.name)}});
    }
    nlohmann::json j = {
        {"path", m.path},
        {"name", m.name},
        {"architecture", m.architecture},
        {"gguf_version", m.gguf_version},
        {"n_params", m.n_params},
        {"weight_bytes", m.weight_bytes},
        {"hparams",
         {{"n_vocab", m.n_vocab}, {"n_ctx_train", m.n_ctx_train}, {"n_embd", m.n_embd}, {"n_layer", m.n_layer},
          {"n_head", m.n_head}, {"n_head_kv", m.n_head_kv}, {"head_dim", m.head_dim}, {"n_ff", m.n_ff},
          {"n_rot", m.n_rot}, {"rope_freq_base", m.rope_freq_base}, {"rope_freq_scale", m.rope_freq_scale},
          {"rope_neox", m.rope_neox}, {"rms_eps", m.rms_eps}, {"tied_output", m.tied_output}}},
        {"tokenizer", {{"model", m.tokenizer_model}, {"pre", m.tokenizer_pre}, {"add_bos", model->add_bos_default()},
                       {"bos_id", model->bos_id()}}},
        {"metadata", meta},
        {"tensor_types", types},
        {"n_tensors", m.tensors.size()},
        {"simd", kernel_info(*model, SessionParams{.simd = o.simd}).simd},
        {"kv_cache", {{"ctx", ctx}, {"type_k", o.type_k}, {"type_v", o.type_v},
                      {"bytes", selected_kv}, {"formats", kv}}},
    };
    if (o.tensors) {
      nlohmann::json list = nlohmann::json::array();
      for (const auto& t : m.tensors) list.push_back({{"name", t.name}, {"type", t.type}, {"dims", t.dims}, {"bytes", t.bytes}});
      j["tensors"] = list;
    }
    write_stdout(dump_json(j) + "\n");
    return 0;
  }

  Lines out;
  auto line = [&out]<class... A>(fmt::format_string<A...> f, A&&... a) { out.add(f, std::forward<A>(a)...); };
  line("model:        {}", m.path);
  line("name:         {}", m.name.empty() ? "(none)" : m.name);
  line("architecture: {}   (GGUF v{})", m.architecture, m.gguf_version);
  line("parameters:   {} ({})", m.n_params, format_count(m.n_params));
  line("weights:      {} ({:.2f} bits per parameter)", format_bytes(m.weight_bytes),
       m.n_params > 0 ? 8.0 * double(m.weight_bytes) / double(m.n_params) : 0.0);
  line("");
  line("hyper-parameters:");
  line("  n_vocab {}   n_ctx_train {}   n_embd {}   n_ff {}", m.n_vocab, m.n_ctx_train, m.n_embd, m.n_ff);
  line("  n_layer {}   n_head {}   n_head_kv {} (GQA {}:1)   head_dim {}", m.n_layer, m.n_head, m.n_head_kv,
       m.n_head_kv > 0 ? m.n_head / m.n_head_kv : 0, m.head_dim);
  line("  RoPE: n_rot {}, base {}, scale {}, pairing {}", m.n_rot, m.rope_freq_base, m.rope_freq_scale,
       m.rope_neox ? "neox (i, i+n_rot/2)" : "normal (2i, 2i+1)");
  line("  rms_eps {}   output head {}", m.rms_eps, m.tied_output ? "tied to the token embedding" : "separate");
  line("  tokenizer {} (pre: {}), add BOS {}, BOS id {}", m.tokenizer_model, m.tokenizer_pre.empty() ? "-" : m.tokenizer_pre,
       model->add_bos_default() ? "yes" : "no", model->bos_id());
  line("");
  line("KV cache at {} tokens (K and V, all {} layers; bytes as allocated: pages, scales, outliers,", ctx,
       m.n_layer);
  line("sink token for KVQuant formats, per-layer calibration constants):");
  line("  {:<14} {:>6} {:>6} {:>6} {:>12} {:>11}  {}", "type", "bits", "K", "V", "total", "per token", "description");
  for (const auto& f : formats) {
    const KvStats st = kv_at(*model, f.name, f.name, ctx);
    line("  {:<14} {:>6.3f} {:>6.3f} {:>6.3f} {:>12} {:>11}  {}", f.name, f.bits_per_element, f.bits_per_element_k,
         f.bits_per_element_v, format_bytes(st.bytes()), format_bytes(uint64_t(double(st.bytes()) / double(ctx))),
         f.description);
  }
  line("  selected: K {} + V {} = {}", o.type_k, o.type_v, format_bytes(selected_kv));
  std::map<std::string, std::string> kernels;  // kernel -> the formats that decode with it
  for (const auto& f : formats) {
    std::string& list = kernels[decode_kernel(f.name)];
    list += (list.empty() ? "" : ", ") + f.name;
  }
  line("decode attention on this CPU (SIMD level {}):", kernel_info(*model, SessionParams{.simd = o.simd}).simd);
  for (const auto& [kernel, list] : kernels)
    line("  {} kernel: {}", kernel, kernels.size() == 1 ? std::string("every format") : list);
  line("");
  line("tensors: {}", m.tensors.size());
  if (o.tensors) {
    size_t w = 4;
    for (const auto& t : m.tensors) w = std::max(w, t.name.size());
    line("  {:<{}} {:<6} {:<24} {:>12}", "name", w, "type", "dims", "bytes");
    for (const auto& t : m.tensors) line("  {:<{}} {:<6} {:<24} {:>12}", t.name, w, t.type, dims_string(t.dims), t.bytes);
  } else {
    line("  {:<6} {:>7} {:>14} {:>12}", "type", "count", "elements", "bytes");
    for (const auto& [name, s] : by_type)
      line("  {:<6} {:>7} {:>14} {:>12}", name, s.count, s.elements, format_bytes(s.bytes));
    line("  (--tensors lists every tensor)");
  }
  line("");
  line("metadata: {} keys", m.metadata.size());
  for (const auto& [k, v] : m.metadata) line("  {} = {}", k, shorten(v, 100));
  write_stdout(out.text);
  return 0;
}

}  // namespace

Command register_info(CLI::App& app) {
  auto o = std::make_shared<InfoOptions>();
  CLI::App* sub = app.add_subcommand("info", "model metadata, tensors, and KV cache memory per format");
  sub->footer(
      "Examples:\n"
      "  kvq info\n"
      "  kvq info -m model.gguf -c 32768 --tensors\n"
      "  kvq info --json");
  add_model_flag(*sub, o->model);
  add_simd_flag(*sub, o->simd);
  add_ctx_flag(*sub, o->n_ctx, 1, "context length for the KV cache sizes (default: the training context)");
  add_cache_type_flags(*sub, o->type_k, o->type_v);
  sub->add_flag("--tensors", o->tensors, "list every tensor (default: a summary per type)");
  add_json_flag(*sub, o->json, "print everything as one JSON object");
  return [o] { return info(*o); };
}

}  // namespace kvq::cli

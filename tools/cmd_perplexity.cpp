// kvq perplexity: how well the model (with the chosen KV cache) predicts a text.
//
// Two protocols, so numbers can be compared with published ones:
//  kvquant  (KVQuant/GPTQ): the text is one token stream cut into non-overlapping
//           windows of CTX tokens; each window starts from an empty cache and every
//           token after its first is scored (CTX-1 predictions per window).
//  llamacpp (llama.cpp `perplexity`): same windows, but the first token of each
//           window becomes BOS when the model adds one, and only the second half is
//           scored (positions CTX/2+1 .. CTX-1, as llama.cpp does).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <limits>

#include "common.h"

namespace kvq::cli {
namespace {

struct PerplexityOptions {
  std::string model;
  std::string text_file;
  int threads = 0;
  int64_t n_ctx = 512;
  int n_batch = 512;
  std::string type_k = "f16", type_v = "f16";
  KvCacheOptions kv;
  int64_t chunks = 0;  // 0: every window
  std::string protocol = "kvquant";
  std::string compare;                 // baseline cache "K[/V]" (empty: no comparison)
  std::vector<std::string> sweep;      // candidate caches "K[/V][+sinkN][+winN]"
  std::string simd = "auto";
  bool json = false;
};

// One KV cache configuration evaluated on the windows.
struct CacheConfig {
  std::string label;
  std::string type_k, type_v;
  int sink = -1;
  int64_t window = 0;
  bool rotate_values = false;
};

// "K[/V][+sinkN][+winN][+rotv]", e.g. "nuq3-1%", "nuq4-1%/f16+sink0", "int3+win64",
// "nuq4-1%+rotv" (values rotated before quantization).
CacheConfig parse_cache_spec(const std::string& spec, const KvCacheOptions& defaults) {
  CacheConfig c;
  c.label = spec;
  c.sink = defaults.sink;
  c.window = defaults.window;
  c.rotate_values = defaults.rotate_values;
  std::vector<std::string> parts;
  for (size_t at = 0;;) {
    const size_t plus = spec.find('+', at);
    parts.push_back(spec.substr(at, plus == std::string::npos ? std::string::npos : plus - at));
    if (plus == std::string::npos) break;
    at = plus + 1;
  }
  const std::string& types = parts[0];
  const size_t slash = types.find('/');
  c.type_k = types.substr(0, slash);
  c.type_v = slash == std::string::npos ? c.type_k : types.substr(slash + 1);
  for (const std::string& t : {c.type_k, c.type_v})
    if (!find_kv_format(t))
      throw UsageError(fmt::format("cache spec '{}': unknown KV cache type '{}' (valid: {})", spec, t, kv_format_names()));
  auto number = [&](const std::string& part, size_t skip) -> int64_t {
    const std::string digits = part.substr(skip);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 9)
      throw UsageError(fmt::format("cache spec '{}': '{}' needs a count, like sink1 or win128", spec, part));
    return std::stoll(digits);
  };
  for (size_t i = 1; i < parts.size(); ++i) {
    if (parts[i].rfind("sink", 0) == 0) c.sink = int(number(parts[i], 4));
    else if (parts[i].rfind("win", 0) == 0) c.window = number(parts[i], 3);
    else if (parts[i] == "rotv") c.rotate_values = true;
    else
      throw UsageError(
          fmt::format("cache spec '{}': unknown modifier '{}' (use +sinkN, +winN or +rotv)", spec, parts[i]));
  }
  return c;
}

// log(sum(exp(logits))) in double, shifted by the max so exp never overflows.
double log_sum_exp(std::span<const float> logits) {
  double max = -std::numeric_limits<double>::infinity();
  for (float l : logits) max = std::max(max, double(l));
  double sum = 0;
  for (float l : logits) sum += std::exp(double(l) - max);
  return std::log(sum) + max;
}

// Log-softmax of one row of logits, stored as float.
void log_softmax(std::span<const float> logits, float* out) {
  const double lse = log_sum_exp(logits);
  for (size_t i = 0; i < logits.size(); ++i) out[i] = float(double(logits[i]) - lse);
}

// -log p(target) from raw logits.
double nll_of(std::span<const float> logits, int32_t target) { return log_sum_exp(logits) - double(logits[size_t(target)]); }

size_t argmax(std::span<const float> x) { return size_t(std::max_element(x.begin(), x.end()) - x.begin()); }

// Running sums for one configuration.
struct Score {
  double sum_nll = 0, sum_nll2 = 0;
  int64_t n = 0;
  // Against the baseline (same tokens):
  double sum_diff = 0, sum_diff2 = 0;  // nll - nll_baseline
  std::vector<float> kld;              // KL(baseline || this) per scored token
  int64_t top1_same = 0;
  KvStats kv;
  double seconds = 0;
  bool non_finite = false;

  double mean() const { return sum_nll / double(n); }
  double ppl() const { return std::exp(mean()); }
  // Delta method: se(exp(mean)) = exp(mean) * se(mean), se(mean) = stddev / sqrt(n).
  static double se_of_mean(double sum, double sum2, int64_t n) {
    if (n < 2) return 0;
    const double m = sum / double(n);
    return std::sqrt(std::max(0.0, (sum2 - double(n) * m * m) / double(n - 1)) / double(n));
  }
  double ppl_se() const { return ppl() * se_of_mean(sum_nll, sum_nll2, n); }
};

double percentile(std::vector<float> v, double q) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, size_t(q * double(v.size() - 1) + 0.5));
  std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(k), v.end());
  return v[k];
}

// The caches named by --compare and --sweep: the baseline first (if any), then the candidates.
// Spec errors are usage errors, found before the text and the model are read.
std::vector<CacheConfig> parse_cache_specs(const PerplexityOptions& o) {
  std::vector<CacheConfig> configs;
  if (!o.compare.empty()) {
    CacheConfig base = parse_cache_spec(o.compare, KvCacheOptions{});
    base.sink = base.sink < 0 ? 0 : base.sink;
    configs.push_back(base);
  }
  for (const std::string& spec : o.sweep) configs.push_back(parse_cache_spec(spec, o.kv));
  return configs;
}

// The cache of -ctk/-ctv (with the --kv-* flags), evaluated when there is no --sweep.
CacheConfig flags_cache(const PerplexityOptions& o, const std::shared_ptr<const Model>& model) {
  const std::string tk = resolve_cache_type(o.type_k, model, o.kv, /*quiet=*/true);
  const std::string tv = resolve_cache_type(o.type_v, model, o.kv, /*quiet=*/true);
  return CacheConfig{tk == tv ? tk : tk + "/" + tv, tk, tv, o.kv.sink, o.kv.window, o.kv.rotate_values};
}

std::string read_text(const std::string& path) {
  std::string text;
  try {
    text = read_file(path, "text file");
  } catch (const Error& e) {
    throw Error(fmt::format("{} (for WikiText-2, wiki.test.txt is the raw test split, its rows joined with \"\\n\\n\")",
                            e.what()));
  }
  if (text.empty()) throw Error(fmt::format("text file {} is empty", path));
  return text;
}

// The text as one token stream, cut into the windows every cache is evaluated on.
struct Windows {
  std::vector<int32_t> tokens;  // the whole text; windows are its first count * ctx tokens
  double tokenize_s = 0;
  int64_t ctx = 0, count = 0;
  int64_t first = 0;         // predictions made from positions first .. ctx-2 are scored
  bool replace_bos = false;  // llama.cpp protocol: each window starts with BOS
  int64_t scored_per_window() const { return ctx - 1 - first; }
  int64_t evaluated() const { return count * ctx; }
};

Windows cut_windows(const Model& model, const std::string& text, const PerplexityOptions& o) {
  const bool llamacpp = o.protocol == "llamacpp";
  Windows w;
  Stopwatch tok_clock;
  w.tokens = model.tokenize(text, model.add_bos_default());
  w.tokenize_s = tok_clock.seconds();
  w.ctx = o.n_ctx;
  w.count = int64_t(w.tokens.size()) / w.ctx;  // the incomplete tail is dropped
  if (w.count == 0)
    throw Error(fmt::format("{} has {} tokens, fewer than one window of {}: use a smaller -c or a longer text",
                            o.text_file, w.tokens.size(), w.ctx));
  if (o.chunks > 0) w.count = std::min(w.count, o.chunks);
  w.first = llamacpp ? w.ctx / 2 : 0;
  w.replace_bos = llamacpp && model.add_bos_default() && model.bos_id() >= 0;
  return w;
}

std::vector<std::unique_ptr<Session>> open_sessions(const std::shared_ptr<const Model>& model,
                                                    const std::vector<CacheConfig>& configs,
                                                    const PerplexityOptions& o) {
  std::vector<std::unique_ptr<Session>> sessions;
  for (const CacheConfig& c : configs) {
    SessionParams sp;
    sp.n_ctx = o.n_ctx;
    sp.n_threads = o.threads;
    sp.n_batch = o.n_batch;
    sp.cache_type_k = c.type_k;
    sp.cache_type_v = c.type_v;
    sp.kv_calibration = o.kv.calibration;
    sp.kv_sink = c.sink;
    sp.kv_window = c.window;
    sp.kv_rotate_values = c.rotate_values;
    sp.simd = o.simd;
    sessions.push_back(std::make_unique<Session>(model, sp));
  }
  return sessions;
}

// Says on stderr what is about to run (not with --json, whose stderr stays quiet).
void announce(const PerplexityOptions& o, const ModelInfo& info, const Windows& w,
              const std::vector<CacheConfig>& configs, bool comparing, int n_threads) {
  if (o.json) return;
  if (info.n_ctx_train > 0 && w.ctx > info.n_ctx_train)
    fmt::print(stderr, "kvq: warning: window {} is longer than the model's training context {}\n", w.ctx,
               info.n_ctx_train);
  std::string names;
  for (const auto& c : configs) names += (names.empty() ? "" : ", ") + c.label;
  fmt::print(stderr, "kvq: {} tokens; {} windows of {} ({} protocol, {} scored per window), KV {}{}, {} threads\n",
             w.tokens.size(), w.count, w.ctx, o.protocol, w.scored_per_window(), names,
             comparing ? fmt::format(" (baseline {})", configs[0].label) : "", n_threads);
}

// How a cache's predictions are scored: alone (NLL only), or as the baseline of a comparison
// (its predictions are remembered) or as a candidate (compared with the remembered ones).
enum class Role { alone, baseline, candidate };

// The baseline's predictions on the current window, per scored position.
struct BaselineWindow {
  size_t n_vocab = 0;
  std::vector<float> logp;  // log-probabilities, n_vocab per position
  std::vector<double> nll;
  std::vector<uint32_t> top;  // top-1 token
  BaselineWindow(bool comparing, size_t n_vocab, int64_t positions)
      : n_vocab(n_vocab),
        logp(comparing ? size_t(positions) * n_vocab : 0),
        nll(comparing ? size_t(positions) : 0),
        top(comparing ? size_t(positions) : 0) {}
};

// -log p(target) of the baseline's prediction at scored position k, which is remembered for the candidates.
double remember_baseline(std::span<const float> logits, int32_t target, size_t k, BaselineWindow& base) {
  float* lp = &base.logp[k * base.n_vocab];
  log_softmax(logits, lp);
  const double nll = -double(lp[size_t(target)]);
  base.nll[k] = nll;
  base.top[k] = uint32_t(argmax(logits));
  return nll;
}

// -log p(target) of a candidate's prediction at scored position k; adds its paired differences to the
// baseline's prediction there (NLL difference, KL divergence, top-1 agreement) to `sc`.
double compare_with_baseline(std::span<const float> logits, int32_t target, size_t k, const BaselineWindow& base,
                             std::vector<float>& logp, Score& sc) {
  log_softmax(logits, logp.data());
  const double nll = -double(logp[size_t(target)]);
  // KL(baseline || candidate) = sum_i p_i (log p_i - log q_i).
  const float* bp = &base.logp[k * base.n_vocab];
  double kl = 0;
  for (size_t i = 0; i < base.n_vocab; ++i) kl += std::exp(double(bp[i])) * (double(bp[i]) - double(logp[i]));
  sc.kld.push_back(float(std::max(0.0, kl)));
  const double d = nll - base.nll[k];
  sc.sum_diff += d;
  sc.sum_diff2 += d * d;
  sc.top1_same += argmax(logits) == base.top[k];
  return nll;
}

// Evaluates one window from an empty cache and adds its scored predictions to `sc`.
// `logp` is scratch for a candidate's log-probabilities (n_vocab).
void score_window(Session& session, std::span<const int32_t> window, const Windows& w, Role role,
                  BaselineWindow& base, std::vector<float>& logp, Score& sc) {
  session.reset();
  session.eval_all(window, [&](int64_t index, std::span<const float> logits) {
    if (index < w.first || index + 1 >= w.ctx) return;
    const size_t k = size_t(index - w.first);
    const int32_t target = window[size_t(index + 1)];
    const double nll = role == Role::alone      ? nll_of(logits, target)
                       : role == Role::baseline ? remember_baseline(logits, target, k, base)
                                                : compare_with_baseline(logits, target, k, base, logp, sc);
    if (!std::isfinite(nll)) sc.non_finite = true;
    sc.sum_nll += nll;
    sc.sum_nll2 += nll * nll;
    ++sc.n;
  });
}

struct Evaluation {
  std::vector<Score> scores;  // one per cache config
  double seconds = 0;
};

// Every cache on every window. Windows outside, caches inside: the baseline's log-probabilities
// (n_vocab floats per position) are kept for the current window only.
Evaluation evaluate(const Model& model, const Windows& w, const std::vector<CacheConfig>& configs,
                    std::vector<std::unique_ptr<Session>>& sessions, bool comparing, bool progress) {
  const size_t n_vocab = size_t(model.info().n_vocab);
  BaselineWindow base(comparing, n_vocab, w.scored_per_window());
  std::vector<float> logp(n_vocab);
  Evaluation ev;
  ev.scores.resize(configs.size());
  std::vector<int32_t> window(static_cast<size_t>(w.ctx));
  Stopwatch eval_clock;
  for (int64_t i = 0; i < w.count; ++i) {
    const int32_t* begin = w.tokens.data() + i * w.ctx;
    std::copy(begin, begin + w.ctx, window.begin());
    if (w.replace_bos) window[0] = model.bos_id();
    for (size_t c = 0; c < configs.size(); ++c) {
      const Role role = !comparing ? Role::alone : c == 0 ? Role::baseline : Role::candidate;
      Score& sc = ev.scores[c];
      Stopwatch clock;
      score_window(*sessions[c], window, w, role, base, logp, sc);
      sc.seconds += clock.seconds();
      sc.kv = sessions[c]->kv_stats();
      if (sc.non_finite)
        throw Error(fmt::format("KV cache {}: the model produced non-finite logits: the perplexity is undefined",
                                configs[c].label));
      if (progress) {
        fmt::print(stderr, "\r[{}/{}] {} PPL {:.4f}  {:.1f} tokens/s          ", i + 1, w.count, configs[c].label,
                   sc.ppl(), double((i + 1) * w.ctx) / sc.seconds);
        std::fflush(stderr);
      }
    }
  }
  ev.seconds = eval_clock.seconds();
  if (progress) fmt::print(stderr, "\n");
  return ev;
}

// A candidate's paired statistics against the baseline, on the same tokens.
void add_paired_stats(nlohmann::json& j, const Score& sc) {
  const double md = sc.sum_diff / double(sc.n);
  const double se = Score::se_of_mean(sc.sum_diff, sc.sum_diff2, sc.n);
  const double ratio = std::exp(md);
  j["ppl_delta_pct"] = (ratio - 1) * 100;
  j["ppl_delta_pct_se"] = ratio * se * 100;
  j["mean_nll_diff"] = md;
  double kl_sum = 0;
  for (float k : sc.kld) kl_sum += k;
  j["kld_mean"] = kl_sum / double(sc.kld.size());
  j["kld_p99"] = percentile(sc.kld, 0.99);
  j["top1_agreement"] = double(sc.top1_same) / double(sc.n);
}

// K or V elements cached at the end of a window (for bits per element: everything allocated counts).
double cached_elements(const ModelInfo& info, const Windows& w) {
  return double(w.ctx) * info.n_layer * info.n_head_kv * info.head_dim;
}

// One cache's result: the JSON object that both the --json output and the table print.
nlohmann::json cache_json(const CacheConfig& config, const Score& sc, bool candidate, double elements,
                          int64_t n_evaluated) {
  nlohmann::json j = {
      {"name", config.label},
      {"type_k", config.type_k},
      {"type_v", config.type_v},
      {"sink", sc.kv.sink_tokens},
      {"window", sc.kv.window_tokens},
      {"values_rotated", sc.kv.values_rotated},
      {"ppl", sc.ppl()},
      {"ppl_stderr", sc.ppl_se()},
      {"mean_nll", sc.mean()},
      // Bits of K/V storage (positions and RoPE angles, shared by the layers, apart).
      {"bits_k", double(sc.kv.bytes_k) * 8 / elements},
      {"bits_v", double(sc.kv.bytes_v) * 8 / elements},
      {"bits_per_element", double(sc.kv.bytes() - sc.kv.bytes_positions) * 8 / (2 * elements)},
      {"kv_bytes", sc.kv.bytes()},
      {"kv_bytes_codes", sc.kv.bytes_codes},
      {"kv_bytes_scales", sc.kv.bytes_scales},
      {"kv_bytes_outliers", sc.kv.bytes_outliers},
      {"kv_bytes_full_precision", sc.kv.bytes_full_precision},
      {"kv_bytes_calibration", sc.kv.bytes_calibration},
      {"kv_bytes_positions", sc.kv.bytes_positions},
      {"tokens_per_s", double(n_evaluated) / sc.seconds},
  };
  if (candidate) add_paired_stats(j, sc);
  return j;
}

// What every perplexity report is made of.
struct Report {
  const PerplexityOptions& o;
  const ModelInfo& info;
  const Windows& windows;
  const std::vector<CacheConfig>& configs;  // the baseline first when comparing
  const Evaluation& ev;
  bool comparing;
  int n_threads;

  nlohmann::json cache(size_t c) const {
    return cache_json(configs[c], ev.scores[c], comparing && c > 0, cached_elements(info, windows),
                      windows.evaluated());
  }
};

nlohmann::json report_json(const Report& r) {
  const Windows& w = r.windows;
  nlohmann::json out = {
      {"n_tokens_scored", r.ev.scores[0].n},
      {"n_tokens_evaluated", w.evaluated()},
      {"n_tokens_text", w.tokens.size()},
      {"n_windows", w.count},
      {"ctx", w.ctx},
      {"protocol", r.o.protocol},
      {"eval_seconds", r.ev.seconds},
      {"tokenize_seconds", w.tokenize_s},
      {"model", r.info.path.empty() ? resolved_model_path(r.o.model) : r.info.path},
      {"text_file", r.o.text_file},
      {"threads", r.n_threads},
  };
  if (r.comparing) {
    out["baseline"] = r.cache(0);
    out["candidates"] = nlohmann::json::array();
    for (size_t c = 1; c < r.configs.size(); ++c) out["candidates"].push_back(r.cache(c));
  } else if (r.configs.size() == 1) {
    // The single-cache result keeps its flat shape.
    const nlohmann::json single = r.cache(0);  // (iterating a temporary's items() would dangle)
    for (const auto& [key, value] : single.items()) out[key] = value;
    out["kv_type_k"] = r.configs[0].type_k;
    out["kv_type_v"] = r.configs[0].type_v;
  } else {
    out["candidates"] = nlohmann::json::array();
    for (size_t c = 0; c < r.configs.size(); ++c) out["candidates"].push_back(r.cache(c));
  }
  return out;
}

// One cache, nothing to compare: a few lines.
void print_single(const Report& r) {
  const Windows& w = r.windows;
  const Score& sc = r.ev.scores[0];
  write_stdout(fmt::format("PPL = {:.4f} +/- {:.4f}\n", sc.ppl(), sc.ppl_se()));
  write_stdout(fmt::format("mean NLL {:.5f} nats over {} scored tokens ({} windows of {}, {} protocol)\n",
                           sc.mean(), sc.n, w.count, w.ctx, r.o.protocol));
  write_stdout(fmt::format("speed {:.1f} tokens/s ({} tokens evaluated in {:.2f} s, {} threads)\n",
                           double(w.evaluated()) / sc.seconds, w.evaluated(), sc.seconds, r.n_threads));
  write_stdout(fmt::format("KV cache K {} / V {}: {} ({:.3f} bits per element)\n", r.configs[0].type_k,
                           r.configs[0].type_v, format_bytes(sc.kv.bytes()),
                           double(sc.kv.bytes() - sc.kv.bytes_positions) * 8 / (2 * cached_elements(r.info, w))));
}

// Several caches (or a comparison): one table row per cache, "-" where there is no baseline to compare with.
void print_table(const Report& r) {
  write_stdout(fmt::format("{} windows of {} tokens, {} scored per cache ({} protocol), {} threads\n",
                           r.windows.count, r.windows.ctx, r.ev.scores[0].n, r.o.protocol, r.n_threads));
  write_stdout(fmt::format("{:<24} {:>6} {:>6} {:>6} {:>4} {:>10} {:>9} {:>18} {:>9} {:>9} {:>7} {:>9}\n", "cache",
                           "bits", "K", "V", "sink", "KV bytes", "PPL", "dPPL% +/- se", "KLD", "KLD p99", "top1",
                           "tok/s"));
  for (size_t c = 0; c < r.configs.size(); ++c) {
    const nlohmann::json j = r.cache(c);
    const Score& sc = r.ev.scores[c];
    std::string delta = "-", kld = "-", kld99 = "-", top1 = "-";
    if (j.contains("ppl_delta_pct")) {
      delta = fmt::format("{:+.3f} +/- {:.3f}", j["ppl_delta_pct"].get<double>(), j["ppl_delta_pct_se"].get<double>());
      kld = fmt::format("{:.5f}", j["kld_mean"].get<double>());
      kld99 = fmt::format("{:.4f}", j["kld_p99"].get<double>());
      top1 = fmt::format("{:.2f}%", 100 * j["top1_agreement"].get<double>());
    }
    write_stdout(fmt::format("{:<24} {:>6.3f} {:>6.3f} {:>6.3f} {:>4} {:>10} {:>9.4f} {:>18} {:>9} {:>9} {:>7} {:>9.1f}\n",
                             r.configs[c].label, j["bits_per_element"].get<double>(), j["bits_k"].get<double>(),
                             j["bits_v"].get<double>(), sc.kv.sink_tokens, format_bytes(sc.kv.bytes()), sc.ppl(),
                             delta, kld, kld99, top1, j["tokens_per_s"].get<double>()));
  }
}

int perplexity(const PerplexityOptions& o) {
  const bool comparing = !o.compare.empty();
  std::vector<CacheConfig> configs = parse_cache_specs(o);
  const std::string text = read_text(o.text_file);
  auto model = load_model(o.model);
  if (o.sweep.empty()) configs.push_back(flags_cache(o, model));  // after the model: "auto" types need it

  const Windows windows = cut_windows(*model, text, o);
  std::vector<std::unique_ptr<Session>> sessions = open_sessions(model, configs, o);
  const int n_threads = sessions[0]->n_threads();
  announce(o, model->info(), windows, configs, comparing, n_threads);

  const bool progress = stderr_is_tty() && !o.json;
  const Evaluation ev = evaluate(*model, windows, configs, sessions, comparing, progress);

  const Report report{o, model->info(), windows, configs, ev, comparing, n_threads};
  if (o.json)
    write_stdout(dump_json(report_json(report)) + "\n");
  else if (!comparing && configs.size() == 1)
    print_single(report);
  else
    print_table(report);
  return 0;
}

}  // namespace

Command register_perplexity(CLI::App& app) {
  auto o = std::make_shared<PerplexityOptions>();
  CLI::App* sub = app.add_subcommand("perplexity", "perplexity of a text (KVQuant/GPTQ or llama.cpp protocol)");
  sub->footer(
      "Protocols:\n"
      "  kvquant   one token stream, non-overlapping windows of CTX tokens, each from an\n"
      "            empty cache; every token after the first of a window is scored.\n"
      "  llamacpp  as llama.cpp's perplexity: BOS starts each window (if the model adds BOS),\n"
      "            only the second half of each window is scored.\n"
      "Short windows hide KV cache damage: compare formats at -c 4096 or more.\n"
      "Examples:\n"
      "  kvq perplexity -f wiki.test.txt -c 2048\n"
      "  kvq perplexity -f wiki.test.txt -c 512 --protocol llamacpp --chunks 20 --json\n"
      "  kvq perplexity -f wiki.test.txt -c 2048 --chunks 32 -ctk nuq4-1% -ctv nuq4-1% --compare f16\n"
      "  kvq perplexity -f wiki.test.txt -c 2048 --chunks 32 --compare f16 --sweep q4_0 --sweep nuq4-1%");
  add_model_flag(*sub, o->model);
  sub->add_option("-f,--file", o->text_file,
                  "text to score (WikiText-2: wiki.test.txt = raw test split rows joined with \"\\n\\n\")")
      ->type_name("FILE");
  add_threads_flag(*sub, o->threads);
  add_simd_flag(*sub, o->simd);
  add_ctx_flag(*sub, o->n_ctx, 16, "window length in tokens");
  sub->get_option("--ctx-size")->capture_default_str();
  add_batch_flag(*sub, o->n_batch);
  add_cache_type_flags(*sub, o->type_k, o->type_v);
  add_kv_cache_flags(*sub, o->kv);
  sub->add_option("--compare", o->compare,
                  "also run this baseline cache (K[/V], e.g. f16) on the same windows and report the paired "
                  "perplexity difference, KL divergence and top-1 agreement against it")
      ->type_name("K[/V]");
  sub->add_option("--sweep", o->sweep,
                  "evaluate these caches instead of -ctk/-ctv (repeatable; K[/V][+sinkN][+winN], "
                  "e.g. --sweep int3 --sweep nuq3-1%+sink0)")
      ->type_name("SPEC")
      ->take_all();
  sub->add_option("--chunks", o->chunks, "evaluate only the first N windows (default: all)")
      ->type_name("N")
      ->check(int_range(1, std::numeric_limits<int64_t>::max()));
  sub->add_option("--protocol", o->protocol, "kvquant or llamacpp")
      ->type_name("NAME")
      ->check(CLI::IsMember({"kvquant", "llamacpp"}))
      ->capture_default_str();
  add_json_flag(*sub, o->json, "print the result as one JSON object");
  return [o] {
    if (o->text_file.empty())
      throw UsageError(
          "no text: give -f FILE (WikiText-2's wiki.test.txt is the raw test split, its rows joined with \"\\n\\n\")");
    return perplexity(*o);
  };
}

}  // namespace kvq::cli

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
};

// "K[/V][+sinkN][+winN]", e.g. "nuq3-1%", "nuq4-1%/f16+sink0", "int3+win64".
CacheConfig parse_cache_spec(const std::string& spec, const KvCacheOptions& defaults) {
  CacheConfig c;
  c.label = spec;
  c.sink = defaults.sink;
  c.window = defaults.window;
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
    else
      throw UsageError(fmt::format("cache spec '{}': unknown modifier '{}' (use +sinkN or +winN)", spec, parts[i]));
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

int perplexity(const PerplexityOptions& o) {
  // Which caches run: the baseline first (if any), then the candidates.
  const bool comparing = !o.compare.empty();
  std::vector<CacheConfig> configs;
  if (comparing) {
    CacheConfig base = parse_cache_spec(o.compare, KvCacheOptions{});
    base.sink = base.sink < 0 ? 0 : base.sink;
    configs.push_back(base);
  }
  std::vector<CacheConfig> swept;
  for (const std::string& spec : o.sweep) swept.push_back(parse_cache_spec(spec, o.kv));
  std::string text;
  try {
    text = read_file(o.text_file, "text file");
  } catch (const Error& e) {
    throw Error(fmt::format("{} (for WikiText-2, wiki.test.txt is the raw test split, its rows joined with \"\\n\\n\")",
                            e.what()));
  }
  if (text.empty()) throw Error(fmt::format("text file {} is empty", o.text_file));

  auto model = load_model(o.model);
  if (o.sweep.empty()) {
    const std::string tk = resolve_cache_type(o.type_k, model, o.kv, /*quiet=*/true);
    const std::string tv = resolve_cache_type(o.type_v, model, o.kv, /*quiet=*/true);
    configs.push_back(CacheConfig{tk == tv ? tk : tk + "/" + tv, tk, tv, o.kv.sink, o.kv.window});
  }
  configs.insert(configs.end(), swept.begin(), swept.end());

  const ModelInfo& info = model->info();
  const bool llamacpp = o.protocol == "llamacpp";

  Stopwatch tok_clock;
  const std::vector<int32_t> tokens = model->tokenize(text, model->add_bos_default());
  const double tokenize_s = tok_clock.seconds();

  const int64_t ctx = o.n_ctx;
  int64_t n_windows = int64_t(tokens.size()) / ctx;  // the incomplete tail is dropped
  if (n_windows == 0)
    throw Error(fmt::format("{} has {} tokens, fewer than one window of {}: use a smaller -c or a longer text",
                            o.text_file, tokens.size(), ctx));
  if (o.chunks > 0) n_windows = std::min(n_windows, o.chunks);
  // Predictions made from positions first .. ctx-2 (each predicts the next token).
  const int64_t first = llamacpp ? ctx / 2 : 0;
  const bool replace_bos = llamacpp && model->add_bos_default() && model->bos_id() >= 0;

  std::vector<std::unique_ptr<Session>> sessions;
  for (const CacheConfig& c : configs) {
    SessionParams sp;
    sp.n_ctx = ctx;
    sp.n_threads = o.threads;
    sp.n_batch = o.n_batch;
    sp.cache_type_k = c.type_k;
    sp.cache_type_v = c.type_v;
    sp.kv_calibration = o.kv.calibration;
    sp.kv_sink = c.sink;
    sp.kv_window = c.window;
    sp.simd = o.simd;
    sessions.push_back(std::make_unique<Session>(model, sp));
  }
  const int n_threads = sessions[0]->n_threads();

  if (info.n_ctx_train > 0 && ctx > info.n_ctx_train && !o.json)
    fmt::print(stderr, "kvq: warning: window {} is longer than the model's training context {}\n", ctx,
               info.n_ctx_train);
  const bool progress = stderr_is_tty() && !o.json;
  if (!o.json) {
    std::string names;
    for (const auto& c : configs) names += (names.empty() ? "" : ", ") + c.label;
    fmt::print(stderr, "kvq: {} tokens; {} windows of {} ({} protocol, {} scored per window), KV {}{}, {} threads\n",
               tokens.size(), n_windows, ctx, o.protocol, ctx - 1 - first, names,
               comparing ? fmt::format(" (baseline {})", configs[0].label) : "", n_threads);
  }

  const size_t n_vocab = size_t(info.n_vocab);
  const int64_t n_scored_per_window = ctx - 1 - first;
  // The baseline's log-probabilities of the current window, to compare the candidates with.
  std::vector<float> base_logp(comparing ? size_t(n_scored_per_window) * n_vocab : 0);
  std::vector<double> base_nll(comparing ? size_t(n_scored_per_window) : 0);
  std::vector<uint32_t> base_top(comparing ? size_t(n_scored_per_window) : 0);
  std::vector<float> logp(n_vocab);
  std::vector<Score> scores(configs.size());
  std::vector<int32_t> window(static_cast<size_t>(ctx));
  Stopwatch eval_clock;
  for (int64_t w = 0; w < n_windows; ++w) {
    const int32_t* begin = tokens.data() + w * ctx;
    std::copy(begin, begin + ctx, window.begin());
    if (replace_bos) window[0] = model->bos_id();
    for (size_t c = 0; c < configs.size(); ++c) {
      const bool is_base = comparing && c == 0;
      Score& sc = scores[c];
      Session& session = *sessions[c];
      Stopwatch clock;
      session.reset();
      session.eval_all(window, [&](int64_t index, std::span<const float> logits) {
        if (index < first || index + 1 >= ctx) return;
        const size_t k = size_t(index - first);
        const int32_t target = window[size_t(index + 1)];
        double nll;
        if (comparing) {
          float* lp = is_base ? &base_logp[k * n_vocab] : logp.data();
          log_softmax(logits, lp);
          nll = -double(lp[size_t(target)]);
          if (is_base) {
            base_nll[k] = nll;
            base_top[k] = uint32_t(argmax(logits));
          } else {
            // KL(baseline || candidate) = sum_i p_i (log p_i - log q_i).
            const float* bp = &base_logp[k * n_vocab];
            double kl = 0;
            for (size_t i = 0; i < n_vocab; ++i) kl += std::exp(double(bp[i])) * (double(bp[i]) - double(lp[i]));
            sc.kld.push_back(float(std::max(0.0, kl)));
            const double d = nll - base_nll[k];
            sc.sum_diff += d;
            sc.sum_diff2 += d * d;
            sc.top1_same += argmax(logits) == base_top[k];
          }
        } else {
          nll = nll_of(logits, target);
        }
        if (!std::isfinite(nll)) sc.non_finite = true;
        sc.sum_nll += nll;
        sc.sum_nll2 += nll * nll;
        ++sc.n;
      });
      sc.seconds += clock.seconds();
      sc.kv = session.kv_stats();
      if (sc.non_finite)
        throw Error(fmt::format("KV cache {}: the model produced non-finite logits: the perplexity is undefined",
                                configs[c].label));
      if (progress) {
        fmt::print(stderr, "\r[{}/{}] {} PPL {:.4f}  {:.1f} tokens/s          ", w + 1, n_windows, configs[c].label,
                   sc.ppl(), double((w + 1) * ctx) / sc.seconds);
        std::fflush(stderr);
      }
    }
  }
  const double eval_s = eval_clock.seconds();
  if (progress) fmt::print(stderr, "\n");

  const int64_t n_evaluated = n_windows * ctx;
  // Bits per cached element as allocated at the end of a window (everything counted).
  const double elements = double(ctx) * info.n_layer * info.n_head_kv * info.head_dim;
  auto describe = [&](size_t c) {
    const Score& sc = scores[c];
    nlohmann::json j = {
        {"name", configs[c].label},
        {"type_k", configs[c].type_k},
        {"type_v", configs[c].type_v},
        {"sink", sc.kv.sink_tokens},
        {"window", sc.kv.window_tokens},
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
    if (comparing && c > 0) {
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
    return j;
  };

  nlohmann::json out = {
      {"n_tokens_scored", scores[0].n},
      {"n_tokens_evaluated", n_evaluated},
      {"n_tokens_text", tokens.size()},
      {"n_windows", n_windows},
      {"ctx", ctx},
      {"protocol", o.protocol},
      {"eval_seconds", eval_s},
      {"tokenize_seconds", tokenize_s},
      {"model", info.path.empty() ? resolved_model_path(o.model) : info.path},
      {"text_file", o.text_file},
      {"threads", n_threads},
  };
  if (comparing) {
    out["baseline"] = describe(0);
    out["candidates"] = nlohmann::json::array();
    for (size_t c = 1; c < configs.size(); ++c) out["candidates"].push_back(describe(c));
  } else if (configs.size() == 1) {
    // The single-cache result keeps its flat shape.
    const nlohmann::json single = describe(0);  // (iterating a temporary's items() would dangle)
    for (const auto& [key, value] : single.items()) out[key] = value;
    out["kv_type_k"] = configs[0].type_k;
    out["kv_type_v"] = configs[0].type_v;
  } else {
    out["candidates"] = nlohmann::json::array();
    for (size_t c = 0; c < configs.size(); ++c) out["candidates"].push_back(describe(c));
  }
  if (o.json) {
    write_stdout(dump_json(out) + "\n");
    return 0;
  }

  if (!comparing && configs.size() == 1) {
    const Score& sc = scores[0];
    write_stdout(fmt::format("PPL = {:.4f} +/- {:.4f}\n", sc.ppl(), sc.ppl_se()));
    write_stdout(fmt::format("mean NLL {:.5f} nats over {} scored tokens ({} windows of {}, {} protocol)\n",
                             sc.mean(), sc.n, n_windows, ctx, o.protocol));
    write_stdout(fmt::format("speed {:.1f} tokens/s ({} tokens evaluated in {:.2f} s, {} threads)\n",
                             double(n_evaluated) / sc.seconds, n_evaluated, sc.seconds, n_threads));
    write_stdout(fmt::format("KV cache K {} / V {}: {} ({:.3f} bits per element)\n", configs[0].type_k,
                             configs[0].type_v, format_bytes(sc.kv.bytes()),
                             double(sc.kv.bytes() - sc.kv.bytes_positions) * 8 / (2 * elements)));
    return 0;
  }
  write_stdout(fmt::format("{} windows of {} tokens, {} scored per cache ({} protocol), {} threads\n", n_windows, ctx,
                           scores[0].n, o.protocol, n_threads));
  write_stdout(fmt::format("{:<24} {:>6} {:>6} {:>6} {:>4} {:>10} {:>9} {:>18} {:>9} {:>9} {:>7} {:>9}\n", "cache",
                           "bits", "K", "V", "sink", "KV bytes", "PPL", "dPPL% +/- se", "KLD", "KLD p99", "top1",
                           "tok/s"));
  for (size_t c = 0; c < configs.size(); ++c) {
    const nlohmann::json j = describe(c);
    std::string delta = "-", kld = "-", kld99 = "-", top1 = "-";
    if (j.contains("ppl_delta_pct")) {
      delta = fmt::format("{:+.3f} +/- {:.3f}", j["ppl_delta_pct"].get<double>(), j["ppl_delta_pct_se"].get<double>());
      kld = fmt::format("{:.5f}", j["kld_mean"].get<double>());
      kld99 = fmt::format("{:.4f}", j["kld_p99"].get<double>());
      top1 = fmt::format("{:.2f}%", 100 * j["top1_agreement"].get<double>());
    }
    write_stdout(fmt::format("{:<24} {:>6.3f} {:>6.3f} {:>6.3f} {:>4} {:>10} {:>9.4f} {:>18} {:>9} {:>9} {:>7} {:>9.1f}\n",
                             configs[c].label, j["bits_per_element"].get<double>(), j["bits_k"].get<double>(),
                             j["bits_v"].get<double>(), scores[c].kv.sink_tokens, format_bytes(scores[c].kv.bytes()),
                             scores[c].ppl(), delta, kld, kld99, top1, j["tokens_per_s"].get<double>()));
  }
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

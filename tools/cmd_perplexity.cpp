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

#include <cmath>
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
  int64_t chunks = 0;  // 0: every window
  std::string protocol = "kvquant";
  bool json = false;
};

// -log p(target) from raw logits, in double, shifted by the max so exp never overflows.
double nll_of(std::span<const float> logits, int32_t target) {
  double max = -std::numeric_limits<double>::infinity();
  for (float l : logits) max = std::max(max, double(l));
  double sum = 0;
  for (float l : logits) sum += std::exp(double(l) - max);
  return std::log(sum) + max - double(logits[size_t(target)]);
}

int perplexity(const PerplexityOptions& o) {
  std::string text;
  try {
    text = read_file(o.text_file, "text file");
  } catch (const Error& e) {
    throw Error(fmt::format("{} (for WikiText-2, wiki.test.txt is the raw test split, its rows joined with \"\\n\\n\")",
                            e.what()));
  }
  if (text.empty()) throw Error(fmt::format("text file {} is empty", o.text_file));

  auto model = load_model(o.model);
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

  SessionParams sp;
  sp.n_ctx = ctx;
  sp.n_threads = o.threads;
  sp.n_batch = o.n_batch;
  sp.cache_type_k = o.type_k;
  sp.cache_type_v = o.type_v;
  Session session(model, sp);

  if (info.n_ctx_train > 0 && ctx > info.n_ctx_train && !o.json)
    fmt::print(stderr, "kvq: warning: window {} is longer than the model's training context {}\n", ctx,
               info.n_ctx_train);
  const bool progress = stderr_is_tty() && !o.json;
  if (!o.json)
    fmt::print(stderr, "kvq: {} tokens; {} windows of {} ({} protocol, {} scored per window), KV {} / {}, {} threads\n",
               tokens.size(), n_windows, ctx, o.protocol, ctx - 1 - first, o.type_k, o.type_v, session.n_threads());

  double sum_nll = 0, sum_nll2 = 0;
  int64_t n_scored = 0;
  bool non_finite = false;
  std::vector<int32_t> window(static_cast<size_t>(ctx));
  Stopwatch eval_clock;
  for (int64_t w = 0; w < n_windows; ++w) {
    const int32_t* begin = tokens.data() + w * ctx;
    std::copy(begin, begin + ctx, window.begin());
    if (replace_bos) window[0] = model->bos_id();
    session.reset();
    session.eval_all(window, [&](int64_t index, std::span<const float> logits) {
      if (index < first || index + 1 >= ctx) return;
      const double nll = nll_of(logits, window[size_t(index + 1)]);
      if (!std::isfinite(nll)) non_finite = true;
      sum_nll += nll;
      sum_nll2 += nll * nll;
      ++n_scored;
    });
    if (progress) {
      const double s = eval_clock.seconds();
      fmt::print(stderr, "\r[{}/{}] PPL {:.4f}  {:.1f} tokens/s   ", w + 1, n_windows,
                 std::exp(sum_nll / double(n_scored)), double((w + 1) * ctx) / s);
      std::fflush(stderr);
    }
  }
  const double eval_s = eval_clock.seconds();
  if (progress) fmt::print(stderr, "\n");
  if (non_finite) throw Error("the model produced non-finite logits: the perplexity is undefined");

  const double mean = sum_nll / double(n_scored);
  const double ppl = std::exp(mean);
  // Delta method: se(exp(mean)) = exp(mean) * se(mean), se(mean) = stddev / sqrt(n).
  double var = n_scored > 1 ? (sum_nll2 - double(n_scored) * mean * mean) / double(n_scored - 1) : 0.0;
  var = std::max(var, 0.0);
  const double se = ppl * std::sqrt(var / double(n_scored));
  const int64_t n_evaluated = n_windows * ctx;
  const double tps = eval_s > 0 ? double(n_evaluated) / eval_s : 0;
  const KvStats kv = session.kv_stats();

  if (o.json) {
    nlohmann::json j = {
        {"ppl", ppl},
        {"ppl_stderr", se},
        {"mean_nll", mean},
        {"n_tokens_scored", n_scored},
        {"n_tokens_evaluated", n_evaluated},
        {"n_tokens_text", tokens.size()},
        {"n_windows", n_windows},
        {"ctx", ctx},
        {"protocol", o.protocol},
        {"tokens_per_s", tps},
        {"eval_seconds", eval_s},
        {"tokenize_seconds", tokenize_s},
        {"kv_type_k", kv.type_k},
        {"kv_type_v", kv.type_v},
        {"kv_bytes", kv.bytes()},
        {"model", info.path.empty() ? resolved_model_path(o.model) : info.path},
        {"text_file", o.text_file},
        {"threads", session.n_threads()},
    };
    write_stdout(dump_json(j) + "\n");
    return 0;
  }
  write_stdout(fmt::format("PPL = {:.4f} +/- {:.4f}\n", ppl, se));
  write_stdout(fmt::format("mean NLL {:.5f} nats over {} scored tokens ({} windows of {}, {} protocol)\n", mean,
                           n_scored, n_windows, ctx, o.protocol));
  write_stdout(fmt::format("speed {:.1f} tokens/s ({} tokens evaluated in {:.2f} s, {} threads)\n", tps, n_evaluated,
                           eval_s, session.n_threads()));
  write_stdout(fmt::format("KV cache K {} / V {}: {}\n", kv.type_k, kv.type_v, format_bytes(kv.bytes())));
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
      "  kvq perplexity -f wiki.test.txt -c 512 --protocol llamacpp --chunks 20 --json");
  add_model_flag(*sub, o->model);
  sub->add_option("-f,--file", o->text_file,
                  "text to score (WikiText-2: wiki.test.txt = raw test split rows joined with \"\\n\\n\")")
      ->type_name("FILE");
  add_threads_flag(*sub, o->threads);
  add_ctx_flag(*sub, o->n_ctx, 16, "window length in tokens");
  sub->get_option("--ctx-size")->capture_default_str();
  add_batch_flag(*sub, o->n_batch);
  add_cache_type_flags(*sub, o->type_k, o->type_v);
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

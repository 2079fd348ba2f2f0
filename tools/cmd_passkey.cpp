// kvq passkey: long-context retrieval check. A random 5-digit pass key is hidden
// at a chosen depth of a long, repetitive filler text; the model must repeat it
// when asked at the end (greedy decoding). Perplexity averages over every token
// and hides damage to the few far-away tokens that matter; this test needs the
// cache to keep one specific old token intact across thousands of positions.
//
// The prompt is plain completion text (no chat template): small base-ish models
// continue "The pass key is" far more reliably than they answer a chat turn.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <optional>
#include <random>

#include "common.h"

namespace kvq::cli {
namespace {

struct PasskeyOptions {
  std::string model;
  int threads = 0;
  int n_batch = 512;
  std::string type_k = "auto", type_v = "auto";
  KvCacheOptions kv;
  std::vector<int64_t> lengths{2048, 4096, 8192};
  std::vector<double> depths{0.1, 0.5, 0.9};
  int trials = 1;
  uint64_t seed = 1234;
  std::string simd = "auto";
  bool json = false;
};

// Tokens generated after the question: room for a space, five digits and a bit.
constexpr int kAnswerTokens = 8;
constexpr int64_t kMinLength = 64;

constexpr std::string_view kInstruction =
    "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it. "
    "I will ask you for the pass key at the end.";
// Filler: these sentences in a cycle, as many as fit. Neutral, says nothing about
// numbers or keys; one sentence (~8 tokens) is the granularity of the fit.
constexpr std::string_view kFiller[] = {
    " The river runs past the old mill.", " The hills are quiet in the morning.", " A bird sits on the fence.",
    " The road goes on and on.", " Here we are again."};
constexpr size_t kFillerCount = std::size(kFiller);
constexpr std::string_view kQuestion = " What is the pass key? The pass key is";

std::string needle_sentence(const std::string& key) {
  return fmt::format(" The pass key is {0}. Remember it. {0} is the pass key.", key);
}

struct Prompt {
  std::vector<int32_t> tokens;
  int64_t filler_units = 0;     // filler sentences in the whole prompt
  int64_t needle_position = 0;  // token index where the needle sentence starts (approximately: tokenizer merges)
};

// `units` filler sentences with the needle after round(depth * units) of them.
std::string prompt_text(const std::string& key, double depth, int64_t units, int64_t* before_needle_chars) {
  const auto before = int64_t(std::llround(depth * double(units)));
  std::string text(kInstruction);
  text.reserve(text.size() + size_t(units) * 40 + 128);
  for (int64_t i = 0; i < before; ++i) text += kFiller[size_t(i) % kFillerCount];
  if (before_needle_chars) *before_needle_chars = int64_t(text.size());
  text += needle_sentence(key);
  for (int64_t i = before; i < units; ++i) text += kFiller[size_t(i) % kFillerCount];
  text += kQuestion;
  return text;
}

// The longest prompt (most filler sentences) that tokenizes to at most `length` tokens.
Prompt build_prompt(const Model& model, const std::string& key, double depth, int64_t length) {
  const bool bos = model.add_bos_default();
  auto count = [&](int64_t units) {
    return int64_t(model.tokenize(prompt_text(key, depth, units, nullptr), bos).size());
  };
  const int64_t bare = count(0);
  if (bare > length)
    throw UsageError(fmt::format("--lengths: {} tokens cannot hold the instruction, pass key and question "
                                 "({} tokens with no filler)",
                                 length, bare));
  // Bracket the answer: lo fits, hi does not.
  const int64_t per_unit = std::max<int64_t>(1, count(1) - bare);
  int64_t lo = 0, hi = std::max<int64_t>(1, (length - bare) / per_unit + 1);
  while (count(hi) <= length) {
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (count(mid) <= length ? lo : hi) = mid;
  }
  Prompt p;
  int64_t before_chars = 0;
  const std::string text = prompt_text(key, depth, lo, &before_chars);
  p.tokens = model.tokenize(text, bos);
  p.filler_units = lo;
  p.needle_position = int64_t(model.tokenize(std::string_view(text).substr(0, size_t(before_chars)), bos).size());
  return p;
}

// The first run of exactly five digits (not part of a longer number), if any.
std::optional<std::string> first_five_digits(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] < '0' || s[i] > '9') {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
    if (j - i == 5) return s.substr(i, 5);
    i = j;
  }
  return std::nullopt;
}

struct TrialResult {
  int64_t length = 0;  // requested
  double depth = 0;
  int trial = 0;
  int64_t prompt_tokens = 0, needle_position = 0, filler_units = 0;
  std::string expected;
  std::optional<std::string> got;
  std::string output;
  bool found = false;
  double prefill_s = 0, decode_s = 0;
};

struct LengthSummary {
  int64_t length = 0, n_ctx = 0;
  int n = 0, n_found = 0;
  int64_t prefill_tokens = 0;
  double prefill_s = 0, decode_s = 0;
  uint64_t kv_bytes = 0;
  double accuracy() const { return n > 0 ? double(n_found) / double(n) : 0.0; }
  double prefill_tps() const { return prefill_s > 0 ? double(prefill_tokens) / prefill_s : 0.0; }
};

std::string cell_text(const TrialResult& r) {
  if (r.found) return "found";
  return r.got ? fmt::format("got {}", *r.got) : "got no key";
}

std::string depth_label(double d) { return fmt::format("{:g}", d); }

// Warns (on stderr, and in the JSON) about lengths past the model's training context.
std::vector<std::string> warn_beyond_training_context(const std::vector<int64_t>& lengths, const ModelInfo& info) {
  std::vector<std::string> warnings;
  for (int64_t L : lengths)
    if (info.n_ctx_train > 0 && L > info.n_ctx_train) {
      warnings.push_back(fmt::format("length {} is longer than the model's training context {}: failures there "
                                     "say little about the KV cache",
                                     L, info.n_ctx_train));
      fmt::print(stderr, "kvq: warning: {}\n", warnings.back());
    }
  return warnings;
}

// Every length must hold the prompt without filler: refuse before any long run starts.
void check_lengths_hold_prompt(const Model& model, const std::vector<int64_t>& lengths) {
  const int64_t bare = int64_t(model.tokenize(prompt_text("12345", 0.5, 0, nullptr), model.add_bos_default()).size());
  for (int64_t L : lengths)
    if (L < bare)
      throw UsageError(fmt::format("--lengths: {} tokens cannot hold the instruction, pass key and question "
                                   "({} tokens with no filler)",
                                   L, bare));
}

// "[run/runs] length L depth D trial T: what" on a terminal's stderr, rewritten in place.
struct Progress {
  bool on = false;
  int64_t n_runs = 0;
  void show(int64_t run, const TrialResult& r, std::string_view what) const {
    if (!on) return;
    fmt::print(stderr, "\r[{}/{}] length {} depth {} trial {}: {}", run, n_runs, r.length, depth_label(r.depth),
               r.trial + 1, what);
    std::fflush(stderr);
  }
};

// The model's answer to a prefilled prompt whose last logits are `logits`: up to kAnswerTokens greedy tokens.
std::vector<int32_t> greedy_answer(Session& session, const Model& model, std::span<const float> logits) {
  SamplerParams greedy;
  greedy.temperature = 0;
  Sampler sampler(greedy);
  std::vector<int32_t> generated;
  for (int i = 0; i < kAnswerTokens; ++i) {
    const int32_t token = sampler.sample(logits);
    if (model.is_end_of_generation(token)) break;
    generated.push_back(token);
    if (i + 1 == kAnswerTokens) break;  // the last token is not evaluated
    const int32_t one[1] = {token};
    logits = session.eval(one);
  }
  return generated;
}

// One trial, given its length, depth, trial number and key (r.expected): hides the key at the depth of
// the longest prompt that fits the length, prefills it from an empty cache and reads the answer.
void run_trial(Session& session, const Model& model, TrialResult& r, int64_t run, const Progress& progress) {
  progress.show(run, r, "building the prompt   ");
  const Prompt prompt = build_prompt(model, r.expected, r.depth, r.length);
  r.prompt_tokens = int64_t(prompt.tokens.size());
  r.needle_position = prompt.needle_position;
  r.filler_units = prompt.filler_units;
  progress.show(run, r, fmt::format("prefill of {} tokens   ", r.prompt_tokens));

  session.reset();
  Stopwatch prefill_clock;
  const std::span<const float> logits = session.eval(prompt.tokens);
  r.prefill_s = prefill_clock.seconds();
  Stopwatch decode_clock;
  const std::vector<int32_t> generated = greedy_answer(session, model, logits);
  r.decode_s = decode_clock.seconds();

  r.output = model.detokenize(generated);
  r.got = first_five_digits(r.output);
  r.found = r.got && *r.got == r.expected;
  progress.show(run, r,
                fmt::format("{} ({:.0f} tokens/s)        ", cell_text(r),
                            r.prefill_s > 0 ? double(r.prompt_tokens) / r.prefill_s : 0.0));
}

void add_to(LengthSummary& sum, const TrialResult& r) {
  sum.n += 1;
  sum.n_found += r.found ? 1 : 0;
  sum.prefill_tokens += r.prompt_tokens;
  sum.prefill_s += r.prefill_s;
  sum.decode_s += r.decode_s;
}

struct Trials {
  std::vector<TrialResult> results;  // by length, then depth, then trial
  std::vector<LengthSummary> summaries;  // one per length
  int threads_used = 0;
};

// Every length x depth x trial, each with a fresh random key.
Trials run_trials(const PasskeyOptions& o, const std::shared_ptr<const Model>& model) {
  const Progress progress{stderr_is_tty(), int64_t(o.lengths.size() * o.depths.size()) * o.trials};
  int64_t run = 0;
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int> key_dist(10000, 99999);
  Trials trials;
  for (int64_t length : o.lengths) {
    SessionParams sp;
    sp.n_ctx = length + kAnswerTokens;
    sp.n_threads = o.threads;
    sp.n_batch = o.n_batch;
    sp.cache_type_k = o.type_k;
    sp.cache_type_v = o.type_v;
    o.kv.apply_to(sp);
    sp.simd = o.simd;
    Session session(model, sp);  // one allocation per length; reset() between trials
    trials.threads_used = session.n_threads();
    LengthSummary sum;
    sum.length = length;
    sum.n_ctx = session.n_ctx();
    for (double depth : o.depths)
      for (int trial = 0; trial < o.trials; ++trial) {
        TrialResult r;
        r.length = length;
        r.depth = depth;
        r.trial = trial;
        r.expected = fmt::format("{}", key_dist(rng));
        run_trial(session, *model, r, ++run, progress);
        add_to(sum, r);
        trials.results.push_back(std::move(r));
      }
    sum.kv_bytes = session.kv_stats().bytes();
    trials.summaries.push_back(sum);
  }
  if (progress.on) fmt::print(stderr, "\n");
  return trials;
}

// What both reports are made of.
struct Report {
  const PasskeyOptions& o;  // with the cache types resolved
  const ModelInfo& info;
  const Trials& trials;
  const std::vector<std::string>& warnings;
  int n_found = 0;
  double accuracy = 0;
  double seconds = 0;
};

nlohmann::json trial_json(const TrialResult& r) {
  return {{"length", r.length},
          {"depth", r.depth},
          {"trial", r.trial},
          {"prompt_tokens", r.prompt_tokens},
          {"needle_position", r.needle_position},
          {"filler_sentences", r.filler_units},
          {"expected", r.expected},
          {"got", r.got ? nlohmann::json(*r.got) : nlohmann::json(nullptr)},
          {"output", r.output},
          {"found", r.found},
          {"prefill_seconds", r.prefill_s},
          {"decode_seconds", r.decode_s}};
}

nlohmann::json length_json(const LengthSummary& s) {
  return {{"length", s.length},
          {"n_ctx", s.n_ctx},
          {"trials", s.n},
          {"found", s.n_found},
          {"accuracy", s.accuracy()},
          {"prefill_tokens", s.prefill_tokens},
          {"prefill_seconds", s.prefill_s},
          {"prefill_tokens_per_s", s.prefill_tps()},
          {"decode_seconds", s.decode_s},
          {"kv_bytes", s.kv_bytes}};
}

nlohmann::json report_json(const Report& r) {
  const PasskeyOptions& o = r.o;
  nlohmann::json jr = nlohmann::json::array();
  for (const auto& t : r.trials.results) jr.push_back(trial_json(t));
  nlohmann::json jl = nlohmann::json::array();
  for (const auto& s : r.trials.summaries) jl.push_back(length_json(s));
  return {
      {"model", r.info.path.empty() ? resolved_model_path(o.model) : r.info.path},
      {"n_ctx_train", r.info.n_ctx_train},
      {"type_k", o.type_k},
      {"type_v", o.type_v},
      {"kv_sink", o.kv.sink},
      {"kv_window", o.kv.window},
      {"kv_calibration", o.kv.calibration},
      {"lengths", o.lengths},
      {"depths", o.depths},
      {"trials", o.trials},
      {"seed", o.seed},
      {"threads", r.trials.threads_used},
      {"answer_tokens", kAnswerTokens},
      {"chat_template", false},
      {"results", jr},
      {"per_length", jl},
      {"found", r.n_found},
      {"total", r.trials.results.size()},
      {"accuracy", r.accuracy},
      {"seconds", r.seconds},
      {"warnings", r.warnings},
  };
}

// One length's row: the largest prompt, each depth's trials ("found" or what came instead), the accuracy.
// `cells` are the length's results, depth after depth.
std::string table_row(const LengthSummary& s, std::span<const TrialResult> cells, size_t n_depths, int n_trials) {
  int64_t max_tokens = 0;
  std::string row;
  for (size_t d = 0, k = 0; d < n_depths; ++d) {
    std::string cell;
    for (int t = 0; t < n_trials; ++t, ++k) {
      const TrialResult& r = cells[k];
      max_tokens = std::max(max_tokens, r.prompt_tokens);
      cell += (t ? ", " : "") + cell_text(r);
    }
    row += " " + cell + " |";
  }
  return fmt::format("| {} | {} |{} {}/{} ({:.0f}%) | {:.1f} |\n", s.length, max_tokens, row, s.n_found, s.n,
                     100.0 * s.accuracy(), s.prefill_tps());
}

// A Markdown table: one row per length, one column per depth.
std::string report_table(const Report& r) {
  const PasskeyOptions& o = r.o;
  std::string out = fmt::format("passkey retrieval: KV {} / {}, sink {}, window {}, {} trial(s) per cell, seed {}\n\n",
                                o.type_k, o.type_v, o.kv.sink < 0 ? "default" : std::to_string(o.kv.sink),
                                o.kv.window, o.trials, o.seed);
  out += "| length | prompt tokens |";
  for (double d : o.depths) out += fmt::format(" depth {} |", depth_label(d));
  out += " accuracy | prefill tokens/s |\n| ---: | ---: |";
  for (size_t i = 0; i < o.depths.size(); ++i) out += " --- |";
  out += " ---: | ---: |\n";
  const size_t per_length = o.depths.size() * size_t(o.trials);
  const std::span<const TrialResult> results = r.trials.results;
  for (size_t i = 0; i < r.trials.summaries.size(); ++i)
    out += table_row(r.trials.summaries[i], results.subspan(i * per_length, per_length), o.depths.size(), o.trials);
  out += fmt::format("\noverall: {}/{} found ({:.0f}%) in {:.1f} s, {} threads\n", r.n_found, results.size(),
                     100.0 * r.accuracy, r.seconds, r.trials.threads_used);
  return out;
}

int passkey(const PasskeyOptions& options) {
  PasskeyOptions o = options;
  Stopwatch total_clock;
  auto model = load_model(o.model);
  const std::vector<std::string> warnings = warn_beyond_training_context(o.lengths, model->info());
  check_lengths_hold_prompt(*model, o.lengths);
  o.type_k = resolve_cache_type(o.type_k, model, o.kv, o.json);
  o.type_v = resolve_cache_type(o.type_v, model, o.kv, o.json);

  const Trials trials = run_trials(o, model);

  Report report{o, model->info(), trials, warnings};
  for (const auto& r : trials.results) report.n_found += r.found ? 1 : 0;
  report.accuracy = trials.results.empty() ? 0.0 : double(report.n_found) / double(trials.results.size());
  report.seconds = total_clock.seconds();
  write_stdout(o.json ? dump_json(report_json(report)) + "\n" : report_table(report));
  return 0;
}

}  // namespace

Command register_passkey(CLI::App& app) {
  auto o = std::make_shared<PasskeyOptions>();
  CLI::App* sub = app.add_subcommand("passkey", "long-context retrieval: find a pass key hidden in filler text");
  sub->footer(
      "A random 5-digit pass key is hidden at each depth (0 = start, 1 = end) of a filler\n"
      "text; the prompt ends with \"What is the pass key? The pass key is\" and the model\n"
      "answers greedily (8 tokens). Found = the first 5-digit number in the answer is the\n"
      "key. The prompt is plain text: the chat template is not applied (small models\n"
      "complete plain text more reliably). Each prompt holds as much filler as fits in\n"
      "the length (in tokens); the context is the length + 8 tokens for the answer.\n"
      "Examples:\n"
      "  kvq passkey\n"
      "  kvq passkey --lengths 2048,4096 --depths 0,0.25,0.5,0.75,1 --trials 3\n"
      "  kvq passkey -ctk f32 -ctv f32 --json");
  add_model_flag(*sub, o->model);
  add_threads_flag(*sub, o->threads);
  add_simd_flag(*sub, o->simd);
  add_batch_flag(*sub, o->n_batch);
  add_cache_type_flags(*sub, o->type_k, o->type_v);
  add_kv_cache_flags(*sub, o->kv);
  sub->add_option("--lengths", o->lengths, "prompt lengths in tokens (at least 64)")
      ->type_name("N[,N...]")
      ->delimiter(',')
      ->check(int_range(kMinLength, kMaxCtx - kAnswerTokens))
      ->capture_default_str();
  sub->add_option("--depths", o->depths, "where the pass key sits, relative: 0 = start of the filler, 1 = end")
      ->type_name("D[,D...]")
      ->delimiter(',')
      ->check(float_range(0.0, 1.0))
      ->capture_default_str();
  sub->add_option("--trials", o->trials, "random keys per length and depth")
      ->type_name("N")
      ->check(int_range(1, 1000))
      ->capture_default_str();
  sub->add_option("-s,--seed", o->seed, "seed of the random keys")->type_name("S")->capture_default_str();
  add_json_flag(*sub, o->json, "print every result as one JSON object (progress still goes to stderr)");
  return [o] { return passkey(*o); };
}

}  // namespace kvq::cli

// kvq bench: prompt processing (ppN) and generation (tgN) speed, like llama-bench,
// optionally at a depth (tokens already in the cache when timing starts).
#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <random>

#include "common.h"

namespace kvq::cli {
namespace {

struct BenchOptions {
  std::string model;
  int threads = 0;
  int n_batch = 512;
  std::vector<int64_t> n_prompt{512};
  std::vector<int64_t> n_gen{128};
  std::vector<int64_t> depths{0};
  std::vector<std::string> types_k{"f16"}, types_v{"f16"};
  KvCacheOptions kv;
  std::string simd = "auto";
  int reps = 3;
  uint64_t seed = 1234;
  std::string depth_fill = "copy";
  bool json = false;
};

// Tokens the model really evaluates before a copy fill repeats their K/V.
constexpr int64_t kFillSeedTokens = 512;

struct Result {
  std::string test;  // "pp" or "tg"
  int64_t n = 0, depth = 0, n_ctx = 0;
  std::string type_k, type_v;
  std::string attention_kernel;  // the tile kernel this test ran (decode may differ by value format)
  std::vector<double> samples_ts;
  MeanStd ts;
  double bytes_per_token = 0, gb_per_s = 0;  // tg only
  uint64_t kv_bytes = 0;
  std::string name() const {
    return depth > 0 ? fmt::format("{}{} @ d{}", test, n, depth) : fmt::format("{}{}", test, n);
  }
};

Result make_result(std::string test, int64_t n, int64_t depth, int64_t n_ctx, const std::string& tk,
                   const std::string& tv) {
  Result r;
  r.test = std::move(test);
  r.n = n;
  r.depth = depth;
  r.n_ctx = n_ctx;
  r.type_k = tk;
  r.type_v = tv;
  return r;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

std::vector<int32_t> random_tokens(std::mt19937_64& rng, int n_vocab, int64_t n) {
  std::uniform_int_distribution<int32_t> dist(0, n_vocab - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = dist(rng);
  return t;
}

int32_t argmax(std::span<const float> logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

int bench(const BenchOptions& o) {
  auto model = load_model(o.model);
  const ModelInfo& m = model->info();
  if (m.n_vocab <= 0) throw Error("the model reports an empty vocabulary");
  const int64_t max_p = *std::max_element(o.n_prompt.begin(), o.n_prompt.end());
  const int64_t max_n = *std::max_element(o.n_gen.begin(), o.n_gen.end());
  if (max_p == 0 && max_n == 0) throw UsageError("nothing to measure: -p and -n are both 0");

  std::mt19937_64 rng(o.seed);
  std::vector<Result> results;
  int threads_used = o.threads;
  for (const auto& tk : o.types_k)
    for (const auto& tv : o.types_v)
      for (int64_t depth : o.depths) {
        SessionParams sp;
        sp.n_ctx = round_up(depth + max_p + max_n, 256);
        sp.n_threads = o.threads;
        sp.n_batch = o.n_batch;
        sp.cache_type_k = resolve_cache_type(tk, model, o.kv, o.json);
        sp.cache_type_v = resolve_cache_type(tv, model, o.kv, o.json);
        o.kv.apply_to(sp);
        sp.simd = o.simd;
        Session session(model, sp);
        threads_used = session.n_threads();
        const std::vector<int32_t> prefix = random_tokens(rng, m.n_vocab, depth);
        // Fresh context holding `depth` tokens; returns the logits after them (empty
        // at depth 0 and after a copy fill, whose logits mean nothing).
        auto fill = [&]() -> std::span<const float> {
          session.reset();
          if (depth == 0) return {};
          if (o.depth_fill == "prefill") return session.eval(prefix);
          const int64_t n_seed = std::min(depth, kFillSeedTokens);
          session.fill_for_benchmark(std::span(prefix).first(size_t(n_seed)), depth);
          return {};
        };
        {  // warm-up: page in the weights, wake the threads
          const auto w = random_tokens(rng, m.n_vocab, std::min<int64_t>(16, session.n_ctx()));
          session.eval(w);
        }
        auto progress = [&](const Result& r, int rep) {
          fmt::print(stderr, "kvq bench: {} K {} V {}: rep {}/{}: {:.1f} tokens/s\n", r.name(), tk, tv, rep + 1,
                       o.reps, r.samples_ts.back());
        };

        for (int64_t p : o.n_prompt) {
          if (p == 0) continue;
          Result r = make_result("pp", p, depth, session.n_ctx(), tk, tv);
          r.attention_kernel = session.kernels().prefill_attention;
          for (int rep = 0; rep < o.reps; ++rep) {
            fill();
            const auto batch = random_tokens(rng, m.n_vocab, p);
            Stopwatch clock;
            session.eval(batch);
            r.samples_ts.push_back(double(p) / clock.seconds());
            progress(r, rep);
          }
          r.ts = mean_std(r.samples_ts);
          r.kv_bytes = session.kv_stats().bytes();
          results.push_back(std::move(r));
        }
        for (int64_t n : o.n_gen) {
          if (n == 0) continue;
          Result r = make_result("tg", n, depth, session.n_ctx(), tk, tv);
          r.attention_kernel = session.kernels().decode_attention;
          for (int rep = 0; rep < o.reps; ++rep) {
            std::span<const float> logits = fill();
            int32_t token = logits.empty() ? random_tokens(rng, m.n_vocab, 1)[0] : argmax(logits);
            Stopwatch clock;
            for (int64_t i = 0; i < n; ++i) {
              const int32_t one[1] = {token};
              token = argmax(session.eval(one));
            }
            r.samples_ts.push_back(double(n) / clock.seconds());
            progress(r, rep);
          }
          r.ts = mean_std(r.samples_ts);
          const KvStats kv = session.kv_stats();
          r.kv_bytes = kv.bytes();
          // Each generated token reads every weight once and the K/V of every token
          // held; on average depth + (n+1)/2 tokens are held during the run.
          const double kv_per_token_of_ctx = kv.n_ctx > 0 ? double(kv.bytes()) / double(kv.n_ctx) : 0;
          r.bytes_per_token = double(m.weight_bytes) + kv_per_token_of_ctx * (double(depth) + double(n + 1) / 2);
          r.gb_per_s = r.bytes_per_token * r.ts.mean / 1e9;
          results.push_back(std::move(r));
        }
      }

  // llama-bench style label: architecture, size, the weight type holding most bytes.
  std::map<std::string, uint64_t> bytes_by_type;
  for (const auto& t : m.tensors) bytes_by_type[t.type] += t.bytes;
  std::string main_type;
  uint64_t most = 0;
  for (const auto& [type, bytes] : bytes_by_type)
    if (bytes > most) most = bytes, main_type = type;
  const std::string model_name = fmt::format("{} {} {}", m.architecture, format_count(m.n_params), main_type);
  if (o.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& r : results) {
      nlohmann::json j = {{"test", r.name()},     {"kind", r.test},       {"n_tokens", r.n},
                          {"depth", r.depth},     {"n_ctx", r.n_ctx},     {"type_k", r.type_k},
                          {"type_v", r.type_v},   {"reps", r.samples_ts.size()},
                          {"samples_ts", r.samples_ts},
                          {"avg_ts", r.ts.mean},  {"stddev_ts", r.ts.stddev},
                          {"kv_bytes", r.kv_bytes},
                          {"attention_kernel", r.attention_kernel}};
      if (r.test == "tg") {
        j["bytes_per_token"] = r.bytes_per_token;
        j["gb_per_s"] = r.gb_per_s;
      }
      list.push_back(std::move(j));
    }
    nlohmann::json out = {{"model", m.path.empty() ? resolved_model_path(o.model) : m.path},
                          {"model_name", m.name},
                          {"model_label", model_name},
                          {"n_params", m.n_params},
                          {"weight_bytes", m.weight_bytes},
                          {"threads", threads_used},
                          {"simd", kernel_info(*model, SessionParams{.simd = o.simd}).simd},
                          {"n_batch", o.n_batch},
                          {"seed", o.seed},
                          {"depth_fill", o.depth_fill},
                          {"kvq_version", std::string(version())},
                          {"results", list}};
    write_stdout(dump_json(out) + "\n");
    return 0;
  }

  std::string table;
  // "kernel": the attention kernel the test ran (it follows the CPU, --simd and the value format).
  table += "| model | size | params | threads | kernel | type_k | type_v | test | t/s | GB/s |\n";
  table += "| --- | ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: |\n";
  for (const auto& r : results)
    table += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {:.2f} ± {:.2f} | {} |\n", model_name,
                         format_bytes(m.weight_bytes), format_count(m.n_params), threads_used, r.attention_kernel,
                         r.type_k, r.type_v, r.name(), r.ts.mean, r.ts.stddev,
                         r.test == "tg" ? fmt::format("{:.2f}", r.gb_per_s) : "");
  write_stdout(table);
  return 0;
}

}  // namespace

Command register_bench(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* sub = app.add_subcommand("bench", "prompt processing and generation speed (like llama-bench)");
  sub->footer(
      "ppN: N random tokens evaluated in one call on a context holding `depth` tokens.\n"
      "tgN: N tokens generated one at a time (greedy), after `depth` tokens.\n"
      "GB/s for tg: (weight bytes + KV bytes of the tokens held) per token x tokens/s.\n"
      "Depth fill 'copy' (default): the model evaluates the first min(depth, 512) tokens and\n"
      "their keys and values are stored again, encoded afresh, up to `depth` (the same bytes\n"
      "and attention work as a real prefill, in seconds); 'prefill' evaluates all of them.\n"
      "Lists are comma separated; every combination of -ctk, -ctv and -d is measured.\n"
      "Examples:\n"
      "  kvq bench\n"
      "  kvq bench -p 512 -n 128 -d 0,4096,16384 -r 5\n"
      "  kvq bench -ctk f16,f32 -ctv f16,f32 --json");
  add_model_flag(*sub, o->model);
  add_threads_flag(*sub, o->threads);
  add_simd_flag(*sub, o->simd);
  add_batch_flag(*sub, o->n_batch);
  const std::string names = kv_format_names();
  sub->add_option("-p,--n-prompt", o->n_prompt, "prompt lengths for ppN tests (0 skips)")
      ->type_name("N[,N...]")
      ->delimiter(',')
      ->check(int_range(0, kMaxCtx))
      ->capture_default_str();
  sub->add_option("-n,--n-gen", o->n_gen, "token counts for tgN tests (0 skips)")
      ->type_name("N[,N...]")
      ->delimiter(',')
      ->check(int_range(0, kMaxCtx))
      ->capture_default_str();
  sub->add_option("-d,--n-depth", o->depths, "tokens already in the context when timing starts")
      ->type_name("N[,N...]")
      ->delimiter(',')
      ->check(int_range(0, kMaxCtx))
      ->capture_default_str();
  sub->add_option("-r,--repetitions", o->reps, "repetitions of each test")
      ->type_name("N")
      ->check(int_range(1, 1000))
      ->capture_default_str();
  sub->add_option("--cache-type-k", o->types_k, fmt::format("KV cache formats for keys, also -ctk: {}", names))
      ->type_name("TYPE[,TYPE...]")
      ->delimiter(',')
      ->check(kv_format_validator())
      ->capture_default_str();
  sub->add_option("--cache-type-v", o->types_v, fmt::format("KV cache formats for values, also -ctv: {}", names))
      ->type_name("TYPE[,TYPE...]")
      ->delimiter(',')
      ->check(kv_format_validator())
      ->capture_default_str();
  add_kv_cache_flags(*sub, o->kv);
  sub->add_option("--depth-fill", o->depth_fill, "how the depth is filled: copy or prefill (see below)")
      ->type_name("HOW")
      ->check(CLI::IsMember({"copy", "prefill"}))
      ->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the random token ids")->type_name("S")->capture_default_str();
  add_json_flag(*sub, o->json, "print the results as one JSON object (progress still goes to stderr)");
  return [o] { return bench(*o); };
}

}  // namespace kvq::cli

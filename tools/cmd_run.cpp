// kvq run: generate text from a prompt, streamed to stdout as it is sampled.
#include <fmt/format.h>

#include <iostream>
#include <optional>
#include <sstream>
#include <random>

#include "common.h"

namespace kvq::cli {
namespace {

struct RunOptions {
  std::string model;
  int threads = 0;
  int64_t n_ctx = 0;  // 0: min(4096, training context)
  int n_batch = 512;
  std::string type_k = "auto", type_v = "auto";
  KvCacheOptions kv;
  std::string simd = "auto";
  std::string prompt, prompt_file;
  int64_t n_predict = 128;
  float temperature = 0.8f;
  int top_k = 40;
  float top_p = 0.95f;
  std::optional<uint64_t> seed;
  bool chat = false;
  std::string system;
  bool echo = false;
  bool json = false;
};

// Default context: enough for a conversation, bounded so that models with huge
// training contexts do not allocate gigabytes of cache by default.
constexpr int64_t kDefaultRunCtx = 4096;

std::string prompt_text(const RunOptions& o, const Model& model) {
  std::string text;
  if (o.prompt_file == "-") {
    std::ostringstream ss;
    ss << std::cin.rdbuf();
    text = std::move(ss).str();
  } else if (!o.prompt_file.empty()) {
    text = read_file(o.prompt_file, "prompt file");
  } else {
    text = o.prompt;
  }
  if (text.empty()) throw UsageError("the prompt is empty: give the text with -p TEXT or -f FILE");
  if (!o.chat) return text;
  std::vector<ChatMessage> messages;
  if (!o.system.empty()) messages.push_back({"system", o.system});
  messages.push_back({"user", text});
  return model.apply_chat_template(messages, /*add_generation_prompt=*/true);
}

int run(const RunOptions& o) {
  if (!o.system.empty() && !o.chat) throw UsageError("--system needs --chat");

  Stopwatch load_clock;
  auto model = load_model(o.model);
  const ModelInfo& info = model->info();
  const double load_s = load_clock.seconds();

  const std::string text = prompt_text(o, *model);
  // Chat templates contain the control tokens (<|im_start|> ...) as text.
  std::vector<int32_t> prompt = model->tokenize(text, model->add_bos_default(), /*parse_special=*/o.chat);
  // A template that writes the BOS itself plus the tokenizer's BOS would double it.
  if (prompt.size() >= 2 && model->bos_id() >= 0 && prompt[0] == model->bos_id() && prompt[1] == prompt[0])
    prompt.erase(prompt.begin());
  if (prompt.empty()) throw UsageError("the prompt is empty after tokenization");

  SessionParams sp;
  sp.n_ctx = o.n_ctx > 0 ? o.n_ctx
                         : (info.n_ctx_train > 0 ? std::min<int64_t>(kDefaultRunCtx, info.n_ctx_train) : kDefaultRunCtx);
  sp.n_threads = o.threads;
  sp.n_batch = o.n_batch;
  sp.cache_type_k = resolve_cache_type(o.type_k, model, o.kv, /*quiet=*/true);  // note at the end
  sp.cache_type_v = resolve_cache_type(o.type_v, model, o.kv, /*quiet=*/true);
  o.kv.apply_to(sp);
  sp.simd = o.simd;
  if (int64_t(prompt.size()) >= sp.n_ctx)
    throw Error(fmt::format("the prompt is {} tokens but the context holds {} (and needs room to generate): "
                            "raise -c/--ctx-size or shorten the prompt",
                            prompt.size(), sp.n_ctx));
  if (info.n_ctx_train > 0 && sp.n_ctx > info.n_ctx_train && !o.json)
    fmt::print(stderr, "kvq: warning: context {} is larger than the model's training context {}\n", sp.n_ctx,
               info.n_ctx_train);

  Session session(model, sp);

  SamplerParams smp;
  smp.temperature = o.temperature;
  smp.top_k = o.top_k;
  smp.top_p = o.top_p;
  smp.seed = o.seed ? *o.seed : std::random_device{}();
  Sampler sampler(smp);

  if (o.echo && !o.json) write_stdout(text);

  Stopwatch prompt_clock;
  std::span<const float> logits = session.eval(prompt);
  const double prompt_s = prompt_clock.seconds();

  Utf8Buffer utf8;
  std::string generated;
  std::vector<int32_t> generated_ids;
  std::string stop_reason = "length";
  Stopwatch gen_clock;
  for (int64_t i = 0; i < o.n_predict; ++i) {
    const int32_t token = sampler.sample(logits);
    if (model->is_end_of_generation(token)) {
      stop_reason = "end_of_generation";
      break;
    }
    generated_ids.push_back(token);
    const std::string piece = utf8.push(model->token_bytes(token));
    generated += piece;
    if (!o.json) write_stdout(piece);
    if (i + 1 == o.n_predict) break;  // no need to run the last token
    if (session.n_past() >= session.n_ctx()) {
      stop_reason = "context_full";
      break;
    }
    const int32_t one[1] = {token};
    logits = session.eval(one);
  }
  const double gen_s = gen_clock.seconds();
  const std::string rest = utf8.flush();
  generated += rest;
  if (!o.json) {
    write_stdout(rest);
    write_stdout("\n");
  }

  const KvStats kv = session.kv_stats();
  const double prompt_tps = prompt_s > 0 ? double(prompt.size()) / prompt_s : 0;
  const double gen_tps = gen_s > 0 && !generated_ids.empty() ? double(generated_ids.size()) / gen_s : 0;
  // The attention kernel decode ran (it depends on the CPU, --simd and the value format).
  const KernelInfo kernels = session.kernels();
  const std::string& kernel = kernels.decode_attention;

  if (o.json) {
    nlohmann::json j = {
        {"model", resolved_model_path(o.model)},
        {"text", generated},
        {"stop_reason", stop_reason},
        {"prompt_tokens", prompt.size()},
        {"prompt_seconds", prompt_s},
        {"prompt_tokens_per_s", prompt_tps},
        {"generated_tokens", generated_ids.size()},
        {"generation_seconds", gen_s},
        {"generation_tokens_per_s", gen_tps},
        {"load_seconds", load_s},
        {"kv_type_k", kv.type_k},
        {"kv_type_v", kv.type_v},
        {"kv_bytes", kv.bytes()},
        {"kv_bytes_k", kv.bytes_k},
        {"kv_bytes_v", kv.bytes_v},
        {"kv_bytes_positions", kv.bytes_positions},
        {"n_ctx", kv.n_ctx},
        {"n_past", kv.n_tokens},
        {"threads", session.n_threads()},
        {"simd", kernels.simd},
        {"attention_kernel", kernel},
        {"temperature", std::stod(fmt::format("{}", o.temperature))},
        {"top_k", o.top_k},
        {"top_p", std::stod(fmt::format("{}", o.top_p))},
        {"seed", smp.seed},
        {"chat", o.chat},
    };
    write_stdout(dump_json(j) + "\n");
    return 0;
  }

  if (stop_reason == "context_full")
    fmt::print(stderr, "kvq: stopped: the context ({} tokens) is full; raise -c/--ctx-size for longer output\n",
               kv.n_ctx);
  fmt::print(stderr, "kvq: prompt:    {:5} tokens in {:7.3f} s = {:8.1f} tokens/s\n", prompt.size(), prompt_s,
             prompt_tps);
  fmt::print(stderr, "kvq: generated: {:5} tokens in {:7.3f} s = {:8.1f} tokens/s ({})\n", generated_ids.size(),
             gen_s, gen_tps, stop_reason == "end_of_generation" ? "end of generation" : stop_reason == "length" ? "reached -n" : "context full");
  fmt::print(stderr,
             "kvq: KV cache:  K {} / V {}, {} held ({} K + {} V + {} positions), context used {} of {} tokens, "
             "{} threads, attention kernel {}\n",
             kv.type_k, kv.type_v, format_bytes(kv.bytes()), format_bytes(kv.bytes_k), format_bytes(kv.bytes_v),
             format_bytes(kv.bytes_positions), kv.n_tokens, kv.n_ctx, session.n_threads(), kernel);
  if (o.temperature > 0) fmt::print(stderr, "kvq: seed {} (pass --seed {} to repeat this output)\n", smp.seed, smp.seed);
  if (o.type_k == "auto" || o.type_v == "auto")
    if (const std::string note = auto_cache_note(*model, o.kv); !note.empty()) fmt::print(stderr, "kvq: note: {}\n", note);
  return 0;
}

}  // namespace

Command register_run(CLI::App& app) {
  auto o = std::make_shared<RunOptions>();
  CLI::App* sub = app.add_subcommand("run", "generate text from a prompt (streamed to stdout)");
  sub->footer(
      "Examples:\n"
      "  kvq run -p \"The capital of France is\" -n 32 --temp 0\n"
      "  kvq run --chat --system \"You are terse.\" -p \"Name three prime numbers.\" -n 64\n"
      "  kvq run -f prompt.txt -n 256 -c 8192 -ctk f32 --json");
  add_model_flag(*sub, o->model);
  auto* p = sub->add_option("-p,--prompt", o->prompt, "prompt text")->type_name("TEXT");
  auto* f = sub->add_option("-f,--file", o->prompt_file, "read the prompt from FILE (- for standard input)")->type_name("FILE");
  p->excludes(f);
  f->excludes(p);
  sub->add_option("-n,--n-predict", o->n_predict, "maximum number of tokens to generate (stops earlier at end of generation)")
      ->type_name("N")
      ->check(int_range(0, kMaxCtx))
      ->capture_default_str();
  add_threads_flag(*sub, o->threads);
  add_simd_flag(*sub, o->simd);
  add_ctx_flag(*sub, o->n_ctx, 16, fmt::format("context size in tokens (default: {} or the training context if smaller)", kDefaultRunCtx));
  add_batch_flag(*sub, o->n_batch);
  add_cache_type_flags(*sub, o->type_k, o->type_v);
  add_kv_cache_flags(*sub, o->kv);
  sub->add_option("--temp", o->temperature, "sampling temperature; 0 = greedy (always the most likely token)")
      ->type_name("T")
      ->check(float_range(0.0, 100.0))
      ->capture_default_str();
  sub->add_option("--top-k", o->top_k, "sample among the K most likely tokens; 0 = no limit")
      ->type_name("K")
      ->check(int_range(0, 1 << 24))
      ->capture_default_str();
  sub->add_option("--top-p", o->top_p, "nucleus sampling: smallest set of tokens with probability >= P, in (0, 1]")
      ->type_name("P")
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            float v = 0;
            if (!CLI::detail::lexical_cast(s, v)) return fmt::format("'{}' is not a number", s);
            if (!(v > 0.0f && v <= 1.0f)) return fmt::format("top-p must be in (0, 1], got {}", s);
            return {};
          },
          "", "(0,1]"))
      ->capture_default_str();
  sub->add_option("-s,--seed", o->seed, "random seed for sampling (default: random, printed at the end)")
      ->type_name("S");
  sub->add_flag("--chat", o->chat, "wrap the prompt as a user message in the model's chat template");
  sub->add_option("--system", o->system, "system message for --chat")->type_name("TEXT");
  sub->add_flag("--echo", o->echo, "print the prompt (as given to the model) before the generated text");
  add_json_flag(*sub, o->json, "print one JSON object (text and statistics) instead of streaming");
  return [o] {
    if (o->prompt.empty() && o->prompt_file.empty())
      throw UsageError("no prompt: give -p TEXT or -f FILE");
    return run(*o);
  };
}

}  // namespace kvq::cli

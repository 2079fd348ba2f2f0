// kvq calibrate: fit the KV calibration sidecar (per-channel key bounds, nuqN
// codebooks) that the KVQuant cache formats need, from calibration text.
#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <limits>

#include "common.h"

namespace kvq::cli {
namespace {

struct CalibrateOptions {
  std::string model;
  std::string text_file;
  std::string out;
  int64_t n_windows = 16;
  int64_t window = 2048;
  std::string weighting = "fisher-s2";
  bool fisher = false;
  std::vector<std::string> also;
  int sink = 1;
  uint64_t seed = 0;
  int threads = 0;
  std::string simd = "auto";
  bool json = false;
};

uint64_t peak_rss_bytes() {
  struct rusage ru {};
  if (::getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return uint64_t(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

int calibrate(CalibrateOptions o) {
  const bool sampled = o.text_file.empty();
  std::string text;
  if (!sampled) {
    text = read_file(o.text_file, "text file");
    if (text.empty()) throw Error(fmt::format("text file {} is empty", o.text_file));
  }
  auto model = load_model(o.model);
  const ModelInfo& info = model->info();
  if (o.window == 0) o.window = info.n_ctx_train > 0 ? std::min<int64_t>(kAutoCalibWindow, info.n_ctx_train) : kAutoCalibWindow;
  if (info.n_ctx_train > 0 && o.window > info.n_ctx_train)
    throw UsageError(fmt::format("--window {} is longer than the model's context {}", o.window, info.n_ctx_train));
  if (o.sink >= o.window) throw UsageError(fmt::format("--sink {} must be smaller than --window {}", o.sink, o.window));
  const std::string out = o.out.empty() ? default_kv_calibration_path(*model) : o.out;
  const std::string weighting = o.fisher ? "fisher-s2" : o.weighting;
  for (size_t i = 0; i < o.also.size(); ++i)
    if (o.also[i] == weighting || std::find(o.also.begin(), o.also.begin() + std::ptrdiff_t(i), o.also[i]) !=
                                      o.also.begin() + std::ptrdiff_t(i))
      throw UsageError(fmt::format("--also-weighting: weighting '{}' is asked for twice", o.also[i]));
  const bool progress = stderr_is_tty() && !o.json;

  Stopwatch tok_clock;
  std::vector<int32_t> tokens;
  if (sampled) {
    if (!o.json)
      fmt::print(stderr, "kvq: no -f: sampling {} x {} tokens of calibration text from the model itself (seed {})\n",
                 o.n_windows, o.window, o.seed);
    tokens = sample_calibration_tokens(model, o.n_windows, o.window, o.seed, o.threads, [&](int64_t done, int64_t total) {
      if (!progress) return;
      const double t = tok_clock.seconds();
      fmt::print(stderr, "\rsampling {}/{} tokens  {:.1f} s  {:.0f} tokens/s  ETA {:.0f} s   ", done, total, t,
                 t > 0 ? double(done) / t : 0.0, t / double(done) * double(total - done));
      if (done == total) fmt::print(stderr, "\n");
      std::fflush(stderr);
    });
  } else {
    tokens = model->tokenize(text, model->add_bos_default());
  }
  const double tokenize_s = tok_clock.seconds();
  const std::string text_label = sampled ? fmt::format("text sampled from the model (seed {})", o.seed) : o.text_file;
  const int64_t need = o.n_windows * o.window;
  if (int64_t(tokens.size()) < need)
    throw Error(fmt::format("{} has {} tokens, but {} windows of {} need {}: use fewer (--windows) or shorter "
                            "(--window) windows, or a longer text",
                            o.text_file, tokens.size(), o.n_windows, o.window, need));

  CalibrationParams p;
  p.n_windows = o.n_windows;
  p.window = o.window;
  p.n_threads = o.threads;
  p.sink_tokens = o.sink;
  p.weighting = weighting;
  p.also_weightings = o.also;
  p.seed = o.seed;
  p.simd = o.simd;
  p.text_name = sampled ? fmt::format("sampled from the model (seed {})", o.seed)
                        : std::filesystem::path(o.text_file).filename().string();
  Stopwatch clock;
  if (progress)
    p.progress = [&](std::string_view stage, int64_t done, int64_t total) {
      const double t = clock.seconds();
      if (stage == "capture") {
        // Windows: tokens/s and the time left at that rate.
        fmt::print(stderr, "\rcapture {}/{} windows  {:.1f} s  {:.0f} tokens/s  ETA {:.0f} s   ", done, total, t,
                   t > 0 ? double(done * o.window) / t : 0.0, t / double(done) * double(total - done));
      } else {
        fmt::print(stderr, "\r{} {}/{}  {:.1f} s   ", stage, done, total, t);
      }
      if (stage == "fit" && done == total) fmt::print(stderr, "\n");
      std::fflush(stderr);
    };
  if (!o.json)
    fmt::print(stderr, "kvq: calibrating on {} windows of {} tokens of {} ({} tokens in the text), weighting {}, sink {}, {} threads\n",
               o.n_windows, o.window, text_label, tokens.size(), p.weighting, o.sink, o.threads);
  const CalibrationReport r = calibrate_kv(model, tokens, p, out);
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(r.path, ec);
  const uint64_t rss = peak_rss_bytes();

  if (o.json) {
    nlohmann::json j = {
        {"sidecar", r.path},
        {"sidecar_bytes", ec ? 0 : uint64_t(size)},
        {"model", info.path},
        {"model_fingerprint", info.fingerprint},
        {"text_file", sampled ? nlohmann::json(nullptr) : nlohmann::json(o.text_file)},
        {"text_sampled", sampled},
        {"sampling_seconds", sampled ? tokenize_s : 0.0},
        {"n_tokens", r.n_tokens},
        {"n_windows", o.n_windows},
        {"window", o.window},
        {"weighting", p.weighting},
        {"also_sidecars", r.also_paths},
        {"backward_bytes", r.backward_bytes},
        {"sink_tokens", o.sink},
        {"seed", o.seed},
        {"threads", o.threads},
        {"tokenize_seconds", tokenize_s},
        {"capture_seconds", r.capture_seconds},
        {"fit_seconds", r.fit_seconds},
        {"peak_capture_bytes", r.peak_capture_bytes},
        {"peak_rss_bytes", rss},
    };
    write_stdout(dump_json(j) + "\n");
    return 0;
  }
  write_stdout(fmt::format("wrote {} ({}, weighting {})\n", r.path, ec ? "size unknown" : format_bytes(uint64_t(size)),
                           p.weighting));
  for (size_t i = 0; i < r.also_paths.size(); ++i)
    write_stdout(fmt::format("wrote {} (weighting {})\n", r.also_paths[i], o.also[i]));
  write_stdout(fmt::format("{} tokens ({} windows of {}); capture {:.1f} s ({:.0f} tokens/s), fit {:.1f} s\n",
                           r.n_tokens, o.n_windows, o.window, r.capture_seconds,
                           r.capture_seconds > 0 ? double(r.n_tokens) / r.capture_seconds : 0.0, r.fit_seconds));
  if (r.backward_bytes > 0)
    write_stdout(fmt::format("memory: activations and Fisher weights captured {}, backward pass working set {}, peak resident {}\n",
                             format_bytes(r.peak_capture_bytes), format_bytes(r.backward_bytes), format_bytes(rss)));
  else
    write_stdout(fmt::format("memory: activations captured {}, peak resident {}\n", format_bytes(r.peak_capture_bytes),
                             format_bytes(rss)));
  return 0;
}

}  // namespace

Command register_calibrate(CLI::App& app) {
  auto o = std::make_shared<CalibrateOptions>();
  CLI::App* sub = app.add_subcommand("calibrate", "fit the KV calibration sidecar the KVQuant cache formats need");
  sub->footer(
      "Runs the model over the first WINDOWS x WINDOW tokens of the text, captures every layer's\n"
      "pre-RoPE keys and values, and writes per-channel key bounds and nuq codebooks (2/3/4/8 bits,\n"
      "with and without 1% outliers) to a GGUF sidecar. The first --sink tokens of each window\n"
      "are left out of every statistic.\n"
      "Weighting (k-means element weights): fisher-s2 (default; Fisher information (dL/dA)^2 from a\n"
      "full-precision backward pass, times the vector scale squared), fisher, scale2, none.\n"
      "--also-weighting writes sidecars of more weightings from the same capture beside the main\n"
      "one (OUT without .gguf, then .WEIGHTING.gguf), for ablations.\n"
      "KVQuant's protocol calibrates on WikiText-2 *validation* text (wiki.valid.tokens), never on\n"
      "the test text the perplexity is measured on. Without -f the model writes its own calibration\n"
      "text (sampled at temperature 1 from BOS, --seed seeds it): what kvq run does on first use.\n"
      "Examples:\n"
      "  kvq calibrate -f wiki.valid.tokens\n"
      "  kvq calibrate -m model.gguf -f wiki.valid.tokens -o model.kvcalib.gguf --windows 4 --window 1024\n"
      "  kvq calibrate -f wiki.valid.tokens -o /tmp/x.kvcalib.gguf --also-weighting fisher,scale2,none");
  add_model_flag(*sub, o->model);
  sub->add_option("-f,--file", o->text_file,
                  "calibration text (WikiText-2 validation: wiki.valid.tokens); without it, text sampled from the "
                  "model itself (4 x 1024 tokens unless --windows/--window say otherwise)")
      ->type_name("FILE");
  sub->add_option("-o,--output", o->out, "sidecar to write (default: MODEL.kvcalib.gguf beside the model)")
      ->type_name("FILE");
  sub->add_option("--windows", o->n_windows, "number of windows taken from the start of the text")
      ->type_name("N")
      ->check(int_range(1, 1 << 20))
      ->capture_default_str();
  sub->add_option("--window", o->window, "tokens per window (each starts from an empty cache)")
      ->type_name("N")
      ->check(int_range(16, kMaxCtx))
      ->capture_default_str();
  auto* weighting = sub->add_option("--weighting", o->weighting,
                                    "k-means element weights: fisher-s2 (Fisher x scale^2), fisher, scale2 (vector "
                                    "range squared) or none")
                        ->type_name("NAME")
                        ->check(CLI::IsMember({"fisher-s2", "fisher", "scale2", "none"}))
                        ->capture_default_str();
  sub->add_flag("--fisher", o->fisher, "same as --weighting fisher-s2 (the default)")->excludes(weighting);
  sub->add_option("--also-weighting", o->also, "more sidecars from the same capture, e.g. fisher,scale2,none")
      ->type_name("LIST")
      ->delimiter(',')
      ->check(CLI::IsMember({"fisher-s2", "fisher", "scale2", "none"}));
  sub->add_option("--sink", o->sink, "first tokens of each window left out of the statistics")
      ->type_name("N")
      ->check(int_range(0, 1 << 20))
      ->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the k-means (and of the sampled text without -f)")->type_name("N")->capture_default_str();
  add_threads_flag(*sub, o->threads);
  add_simd_flag(*sub, o->simd);
  add_json_flag(*sub, o->json, "print the result as one JSON object");
  return [o, sub] {
    if (o->text_file.empty()) {
      // Sampled text costs a decode step per token: smaller defaults.
      if (sub->count("--windows") == 0) o->n_windows = kAutoCalibWindows;
      if (sub->count("--window") == 0) o->window = 0;  // kAutoCalibWindow, or the model's context if shorter
    }
    return calibrate(*o);
  };
}

}  // namespace kvq::cli

#include "common.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <sys/stat.h>
#include <thread>
#include <utility>

namespace kvq::cli {

std::string default_model_path() {
  if (const char* dir = std::getenv("KVQ_CACHE_DIR"); dir && *dir) return fmt::format("{}/{}", dir, kDefaultModelName);
  const char* home = std::getenv("HOME");
  return fmt::format("{}/.cache/kvq/{}", home && *home ? home : ".", kDefaultModelName);
}

int default_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : int(std::min<unsigned>(n, kMaxThreads));
}

void add_model_flag(CLI::App& app, std::string& path) {
  app.add_option("-m,--model", path,
                 fmt::format("GGUF model file (default: $KVQ_CACHE_DIR/{0}, else ~/.cache/kvq/{0}; "
                             "scripts/fetch-model.sh downloads it)",
                             kDefaultModelName))
      ->type_name("FILE");
}

void add_threads_flag(CLI::App& app, int& threads) {
  threads = default_threads();
  app.add_option("-t,--threads", threads, "threads for the forward pass (default: every core)")
      ->type_name("N")
      ->check(int_range(1, kMaxThreads))
      ->capture_default_str();
}

void add_simd_flag(CLI::App& app, std::string& simd) {
  app.add_option("--simd", simd,
                 fmt::format("SIMD level of the kernels, at most what this CPU runs ({} here): to compare paths or to "
                             "time what a CPU without AVX-512 runs",
                             cpu_simd_level()))
      ->type_name("LEVEL")
      ->check(CLI::IsMember({"auto", "avx512", "avx2", "scalar"}))
      ->check([](const std::string& name) -> std::string {
        const std::vector<std::string> levels = cpu_simd_levels();
        if (name == "auto" || std::find(levels.begin(), levels.end(), name) != levels.end()) return "";
        return fmt::format("this CPU runs at most {}", cpu_simd_level());
      })
      ->capture_default_str();
}

void add_ctx_flag(CLI::App& app, int64_t& n_ctx, int64_t min_ctx, const std::string& help) {
  app.add_option("-c,--ctx-size", n_ctx, help)
      ->type_name("N")
      ->check(int_range(min_ctx, kMaxCtx));
}

void add_batch_flag(CLI::App& app, int& n_batch) {
  app.add_option("-b,--batch-size", n_batch, "tokens per forward chunk during prompt processing")
      ->type_name("N")
      ->check(int_range(1, 1 << 16))
      ->capture_default_str();
}

CLI::Validator int_range(int64_t lo, int64_t hi) {
  return CLI::Validator(
      [lo, hi](std::string& s) -> std::string {
        int64_t v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return fmt::format("'{}' is not an integer", s);
        if (v < lo) return fmt::format("must be >= {}, got {}", lo, s);
        if (v > hi) return fmt::format("must be <= {}, got {}", hi, s);
        return {};
      },
      "", "");
}

CLI::Validator float_range(double lo, double hi) {
  return CLI::Validator(
      [lo, hi](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v) || !std::isfinite(v)) return fmt::format("'{}' is not a number", s);
        if (v < lo) return fmt::format("must be >= {}, got {}", lo, s);
        if (v > hi) return fmt::format("must be <= {}, got {}", hi, s);
        return {};
      },
      "", "");
}

std::string kv_format_names() {
  std::string names;
  for (const auto& f : kv_formats()) names += (names.empty() ? "" : ", ") + f.name;
  return names;
}

const KvFormatInfo* find_kv_format(std::string_view name) {
  static const std::vector<KvFormatInfo> formats = kv_formats();
  for (const auto& f : formats)
    if (f.name == name) return &f;
  return nullptr;
}

namespace {

bool auto_calibration_enabled() {
  const char* v = std::getenv("KVQ_AUTO_CALIB");
  return !(v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0));
}

// "auto" and no sidecar at the model's default path: fit one now, once, and cache
// it there. Text: $KVQ_CALIB_TEXT when set, else tokens the model samples itself.
// The default cache needs per-channel key ranges only, so the fit skips the
// backward pass (scale2 weighting). Returns false (after saying why) on failure.
bool auto_calibrate(const std::shared_ptr<const Model>& model) {
  const std::string path = default_kv_calibration_path(*model);
  CalibrationParams p;
  p.n_windows = kAutoCalibWindows;
  p.window = std::min<int64_t>(kAutoCalibWindow, model->info().n_ctx_train > 0 ? model->info().n_ctx_train : kAutoCalibWindow);
  p.weighting = "scale2";
  const bool tty = stderr_is_tty();
  Stopwatch clock;
  try {
    std::vector<int32_t> tokens;
    const char* text_env = std::getenv("KVQ_CALIB_TEXT");
    if (text_env && *text_env) {
      p.text_name = std::filesystem::path(text_env).filename().string();
      fmt::print(stderr, "kvq: no KV calibration for this model yet: fitting the {} cache's key ranges and codebooks once on "
                         "{} x {} tokens of {} ($KVQ_CALIB_TEXT) -> {}\n", kAutoKvType, p.n_windows, p.window, text_env, path);
      tokens = model->tokenize(read_file(text_env, "calibration text ($KVQ_CALIB_TEXT)"), model->add_bos_default());
    } else {
      p.text_name = fmt::format("sampled from the model (seed {})", kAutoCalibSeed);
      fmt::print(stderr, "kvq: no KV calibration for this model yet: fitting the {} cache's key ranges and codebooks once on "
                         "{} x {} tokens the model samples itself -> {} (about a minute; `kvq calibrate -f TEXT` fits "
                         "one on text of your choice, KVQ_AUTO_CALIB=0 turns this off)\n",
                 kAutoKvType, p.n_windows, p.window, path);
      tokens = sample_calibration_tokens(model, p.n_windows, p.window, kAutoCalibSeed, 0, [&](int64_t done, int64_t total) {
        if (!tty) return;
        fmt::print(stderr, "\rkvq: sampling calibration text {}/{} tokens  {:.0f} s   ", done, total, clock.seconds());
        std::fflush(stderr);
      });
      if (tty) fmt::print(stderr, "\n");
    }
    if (tty)
      p.progress = [&](std::string_view stage, int64_t done, int64_t total) {
        fmt::print(stderr, "\rkvq: calibration {} {}/{}  {:.0f} s   ", stage, done, total, clock.seconds());
        if (stage == "fit" && done == total) fmt::print(stderr, "\n");
        std::fflush(stderr);
      };
    calibrate_kv(model, tokens, p, path);
  } catch (const std::exception& e) {
    if (tty) fmt::print(stderr, "\n");
    fmt::print(stderr, "kvq: note: automatic KV calibration failed ({}); the KV cache stays f16\n", e.what());
    return false;
  }
  fmt::print(stderr, "kvq: KV calibration saved to {} in {:.0f} s\n", path, clock.seconds());
  return true;
}

}  // namespace

std::string resolve_cache_type(const std::string& type, const std::shared_ptr<const Model>& model,
                               const KvCacheOptions& kv, bool quiet) {
  if (type != "auto") return type;
  if (auto_cache_note(*model, kv).empty()) return kAutoKvType;
  // Only the default sidecar is made automatically (an explicit --kv-calib that
  // does not exist is the user's to create), once per process.
  static int auto_result = -1;
  if (kv.calibration.empty() && auto_calibration_enabled()) {
    if (auto_result < 0) auto_result = auto_calibrate(model) ? 1 : 0;
    if (auto_result == 1) return kAutoKvType;
  }
  static bool told = false;  // once per process, not once per K and V
  const std::string note = auto_cache_note(*model, kv);
  if (!quiet && !note.empty() && !std::exchange(told, true)) fmt::print(stderr, "kvq: note: {}\n", note);
  return "f16";
}

std::string auto_cache_note(const Model& model, const KvCacheOptions& kv) {
  const std::string sidecar = kv.calibration.empty() ? default_kv_calibration_path(model) : kv.calibration;
  struct stat st {};
  if (::stat(sidecar.c_str(), &st) == 0) return {};
  return fmt::format("KV cache f16: no KV calibration at {} (create it once with `kvq calibrate -f TEXT`, "
                     "a few minutes, to get the {} cache at ~3.6x less memory)",
                     sidecar, kAutoKvType);
}

CLI::Validator kv_format_validator() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        if (value == "auto" || find_kv_format(value)) return {};
        return fmt::format("unknown KV cache type '{}' (valid: {})", value, kv_format_names());
      },
      "", "KV_TYPE");
}

void add_cache_type_flags(CLI::App& app, std::string& type_k, std::string& type_v) {
  const std::string names = kv_format_names();
  app.add_option("--cache-type-k", type_k,
                 fmt::format("KV cache format for keys, also -ctk: auto (= {}, calibrated on first use; f16 if that is off or fails), {}",
                             kAutoKvType, names))
      ->type_name("TYPE")
      ->check(kv_format_validator())
      ->capture_default_str();
  app.add_option("--cache-type-v", type_v,
                 fmt::format("KV cache format for values, also -ctv: auto (= {}, calibrated on first use; f16 if that is off or fails), {}",
                             kAutoKvType, names))
      ->type_name("TYPE")
      ->check(kv_format_validator())
      ->capture_default_str();
}

void add_json_flag(CLI::App& app, bool& json, const std::string& help) { app.add_flag("--json", json, help); }

void KvCacheOptions::apply_to(SessionParams& sp) const {
  sp.kv_sink = sink;
  sp.kv_window = window;
  sp.kv_calibration = calibration;
  sp.kv_rotate_values = rotate_values;
}

void add_kv_cache_flags(CLI::App& app, KvCacheOptions& kv) {
  app.add_option("--kv-sink", kv.sink,
                 "first tokens of the context kept in full precision (attention sink); -1 = the format's default "
                 "(1 for KVQuant formats, 0 otherwise)")
      ->type_name("N")
      ->check(int_range(-1, kMaxCtx))
      ->capture_default_str();
  app.add_option("--kv-window", kv.window, "most recent tokens kept in full precision; 0 = off")
      ->type_name("N")
      ->check(int_range(0, kMaxCtx))
      ->capture_default_str();
  app.add_flag("--kv-rotate-values", kv.rotate_values,
               "rotate each value vector (Walsh-Hadamard) before it is quantized; head sizes that are powers of two");
  app.add_option("--kv-calib", kv.calibration,
                 "calibration sidecar for KV formats that need one (default: <model>.kvcalib.gguf)")
      ->type_name("FILE");
}

std::string resolved_model_path(const std::string& path) { return path.empty() ? default_model_path() : path; }

std::shared_ptr<const Model> load_model(const std::string& path) {
  const std::string file = resolved_model_path(path);
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) {
    if (path.empty())
      throw Error(fmt::format("default model not found at {}: run scripts/fetch-model.sh to download it, "
                              "or pass -m FILE",
                              file));
    throw Error(fmt::format("model {}: {}", file, std::strerror(errno)));
  }
  if (S_ISDIR(st.st_mode)) throw Error(fmt::format("{}: is a directory, expected a GGUF file", file));
  return Model::load(file);
}

std::string read_file(const std::string& path, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw Error(fmt::format("{} {}: {}", what, path, std::strerror(errno)));
  if (S_ISDIR(st.st_mode)) throw Error(fmt::format("{} {}: is a directory", what, path));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{} {}: cannot open: {}", what, path, std::strerror(errno)));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error(fmt::format("{} {}: read error", what, path));
  return std::move(ss).str();
}

std::vector<std::string> normalize_args(int argc, char** argv) {
  static const std::pair<std::string_view, std::string_view> aliases[] = {
      {"-ctk", "--cache-type-k"}, {"-ctv", "--cache-type-v"}};
  std::vector<std::string> out;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {  // everything after is a value
      for (; i < argc; ++i) out.emplace_back(argv[i]);
      break;
    }
    for (const auto& [from, to] : aliases) {
      if (arg == from) {
        arg = to;
      } else if (arg.size() > from.size() && arg.compare(0, from.size(), from) == 0 && arg[from.size()] == '=') {
        arg = std::string(to) + arg.substr(from.size());
      }
    }
    out.push_back(std::move(arg));
  }
  return out;
}

// Length of the UTF-8 sequence a lead byte starts; 0 for a continuation or invalid byte.
static int utf8_sequence_length(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if ((c & 0xF8) == 0xF0) return 4;
  return 0;
}

std::string Utf8Buffer::push(std::string_view bytes) {
  pending_.append(bytes);
  // Look back at most 3 bytes for the lead byte of a sequence that is still open.
  const size_t n = pending_.size();
  size_t keep_from = n;
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(pending_[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const int len = utf8_sequence_length(c);
    if (len > int(back)) keep_from = n - back;  // incomplete: hold it back
    break;
  }
  std::string ready = pending_.substr(0, keep_from);
  pending_.erase(0, keep_from);
  return ready;
}

std::string Utf8Buffer::flush() { return std::exchange(pending_, {}); }

void write_stdout(std::string_view text) {
  if (text.empty()) return;
  if (std::fwrite(text.data(), 1, text.size(), stdout) != text.size() || std::fflush(stdout) != 0)
    throw Error(fmt::format("writing to standard output failed: {}", std::strerror(errno)));
}

bool stderr_is_tty() { return ::isatty(STDERR_FILENO) == 1; }

MeanStd mean_std(const std::vector<double>& values) {
  MeanStd r;
  if (values.empty()) return r;
  double sum = 0;
  for (double v : values) sum += v;
  r.mean = sum / double(values.size());
  if (values.size() > 1) {
    double ss = 0;
    for (double v : values) ss += (v - r.mean) * (v - r.mean);
    r.stddev = std::sqrt(ss / double(values.size() - 1));
  }
  return r;
}

std::string format_bytes(uint64_t bytes) {
  const double b = double(bytes);
  if (bytes < 1024) return fmt::format("{} B", bytes);
  if (b < 1024.0 * 1024) return fmt::format("{:.1f} KiB", b / 1024);
  if (b < 1024.0 * 1024 * 1024) return fmt::format("{:.1f} MiB", b / (1024.0 * 1024));
  return fmt::format("{:.2f} GiB", b / (1024.0 * 1024 * 1024));
}

std::string format_count(int64_t n) {
  const double v = double(n);
  if (n < 1000) return fmt::format("{}", n);
  if (n < 1000000) return fmt::format("{:.1f}K", v / 1e3);
  if (n < 1000000000) return fmt::format("{:.1f}M", v / 1e6);
  return fmt::format("{:.2f}B", v / 1e9);
}

std::string dump_json(const nlohmann::json& j, int indent) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace kvq::cli

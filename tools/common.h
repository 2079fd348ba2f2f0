// Shared pieces of the kvq command-line tool: flag definitions that every
// subcommand spells the same way, model loading with a helpful message, UTF-8
// safe streaming, small statistics and formatting helpers.
#pragma once
#include <CLI/CLI.hpp>
#include <kvq/kvq.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace kvq::cli {

// A flag value that parsed but makes no sense (found after parsing). Exit code 2,
// like CLI11's own usage errors.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline constexpr const char* kDefaultModelName = "SmolLM2-135M-Instruct.Q4_1.gguf";
inline constexpr int kMaxThreads = 1024;
inline constexpr int64_t kMaxCtx = int64_t(1) << 24;

// $KVQ_CACHE_DIR/<default model>, else ~/.cache/kvq/<default model>.
std::string default_model_path();
int default_threads();  // every core the OS reports

// Flags shared by the subcommands (same names and help everywhere).
void add_model_flag(CLI::App& app, std::string& path);
void add_threads_flag(CLI::App& app, int& threads);
// --simd LEVEL (SessionParams::simd): caps the SIMD level of the session's kernels.
void add_simd_flag(CLI::App& app, std::string& simd);
void add_ctx_flag(CLI::App& app, int64_t& n_ctx, int64_t min_ctx, const std::string& help);
void add_batch_flag(CLI::App& app, int& n_batch);
void add_cache_type_flags(CLI::App& app, std::string& type_k, std::string& type_v);
void add_json_flag(CLI::App& app, bool& json, const std::string& help);

// KV cache settings beyond the formats (attention sink, full-precision window,
// calibration sidecar): --kv-sink, --kv-window, --kv-calib. Defaults are the
// SessionParams defaults; apply_to copies them into the session's parameters.
struct KvCacheOptions {
  int sink = -1;            // -1: the format's default
  int64_t window = 0;       // 0: off
  std::string calibration;  // empty: the model's default sidecar path
  bool rotate_values = false;
  void apply_to(SessionParams& sp) const;
};
void add_kv_cache_flags(CLI::App& app, KvCacheOptions& kv);

// The cache type "auto" (the default of kvq run and passkey): the KVQuant preset
// kAutoKvType when the model has a calibration sidecar (--kv-calib or the default
// path). Without one at the default path it is made on the spot, once, and cached
// there: kAutoCalibWindows x kAutoCalibWindow tokens of $KVQ_CALIB_TEXT, or sampled
// from the model itself (KVQ_AUTO_CALIB=0 turns this off). Otherwise f16, with a
// note on stderr saying how to calibrate. Other names pass through.
inline constexpr const char* kAutoKvType = "int4-ch-1%";
inline constexpr int64_t kAutoCalibWindows = 4;
inline constexpr int64_t kAutoCalibWindow = 1024;
inline constexpr uint64_t kAutoCalibSeed = 0;  // as kvq calibrate's default --seed
// `quiet` leaves the note to the caller (auto_cache_note), e.g. to print it after
// the checks that may still fail with a one-line error.
std::string resolve_cache_type(const std::string& type, const std::shared_ptr<const Model>& model,
                               const KvCacheOptions& kv, bool quiet);
std::string auto_cache_note(const Model& model, const KvCacheOptions& kv);  // empty when calibrated

// Numeric validators whose messages read well ("must be >= 0, got -5").
CLI::Validator int_range(int64_t lo, int64_t hi);
CLI::Validator float_range(double lo, double hi);  // inclusive

// Validator accepting exactly the names of kv_formats(); the error lists them.
CLI::Validator kv_format_validator();
std::string kv_format_names();  // "f16, f32, ..."
const KvFormatInfo* find_kv_format(std::string_view name);

// Loads the model at `path` (the default model when empty). A missing default
// model gets a message that says how to fetch it.
std::shared_ptr<const Model> load_model(const std::string& path);
std::string resolved_model_path(const std::string& path);

// Whole file as bytes; kvq::Error naming the file when it cannot be read.
std::string read_file(const std::string& path, const std::string& what);

// llama.cpp spells some flags with one dash and several letters (-ctk); CLI11
// only knows single-letter short flags, so those are rewritten to long ones.
std::vector<std::string> normalize_args(int argc, char** argv);

// Tokens arrive as raw bytes and a multi-byte UTF-8 character can be split
// across tokens: hold back an incomplete trailing sequence until it completes.
class Utf8Buffer {
 public:
  std::string push(std::string_view bytes);  // the part that is safe to print now
  std::string flush();                       // whatever is left (maybe invalid)

 private:
  std::string pending_;
};

// Writes to stdout and flushes (streaming); throws when stdout is gone.
void write_stdout(std::string_view text);

bool stderr_is_tty();

struct MeanStd {
  double mean = 0, stddev = 0;  // stddev: sample (n-1), 0 for a single value
};
MeanStd mean_std(const std::vector<double>& values);

std::string format_bytes(uint64_t bytes);  // "12.3 MiB"
std::string format_count(int64_t n);       // "134.5M"

// nlohmann::json::dump that never throws on invalid UTF-8 (model text may be).
std::string dump_json(const nlohmann::json& j, int indent = 2);

class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  void restart() { start_ = std::chrono::steady_clock::now(); }
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

// Subcommands: each registers itself on the app and returns the function that
// runs it once parsing succeeded (its options live in the closure).
using Command = std::function<int()>;
Command register_run(CLI::App& app);
Command register_perplexity(CLI::App& app);
Command register_info(CLI::App& app);
Command register_bench(CLI::App& app);
Command register_passkey(CLI::App& app);
Command register_calibrate(CLI::App& app);

}  // namespace kvq::cli

// kvq public API: load a GGUF model, run it with a (quantizable) KV cache,
// sample tokens. Tools use only this header. Errors throw kvq::Error with a
// one-line message naming the problem.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvq/error.h"

namespace kvq {

std::string_view version();

// ---- Model -------------------------------------------------------------------

struct TensorSummary {
  std::string name;
  std::string type;            // "q4_1", "f32", ...
  std::vector<int64_t> dims;   // GGUF order: dims[0] contiguous
  uint64_t bytes = 0;
};

struct ModelInfo {
  std::string path;
  std::string architecture;    // "llama"
  std::string name;            // general.name
  // 16 hex digits: a 64-bit hash of every tensor's name, type, shape, offset and
  // data (metadata excluded). Identifies the weights a KV calibration was fitted
  // on; not cryptographic. Computed at load (one pass over the mapped file).
  std::string fingerprint;
  uint32_t gguf_version = 0;
  int64_t n_params = 0;
  uint64_t weight_bytes = 0;   // bytes of all tensor data in the file
  int n_vocab = 0, n_ctx_train = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0;
  int head_dim = 0, n_ff = 0, n_rot = 0;
  float rope_freq_base = 0, rope_freq_scale = 1, rms_eps = 0;
  bool rope_neox = false;      // pairing: false = (2i, 2i+1), true = (i, i + n_rot/2)
  bool tied_output = false;    // output head shares the token embedding
  std::string tokenizer_model, tokenizer_pre;
  std::vector<std::pair<std::string, std::string>> metadata;  // key, printable value
  std::vector<TensorSummary> tensors;
};

struct ChatMessage {
  std::string role;     // "system", "user", "assistant"
  std::string content;
};

class Model {
 public:
  // Memory-maps and validates the file; throws kvq::Error("PATH: ...").
  static std::shared_ptr<const Model> load(const std::string& path);
  ~Model();

  const ModelInfo& info() const;

  // Tokenizer (from the file's metadata).
  std::vector<int32_t> tokenize(std::string_view text, bool add_bos, bool parse_special = false) const;
  std::string token_bytes(int32_t id) const;  // raw bytes; may be a partial UTF-8 sequence
  std::string detokenize(std::span<const int32_t> ids) const;
  bool add_bos_default() const;
  int32_t bos_id() const;  // -1 if none
  bool is_end_of_generation(int32_t id) const;

  // Renders a conversation with the model's chat template (ChatML, Llama 2/3 ...),
  // ending with the assistant's turn opened when add_generation_prompt.
  // Throws if the model has no template kvq understands.
  std::string apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// ---- KV cache formats ----------------------------------------------------------

struct KvFormatInfo {
  std::string name;           // what the user types: "f16", "f32", ...
  double bits_per_element;    // storage cost, K and V averaged, everything included
  double bits_per_element_k;  // as keys
  double bits_per_element_v;  // as values
  bool pre_rope;              // keys stored before RoPE (RoPE applied after reading)
  bool needs_calibration;     // needs a calibration sidecar (kvq calibrate)
  bool kvquant;               // a KVQuant recipe (keeps an attention sink by default)
  std::string description;
};
// Every format kvq supports, with its cost for a layer of n_kv_heads x head_dim
// (per-token side data makes the cost depend on the row width).
std::vector<KvFormatInfo> kv_formats(int n_kv_heads = 8, int head_dim = 128);

// ---- KV calibration (KVQuant formats) ----------------------------------------

// Offline calibration of the KV cache formats that need it: runs the model on
// calibration text, captures every layer's pre-RoPE keys and values, and writes
// a sidecar GGUF with per-channel key bounds and per-layer codebooks.
struct CalibrationParams {
  int64_t n_windows = 16;       // windows of `window` tokens taken from the start of the text
  int64_t window = 2048;
  int n_threads = 0;            // 0 = every core
  int sink_tokens = 1;          // first tokens of each window, excluded from the statistics
  // k-means element weights: "fisher-s2" (Fisher information (dL/dA)^2 from a backward
  // pass, times the element's vector scale squared), "fisher" (Fisher only), "scale2"
  // (vector scale squared) or "none".
  std::string weighting = "fisher-s2";
  // More sidecars from the same capture (ablations), one per weighting, written beside
  // the main one as kv_calibration_sibling_path(out_path, weighting).
  std::vector<std::string> also_weightings;
  uint64_t seed = 0;            // k-means initialisation
  std::string simd = "auto";    // SIMD cap of the capture and backward passes (SessionParams::simd)
  std::string text_name;        // recorded in the sidecar (where the text came from)
  // Progress: (stage, done, total), e.g. ("capture", 3, 16) then ("fit", 20, 60).
  std::function<void(std::string_view stage, int64_t done, int64_t total)> progress;
};

struct CalibrationReport {
  std::string path;             // the sidecar written
  int64_t n_tokens = 0;         // tokens run through the model
  double capture_seconds = 0, fit_seconds = 0;
  uint64_t peak_capture_bytes = 0;  // activations (and Fisher weights) held for fitting
  uint64_t backward_bytes = 0;      // working set of the backward pass (0 without Fisher weighting)
  std::vector<std::string> also_paths;  // the sidecars of also_weightings, in order
};

CalibrationReport calibrate_kv(std::shared_ptr<const Model> model, std::span<const int32_t> tokens,
                               const CalibrationParams& params, const std::string& out_path);

// Calibration text when none is at hand: n_windows sequences of `window` tokens,
// each sampled from the model itself after its BOS token (temperature 1, no top-k
// or top-p cut, end-of-generation tokens never drawn; window w seeded with
// seed + w), concatenated so that calibrate_kv's windows are exactly these
// sequences. The model's own samples follow the distribution it was trained on,
// which is what the KV statistics should describe when no representative text is
// given. Deterministic for a given seed and thread count. Progress: (done, total)
// tokens.
std::vector<int32_t> sample_calibration_tokens(std::shared_ptr<const Model> model, int64_t n_windows, int64_t window,
                                               uint64_t seed, int n_threads,
                                               const std::function<void(int64_t done, int64_t total)>& progress = {});

// The weightings calibrate_kv knows, the default first.
std::vector<std::string> calibration_weightings();
// "DIR/x.kvcalib.gguf" + "none" -> "DIR/x.kvcalib.none.gguf" (".gguf" appended when absent).
std::string kv_calibration_sibling_path(const std::string& out_path, const std::string& weighting);

// Where a model's sidecar lives by default: "<model path>.kvcalib.gguf".
std::string default_kv_calibration_path(const Model& model);

// ---- Session -------------------------------------------------------------------

struct SessionParams {
  int64_t n_ctx = 0;         // context length in tokens; 0 = the model's training context
  int n_threads = 0;         // 0 = every core
  int n_batch = 512;         // tokens per forward chunk during prompt processing
  std::string cache_type_k = "f16";
  std::string cache_type_v = "f16";
  std::string kv_calibration;  // sidecar for formats that need one; empty = the model's default path
  int kv_sink = -1;            // first tokens kept in full precision; -1 = format default (1 for KVQuant)
  int64_t kv_window = 0;       // most recent tokens kept in full precision (0 = off)
  // Value vectors Walsh-Hadamard rotated before they are quantized (attention
  // rotates each head's output back once per token); head sizes must be powers
  // of two. The "-rot" formats rotate keys and values by themselves.
  bool kv_rotate_values = false;
  // The kernels this session runs, fixed when it is made (sessions in one
  // process may differ). `simd` caps the instruction set of every kernel:
  // "auto" (the best this CPU runs), "avx512", "avx2" or "scalar" (a level above
  // the CPU's is an error). `attention_kernel` pins attention and its tile
  // decoders, to compare paths: "auto" (by `simd` and the head size), "avx512",
  // "avx2", "portable" (Google Highway, as a CPU without AVX2 runs it) or
  // "scalar" (the references; every other kernel still as `simd` allows).
  std::string simd = "auto";
  std::string attention_kernel = "auto";
};

// What a session computes with (Session::kernels, kernel_info).
struct KernelInfo {
  std::string simd;              // the SIMD level every kernel is capped at
  std::string prefill_attention; // the attention kernel of long batches, e.g. "avx512", "portable/AVX2"
  std::string decode_attention;  // the one decode runs over the session's value format
};
// The SIMD level this CPU runs at most ("avx512", "avx2" or "scalar"), and
// every level SessionParams::simd may name on it, best first ("auto" aside).
std::string cpu_simd_level();
std::vector<std::string> cpu_simd_levels();
// The kernels a session of `model` with these parameters would run (only the
// kernel fields and cache_type_v are read); throws as the session would.
KernelInfo kernel_info(const Model& model, const SessionParams& params);

struct KvStats {
  std::string type_k, type_v;
  int64_t n_tokens = 0;      // tokens held
  int64_t n_ctx = 0;         // capacity
  int sink_tokens = 0;       // full-precision attention sink
  int64_t window_tokens = 0; // full-precision recent window
  bool values_rotated = false; // values stored Walsh-Hadamard rotated (a "-rot" format or kv_rotate_values)
  uint64_t bytes_k = 0;      // bytes really allocated for keys (everything below included)
  uint64_t bytes_v = 0;      // and values
  // The same bytes by what they hold:
  uint64_t bytes_codes = 0, bytes_scales = 0, bytes_outliers = 0;
  uint64_t bytes_full_precision = 0;  // sink and window side stores
  uint64_t bytes_calibration = 0;     // per-layer constants (per-channel ranges, codebooks)
  uint64_t bytes_positions = 0;       // shared by the layers: 4 B of position per token, and for pre-RoPE key
                                      // formats the RoPE angles of each page's first position and of a page's 64 offsets
  uint64_t bytes() const { return bytes_k + bytes_v + bytes_positions; }
};

// The bytes a session with these parameters holds once n_tokens tokens are in its
// cache (exactly what Session::kv_stats() would report), without allocating it.
// params.n_ctx = 0 means "n_tokens".
KvStats kv_memory_estimate(const Model& model, const SessionParams& params, int64_t n_tokens);

// Called with (index of the token in the evaluated span, its next-token logits).
using LogitsCallback = std::function<void(int64_t index, std::span<const float> logits)>;

class Session {
 public:
  Session(std::shared_ptr<const Model> model, const SessionParams& params);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Appends tokens at positions n_past()..n_past()+n-1 and runs them. Returns the
  // logits after the last token. Throws (losing nothing already in the context)
  // if the tokens do not fit in the context or an id is out of range.
  std::span<const float> eval(std::span<const int32_t> tokens);
  // Same, but reports the logits after every token, in order, through `on_logits`.
  void eval_all(std::span<const int32_t> tokens, const LogitsCallback& on_logits);

  // For speed measurements at depth: evaluates `seed` like eval(), then grows the
  // context to `n_tokens` without running the model, storing the seed's own keys
  // and values again (encoded afresh in the cache's formats) at the following
  // positions. The cache then holds as many bytes and costs as much to attend over
  // as after a real prefill of n_tokens, in seconds instead of minutes; what the
  // model predicts next is meaningless. Throws if n_tokens does not fit the context
  // or is shorter than the seed.
  void fill_for_benchmark(std::span<const int32_t> seed, int64_t n_tokens);

  int64_t n_past() const;
  int64_t n_ctx() const;
  int n_threads() const;
  void reset();  // forget the context (the cache keeps its allocation)
  KvStats kv_stats() const;
  KernelInfo kernels() const;
  const Model& model() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// ---- Sampling ------------------------------------------------------------------

struct SamplerParams {
  float temperature = 0.8f;  // <= 0: greedy (argmax)
  int top_k = 40;            // <= 0: no top-k cut
  float top_p = 0.95f;       // >= 1: no nucleus cut
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerParams& params);
  int32_t sample(std::span<const float> logits);  // deterministic for a given seed

 private:
  SamplerParams params_;
  uint64_t state_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

}  // namespace kvq

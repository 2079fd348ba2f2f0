// kvq::calibrate_kv: run the model over calibration windows, capture every
// layer's pre-RoPE keys and values, fit the sidecar (src/calib) and write it
// atomically (temp file, then rename).
//
// Without Fisher weighting the capture goes through the inference forward pass
// and the cache's store observer. With it (fisher, fisher-s2), each window runs
// the full-precision forward + activation backward pass (src/model/llama_backward),
// which hands over every layer's K, V and dL/dK, dL/dV; the element weights are
// (dL/dA)^2. One capture can feed several sidecars (also_weightings).
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>

#include "base/error.h"
#include "base/threads.h"
#include "calib/kv_calibration.h"
#include "calib/kv_fit.h"
#include "formats/kv_format.h"
#include "kvcache/kv_cache.h"
#include "model/llama_backward.h"
#include "runtime/model_impl.h"

namespace kvq {
namespace {

constexpr int64_t kCalibBatch = 512;  // tokens per forward chunk (as Session's default)

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool is_fisher(const std::string& w) { return w == "fisher" || w == "fisher-s2"; }
bool uses_scale2(const std::string& w) { return w == "scale2" || w == "fisher-s2"; }

void check_weighting(const std::string& w) {
  const auto all = calibration_weightings();
  if (std::find(all.begin(), all.end(), w) == all.end())
    fail("calibrate: unknown weighting '{}' (valid: fisher-s2, fisher, scale2, none)", w);
}

// Write beside the target, then rename: a crash never leaves a half-written sidecar.
void save_atomically(const KvCalibration& calib, const std::string& out_path) {
  const std::string tmp = fmt::format("{}.tmp{}", out_path, long(::getpid()));
  try {
    calib.save(tmp);
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  if (std::rename(tmp.c_str(), out_path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    fail("{}: cannot write the calibration sidecar: {}", out_path, std::strerror(e));
  }
}

}  // namespace

std::vector<std::string> calibration_weightings() { return {"fisher-s2", "fisher", "scale2", "none"}; }

std::string kv_calibration_sibling_path(const std::string& out_path, const std::string& weighting) {
  std::string stem = out_path;
  if (stem.size() > 5 && stem.compare(stem.size() - 5, 5, ".gguf") == 0) stem.resize(stem.size() - 5);
  return stem + "." + weighting + ".gguf";
}

std::string default_kv_calibration_path(const Model& model) { return model.info().path + ".kvcalib.gguf"; }

std::vector<int32_t> sample_calibration_tokens(std::shared_ptr<const Model> model, int64_t n_windows, int64_t window,
                                               uint64_t seed, int n_threads,
                                               const std::function<void(int64_t, int64_t)>& progress) {
  if (!model) fail("calibration sampling: no model");
  const ModelInfo& info = model->info();
  const int64_t max_window = info.n_ctx_train > 0 ? info.n_ctx_train : (int64_t(1) << 24);
  if (n_windows < 1 || window < 2 || window > max_window || n_windows > (int64_t(1) << 24) / window)
    fail("calibration sampling: {} windows of {} tokens is out of range (window 2..{})", n_windows, window, max_window);
  const int32_t bos = model->bos_id();
  if (bos < 0) fail("calibration sampling: the model has no BOS token to start from; give a calibration text");
  // Tokens the sampler must never draw: the ends of generation (a calibration
  // window is one long text, not a finished answer).
  std::vector<int32_t> banned;
  for (int32_t id = 0; id < info.n_vocab; ++id)
    if (model->is_end_of_generation(id)) banned.push_back(id);

  SessionParams sp;
  sp.n_ctx = window;
  sp.n_threads = n_threads;
  Session session(model, sp);
  std::vector<int32_t> out;
  out.reserve(size_t(n_windows * window));
  std::vector<float> logits;
  const int64_t total = n_windows * window;
  for (int64_t w = 0; w < n_windows; ++w) {
    session.reset();
    Sampler sampler(SamplerParams{1.0f, 0, 1.0f, seed + uint64_t(w)});
    int32_t tok = bos;
    for (int64_t i = 0; i < window; ++i) {
      out.push_back(tok);
      if (progress && (i % 64 == 63 || i == window - 1)) progress(w * window + i + 1, total);
      if (i + 1 == window) break;
      const std::span<const float> l = session.eval(std::span<const int32_t>(&tok, 1));
      logits.assign(l.begin(), l.end());
      for (int32_t id : banned) logits[size_t(id)] = -std::numeric_limits<float>::infinity();
      tok = sampler.sample(logits);
    }
  }
  return out;
}

CalibrationReport calibrate_kv(std::shared_ptr<const Model> model, std::span<const int32_t> tokens,
                               const CalibrationParams& params, const std::string& out_path) {
  if (!model) fail("calibrate: no model");
  const LlamaModel& llama = model->impl().llama;
  const LlamaHparams& hp = llama.hparams();
  const int64_t max_window = hp.n_ctx_train > 0 ? hp.n_ctx_train : (int64_t(1) << 24);
  if (params.n_windows < 1) fail("calibrate: number of windows {} must be >= 1", params.n_windows);
  if (params.window < 16 || params.window > max_window)
    fail("calibrate: window {} is out of range 16..{} (the model's context)", params.window, max_window);
  if (params.n_windows > (int64_t(1) << 24) / params.window)
    fail("calibrate: {} windows of {} tokens are too many", params.n_windows, params.window);
  if (params.sink_tokens < 0 || params.sink_tokens >= params.window)
    fail("calibrate: sink token count {} is out of range 0..{}", params.sink_tokens, params.window - 1);
  check_weighting(params.weighting);
  bool need_fisher = is_fisher(params.weighting);
  for (size_t i = 0; i < params.also_weightings.size(); ++i) {
    const std::string& w = params.also_weightings[i];
    check_weighting(w);
    if (w == params.weighting || std::find(params.also_weightings.begin(), params.also_weightings.begin() + std::ptrdiff_t(i), w) !=
                                     params.also_weightings.begin() + std::ptrdiff_t(i))
      fail("calibrate: weighting '{}' is asked for twice", w);
    need_fisher = need_fisher || is_fisher(w);
  }
  if (params.n_threads < 0 || params.n_threads > 1024) fail("calibrate: thread count {} is out of range 0..1024", params.n_threads);
  if (out_path.empty()) fail("calibrate: no output path");
  const int64_t n_tokens = params.n_windows * params.window;
  if (int64_t(tokens.size()) < n_tokens)
    fail("calibrate: {} windows of {} tokens need {} tokens, the text has {} (use fewer or shorter windows, or a longer text)",
         params.n_windows, params.window, n_tokens, tokens.size());
  for (int64_t i = 0; i < n_tokens; ++i)
    if (tokens[size_t(i)] < 0 || tokens[size_t(i)] >= hp.n_vocab)
      fail("calibrate: token id {} at index {} is outside the vocabulary (0..{})", tokens[size_t(i)], i, hp.n_vocab - 1);

  const int row = hp.kv_dim();
  // Capture buffers: every layer's K and V for every token, f32 [n_tokens][row].
  // With Fisher weighting also (dL/dK)^2 and (dL/dV)^2, same shape.
  struct LayerBuf {
    std::vector<float> k, v, kw, vw;
  };
  std::vector<LayerBuf> bufs(static_cast<size_t>(hp.n_layer));
  for (auto& b : bufs) {
    b.k.resize(size_t(n_tokens) * size_t(row));
    b.v.resize(size_t(n_tokens) * size_t(row));
    if (need_fisher) {
      b.kw.resize(size_t(n_tokens) * size_t(row));
      b.vw.resize(size_t(n_tokens) * size_t(row));
    }
  }
  std::vector<int32_t> positions(static_cast<size_t>(n_tokens));
  const uint64_t capture_bytes = uint64_t(hp.n_layer) * (need_fisher ? 4 : 2) * uint64_t(n_tokens) * uint64_t(row) * sizeof(float) +
                                 positions.size() * sizeof(int32_t);

  KvCache cache(model_cache_config(hp, params.window, "f32", "f32"));
  ThreadPool pool(params.n_threads == 0 ? default_thread_count() : params.n_threads);
  const KernelSet kernels = session_kernels(params.simd, "auto");
  LlamaScratch scratch;

  int64_t window_start = 0;  // index of the window's first token in the capture buffers
  cache.set_observer([&](int layer, int64_t n, const int32_t* pos, const float* k, const float* v) {
    KVQ_ASSERT(layer >= 0 && layer < hp.n_layer && n >= 0);
    const int64_t at = window_start + pos[0];  // positions restart at 0 in each window
    KVQ_ASSERT(at >= 0 && at + n <= n_tokens);
    std::copy(k, k + n * row, bufs[size_t(layer)].k.begin() + at * row);
    std::copy(v, v + n * row, bufs[size_t(layer)].v.begin() + at * row);
    if (layer == 0) std::copy(pos, pos + n, positions.begin() + at);
  });

  const auto t_capture = std::chrono::steady_clock::now();
  std::vector<int32_t> batch_pos;
  for (int64_t w = 0; w < params.n_windows && need_fisher; ++w) {
    // Full-precision forward + backward over the window: K, V and (dL/dA)^2.
    const int64_t at = w * params.window;
    for (int64_t i = 0; i < params.window; ++i) positions[size_t(at + i)] = int32_t(i);
    llama_window_kv_grads<float>(llama, tokens.data() + at, params.window, pool, kernels.simd,
                                 [&](int layer, const float* k, const float* v, const float* dk, const float* dv) {
                                   LayerBuf& b = bufs[size_t(layer)];
                                   const size_t o = size_t(at) * size_t(row), m = size_t(params.window) * size_t(row);
                                   std::copy(k, k + m, b.k.begin() + std::ptrdiff_t(o));
                                   std::copy(v, v + m, b.v.begin() + std::ptrdiff_t(o));
                                   for (size_t i = 0; i < m; ++i) {
                                     b.kw[o + i] = dk[i] * dk[i];
                                     b.vw[o + i] = dv[i] * dv[i];
                                   }
                                 });
    if (params.progress) params.progress("capture", w + 1, params.n_windows);
  }
  for (int64_t w = 0; w < params.n_windows && !need_fisher; ++w) {
    cache.clear();
    window_start = w * params.window;
    for (int64_t b0 = 0; b0 < params.window; b0 += kCalibBatch) {
      const int64_t bn = std::min(kCalibBatch, params.window - b0);
      batch_pos.resize(size_t(bn));
      std::iota(batch_pos.begin(), batch_pos.end(), int32_t(b0));
      cache.begin_batch(batch_pos);
      try {
        llama.forward(tokens.data() + window_start + b0, batch_pos.data(), bn, bn, cache, scratch, pool, kernels,
                      [](int64_t, const float*) {});
      } catch (...) {
        cache.abort_batch();
        throw;
      }
      cache.end_batch();
    }
    if (params.progress) params.progress("capture", w + 1, params.n_windows);
  }
  cache.set_observer({});
  CalibrationReport report;
  report.capture_seconds = seconds_since(t_capture);
  report.n_tokens = n_tokens;
  report.peak_capture_bytes = capture_bytes;
  if (need_fisher) report.backward_bytes = llama_backward_bytes(llama, params.window, sizeof(float));

  const auto t_fit = std::chrono::steady_clock::now();
  std::vector<std::string> weightings{params.weighting};
  weightings.insert(weightings.end(), params.also_weightings.begin(), params.also_weightings.end());
  const int64_t fit_total = int64_t(weightings.size()) * hp.n_layer;
  for (size_t wi = 0; wi < weightings.size(); ++wi) {
    const std::string& weighting = weightings[wi];
    KvFitParams fp;
    fp.n_kv_heads = hp.n_head_kv;
    fp.head_dim = hp.head_dim;
    fp.rope = hp.rope;
    fp.sink_tokens = params.sink_tokens;
    fp.weight_scale2 = uses_scale2(weighting);
    fp.seed = params.seed;
    std::vector<KvLayerCapture> caps(bufs.size());
    for (size_t l = 0; l < bufs.size(); ++l) {
      caps[l].n_tokens = n_tokens;
      caps[l].positions = positions.data();
      caps[l].k = bufs[l].k.data();
      caps[l].v = bufs[l].v.data();
      if (is_fisher(weighting)) {
        caps[l].k_weight = bufs[l].kw.data();
        caps[l].v_weight = bufs[l].vw.data();
      }
    }
    KvCalibration calib;
    calib.n_layers = hp.n_layer;
    calib.n_kv_heads = hp.n_head_kv;
    calib.head_dim = hp.head_dim;
    const int64_t done0 = int64_t(wi) * hp.n_layer;
    calib.layers = fit_kv_layers(fp, caps, pool, [&](int64_t done, int64_t) {
      if (params.progress) params.progress("fit", done0 + done, fit_total);
    });
    KvCalibrationInfo& info = calib.info;
    info.kvq_version = std::string(version());
    info.model_fingerprint = model->info().fingerprint;
    info.model_name = model->info().name;
    info.text_name = params.text_name;
    info.n_windows = params.n_windows;
    info.window = params.window;
    info.n_tokens = n_tokens;
    info.sink_tokens = params.sink_tokens;
    info.weighting = weighting;
    info.outlier_fraction = fp.outlier_fraction;
    info.bits = fp.bits;
    info.seed = params.seed;
    const std::string path = wi == 0 ? out_path : kv_calibration_sibling_path(out_path, weighting);
    save_atomically(calib, path);
    if (wi > 0) report.also_paths.push_back(path);
  }
  report.fit_seconds = seconds_since(t_fit);
  report.path = out_path;
  return report;
}

}  // namespace kvq

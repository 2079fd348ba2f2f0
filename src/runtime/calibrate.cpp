// kvq::calibrate_kv: run the model over calibration windows, capture every
// layer's pre-RoPE keys and values through the cache's store observer, fit the
// sidecar (src/calib) and write it atomically (temp file, then rename).
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>

#include "base/error.h"
#include "base/threads.h"
#include "calib/kv_calibration.h"
#include "calib/kv_fit.h"
#include "formats/kv_format.h"
#include "kvcache/kv_cache.h"
#include "runtime/model_impl.h"

namespace kvq {
namespace {

constexpr int64_t kCalibBatch = 512;  // tokens per forward chunk (as Session's default)

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::string default_kv_calibration_path(const Model& model) { return model.info().path + ".kvcalib.gguf"; }

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
  if (params.weighting != "none" && params.weighting != "scale2")
    fail("calibrate: unknown weighting '{}' (valid: none, scale2)", params.weighting);
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
  struct LayerBuf {
    std::vector<float> k, v;
  };
  std::vector<LayerBuf> bufs(static_cast<size_t>(hp.n_layer));
  for (auto& b : bufs) {
    b.k.resize(size_t(n_tokens) * size_t(row));
    b.v.resize(size_t(n_tokens) * size_t(row));
  }
  std::vector<int32_t> positions(static_cast<size_t>(n_tokens));
  const uint64_t capture_bytes =
      uint64_t(hp.n_layer) * 2 * uint64_t(n_tokens) * uint64_t(row) * sizeof(float) + positions.size() * sizeof(int32_t);

  KvCacheConfig cfg;
  cfg.n_layers = hp.n_layer;
  cfg.n_kv_heads = hp.n_head_kv;
  cfg.head_dim = hp.head_dim;
  cfg.n_ctx = params.window;
  cfg.k_format = &kv_format("f32");
  cfg.v_format = &kv_format("f32");
  cfg.rope = hp.rope;
  KvCache cache(cfg);
  ThreadPool pool(params.n_threads == 0 ? default_thread_count() : params.n_threads);
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
  for (int64_t w = 0; w < params.n_windows; ++w) {
    cache.clear();
    window_start = w * params.window;
    for (int64_t b0 = 0; b0 < params.window; b0 += kCalibBatch) {
      const int64_t bn = std::min(kCalibBatch, params.window - b0);
      batch_pos.resize(size_t(bn));
      std::iota(batch_pos.begin(), batch_pos.end(), int32_t(b0));
      cache.begin_batch(batch_pos);
      try {
        llama.forward(tokens.data() + window_start + b0, batch_pos.data(), bn, bn, cache, scratch, pool,
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

  const auto t_fit = std::chrono::steady_clock::now();
  KvFitParams fp;
  fp.n_kv_heads = hp.n_head_kv;
  fp.head_dim = hp.head_dim;
  fp.rope = hp.rope;
  fp.sink_tokens = params.sink_tokens;
  fp.weight_scale2 = params.weighting == "scale2";
  fp.seed = params.seed;
  std::vector<KvLayerCapture> caps(bufs.size());
  for (size_t l = 0; l < bufs.size(); ++l) {
    caps[l].n_tokens = n_tokens;
    caps[l].positions = positions.data();
    caps[l].k = bufs[l].k.data();
    caps[l].v = bufs[l].v.data();
  }
  KvCalibration calib;
  calib.n_layers = hp.n_layer;
  calib.n_kv_heads = hp.n_head_kv;
  calib.head_dim = hp.head_dim;
  calib.layers = fit_kv_layers(fp, caps, pool, [&](int64_t done, int64_t total) {
    if (params.progress) params.progress("fit", done, total);
  });
  bufs.clear();
  bufs.shrink_to_fit();
  KvCalibrationInfo& info = calib.info;
  info.kvq_version = std::string(version());
  info.model_fingerprint = model->info().fingerprint;
  info.model_name = model->info().name;
  info.text_name = params.text_name;
  info.n_windows = params.n_windows;
  info.window = params.window;
  info.n_tokens = n_tokens;
  info.sink_tokens = params.sink_tokens;
  info.weighting = params.weighting;
  info.outlier_fraction = fp.outlier_fraction;
  info.bits = fp.bits;
  info.seed = params.seed;
  report.fit_seconds = seconds_since(t_fit);

  // Write beside the target, then rename: a crash never leaves a half-written sidecar.
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
  report.path = out_path;
  return report;
}

}  // namespace kvq

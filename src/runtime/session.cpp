#include <algorithm>
#include <filesystem>
#include <limits>
#include <numeric>

#include "base/error.h"
#include "base/threads.h"
#include "calib/kv_calibration.h"
#include "formats/kv_format.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/kernel_set.h"
#include "kvcache/kv_cache.h"
#include "runtime/model_impl.h"

namespace kvq {

struct Session::Impl {
  std::shared_ptr<const Model> model;
  SessionParams params;
  KernelSet kernels;
  ThreadPool pool;
  KvCache cache;
  LlamaScratch scratch;
  std::vector<float> last_logits;
  std::vector<int32_t> positions;

  Impl(std::shared_ptr<const Model> m, const SessionParams& p, const KernelSet& ks, const KvCacheConfig& cfg)
      : model(std::move(m)), params(p), kernels(ks), pool(p.n_threads), cache(cfg) {}

  const LlamaModel& llama() const { return model->impl().llama; }

  void check(std::span<const int32_t> tokens) const {
    const int n_vocab = llama().hparams().n_vocab;
    for (size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] < 0 || tokens[i] >= n_vocab)
        fail("token id {} at index {} is outside the vocabulary (0..{})", tokens[i], i, n_vocab - 1);
    if (cache.n_tokens() + int64_t(tokens.size()) > params.n_ctx)
      fail("{} tokens do not fit in the context: {} of {} already used (raise -c/--ctx-size)", tokens.size(),
           cache.n_tokens(), params.n_ctx);
  }

  // Runs tokens in batches of n_batch; logits of tokens >= first_logit go to on_logits.
  void run(std::span<const int32_t> tokens, int64_t first_logit, FunctionRef<void(int64_t, const float*)> on_logits) {
    check(tokens);
    const int64_t n = int64_t(tokens.size());
    for (int64_t b0 = 0; b0 < n; b0 += params.n_batch) {
      const int64_t bn = std::min<int64_t>(params.n_batch, n - b0);
      positions.resize(size_t(bn));
      std::iota(positions.begin(), positions.end(), int32_t(cache.n_tokens()));
      cache.begin_batch(positions);
      try {
        llama().forward(tokens.data() + b0, positions.data(), bn, std::max<int64_t>(0, first_logit - b0), cache,
                        scratch, pool, kernels, [&](int64_t i, const float* lg) { on_logits(b0 + i, lg); });
      } catch (...) {
        cache.abort_batch();
        throw;
      }
      cache.end_batch();
    }
  }

  void fill_for_benchmark(std::span<const int32_t> seed, int64_t n_tokens) {
    if (seed.empty()) fail("fill_for_benchmark: no seed tokens");
    const int64_t n_seed = int64_t(seed.size());
    if (n_tokens < cache.n_tokens() + n_seed)
      fail("fill_for_benchmark: {} tokens are fewer than the {} held plus the {} of the seed", n_tokens,
           cache.n_tokens(), n_seed);
    if (n_tokens > params.n_ctx)
      fail("fill_for_benchmark: {} tokens do not fit in the context of {} (raise -c/--ctx-size)", n_tokens,
           params.n_ctx);
    // The seed's pre-RoPE keys and values, per layer, as the cache is handed them.
    const int n_layers = llama().hparams().n_layer;
    const int64_t row = int64_t(llama().hparams().kv_dim());
    std::vector<std::vector<float>> k(static_cast<size_t>(n_layers)), v(static_cast<size_t>(n_layers));
    const int64_t seed_start = cache.n_tokens();
    struct ObserverGuard {
      KvCache& c;
      ~ObserverGuard() { c.set_observer({}); }
    } guard{cache};
    cache.set_observer([&](int layer, int64_t n, const int32_t*, const float* kb, const float* vb) {
      k[size_t(layer)].insert(k[size_t(layer)].end(), kb, kb + n * row);
      v[size_t(layer)].insert(v[size_t(layer)].end(), vb, vb + n * row);
    });
    run(seed, n_seed, [](int64_t, const float*) {});  // first_logit past the end: no output head
    cache.set_observer({});
    // Copies of the seed, batch by batch, each batch within one copy of the seed.
    while (cache.n_tokens() < n_tokens) {
      const int64_t at = (cache.n_tokens() - seed_start) % n_seed;
      const int64_t bn = std::min({n_tokens - cache.n_tokens(), n_seed - at, int64_t(params.n_batch)});
      positions.resize(size_t(bn));
      std::iota(positions.begin(), positions.end(), int32_t(cache.n_tokens()));
      cache.begin_batch(positions);
      for (int l = 0; l < n_layers; ++l)
        cache.store(l, k[size_t(l)].data() + at * row, v[size_t(l)].data() + at * row);
      cache.end_batch();
    }
  }
};

KvCacheConfig model_cache_config(const LlamaHparams& hp, int64_t n_ctx, std::string_view type_k,
                                 std::string_view type_v) {
  KvCacheConfig cfg;
  cfg.n_layers = hp.n_layer;
  cfg.n_kv_heads = hp.n_head_kv;
  cfg.head_dim = hp.head_dim;
  cfg.n_ctx = n_ctx;
  cfg.k_format = &kv_format(type_k);
  cfg.v_format = &kv_format(type_v);
  cfg.rope = hp.rope;
  return cfg;
}

KernelSet session_kernels(const std::string& simd, const std::string& attention_kernel) {
  KernelSet ks;
  ks.simd = parse_simd_level(simd);
  // A pinned kernel brings its own decoders: what a CPU of that kind runs.
  if (attention_kernel == "scalar") ks.scalar_attention = true;
  else if (attention_kernel == "avx512") ks.attention = AttentionKernel::avx512, ks.decoders = TileDecoders::avx512;
  else if (attention_kernel == "avx2") ks.attention = AttentionKernel::avx2, ks.decoders = TileDecoders::avx2;
  else if (attention_kernel == "portable") ks.attention = AttentionKernel::portable, ks.decoders = TileDecoders::portable;
  else if (attention_kernel != "auto")
    fail("unknown attention kernel '{}' (valid: auto, avx512, avx2, portable, scalar)", attention_kernel);
  return resolve_kernels(ks);
}

namespace {

KernelInfo describe_kernels(const KernelSet& ks, int head_dim, const std::string& cache_type_v) {
  return {simd_level_name(ks.simd), attention_kernel_name(ks, head_dim),
          attention_kernel_name(ks, head_dim, &kv_format(cache_type_v))};
}

// The cache a session with these (validated) parameters holds, calibration aside.
KvCacheConfig cache_config(const LlamaHparams& hp, const SessionParams& p) {
  KvCacheConfig cfg = model_cache_config(hp, p.n_ctx, p.cache_type_k, p.cache_type_v);
  if (p.kv_sink < -1) fail("sink token count {} is negative", p.kv_sink);
  if (p.kv_window < 0) fail("window token count {} is negative", p.kv_window);
  cfg.sink_tokens = p.kv_sink >= 0 ? p.kv_sink : (cfg.k_format->kvquant || cfg.v_format->kvquant ? 1 : 0);
  cfg.window_tokens = p.kv_window;
  cfg.rotate_values = p.kv_rotate_values;
  return cfg;
}

// Formats that need offline calibration (KVQuant) get it from the model's sidecar.
void load_calibration(const Model& model, const SessionParams& p, KvCacheConfig& cfg) {
  const bool k_needs = cfg.k_format->needs_calibration(KvRole::key);
  const bool v_needs = cfg.v_format->needs_calibration(KvRole::value);
  if (!k_needs && !v_needs) return;
  const std::string path = p.kv_calibration.empty() ? default_kv_calibration_path(model) : p.kv_calibration;
  const std::string_view which = k_needs ? cfg.k_format->name : cfg.v_format->name;
  if (!std::filesystem::exists(path))
    fail("KV cache type '{}' needs a calibration sidecar and there is none at {} (create it once with "
         "`kvq calibrate -m MODEL -f TEXT -o {}`, pass --kv-calib FILE, or use f16)",
         which, path, path);
  const KvCalibration calib = KvCalibration::load(path);
  calib.check_compatible(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, model.info().fingerprint, path);
  for (int l = 0; l < cfg.n_layers; ++l) {
    if (k_needs) cfg.k_calibration.push_back(calib.for_format(l, KvRole::key, *cfg.k_format));
    if (v_needs) cfg.v_calibration.push_back(calib.for_format(l, KvRole::value, *cfg.v_format));
  }
}

}  // namespace

Session::Session(std::shared_ptr<const Model> model, const SessionParams& params) {
  if (!model) fail("session: no model");
  const LlamaModel& llama = model->impl().llama;
  const LlamaHparams& hp = llama.hparams();
  SessionParams p = params;
  if (p.n_ctx < 0) fail("context size {} is negative", p.n_ctx);
  if (p.n_ctx == 0) p.n_ctx = hp.n_ctx_train;
  if (p.n_ctx > (int64_t(1) << 24)) fail("context size {} is too large (max {})", p.n_ctx, int64_t(1) << 24);
  if (p.n_threads < 0 || p.n_threads > 1024) fail("thread count {} is out of range 0..1024", p.n_threads);
  if (p.n_threads == 0) p.n_threads = default_thread_count();
  if (p.n_batch <= 0 || p.n_batch > 65536) fail("batch size {} is out of range 1..65536", p.n_batch);
  const KernelSet kernels = session_kernels(p.simd, p.attention_kernel);
  KvCacheConfig cfg = cache_config(hp, p);
  load_calibration(*model, p, cfg);
  impl_ = std::make_unique<Impl>(std::move(model), p, kernels, cfg);
}

Session::~Session() = default;

std::span<const float> Session::eval(std::span<const int32_t> tokens) {
  if (tokens.empty()) fail("eval: no tokens");
  Impl& s = *impl_;
  const int64_t last = int64_t(tokens.size()) - 1;
  s.run(tokens, last, [&](int64_t, const float* lg) {
    s.last_logits.assign(lg, lg + s.llama().hparams().n_vocab);
  });
  return s.last_logits;
}

void Session::eval_all(std::span<const int32_t> tokens, const LogitsCallback& on_logits) {
  if (tokens.empty()) return;
  const int n_vocab = impl_->llama().hparams().n_vocab;
  impl_->run(tokens, 0, [&](int64_t i, const float* lg) { on_logits(i, std::span<const float>(lg, size_t(n_vocab))); });
}

void Session::fill_for_benchmark(std::span<const int32_t> seed, int64_t n_tokens) {
  impl_->fill_for_benchmark(seed, n_tokens);
}

KernelInfo Session::kernels() const {
  return describe_kernels(impl_->kernels, impl_->llama().hparams().head_dim, impl_->params.cache_type_v);
}

std::string cpu_simd_level() { return simd_level_name(detected_simd_level()); }

std::vector<std::string> cpu_simd_levels() {
  std::vector<std::string> levels;
  for (int l = int(detected_simd_level()); l >= 0; --l) levels.push_back(simd_level_name(SimdLevel(l)));
  return levels;
}

KernelInfo kernel_info(const Model& model, const SessionParams& params) {
  return describe_kernels(session_kernels(params.simd, params.attention_kernel), model.impl().llama.hparams().head_dim,
                          params.cache_type_v);
}

int64_t Session::n_past() const { return impl_->cache.n_tokens(); }
int64_t Session::n_ctx() const { return impl_->params.n_ctx; }
int Session::n_threads() const { return impl_->pool.size(); }
void Session::reset() { impl_->cache.clear(); }
const Model& Session::model() const { return *impl_->model; }

namespace {

KvStats make_stats(const KvCacheConfig& c, int64_t n_tokens, const KvMemory& m) {
  KvStats st;
  st.type_k = std::string(c.k_format->name);
  st.type_v = std::string(c.v_format->name);
  st.n_tokens = n_tokens;
  st.n_ctx = c.n_ctx;
  st.sink_tokens = c.sink_tokens;
  st.window_tokens = c.window_tokens;
  st.values_rotated = c.values_rotated();
  st.bytes_k = m.k;
  st.bytes_v = m.v;
  st.bytes_codes = m.codes;
  st.bytes_scales = m.scales;
  st.bytes_outliers = m.outliers;
  st.bytes_full_precision = m.full_precision;
  st.bytes_calibration = m.calibration;
  st.bytes_positions = m.positions;
  return st;
}

}  // namespace

KvStats kv_memory_estimate(const Model& model, const SessionParams& params, int64_t n_tokens) {
  const LlamaHparams& hp = model.impl().llama.hparams();
  SessionParams p = params;
  if (n_tokens < 0) fail("token count {} is negative", n_tokens);
  if (p.n_ctx <= 0) p.n_ctx = std::max<int64_t>(n_tokens, 1);
  const KvCacheConfig cfg = cache_config(hp, p);
  return make_stats(cfg, n_tokens, KvCache::memory_for(cfg, n_tokens, p.n_batch));
}

KvStats Session::kv_stats() const {
  const KvCache& c = impl_->cache;
  return make_stats(c.config(), c.n_tokens(), c.memory());
}

}  // namespace kvq

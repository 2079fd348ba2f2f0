#include "calib/kv_calibration.h"

#include <cmath>
#include <cstdio>
#include <cstring>

#include "base/error.h"
#include "gguf/gguf.h"

namespace kvq {
namespace {

constexpr std::string_view kDomainName[2] = {"pre", "post"};
constexpr std::string_view kVariantSuffix[2] = {"", ".o1"};

std::string bounds_name(int layer, int domain, int variant) {
  return fmt::format("blk.{}.k_bounds.{}.{}", layer, kDomainName[domain], variant ? "o1" : "minmax");
}
std::string codebook_name(int layer, KvRole role, int bits, int variant) {
  return fmt::format("blk.{}.{}_codebook.nuq{}{}", layer, role == KvRole::key ? "k" : "v", bits,
                     kVariantSuffix[variant]);
}

int variant_of(const KvCalibrationInfo& info, const KvFormat& f) {
  if (!(f.outlier_fraction > 0)) return kNoOutliers;
  if (f.outlier_fraction == info.outlier_fraction) return kOutliers1;
  fail("KV cache type '{}' keeps {:g}% outliers; the calibration sidecar was fitted for {:g}% only", f.name,
       double(f.outlier_fraction) * 100, double(info.outlier_fraction) * 100);
}

void check_codebook(const std::vector<float>& c, int bits, std::string_view what, std::string_view name) {
  if (c.size() != (size_t(1) << bits))
    fail("{}: codebook {} has {} centroids, expected 2^{} = {}", what, name, c.size(), bits, size_t(1) << bits);
  for (size_t i = 0; i < c.size(); ++i) {
    if (!std::isfinite(c[i]) || c[i] < -1.0f || c[i] > 1.0f)
      fail("{}: codebook {} centroid {} is {} (must be finite, within [-1, 1])", what, name, i, c[i]);
    if (i > 0 && c[i] < c[i - 1]) fail("{}: codebook {} is not sorted (centroid {} < centroid {})", what, name, i, i - 1);
  }
}

void check_bounds(const KvChannelBounds& b, int row, std::string_view what, std::string_view name) {
  if (int(b.lower.size()) != row || int(b.upper.size()) != row)
    fail("{}: key bounds {} have {}/{} channels, expected {}", what, name, b.lower.size(), b.upper.size(), row);
  for (int c = 0; c < row; ++c) {
    const float lo = b.lower[size_t(c)], hi = b.upper[size_t(c)];
    if (!std::isfinite(lo) || !std::isfinite(hi) || hi < lo)
      fail("{}: key bounds {} of channel {} are [{}, {}] (must be finite, upper >= lower)", what, name, c, lo, hi);
  }
}

}  // namespace

KvTensorCalibration KvCalibration::for_format(int layer, KvRole role, const KvFormat& f) const {
  if (layer < 0 || layer >= n_layers) fail("KV calibration: layer {} is out of range (0..{})", layer, n_layers - 1);
  KvTensorCalibration out;
  if (!f.needs_calibration(role)) return out;
  const int variant = variant_of(info, f);
  const KvLayerCalibration& L = layers[size_t(layer)];
  if (role == KvRole::key && f.key_scaling == KvKeyScaling::per_channel) {
    const KvChannelBounds& b = L.k_bounds[f.keys_pre_rope ? kPreRope : kPostRope][size_t(variant)];
    out.lower = b.lower;
    out.upper = b.upper;
  }
  if (f.levels == KvLevels::codebook) {
    const auto& books = role == KvRole::key ? L.k_codebook[size_t(variant)] : L.v_codebook[size_t(variant)];
    const auto it = books.find(f.bits);
    if (it == books.end())
      fail("KV cache type '{}' needs {}-bit codebooks; the calibration sidecar has none (run kvq calibrate again)",
           f.name, f.bits);
    out.codebook = it->second;
  }
  return out;
}

void KvCalibration::check_compatible(int nl, int nh, int hd, std::string_view fingerprint,
                                     std::string_view path) const {
  if (nl != n_layers || nh != n_kv_heads || hd != head_dim)
    fail("{}: calibrated for another model ({} layers x {} KV heads x {} head dim; this model has {} x {} x {})",
         path, n_layers, n_kv_heads, head_dim, nl, nh, hd);
  if (fingerprint != info.model_fingerprint)
    fail("{}: calibrated for another model (fingerprint {}{}; this model's is {}): run kvq calibrate for it", path,
         info.model_fingerprint, info.model_name.empty() ? "" : ", '" + info.model_name + "'", fingerprint);
}

void KvCalibration::validate(std::string_view what) const {
  if (n_layers < 1 || n_layers > 4096 || n_kv_heads < 1 || n_kv_heads > 4096 || head_dim < 1 || head_dim > 4096)
    fail("{}: invalid shape {} layers x {} KV heads x {} head dim", what, n_layers, n_kv_heads, head_dim);
  if (int(layers.size()) != n_layers) fail("{}: {} layers of data for {} layers", what, layers.size(), n_layers);
  if (!(info.outlier_fraction > 0 && info.outlier_fraction < 0.5f))
    fail("{}: outlier fraction {} is out of range (0, 0.5)", what, info.outlier_fraction);
  for (size_t i = 0; i < info.bits.size(); ++i) {
    if (info.bits[i] < 1 || info.bits[i] > 8) fail("{}: codebook bits {} out of range 1..8", what, info.bits[i]);
    for (size_t j = 0; j < i; ++j)
      if (info.bits[j] == info.bits[i]) fail("{}: codebook bits {} listed twice", what, info.bits[i]);
  }
  for (int l = 0; l < n_layers; ++l) {
    const KvLayerCalibration& L = layers[size_t(l)];
    for (int d = 0; d < 2; ++d)
      for (int v = 0; v < 2; ++v) check_bounds(L.k_bounds[size_t(d)][size_t(v)], row(), what, bounds_name(l, d, v));
    for (int v = 0; v < 2; ++v) {
      for (KvRole role : {KvRole::key, KvRole::value}) {
        const auto& books = role == KvRole::key ? L.k_codebook[size_t(v)] : L.v_codebook[size_t(v)];
        if (books.size() != info.bits.size())
          fail("{}: layer {} has {} codebooks, expected one per fitted size ({})", what, l, books.size(),
               info.bits.size());
        for (int b : info.bits) {
          const auto it = books.find(b);
          if (it == books.end()) fail("{}: codebook {} is missing", what, codebook_name(l, role, b, v));
          check_codebook(it->second, b, what, codebook_name(l, role, b, v));
        }
      }
    }
  }
}

void KvCalibration::save(const std::string& path) const {
  validate(path);
  gguf::Writer w;
  w.add_string("general.architecture", "kvq-calibration");
  w.add_uint32("kvq.calib.format_version", info.format_version);
  w.add_string("kvq.calib.kvq_version", info.kvq_version);
  w.add_string("kvq.calib.model_fingerprint", info.model_fingerprint);
  w.add_string("kvq.calib.model_name", info.model_name);
  w.add_string("kvq.calib.text_name", info.text_name);
  w.add_int64("kvq.calib.n_windows", info.n_windows);
  w.add_int64("kvq.calib.window", info.window);
  w.add_int64("kvq.calib.n_tokens", info.n_tokens);
  w.add_int32("kvq.calib.sink_tokens", info.sink_tokens);
  w.add_string("kvq.calib.weighting", info.weighting);
  w.add_float32("kvq.calib.outlier_fraction", info.outlier_fraction);
  w.add_int32_array("kvq.calib.bits", std::vector<int32_t>(info.bits.begin(), info.bits.end()));
  w.add_uint64("kvq.calib.seed", info.seed);
  w.add_int32("kvq.calib.n_layers", n_layers);
  w.add_int32("kvq.calib.n_kv_heads", n_kv_heads);
  w.add_int32("kvq.calib.head_dim", head_dim);
  std::vector<float> buf;
  for (int l = 0; l < n_layers; ++l) {
    const KvLayerCalibration& L = layers[size_t(l)];
    for (int d = 0; d < 2; ++d)
      for (int v = 0; v < 2; ++v) {
        const KvChannelBounds& b = L.k_bounds[size_t(d)][size_t(v)];
        buf = b.lower;
        buf.insert(buf.end(), b.upper.begin(), b.upper.end());
        w.add_tensor(bounds_name(l, d, v), GgmlType::F32, {row(), 2}, buf.data(), buf.size() * sizeof(float));
      }
    for (KvRole role : {KvRole::key, KvRole::value})
      for (int b : info.bits)
        for (int v = 0; v < 2; ++v) {
          const auto& c = (role == KvRole::key ? L.k_codebook : L.v_codebook)[size_t(v)].at(b);
          w.add_tensor(codebook_name(l, role, b, v), GgmlType::F32, {int64_t(c.size())}, c.data(),
                       c.size() * sizeof(float));
        }
  }
  w.write(path);
}

KvCalibration KvCalibration::load(const std::string& path) {
  const gguf::File f = gguf::File::open(path);
  auto req_int = [&](std::string_view key) -> int64_t {
    const auto v = f.get_int(key);
    if (!v) fail("{}: not a kvq calibration sidecar or incomplete: metadata key {} is missing", path, key);
    return *v;
  };
  auto req_str = [&](std::string_view key) -> std::string {
    const auto v = f.get_string(key);
    if (!v) fail("{}: not a kvq calibration sidecar or incomplete: metadata key {} is missing", path, key);
    return std::string(*v);
  };
  if (f.get_string("general.architecture").value_or("") != "kvq-calibration")
    fail("{}: not a kvq calibration sidecar (general.architecture is not 'kvq-calibration')", path);
  KvCalibration c;
  const int64_t version = req_int("kvq.calib.format_version");
  if (version != kKvCalibrationFormatVersion)
    fail("{}: calibration format version {} is not supported (this kvq reads version {}): run kvq calibrate again",
         path, version, kKvCalibrationFormatVersion);
  c.info.format_version = uint32_t(version);
  c.info.kvq_version = req_str("kvq.calib.kvq_version");
  c.info.model_fingerprint = req_str("kvq.calib.model_fingerprint");
  c.info.model_name = req_str("kvq.calib.model_name");
  c.info.text_name = req_str("kvq.calib.text_name");
  c.info.n_windows = req_int("kvq.calib.n_windows");
  c.info.window = req_int("kvq.calib.window");
  c.info.n_tokens = req_int("kvq.calib.n_tokens");
  const int64_t sink = req_int("kvq.calib.sink_tokens");
  if (sink < 0 || sink > (int64_t(1) << 24)) fail("{}: sink token count {} is out of range", path, sink);
  c.info.sink_tokens = int(sink);
  c.info.weighting = req_str("kvq.calib.weighting");
  const auto of = f.get_float("kvq.calib.outlier_fraction");
  if (!of) fail("{}: not a kvq calibration sidecar or incomplete: metadata key kvq.calib.outlier_fraction is missing", path);
  c.info.outlier_fraction = float(*of);
  const gguf::Value* bits = f.get_array("kvq.calib.bits");
  if (!bits) fail("{}: not a kvq calibration sidecar or incomplete: metadata key kvq.calib.bits is missing", path);
  if (bits->array_size() > 8) fail("{}: {} codebook sizes listed (at most 8)", path, bits->array_size());
  for (uint64_t i = 0; i < bits->array_size(); ++i) {
    const int64_t b = bits->int_at(i);
    if (b < 1 || b > 8) fail("{}: codebook bits {} out of range 1..8", path, b);
    c.info.bits.push_back(int(b));
  }
  const auto seed = f.find("kvq.calib.seed");
  c.info.seed = seed && seed->as_uint() ? *seed->as_uint() : 0;
  auto shape = [&](std::string_view key) {
    const int64_t v = req_int(key);
    if (v < 1 || v > 4096) fail("{}: {} = {} is out of range 1..4096", path, key, v);
    return int(v);
  };
  c.n_layers = shape("kvq.calib.n_layers");
  c.n_kv_heads = shape("kvq.calib.n_kv_heads");
  c.head_dim = shape("kvq.calib.head_dim");
  const int64_t row = c.row();

  auto tensor = [&](const std::string& name, const std::vector<int64_t>& dims) -> const float* {
    const gguf::TensorInfo* t = f.find_tensor(name);
    if (!t) fail("{}: tensor {} is missing", path, name);
    if (t->type != GgmlType::F32) fail("{}: tensor {} has type {}, expected f32", path, name, ggml_type_name(t->type));
    if (t->dims != dims) {
      std::string got, want;
      for (int64_t d : t->dims) got += (got.empty() ? "" : " x ") + std::to_string(d);
      for (int64_t d : dims) want += (want.empty() ? "" : " x ") + std::to_string(d);
      fail("{}: tensor {} has shape [{}], expected [{}]", path, name, got, want);
    }
    return reinterpret_cast<const float*>(t->data);
  };
  auto floats = [](const float* p, int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    std::memcpy(v.data(), p, size_t(n) * sizeof(float));  // the mapping may be unaligned for float
    return v;
  };
  c.layers.resize(size_t(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    KvLayerCalibration& L = c.layers[size_t(l)];
    for (int d = 0; d < 2; ++d)
      for (int v = 0; v < 2; ++v) {
        const float* p = tensor(bounds_name(l, d, v), {row, 2});
        L.k_bounds[size_t(d)][size_t(v)].lower = floats(p, row);
        L.k_bounds[size_t(d)][size_t(v)].upper = floats(p + row, row);
      }
    for (KvRole role : {KvRole::key, KvRole::value})
      for (int b : c.info.bits)
        for (int v = 0; v < 2; ++v) {
          const std::string name = codebook_name(l, role, b, v);
          const gguf::TensorInfo* t = f.find_tensor(name);
          if (t && t->dims.size() == 1 && t->dims[0] != (int64_t(1) << b))
            fail("{}: codebook {} has {} centroids, expected 2^{} = {}", path, name, t->dims[0], b, 1 << b);
          const float* p = tensor(name, {int64_t(1) << b});
          (role == KvRole::key ? L.k_codebook : L.v_codebook)[size_t(v)][b] = floats(p, int64_t(1) << b);
        }
  }
  c.validate(path);
  return c;
}

}  // namespace kvq

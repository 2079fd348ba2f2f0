// The calibration sidecar (save/load round trip, variant selection, validation
// of tampered files, compatibility checks) and the statistics builder on
// synthetic activations with known percentiles, sink tokens and value outliers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "base/threads.h"
#include "calib/kmeans.h"
#include "calib/kv_calibration.h"
#include "calib/kv_fit.h"
#include "gguf/gguf.h"
#include "kvq/error.h"
#include "test_util.h"

namespace kvq {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

KvCalibration synthetic(int n_layers = 2, int n_kv_heads = 2, int head_dim = 4) {
  KvCalibration c;
  c.n_layers = n_layers;
  c.n_kv_heads = n_kv_heads;
  c.head_dim = head_dim;
  c.info.kvq_version = "test";
  c.info.model_fingerprint = "0123456789abcdef";
  c.info.model_name = "tiny";
  c.info.text_name = "valid.txt";
  c.info.n_windows = 2;
  c.info.window = 32;
  c.info.n_tokens = 64;
  c.info.sink_tokens = 1;
  c.info.weighting = "scale2";
  c.info.bits = {2, 3, 4, 8};
  c.info.seed = 42;
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  c.layers.resize(size_t(n_layers));
  for (auto& L : c.layers) {
    for (auto& dom : L.k_bounds)
      for (auto& b : dom)
        for (int i = 0; i < c.row(); ++i) {
          const float a = u(rng), d = std::abs(u(rng));
          b.lower.push_back(a);
          b.upper.push_back(a + d);
        }
    for (int v = 0; v < 2; ++v)
      for (int bits : c.info.bits)
        for (auto* books : {&L.k_codebook, &L.v_codebook}) {
          std::vector<float> cb(size_t(1) << bits);
          for (float& x : cb) x = u(rng);
          std::sort(cb.begin(), cb.end());
          (*books)[size_t(v)][bits] = cb;
        }
  }
  return c;
}

void expect_same(const KvCalibration& a, const KvCalibration& b) {
  EXPECT_EQ(a.info.kvq_version, b.info.kvq_version);
  EXPECT_EQ(a.info.model_fingerprint, b.info.model_fingerprint);
  EXPECT_EQ(a.info.model_name, b.info.model_name);
  EXPECT_EQ(a.info.text_name, b.info.text_name);
  EXPECT_EQ(a.info.n_windows, b.info.n_windows);
  EXPECT_EQ(a.info.window, b.info.window);
  EXPECT_EQ(a.info.n_tokens, b.info.n_tokens);
  EXPECT_EQ(a.info.sink_tokens, b.info.sink_tokens);
  EXPECT_EQ(a.info.weighting, b.info.weighting);
  EXPECT_EQ(a.info.outlier_fraction, b.info.outlier_fraction);
  EXPECT_EQ(a.info.bits, b.info.bits);
  EXPECT_EQ(a.info.seed, b.info.seed);
  ASSERT_EQ(a.n_layers, b.n_layers);
  EXPECT_EQ(a.n_kv_heads, b.n_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  for (size_t l = 0; l < a.layers.size(); ++l) {
    for (int d = 0; d < 2; ++d)
      for (int v = 0; v < 2; ++v) {
        EXPECT_EQ(a.layers[l].k_bounds[size_t(d)][size_t(v)].lower, b.layers[l].k_bounds[size_t(d)][size_t(v)].lower);
        EXPECT_EQ(a.layers[l].k_bounds[size_t(d)][size_t(v)].upper, b.layers[l].k_bounds[size_t(d)][size_t(v)].upper);
      }
    EXPECT_EQ(a.layers[l].k_codebook, b.layers[l].k_codebook);
    EXPECT_EQ(a.layers[l].v_codebook, b.layers[l].v_codebook);
  }
}

TEST(KvCalibration, SaveLoadRoundTripIsBitExact) {
  const KvCalibration c = synthetic();
  const std::string path = test::temp_dir() + "/roundtrip.kvcalib.gguf";
  c.save(path);
  const KvCalibration d = KvCalibration::load(path);
  expect_same(c, d);
  // Saving what was loaded gives the same bytes.
  const std::string path2 = test::temp_dir() + "/roundtrip2.kvcalib.gguf";
  d.save(path2);
  EXPECT_EQ(test::read_file(path), test::read_file(path2));
  const gguf::File f = gguf::File::open(path);
  EXPECT_NE(f.find_tensor("blk.1.k_bounds.pre.minmax"), nullptr);
  EXPECT_NE(f.find_tensor("blk.1.k_bounds.post.o1"), nullptr);
  EXPECT_NE(f.find_tensor("blk.0.k_codebook.nuq3.o1"), nullptr);
  EXPECT_NE(f.find_tensor("blk.0.v_codebook.nuq8"), nullptr);
  EXPECT_EQ(f.find_tensor("blk.0.k_bounds.pre.minmax")->dims, (std::vector<int64_t>{8, 2}));
}

TEST(KvCalibration, ForFormatPicksTheVariant) {
  const KvCalibration c = synthetic();
  const auto& L = c.layers[1];
  const KvTensorCalibration k31 = c.for_format(1, KvRole::key, kv_format("nuq3-1%"));
  EXPECT_EQ(k31.lower, L.k_bounds[kPreRope][kOutliers1].lower);
  EXPECT_EQ(k31.upper, L.k_bounds[kPreRope][kOutliers1].upper);
  EXPECT_EQ(k31.codebook, L.k_codebook[kOutliers1].at(3));
  const KvTensorCalibration v4 = c.for_format(1, KvRole::value, kv_format("nuq4"));
  EXPECT_TRUE(v4.lower.empty() && v4.upper.empty());
  EXPECT_EQ(v4.codebook, L.v_codebook[kNoOutliers].at(4));
  const KvTensorCalibration post = c.for_format(1, KvRole::key, kv_format("int4-ch-post"));
  EXPECT_EQ(post.lower, L.k_bounds[kPostRope][kNoOutliers].lower);
  EXPECT_TRUE(post.codebook.empty());
  const KvTensorCalibration ch = c.for_format(1, KvRole::key, kv_format("int2-ch-1%"));
  EXPECT_EQ(ch.upper, L.k_bounds[kPreRope][kOutliers1].upper);
  EXPECT_TRUE(ch.codebook.empty());
  const KvTensorCalibration none = c.for_format(0, KvRole::key, kv_format("f16"));
  EXPECT_TRUE(none.lower.empty() && none.codebook.empty());
  EXPECT_TRUE(c.for_format(0, KvRole::value, kv_format("int4-ch")).codebook.empty());  // values per token: nothing
}

TEST(KvCalibration, MissingVariantsAreClearErrors) {
  KvCalibration c = synthetic();
  c.info.bits = {2, 4, 8};
  for (auto& L : c.layers)
    for (int v = 0; v < 2; ++v) {
      L.k_codebook[size_t(v)].erase(3);
      L.v_codebook[size_t(v)].erase(3);
    }
  const std::string e = error_of([&] { c.for_format(0, KvRole::key, kv_format("nuq3")); });
  EXPECT_NE(e.find("3-bit"), std::string::npos) << e;
  EXPECT_NE(e.find("nuq3"), std::string::npos) << e;
  KvFormat two_percent = kv_format("nuq4-1%");
  two_percent.outlier_fraction = 0.02f;
  const std::string e2 = error_of([&] { c.for_format(0, KvRole::value, two_percent); });
  EXPECT_NE(e2.find("2% outliers"), std::string::npos) << e2;
  EXPECT_THROW(c.for_format(2, KvRole::key, kv_format("nuq4")), Error);
}

TEST(KvCalibration, CheckCompatible) {
  const KvCalibration c = synthetic();
  EXPECT_NO_THROW(c.check_compatible(2, 2, 4, "0123456789abcdef", "x.gguf"));
  const std::string e = error_of([&] { c.check_compatible(2, 2, 4, "fedcba9876543210", "x.gguf"); });
  EXPECT_EQ(e.rfind("x.gguf: calibrated for another model", 0), 0u) << e;
  const std::string e2 = error_of([&] { c.check_compatible(3, 2, 4, "0123456789abcdef", "x.gguf"); });
  EXPECT_EQ(e2.rfind("x.gguf: calibrated for another model", 0), 0u) << e2;
  EXPECT_NE(e2.find("2 layers"), std::string::npos) << e2;
}

// Byte position of tensor `name`'s first dimension in the header, and of its data.
size_t find_dim0(const std::vector<uint8_t>& bytes, const std::string& name) {
  std::vector<uint8_t> key(8);
  const uint64_t len = name.size();
  std::memcpy(key.data(), &len, 8);
  key.insert(key.end(), name.begin(), name.end());
  const auto it = std::search(bytes.begin(), bytes.end(), key.begin(), key.end());
  EXPECT_NE(it, bytes.end());
  return size_t(it - bytes.begin()) + key.size() + 4;  // after name and n_dims
}

TEST(KvCalibration, TamperedFilesAreRejectedWithTheFileName) {
  const std::string path = test::temp_dir() + "/tamper.kvcalib.gguf";
  synthetic().save(path);
  const std::vector<uint8_t> good = test::read_file(path);

  // A codebook with 2 centroids where 2^2 = 4 are due.
  std::vector<uint8_t> bad = good;
  const size_t at = find_dim0(bad, "blk.0.k_codebook.nuq2");
  const uint64_t two = 2;
  std::memcpy(bad.data() + at, &two, 8);
  const std::string p1 = test::temp_dir() + "/bad_size.kvcalib.gguf";
  test::write_file(p1, bad);
  std::string e = error_of([&] { KvCalibration::load(p1); });
  EXPECT_EQ(e.rfind(p1 + ":", 0), 0u) << e;
  EXPECT_NE(e.find("blk.0.k_codebook.nuq2 has 2 centroids, expected 2^2 = 4"), std::string::npos) << e;

  // Unsorted codebook: swap the first two centroids.
  const gguf::File f = gguf::File::open(path);
  const gguf::TensorInfo* t = f.find_tensor("blk.1.v_codebook.nuq3.o1");
  ASSERT_NE(t, nullptr);
  bad = good;
  const size_t data = size_t(f.data_offset() + t->offset);
  float c0, c1;
  std::memcpy(&c0, bad.data() + data, 4);
  std::memcpy(&c1, bad.data() + data + 4, 4);
  ASSERT_LT(c0, c1);
  std::memcpy(bad.data() + data, &c1, 4);
  std::memcpy(bad.data() + data + 4, &c0, 4);
  const std::string p2 = test::temp_dir() + "/unsorted.kvcalib.gguf";
  test::write_file(p2, bad);
  e = error_of([&] { KvCalibration::load(p2); });
  EXPECT_EQ(e.rfind(p2 + ":", 0), 0u) << e;
  EXPECT_NE(e.find("blk.1.v_codebook.nuq3.o1 is not sorted"), std::string::npos) << e;

  // NaN in key bounds.
  const gguf::TensorInfo* tb = f.find_tensor("blk.0.k_bounds.post.minmax");
  bad = good;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bad.data() + size_t(f.data_offset() + tb->offset) + 4, &nan, 4);
  const std::string p3 = test::temp_dir() + "/nan.kvcalib.gguf";
  test::write_file(p3, bad);
  e = error_of([&] { KvCalibration::load(p3); });
  EXPECT_NE(e.find("blk.0.k_bounds.post.minmax"), std::string::npos) << e;

  // Not a sidecar at all.
  gguf::Writer w;
  w.add_string("general.architecture", "llama");
  const std::string p4 = test::temp_dir() + "/model.gguf";
  w.write(p4);
  e = error_of([&] { KvCalibration::load(p4); });
  EXPECT_NE(e.find("not a kvq calibration sidecar"), std::string::npos) << e;
}

// ---- statistics builder ----

struct Synthetic {
  int n_kv_heads = 2, head_dim = 4;
  int row() const { return n_kv_heads * head_dim; }
  std::vector<int32_t> positions;
  std::vector<float> k, v;
};

// Two windows of 101 tokens (position 0 = sink with huge activations). Key
// channel c of the j-th kept token (j = 0..199, in window order) is
// (c - 3) + 0.5 * perm(j): a permutation of 200 evenly spaced values. Values: a
// row of small uniform numbers in [-1, 1] plus one +50 and one -50 element.
Synthetic make_synthetic() {
  Synthetic s;
  const int row = s.row();
  std::mt19937 rng(17);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<int> perm(200);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  int j = 0;
  for (int w = 0; w < 2; ++w)
    for (int p = 0; p <= 100; ++p) {
      s.positions.push_back(p);
      for (int c = 0; c < row; ++c) {
        s.k.push_back(p == 0 ? 1000.0f : float(c - 3) + 0.5f * float(perm[size_t(j)]));
        s.v.push_back(p == 0 ? -1000.0f : u(rng));
      }
      if (p > 0) {
        s.v[s.v.size() - size_t(row) + size_t(p % row)] = 50.0f;
        s.v[s.v.size() - size_t(row) + size_t((p + 3) % row)] = -50.0f;
        ++j;
      }
    }
  return s;
}

KvFitParams fit_params(const Synthetic& s) {
  KvFitParams p;
  p.n_kv_heads = s.n_kv_heads;
  p.head_dim = s.head_dim;
  p.rope.head_dim = s.head_dim;
  p.rope.n_rot = s.head_dim;
  p.rope.freq_base = 100.0f;
  p.sink_tokens = 1;
  p.bits = {2, 3};
  return p;
}

KvLayerCapture capture_of(const Synthetic& s) {
  KvLayerCapture cap;
  cap.n_tokens = int64_t(s.positions.size());
  cap.positions = s.positions.data();
  cap.k = s.k.data();
  cap.v = s.v.data();
  return cap;
}

TEST(KvFit, KeyBoundsArePercentilesWithoutTheSink) {
  const Synthetic s = make_synthetic();
  const KvLayerCalibration L = fit_kv_layer(fit_params(s), capture_of(s));
  for (int c = 0; c < s.row(); ++c) {
    const double off = c - 3;
    EXPECT_FLOAT_EQ(L.k_bounds[kPreRope][kNoOutliers].lower[size_t(c)], float(off));
    EXPECT_FLOAT_EQ(L.k_bounds[kPreRope][kNoOutliers].upper[size_t(c)], float(off + 0.5 * 199));
    // 0.5th percentile at 0.005 * 199 = 0.995 order statistics, 99.5th at 198.005.
    EXPECT_NEAR(L.k_bounds[kPreRope][kOutliers1].lower[size_t(c)], off + 0.5 * 0.995, 1e-4);
    EXPECT_NEAR(L.k_bounds[kPreRope][kOutliers1].upper[size_t(c)], off + 0.5 * 198.005, 1e-4);
  }
  // Post-RoPE min/max: rotate each kept key at its position here.
  const Rope rope(fit_params(s).rope);
  std::vector<float> lo(size_t(s.row()), INFINITY), hi(size_t(s.row()), -INFINITY), x(size_t(s.row()));
  for (size_t t = 0; t < s.positions.size(); ++t) {
    if (s.positions[t] < 1) continue;
    std::copy(s.k.begin() + std::ptrdiff_t(t) * s.row(), s.k.begin() + std::ptrdiff_t(t + 1) * s.row(), x.begin());
    rope.apply(x.data(), s.n_kv_heads, s.positions[t]);
    for (int c = 0; c < s.row(); ++c) {
      lo[size_t(c)] = std::min(lo[size_t(c)], x[size_t(c)]);
      hi[size_t(c)] = std::max(hi[size_t(c)], x[size_t(c)]);
    }
  }
  EXPECT_EQ(L.k_bounds[kPostRope][kNoOutliers].lower, lo);
  EXPECT_EQ(L.k_bounds[kPostRope][kNoOutliers].upper, hi);
  for (int c = 0; c < s.row(); ++c) EXPECT_GT(L.k_bounds[kPostRope][kOutliers1].lower[size_t(c)], lo[size_t(c)]);
}

// The encoder keeps at most k_cap elements per tail of a token beyond the key
// bounds exactly; the rest are coded with the codebook like any element, so
// the fit must see them (at the edge of the range). Four spike tokens (0.4 %,
// inside the 0.5 % tail, so the bounds stay near +-1) have every channel at +5:
// one element each is an exact outlier, 63 are coded densely at the top level.
// Weighted heavily, they must pull the top centroid of the 1 % codebook to +1.
TEST(KvFit, KeysBeyondTheOutlierCapStayInTheCodebookFit) {
  const int row = 64;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<int32_t> pos;
  std::vector<float> k, v;
  for (int t = 0; t <= 1000; ++t) {
    pos.push_back(t);
    const bool spike = t % 250 == 7;
    for (int c = 0; c < row; ++c) {
      k.push_back(spike ? 5.0f : uni(rng));
      v.push_back(uni(rng));
    }
  }
  KvFitParams p;
  p.n_kv_heads = 1;
  p.head_dim = row;
  p.rope.head_dim = row;
  p.rope.n_rot = row;
  p.sink_tokens = 1;
  p.bits = {2};
  ASSERT_EQ(kv_outliers_per_tail(p.outlier_fraction, row), 1);
  KvLayerCapture cap;
  cap.n_tokens = int64_t(pos.size());
  cap.positions = pos.data();
  cap.k = k.data();
  cap.v = v.data();
  auto top_centroid = [&](float spike_weight) {
    std::vector<float> w(k.size(), 1.0f);
    for (size_t i = 0; i < k.size(); ++i)
      if (k[i] == 5.0f) w[i] = spike_weight;
    cap.k_weight = w.data();
    const KvLayerCalibration L = fit_kv_layer(p, cap);
    EXPECT_LT(L.k_bounds[kPreRope][kOutliers1].upper[0], 1.0f);  // the spikes are beyond the bounds
    return L.k_codebook[kOutliers1].at(2).back();
  };
  EXPECT_LT(top_centroid(1.0f), 0.9f);    // uniform data: top centroid near 0.75
  EXPECT_GT(top_centroid(1e4f), 0.99f);   // the densely coded spike elements dominate
}

TEST(KvFit, ValueOutliersAreTrimmedPerToken) {
  const Synthetic s = make_synthetic();
  const KvLayerCalibration L = fit_kv_layer(fit_params(s), capture_of(s));
  // Without trimming each row's range is [-50, 50]: everything else sits near 0.
  const auto& v0 = L.v_codebook[kNoOutliers].at(2);
  EXPECT_NEAR(v0[0], -1.0f, 1e-4);
  EXPECT_NEAR(v0[3], 1.0f, 1e-4);
  EXPECT_LT(std::abs(v0[1]), 0.03f);
  EXPECT_LT(std::abs(v0[2]), 0.03f);
  // With one element per tail dropped (kv_outliers_per_tail(0.01, 8) = 1) the
  // other six are rescaled by their own min/max: the codebook is the weighted
  // (r^2) k-means of exactly those, computed here without the builder.
  std::vector<float> xs, ws;
  for (size_t t = 0; t < s.positions.size(); ++t) {
    if (s.positions[t] < 1) continue;
    std::vector<float> r(s.v.begin() + std::ptrdiff_t(t) * s.row(), s.v.begin() + std::ptrdiff_t(t + 1) * s.row());
    std::sort(r.begin(), r.end());
    const double zp = (double(r[1]) + r[6]) / 2, range = (double(r[6]) - r[1]) / 2;
    for (int i = 1; i <= 6; ++i) {
      xs.push_back(float((r[size_t(i)] - zp) / range));
      ws.push_back(float(range * range));
    }
  }
  for (int bits : {2, 3}) {
    const auto want = weighted_kmeans_1d(xs, ws, 1 << bits, 0);
    const auto& got = L.v_codebook[kOutliers1].at(bits);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-3) << bits << " bits, level " << i;
    EXPECT_LE(weighted_sse_1d(xs, ws, got), weighted_sse_1d(xs, ws, want) * 1.001);
  }
  EXPECT_LT(L.v_codebook[kOutliers1].at(2)[1], -0.2f);  // spread over [-1, 1], unlike v0
  for (int v = 0; v < 2; ++v) EXPECT_EQ(L.k_codebook[size_t(v)].at(3).size(), 8u);
}

TEST(KvFit, SinkTokensNeverEnterTheCodebooks) {
  Synthetic s = make_synthetic();
  const KvLayerCalibration a = fit_kv_layer(fit_params(s), capture_of(s));
  for (size_t t = 0; t < s.positions.size(); ++t)
    if (s.positions[t] == 0)
      for (int c = 0; c < s.row(); ++c) {
        s.k[t * size_t(s.row()) + size_t(c)] = -7.0f;
        s.v[t * size_t(s.row()) + size_t(c)] = float(c);
      }
  const KvLayerCalibration b = fit_kv_layer(fit_params(s), capture_of(s));
  EXPECT_EQ(a.k_codebook, b.k_codebook);
  EXPECT_EQ(a.v_codebook, b.v_codebook);
  EXPECT_EQ(a.k_bounds[kPostRope][kOutliers1].lower, b.k_bounds[kPostRope][kOutliers1].lower);
  // Sink 0: the first tokens count, and the -7 keys become the minimum.
  KvFitParams p = fit_params(s);
  p.sink_tokens = 0;
  const KvLayerCalibration c = fit_kv_layer(p, capture_of(s));
  EXPECT_EQ(c.k_bounds[kPreRope][kNoOutliers].lower[5], -7.0f);
}

TEST(KvFit, ExtraWeightsAndErrors) {
  const Synthetic s = make_synthetic();
  KvLayerCapture cap = capture_of(s);
  // Unit extra weights change nothing.
  std::vector<float> ones(s.k.size(), 1.0f);
  cap.k_weight = ones.data();
  cap.v_weight = ones.data();
  const KvLayerCalibration a = fit_kv_layer(fit_params(s), capture_of(s));
  const KvLayerCalibration b = fit_kv_layer(fit_params(s), cap);
  EXPECT_EQ(a.k_codebook, b.k_codebook);
  EXPECT_EQ(a.v_codebook, b.v_codebook);
  std::vector<float> bad = ones;
  bad[size_t(s.row()) * 3] = -1.0f;
  cap.k_weight = bad.data();
  EXPECT_THROW(fit_kv_layer(fit_params(s), cap), Error);
  // Only sink tokens: nothing to fit.
  KvFitParams p = fit_params(s);
  p.sink_tokens = 1000;
  EXPECT_THROW(fit_kv_layer(p, capture_of(s)), Error);
  Synthetic n = s;
  n.v[size_t(s.row()) * 5] = NAN;
  EXPECT_THROW(fit_kv_layer(fit_params(n), capture_of(n)), Error);
}

TEST(KvFit, LayersInParallelMatchOneByOne) {
  const Synthetic s = make_synthetic();
  Synthetic s2 = s;
  for (float& x : s2.k) x *= 0.5f;
  const std::vector<KvLayerCapture> caps = {capture_of(s), capture_of(s2), capture_of(s)};
  ThreadPool pool(2);
  std::vector<int64_t> seen;
  const auto layers = fit_kv_layers(fit_params(s), caps, pool, [&](int64_t done, int64_t total) {
    EXPECT_EQ(total, 3);
    seen.push_back(done);
  });
  EXPECT_EQ(seen, (std::vector<int64_t>{1, 2, 3}));
  ASSERT_EQ(layers.size(), 3u);
  for (size_t l = 0; l < 3; ++l) {
    const KvLayerCalibration one = fit_kv_layer(fit_params(s), caps[l]);
    EXPECT_EQ(layers[l].k_codebook, one.k_codebook);
    EXPECT_EQ(layers[l].v_codebook, one.v_codebook);
    EXPECT_EQ(layers[l].k_bounds[kPreRope][kOutliers1].upper, one.k_bounds[kPreRope][kOutliers1].upper);
  }
}

}  // namespace
}  // namespace kvq

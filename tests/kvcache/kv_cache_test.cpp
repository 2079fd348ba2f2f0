// The paged KV cache: page-granular allocation, batch semantics (commit, abort,
// overflow, position order), and the stored layout read back through the view:
// keys channel-major per (page, head) block — element (token j, channel d) at
// k_block(page, h)[d * kKvPageTokens + j] — already rotated for post-RoPE
// formats; values token-major — element (j, d) at v_block(page, h)[j * head_dim + d].
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "base/fp16.h"
#include "formats/kv_format.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/kv_tile.h"
#include "kvcache/kv_cache.h"
#include "kvq/error.h"

namespace kvq {
namespace {

KvCacheConfig make_config(const char* fmt, int n_layers, int n_kv, int hd, int64_t n_ctx, bool neox = false,
                          int n_rot = 0) {
  KvCacheConfig c;
  c.n_layers = n_layers;
  c.n_kv_heads = n_kv;
  c.head_dim = hd;
  c.n_ctx = n_ctx;
  c.k_format = &kv_format(fmt);
  c.v_format = &kv_format(fmt);
  c.rope.head_dim = hd;
  c.rope.n_rot = n_rot ? n_rot : hd;
  c.rope.neox = neox;
  return c;
}

std::vector<int32_t> iota_pos(int32_t first, int64_t n, int32_t step = 1) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[size_t(i)] = first + int32_t(i) * step;
  return p;
}

std::vector<float> random_vec(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// Appends a batch with the same data in every layer (or layer-specific data).
void append(KvCache& cache, const std::vector<int32_t>& pos, const std::vector<std::vector<float>>& k,
            const std::vector<std::vector<float>>& v) {
  cache.begin_batch(pos);
  for (int l = 0; l < cache.config().n_layers; ++l) cache.store(l, k[size_t(l)].data(), v[size_t(l)].data());
  cache.end_batch();
}

void append_random(KvCache& cache, const std::vector<int32_t>& pos, uint32_t seed) {
  const auto& c = cache.config();
  const size_t n = pos.size() * size_t(c.n_kv_heads) * c.head_dim;
  std::vector<std::vector<float>> k, v;
  for (int l = 0; l < c.n_layers; ++l) {
    k.push_back(random_vec(n, seed + 2 * l));
    v.push_back(random_vec(n, seed + 2 * l + 1));
  }
  append(cache, pos, k, v);
}

// Element (token i, channel d) of head h as stored in a layer view.
float read_k(const KvLayerView& kv, int64_t i, int h, int d) {
  const int64_t page = i / kKvPageTokens, j = i % kKvPageTokens;
  std::vector<float> tile(size_t(kv.head_dim) * kKvPageTokens);
  kv_decode_key_tile(resolve_kernels({}), kv, page, h, tile.data());
  return tile[size_t(d * kKvPageTokens + j)];
}
float read_v(const KvLayerView& kv, int64_t i, int h, int d) {
  const int64_t page = i / kKvPageTokens, j = i % kKvPageTokens;
  std::vector<float> tile(size_t(kv.head_dim) * kKvPageTokens);
  kv_decode_value_tile(resolve_kernels({}), kv, page, h, tile.data());
  return tile[size_t(j * kv.head_dim + d)];
}

uint64_t element_bytes(const char* fmt) { return std::string(fmt) == "f32" ? 4 : 2; }

uint64_t expected_bytes(const char* fmt, int64_t pages_per_layer, int n_layers, int n_kv, int hd) {
  return uint64_t(pages_per_layer) * kKvPageTokens * uint64_t(n_kv) * uint64_t(hd) * element_bytes(fmt) *
         uint64_t(n_layers);
}

TEST(KvCache, BytesGrowInWholePages) {
  for (const char* fmt : {"f32", "f16"}) {
    SCOPED_TRACE(fmt);
    const int n_layers = 3, n_kv = 2, hd = 16;
    KvCache cache(make_config(fmt, n_layers, n_kv, hd, 1000));
    EXPECT_EQ(cache.bytes_k(), 0u);
    EXPECT_EQ(cache.bytes_v(), 0u);
    EXPECT_EQ(cache.n_tokens(), 0);
    // Token counts after each batch -> pages per layer.
    int32_t next = 0;
    const std::pair<int64_t, int64_t> steps[] = {{1, 1}, {62, 1}, {1, 1}, {1, 2}, {63, 2}, {1, 3}, {200, 6}};
    int64_t total = 0;
    for (auto [n, pages] : steps) {
      append_random(cache, iota_pos(next, n), uint32_t(next));
      next += int32_t(n);
      total += n;
      EXPECT_EQ(cache.n_tokens(), total);
      EXPECT_EQ(cache.bytes_k(), expected_bytes(fmt, pages, n_layers, n_kv, hd)) << "after " << total << " tokens";
      EXPECT_EQ(cache.bytes_v(), expected_bytes(fmt, pages, n_layers, n_kv, hd)) << "after " << total << " tokens";
    }
  }
}

TEST(KvCache, ClearKeepsPagesForgetsTokens) {
  KvCache cache(make_config("f16", 2, 1, 8, 500));
  append_random(cache, iota_pos(0, 130), 1);
  const uint64_t bk = cache.bytes_k(), bv = cache.bytes_v();
  EXPECT_EQ(bk, expected_bytes("f16", 3, 2, 1, 8));
  cache.clear();
  EXPECT_EQ(cache.n_tokens(), 0);
  EXPECT_EQ(cache.view(0).n_tokens, 0);
  EXPECT_EQ(cache.view(1).n_tokens, 0);
  EXPECT_EQ(cache.bytes_k(), bk);
  EXPECT_EQ(cache.bytes_v(), bv);
  // Positions restart: 0 is accepted again, and reuse allocates nothing new.
  append_random(cache, iota_pos(0, 100), 2);
  EXPECT_EQ(cache.n_tokens(), 100);
  EXPECT_EQ(cache.bytes_k(), bk);
  EXPECT_EQ(cache.view(0).positions[0], 0);
}

TEST(KvCache, ContextOverflowThrowsAndLeavesCacheUnchanged) {
  KvCache cache(make_config("f32", 2, 2, 8, 100));
  append_random(cache, iota_pos(0, 90), 3);
  const uint64_t bk = cache.bytes_k(), bv = cache.bytes_v();
  const float k_before = read_k(cache.view(1), 89, 1, 7);
  try {
    cache.begin_batch(iota_pos(90, 11));
    FAIL() << "expected an overflow error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("context"), std::string::npos) << msg;
    EXPECT_NE(msg.find("100"), std::string::npos) << "names the context size: " << msg;
  }
  EXPECT_EQ(cache.n_tokens(), 90);
  EXPECT_EQ(cache.batch_size(), 0);
  EXPECT_EQ(cache.bytes_k(), bk);
  EXPECT_EQ(cache.bytes_v(), bv);
  EXPECT_EQ(cache.view(0).n_tokens, 90);
  EXPECT_EQ(read_k(cache.view(1), 89, 1, 7), k_before);
  // Exactly filling the context is fine.
  append_random(cache, iota_pos(90, 10), 4);
  EXPECT_EQ(cache.n_tokens(), 100);
  EXPECT_THROW(cache.begin_batch(iota_pos(100, 1)), Error);
  EXPECT_EQ(cache.n_tokens(), 100);
}

TEST(KvCache, PositionsMustIncrease) {
  KvCache cache(make_config("f32", 1, 1, 8, 100));
  append_random(cache, iota_pos(10, 5), 5);  // positions 10..14
  const uint64_t bk = cache.bytes_k();
  for (const std::vector<int32_t>& bad :
       {std::vector<int32_t>{14}, std::vector<int32_t>{3}, std::vector<int32_t>{15, 15},
        std::vector<int32_t>{16, 15}, std::vector<int32_t>{20, 21, 21}}) {
    EXPECT_THROW(cache.begin_batch(bad), Error) << "first bad position " << bad[0];
    EXPECT_EQ(cache.n_tokens(), 5);
    EXPECT_EQ(cache.batch_size(), 0);
    EXPECT_EQ(cache.bytes_k(), bk);
  }
  // Gaps are allowed.
  append_random(cache, {15, 30, 31}, 6);
  EXPECT_EQ(cache.n_tokens(), 8);
  EXPECT_EQ(cache.view(0).positions[7], 31);
  EXPECT_THROW(cache.begin_batch(std::vector<int32_t>{31}), Error);
}

TEST(KvCache, AbortBatchForgetsTheBatch) {
  const int hd = 8, n_kv = 2;
  KvCache cache(make_config("f32", 2, n_kv, hd, 300));
  append_random(cache, iota_pos(0, 60), 7);
  const std::vector<float> k_bad = random_vec(10 * n_kv * hd, 8), v_bad = random_vec(10 * n_kv * hd, 9);
  cache.begin_batch(iota_pos(60, 10));
  EXPECT_EQ(cache.batch_size(), 10);
  cache.store(0, k_bad.data(), v_bad.data());
  EXPECT_EQ(cache.view(0).n_tokens, 70);  // the stored batch is readable
  EXPECT_EQ(cache.view(1).n_tokens, 60);  // not stored in this layer yet
  cache.abort_batch();
  EXPECT_EQ(cache.batch_size(), 0);
  EXPECT_EQ(cache.n_tokens(), 60);
  EXPECT_EQ(cache.view(0).n_tokens, 60);
  EXPECT_EQ(cache.view(1).n_tokens, 60);
  // The aborted positions are free again; the new batch's data is what is read.
  const std::vector<float> k = random_vec(10 * n_kv * hd, 10), v = random_vec(10 * n_kv * hd, 11);
  append(cache, iota_pos(60, 10), {k, k}, {v, v});
  EXPECT_EQ(cache.n_tokens(), 70);
  const KvLayerView kv = cache.view(0);
  EXPECT_EQ(kv.positions[60], 60);
  EXPECT_EQ(kv.positions[69], 69);
  for (int64_t i = 0; i < 10; ++i)
    for (int h = 0; h < n_kv; ++h)
      for (int d = 0; d < hd; ++d)
        ASSERT_EQ(read_v(kv, 60 + i, h, d), v[size_t((i * n_kv + h) * hd + d)]);
}

// f32 keys read back equal Rope::apply of the input at the token's position
// (bit-exact), and the textbook rotation in double (within rounding); values
// are the inputs exactly. Multiple batches straddling pages, multiple layers.
TEST(KvCache, F32StoresRotatedKeysChannelMajorAndValuesTokenMajor) {
  for (bool neox : {false, true})
    for (int n_rot : {0, 8}) {
      SCOPED_TRACE(std::string("neox=") + (neox ? "1" : "0") + " n_rot=" + std::to_string(n_rot));
      const int hd = 16, n_kv = 3, n_layers = 2;
      const KvCacheConfig cfg = make_config("f32", n_layers, n_kv, hd, 400, neox, n_rot);
      KvCache cache(cfg);
      const Rope rope(cfg.rope);
      const int64_t row = int64_t(n_kv) * hd;
      std::vector<int32_t> all_pos;
      std::vector<std::vector<float>> all_k(n_layers), all_v(n_layers);
      int32_t next = 5;
      uint32_t seed = 1;
      for (int64_t n : {1, 40, 30, 64, 1, 70}) {
        const std::vector<int32_t> pos = iota_pos(next, n, 2);
        next = pos.back() + 3;
        std::vector<std::vector<float>> k, v;
        for (int l = 0; l < n_layers; ++l) {
          k.push_back(random_vec(size_t(n * row), seed++));
          v.push_back(random_vec(size_t(n * row), seed++));
          all_k[size_t(l)].insert(all_k[size_t(l)].end(), k.back().begin(), k.back().end());
          all_v[size_t(l)].insert(all_v[size_t(l)].end(), v.back().begin(), v.back().end());
        }
        all_pos.insert(all_pos.end(), pos.begin(), pos.end());
        append(cache, pos, k, v);
      }
      const int64_t n = int64_t(all_pos.size());
      ASSERT_EQ(cache.n_tokens(), n);
      for (int l = 0; l < n_layers; ++l) {
        const KvLayerView kv = cache.view(l);
        ASSERT_EQ(kv.n_tokens, n);
        EXPECT_EQ(kv.n_kv_heads, n_kv);
        EXPECT_EQ(kv.head_dim, hd);
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(kv.positions[i], all_pos[size_t(i)]);
          std::vector<float> rotated(all_k[size_t(l)].begin() + i * row, all_k[size_t(l)].begin() + (i + 1) * row);
          rope.apply(rotated.data(), n_kv, all_pos[size_t(i)]);
          for (int h = 0; h < n_kv; ++h) {
            const float* raw = all_k[size_t(l)].data() + i * row + h * hd;
            const int half = cfg.rope.n_rot / 2;
            for (int d = 0; d < hd; ++d) {
              const float got = read_k(kv, i, h, d);
              ASSERT_EQ(got, rotated[size_t(h * hd + d)]) << "layer " << l << " token " << i << " head " << h << " d " << d;
              // Independent check of the rotation.
              double want = raw[d];
              if (d < cfg.rope.n_rot) {
                const int pair = neox ? (d % half) : d / 2;
                const bool first = neox ? d < half : d % 2 == 0;
                const int a = neox ? pair : 2 * pair, b = neox ? pair + half : 2 * pair + 1;
                const double th = double(all_pos[size_t(i)]) * std::pow(10000.0, -2.0 * pair / cfg.rope.n_rot);
                want = first ? raw[a] * std::cos(th) - raw[b] * std::sin(th) : raw[a] * std::sin(th) + raw[b] * std::cos(th);
              }
              ASSERT_NEAR(got, want, 2e-6) << "token " << i << " head " << h << " d " << d;
              ASSERT_EQ(read_v(kv, i, h, d), all_v[size_t(l)][size_t(i * row + h * hd + d)]);
            }
          }
        }
      }
    }
}

TEST(KvCache, F16StoresHalfRoundedRotatedKeysAndValues) {
  const int hd = 8, n_kv = 2;
  const KvCacheConfig cfg = make_config("f16", 1, n_kv, hd, 200);
  KvCache cache(cfg);
  const Rope rope(cfg.rope);
  const int64_t n = 130, row = int64_t(n_kv) * hd;
  std::vector<float> k = random_vec(size_t(n * row), 1), v = random_vec(size_t(n * row), 2);
  // Values at awkward magnitudes too: subnormal halves, overflow, exact halves.
  v[0] = 1e-6f;
  v[1] = 7e4f;
  v[2] = 1.0009766f;
  v[3] = -2.9802322e-08f;
  append(cache, iota_pos(0, n), {k}, {v});
  const KvLayerView kv = cache.view(0);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<float> rotated(k.begin() + i * row, k.begin() + (i + 1) * row);
    rope.apply(rotated.data(), n_kv, i);
    for (int h = 0; h < n_kv; ++h)
      for (int d = 0; d < hd; ++d) {
        const size_t at = size_t(h * hd + d);
        ASSERT_EQ(read_k(kv, i, h, d), fp16_to_f32(f32_to_fp16(rotated[at]))) << i << "," << h << "," << d;
        const float vin = v[size_t(i * row) + at];
        ASSERT_EQ(f32_to_bits(read_v(kv, i, h, d)), f32_to_bits(fp16_to_f32(f32_to_fp16(vin)))) << vin;
      }
  }
  EXPECT_TRUE(std::isinf(read_v(kv, 0, 0, 1)));
}

// The raw layout: k_block/v_block offsets and the page structure.
TEST(KvCache, ViewLayoutOffsets) {
  const int hd = 8, n_kv = 3;
  KvCache cache(make_config("f32", 1, n_kv, hd, 200));
  append_random(cache, iota_pos(0, 70), 1);
  const KvLayerView kv = cache.view(0);
  // The plain f32 layout (docs/formats.md): per head a block of hd x 64 floats,
  // keys channel-major, then the values' blocks token-major.
  const uint64_t head_bytes = uint64_t(hd) * kKvPageTokens * 4;
  EXPECT_EQ(kv.v_offset, head_bytes * n_kv);
  EXPECT_EQ(kv.page_bytes, 2 * head_bytes * n_kv);
  EXPECT_NE(kv.pages[0], kv.pages[1]);
  auto k_block = [&](int64_t p, int h) { return kv.pages[p] + h * head_bytes; };
  auto v_block = [&](int64_t p, int h) { return kv.pages[p] + kv.v_offset + h * head_bytes; };
  // Padding slots of the partial last page are zero (no garbage for SIMD tiles).
  for (int h = 0; h < n_kv; ++h)
    for (int64_t j = 70 - kKvPageTokens; j < kKvPageTokens; ++j)
      for (int d = 0; d < hd; ++d) {
        float x;
        std::memcpy(&x, k_block(1, h) + (d * kKvPageTokens + j) * 4, 4);
        ASSERT_EQ(x, 0.0f);
        std::memcpy(&x, v_block(1, h) + (j * hd + d) * 4, 4);
        ASSERT_EQ(x, 0.0f);
      }
}

// Rows of n_kv_heads * head_dim wider than 1024 floats are common: models
// without GQA (32 heads x 128 = 4096) or with wide heads (8 x 256 = 2048).
TEST(KvCache, StoresWideRows) {
  for (const char* fmt : {"f32", "f16"})
    for (auto [n_kv, hd] : {std::pair{8, 256}, std::pair{32, 128}}) {
      SCOPED_TRACE(std::string(fmt) + " n_kv=" + std::to_string(n_kv) + " hd=" + std::to_string(hd));
      const KvCacheConfig cfg = make_config(fmt, 1, n_kv, hd, 16);
      KvCache cache(cfg);
      const Rope rope(cfg.rope);
      const int64_t n = 3, row = int64_t(n_kv) * hd;
      const std::vector<float> k = random_vec(size_t(n * row), 1), v = random_vec(size_t(n * row), 2);
      ASSERT_NO_THROW(append(cache, iota_pos(0, n), {k}, {v}));
      const KvLayerView kv = cache.view(0);
      for (int64_t i = 0; i < n; ++i) {
        std::vector<float> rotated(k.begin() + i * row, k.begin() + (i + 1) * row);
        rope.apply(rotated.data(), n_kv, i);
        for (int h = 0; h < n_kv; h += 7)
          for (int d = 0; d < hd; d += 5) {
            const size_t at = size_t(h * hd + d);
            const float want = std::string(fmt) == "f32" ? rotated[at] : fp16_to_f32(f32_to_fp16(rotated[at]));
            ASSERT_EQ(read_k(kv, i, h, d), want) << i << "," << h << "," << d;
          }
      }
    }
}

TEST(KvCache, RejectsBadConfig) {
  EXPECT_THROW(KvCache(make_config("f32", 0, 1, 8, 10)), Error);
  EXPECT_THROW(KvCache(make_config("f32", 1, 0, 8, 10)), Error);
  EXPECT_THROW(KvCache(make_config("f32", 1, 1, 8, 0)), Error);
  KvCacheConfig c = make_config("f32", 1, 1, 8, 10);
  c.k_format = nullptr;
  EXPECT_THROW({ KvCache cache(c); }, Error);
}

TEST(KvCache, EmptyBatchIsANoOp) {
  KvCache cache(make_config("f32", 1, 1, 8, 10));
  cache.begin_batch(std::span<const int32_t>());
  EXPECT_EQ(cache.batch_size(), 0);
  EXPECT_EQ(cache.bytes_k(), 0u);
  append_random(cache, {0, 1}, 1);
  EXPECT_EQ(cache.n_tokens(), 2);
}

}  // namespace
}  // namespace kvq

namespace kvq {
namespace {

// memory_for() computes without allocating what memory() reports for a real cache.
TEST(KvCacheMemory, EstimateEqualsAllocation) {
  for (const char* fmt : {"f16", "q4_0", "int2", "nuq3-1%"})
    for (int sink : {0, 3})
      for (int64_t window : {0, 70}) {
        KvCacheConfig c = make_config(fmt, 2, 3, 64, 1000);
        c.sink_tokens = sink;
        c.window_tokens = window;
        const KvFormat& f = *c.k_format;
        if (f.needs_calibration(KvRole::key) || f.needs_calibration(KvRole::value)) {
          KvTensorCalibration cal;
          cal.lower.assign(192, -1.0f);
          cal.upper.assign(192, 1.0f);
          for (int i = 0; i < (1 << f.bits); ++i) cal.codebook.push_back(-1.0f + 2.0f * float(i) / float((1 << f.bits) - 1));
          c.k_calibration.assign(2, cal);
          c.v_calibration.assign(2, cal);
        }
        KvCache cache(c);
        int64_t n = 0;
        for (int64_t batch : {100, 1, 1, 37}) {
          append_random(cache, iota_pos(int32_t(n), batch), uint32_t(n + 1));
          n += batch;
          const KvMemory real = cache.memory(), est = KvCache::memory_for(c, n, 100);
          SCOPED_TRACE(std::string(fmt) + " sink " + std::to_string(sink) + " window " + std::to_string(window) +
                       " n " + std::to_string(n));
          EXPECT_EQ(real.k, est.k);
          EXPECT_EQ(real.v, est.v);
          EXPECT_EQ(real.codes, est.codes);
          EXPECT_EQ(real.scales, est.scales);
          EXPECT_EQ(real.outliers, est.outliers);
          EXPECT_EQ(real.full_precision, est.full_precision);
          EXPECT_EQ(real.calibration, est.calibration);
          EXPECT_EQ(real.positions, est.positions);
          EXPECT_EQ(real.total(),
                    real.codes + real.scales + real.outliers + real.full_precision + real.calibration + real.positions);
          // Pages: ceil(n / 64) per layer.
          const uint64_t pages = uint64_t((n + 63) / 64) * 2;
          EXPECT_EQ(real.codes + real.scales + real.outliers, pages * (cache.view(0).v_offset +
              make_kv_codec(*c.v_format, KvRole::value, KvGeometry{3, 64}, nullptr, true)->page_bytes()));
        }
      }
}

// The first sink_tokens tokens read back exactly as binary16, whatever the format.
TEST(KvCacheSink, SinkTokensReadBackAsBinary16) {
  KvCacheConfig c = make_config("int2", 1, 2, 32, 200);
  c.sink_tokens = 5;
  KvCache cache(c);
  const auto pos = iota_pos(0, 70);
  std::vector<float> k = random_vec(70 * 64, 11), v = random_vec(70 * 64, 12);
  append(cache, pos, {k}, {v});
  const KvLayerView kv = cache.view(0);
  Rope rope(c.rope);
  for (int64_t i = 0; i < 70; ++i)
    for (int h = 0; h < 2; ++h) {
      std::vector<float> key(k.begin() + i * 64 + h * 32, k.begin() + i * 64 + h * 32 + 32);
      rope.apply(key.data(), 1, int32_t(i));  // int2 stores post-RoPE keys
      for (int d = 0; d < 32; ++d) {
        const float want_k = fp16_to_f32(f32_to_fp16(key[size_t(d)]));
        const float want_v = fp16_to_f32(f32_to_fp16(v[size_t(i * 64 + h * 32 + d)]));
        if (i < 5) {
          EXPECT_EQ(read_k(kv, i, h, d), want_k) << i;
          EXPECT_EQ(read_v(kv, i, h, d), want_v) << i;
        }
      }
    }
  // Later tokens are int2 codes: far from exact somewhere.
  double worst = 0;
  for (int64_t i = 5; i < 70; ++i)
    for (int d = 0; d < 32; ++d) worst = std::max(worst, double(std::fabs(read_v(kv, i, 0, d) - v[size_t(i * 64 + d)])));
  EXPECT_GT(worst, 0.1);
}

}  // namespace
}  // namespace kvq

namespace kvq {
namespace {

// RoPE after dequantization equals RoPE before caching when quantization is
// lossless: keys placed exactly on the 8-bit uniform grid of a per-channel
// pre-RoPE format (calibrated range [-1, 1]) decode exactly, and the view rotates
// them at their own positions like Rope::apply on the originals — both pairings,
// partial rotation, positions that skip.
TEST(KvCachePreRope, LosslessCodesRotateLikeTheFullPrecisionPath) {
  for (bool neox : {false, true})
    for (int n_rot : {64, 32}) {
      KvCacheConfig c = make_config("int8-ch", 1, 2, 64, 300, neox, n_rot);
      KvTensorCalibration cal;
      cal.lower.assign(128, -1.0f);
      cal.upper.assign(128, 1.0f);
      c.k_calibration.assign(1, cal);
      KvCache cache(c);
      std::mt19937 rng(3);
      std::uniform_int_distribution<int> level(0, 255);
      const int64_t n = 130;
      std::vector<float> k(size_t(n) * 128), v = random_vec(size_t(n) * 128, 9);
      for (auto& x : k) x = -1.0f + 2.0f * float(level(rng)) / 255.0f;
      const auto pos = iota_pos(5, n, 3);
      append(cache, pos, {k}, {v});
      const KvLayerView kv = cache.view(0);
      ASSERT_TRUE(kv.keys_pre_rope);
      Rope rope(c.rope);
      double worst = 0;
      for (int64_t i = 0; i < n; ++i) {
        std::vector<float> want(k.begin() + i * 128, k.begin() + (i + 1) * 128);
        rope.apply(want.data(), 2, pos[size_t(i)]);
        for (int h = 0; h < 2; ++h)
          for (int d = 0; d < 64; ++d) worst = std::max(worst, double(std::fabs(read_k(kv, i, h, d) - want[size_t(h * 64 + d)])));
      }
      EXPECT_LT(worst, 1e-6) << "neox " << neox << " n_rot " << n_rot;
    }
}

}  // namespace
}  // namespace kvq

namespace kvq {
namespace {

// A rotated format stores H x (keys after RoPE) in its codes and side stores
// alike; H x read back and turned back by H is x up to the format's rounding.
// With an outlier channel per vector (the case rotation is for) the rotated
// 4-bit block format reconstructs the vectors better than the plain one.
// Token i's value vector of head h, one tile decode (read_v decodes one per element).
std::vector<float> read_v_row(const KvLayerView& kv, int64_t i, int h) {
  std::vector<float> tile(size_t(kv.head_dim) * kKvPageTokens);
  kv_decode_value_tile(resolve_kernels({}), kv, i / kKvPageTokens, h, tile.data());
  const float* row = tile.data() + (i % kKvPageTokens) * kv.head_dim;
  return std::vector<float>(row, row + kv.head_dim);
}

TEST(KvCacheRotated, StoresRotatedRowsAndSpreadsOutliers) {
  const int hd = 64, n = 70;
  auto error_of = [&](const char* fmt, int sink) {
    KvCacheConfig c = make_config(fmt, 1, 2, hd, 200);
    c.sink_tokens = sink;
    KvCache cache(c);
    std::vector<float> k = random_vec(n * 2 * hd, 21), v = random_vec(n * 2 * hd, 22);
    for (int64_t i = 0; i < n; ++i)
      for (int h = 0; h < 2; ++h) v[size_t((i * 2 + h) * hd + (i * 7 + h) % hd)] = 25.0f;  // one outlier channel
    append(cache, iota_pos(0, n), {k}, {v});
    const KvLayerView kv = cache.view(0);
    EXPECT_EQ(kv.v_rotated, kv_format(fmt).rotate_v);
    double err = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int h = 0; h < 2; ++h) {
        std::vector<float> got = read_v_row(kv, i, h);
        if (kv.v_rotated) kv_hadamard(got.data(), hd);
        for (int d = 0; d < hd; ++d) {
          const double e = got[size_t(d)] - v[size_t((i * 2 + h) * hd + d)];
          if (i < sink) EXPECT_NEAR(e, 0.0, 0.02 + 1e-3 * std::fabs(v[size_t((i * 2 + h) * hd + d)])) << fmt << " sink";
          err += e * e;
        }
      }
    return err;
  };
  for (int sink : {0, 4}) {
    EXPECT_LT(error_of("q4_0-rot", sink), 0.5 * error_of("q4_0", sink)) << "sink " << sink;
    EXPECT_LT(error_of("int4-rot", sink), 0.5 * error_of("int4", sink)) << "sink " << sink;
  }
}

// KvCacheConfig::rotate_values rotates the values of any format (here the
// per-token 4-bit one a KVQuant preset uses for values); keys stay as they are.
TEST(KvCacheRotated, RotateValuesOptionOnAnyFormat) {
  const int hd = 64, n = 70;
  auto error_of = [&](bool rotate) {
    KvCacheConfig c = make_config("int4", 1, 2, hd, 200);
    c.rotate_values = rotate;
    KvCache cache(c);
    EXPECT_EQ(cache.config().values_rotated(), rotate);
    std::vector<float> k = random_vec(n * 2 * hd, 31), v = random_vec(n * 2 * hd, 32);
    for (int64_t i = 0; i < n; ++i) v[size_t(i * 2 * hd + (i * 5) % hd)] = 25.0f;
    append(cache, iota_pos(0, n), {k}, {v});
    const KvLayerView kv = cache.view(0);
    EXPECT_EQ(kv.v_rotated, rotate);
    EXPECT_FALSE(kv.k_rotated);
    double err = 0;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<float> got = read_v_row(kv, i, 0);
      if (rotate) kv_hadamard(got.data(), hd);
      for (int d = 0; d < hd; ++d) err += std::pow(got[size_t(d)] - v[size_t(i * 2 * hd + d)], 2);
    }
    return err;
  };
  EXPECT_LT(error_of(true), 0.5 * error_of(false));
  KvCacheConfig odd = make_config("int4", 1, 2, 80, 200);
  odd.rotate_values = true;
  EXPECT_THROW(KvCache{odd}, Error);
}

TEST(KvCacheRotated, RejectsHeadSizesThatAreNotPowersOfTwo) {
  try {
    KvCache cache(make_config("q4_0-rot", 1, 2, 80, 200));
    FAIL() << "a rotated format took head size 80";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("power of two"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("80"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(KvCache(make_config("q4_0", 1, 2, 80, 200)));
}

}  // namespace
}  // namespace kvq

// Fast tile decode stages (src/kernels/cpu/kv_decode*.cpp: the AVX2 decoders,
// and the portable ones at each Highway target this CPU runs) against the
// scalar codec decode, the oracle: every format of the table, head sizes with and
// without a SIMD path, several KV heads (so head offsets and 16-bit outlier
// indices are exercised), and awkward page fills n = 1, 31, 33, 63, 64. The
// fast stages are required to give the very same floats (bit for bit, see
// kv_decode.h), so any difference is a bug. Also the RoPE rotation of a key
// tile against the page-transposed angle table, and the cache view's key /
// value tiles (kv_tile.h) (decode + sink/window patch + rotation) on both paths.
#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/cpu.h"
#include "base/fp16.h"
#include "kernels/cpu/attention_tile.h"
#include "formats/kv_format.h"
#include "kernels/cpu/kv_decode.h"
#include "kernels/cpu/kv_tile.h"
#include "kvcache/kv_cache.h"

namespace kvq {
namespace {

// One set of fast decoders: the AVX-512 or AVX2 ones, or the portable ones at one Highway target.
struct DecoderPath {
  std::string name;
  TileDecoders decoders;
  int64_t target = 0;
};

bool is_baseline(int64_t target) {
  const std::string name = hwy::TargetName(target);
  return name == "SCALAR" || name == "EMU128";
}

// The AVX-512 and AVX2 decoders (where the CPU has them), and the portable ones at every vector target (the one-lane
// baseline declines every layout: see PortableBaselineLeavesTilesToTheCodecs).
std::vector<DecoderPath> decoder_paths() {
  std::vector<DecoderPath> paths;
  if (detected_simd_level() >= SimdLevel::avx512) paths.push_back({"avx512", TileDecoders::avx512});
  if (detected_simd_level() >= SimdLevel::avx2) paths.push_back({"avx2", TileDecoders::avx2});
  for (int64_t t : portable_targets())
    if (!is_baseline(t)) paths.push_back({"portable/" + std::string(hwy::TargetName(t)), TileDecoders::portable, t});
  return paths;
}

// The kernel set that runs a path's decoders.
KernelSet kernels_of(const DecoderPath& p) {
  KernelSet ks;
  ks.decoders = p.decoders;
  ks.portable_target = p.target;
  ks = resolve_kernels(ks);
  EXPECT_EQ(ks.decoders, p.decoders) << p.name;
  return ks;
}

// The codecs' decode and the scalar rotation: the reference.
KernelSet reference_kernels() {
  KernelSet ks;
  ks.scalar_attention = true;
  return resolve_kernels(ks);
}

// Layouts each portable decoder must take itself (not hand to the codec).
#if defined(__x86_64__)
// The layouts the AVX-512 decoders take themselves (the rest go to AVX2's).
bool avx512_decodes(const KvFormat& f, KvRole role, int hd) {
  return f.scheme == KvScheme::quant && f.bits <= 4 && (role == KvRole::key || hd % 16 == 0);
}
#endif

bool portable_decodes(const KvFormat& f, int hd) {
  switch (f.scheme) {
    case KvScheme::quant: return f.bits <= 4;
    case KvScheme::q8_0:
    case KvScheme::q4_0: return hd % 32 == 0;
    case KvScheme::f16: return true;
    default: return false;
  }
}

// Random calibration the way a calibrate step would shape it.
KvTensorCalibration make_cal(const KvFormat& f, int row, std::mt19937& rng) {
  KvTensorCalibration cal;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  if (f.levels == KvLevels::codebook) {
    cal.codebook.resize(size_t(1) << f.bits);
    for (auto& c : cal.codebook) c = u(rng);
    std::sort(cal.codebook.begin(), cal.codebook.end());
  }
  cal.lower.resize(size_t(row));
  cal.upper.resize(size_t(row));
  for (int c = 0; c < row; ++c) {
    const float mid = 0.5f * u(rng), half = 0.2f + std::fabs(u(rng)) * 2.0f;
    cal.lower[size_t(c)] = mid - half;
    cal.upper[size_t(c)] = mid + half;
  }
  return cal;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

// A page part holding n encoded rows of Gaussian noise, each with one large
// element now and then (an outlier for the formats that keep them).
std::vector<uint8_t> random_page(const KvCodec& codec, const KvGeometry& g, int n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<uint8_t> page(codec.page_bytes(), 0);  // exactly one page part: an overrun is an ASan error
  std::vector<float> row(size_t(g.row()));
  for (int j = 0; j < n; ++j) {
    for (auto& x : row) x = nd(rng) * 1.5f;
    row[size_t(rng() % row.size())] = 40.0f * (rng() % 2 ? 1 : -1);
    codec.encode(row.data(), j, page.data());
  }
  return page;
}

// A page-transposed angle table (kv_rotate_key_tile's cs) of random angles.
std::vector<float> random_angles(int half, std::mt19937& rng) {
  std::uniform_real_distribution<float> ang(-3.14159f, 3.14159f);
  std::vector<float> cs(size_t(2 * half) * kKvPageTokens);
  for (int i = 0; i < half; ++i)
    for (int j = 0; j < kKvPageTokens; ++j) {
      const float t = ang(rng);
      cs[size_t(i) * kKvPageTokens + j] = std::cos(t);
      cs[size_t(half + i) * kKvPageTokens + j] = std::sin(t);
    }
  return cs;
}

TEST(KvDecode, FastTilesMatchTheCodecBitForBit) {
  for (const DecoderPath& path : decoder_paths()) {
    SCOPED_TRACE(path.name);
    const KernelSet ks = kernels_of(path);
    std::mt19937 rng(7);
    for (const KvFormat& f : kv_format_table()) {
      // 16 x 128: a row whose 1 % outliers (22 a slot) take two hit lists.
      for (const KvGeometry g : {KvGeometry{3, 64}, KvGeometry{3, 32}, KvGeometry{3, 80}, KvGeometry{3, 128},
                                 KvGeometry{3, 20}, KvGeometry{16, 128}}) {
        const int hd = g.head_dim;
        if (g.n_kv_heads == 16 && f.outlier_fraction == 0) continue;
        for (KvRole role : {KvRole::key, KvRole::value}) {
          const KvTensorCalibration cal = make_cal(f, g.row(), rng);
          const auto codec = make_kv_codec(f, role, g, &cal);
          for (int n : {1, 31, 33, 63, 64}) {
            const std::vector<uint8_t> page = random_page(*codec, g, n, rng);
            for (int head = 0; head < g.n_kv_heads; ++head) {
              std::vector<float> want(size_t(hd) * kKvPageTokens, 0.0f), got(want.size(), 0.0f);
              codec->decode(page.data(), head, n, want.data());
              kv_decode_tile(ks, codec->layout(), page.data(), head, n, got.data());
              if (path.decoders == TileDecoders::portable && portable_decodes(f, hd)) {
                std::vector<float> own(want.size(), 0.0f);
                ASSERT_TRUE(simd::kv_decode_tile_portable(path.target, codec->layout(), page.data(), head, n, own.data()))
                    << f.name << " hd=" << hd << ": the portable decoder left it to the codec";
              }
#if defined(__x86_64__)
              if (path.decoders == TileDecoders::avx512 && avx512_decodes(f, role, hd)) {
                std::vector<float> own(want.size(), 0.0f);
                ASSERT_TRUE(simd::kv_decode_tile_avx512(codec->layout(), page.data(), head, n, own.data()))
                    << f.name << " hd=" << hd << ": the AVX-512 decoder left it to AVX2's";
              }
#endif
              int bad = 0;
              for (int j = 0; j < n; ++j)
                for (int d = 0; d < hd; ++d) {
                  const size_t i = role == KvRole::key ? size_t(d) * kKvPageTokens + j : size_t(j) * hd + d;
                  if (!same_bits(want[i], got[i]) && bad++ < 3)
                    ADD_FAILURE() << f.name << (role == KvRole::key ? " keys" : " values") << " hd=" << hd << " n=" << n
                                  << " head=" << head << " slot " << j << " dim " << d << ": " << got[i]
                                  << " != " << want[i];
                }
            }
          }
        }
      }
    }
  }
}

// On Highway's one-lane baseline target the portable decoders decline every
// layout, so the codecs decode (a CPU whose best target that is loses nothing).
TEST(KvDecode, PortableBaselineLeavesTilesToTheCodecs) {
  const KvGeometry g{3, 64};
  std::mt19937 rng(9);
  int checked = 0;
  for (int64_t t : portable_targets()) {
    if (!is_baseline(t)) continue;
    for (const char* name : {"f16", "q8_0", "nuq4-1%", "int3"}) {
      const KvFormat& f = kv_format(name);
      const KvTensorCalibration cal = make_cal(f, g.row(), rng);
      const auto codec = make_kv_codec(f, KvRole::key, g, &cal);
      std::vector<uint8_t> page(codec->page_bytes(), 0);
      std::vector<float> tile(size_t(g.head_dim) * kKvPageTokens), cs(size_t(g.head_dim) * kKvPageTokens, 1.0f);
      EXPECT_FALSE(simd::kv_decode_tile_portable(t, codec->layout(), page.data(), 0, 8, tile.data())) << name;
      EXPECT_FALSE(simd::kv_decode_rotate_keys_portable(t, codec->layout(), page.data(), 0, 8, tile.data(), cs.data(),
                                                        g.head_dim / 2, false))
          << name;
      ++checked;
    }
  }
  EXPECT_GT(checked, 0) << "no one-lane baseline target compiled in";
}

// Every half the portable f16 decoder can meet (subnormals, infinities, NaNs):
// the same floats as the scalar conversion (NaN as NaN).
TEST(KvDecode, PortableHalfConversionIsExact) {
  const KvGeometry g{3, 64};
  const auto codec = make_kv_codec(kv_format("f16"), KvRole::value, g, nullptr);
  const int per_head = g.head_dim * kKvPageTokens;
  std::vector<uint8_t> page(codec->page_bytes());
  std::vector<float> tile(static_cast<size_t>(per_head));
  for (const DecoderPath& path : decoder_paths()) {
    if (path.decoders != TileDecoders::portable) continue;
    SCOPED_TRACE(path.name);
    for (uint32_t h0 = 0; h0 < 65536; h0 += uint32_t(per_head) * 3) {
      for (int i = 0; i < 3 * per_head; ++i) {
        const uint16_t h = uint16_t(h0 + uint32_t(i));
        std::memcpy(page.data() + 2 * i, &h, 2);
      }
      for (int head = 0; head < 3; ++head) {
        ASSERT_TRUE(simd::kv_decode_tile_portable(path.target, codec->layout(), page.data(), head, kKvPageTokens, tile.data()));
        for (int i = 0; i < per_head; ++i) {
          const uint16_t h = uint16_t(h0 + uint32_t(head * per_head + i));
          const float want = fp16_to_f32(h);
          ASSERT_TRUE(same_bits(want, tile[size_t(i)]) || (std::isnan(want) && std::isnan(tile[size_t(i)])))
              << "half 0x" << std::hex << h << ": " << tile[size_t(i)] << " != " << want;
        }
      }
    }
  }
}

TEST(KvDecode, RotationMatchesScalarBitForBit) {
  for (const DecoderPath& path : decoder_paths()) {
    SCOPED_TRACE(path.name);
    const KernelSet ks = kernels_of(path);
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    for (int hd : {64, 32, 80, 128}) {
      for (int n_rot : {hd, hd / 2}) {
        const int half = n_rot / 2;
        for (bool neox : {false, true}) {
          for (int n : {1, 31, 33, 63, 64}) {
            std::vector<float> cs(size_t(2 * half) * kKvPageTokens), kt(size_t(hd) * kKvPageTokens);
            for (auto& x : cs) x = u(rng);
            for (auto& x : kt) x = u(rng);
            std::vector<float> want = kt, got = kt;
            kv_rotate_key_tile(reference_kernels(), want.data(), n, cs.data(), half, neox);
            kv_rotate_key_tile(ks, got.data(), n, cs.data(), half, neox);
            for (int d = 0; d < hd; ++d)
              for (int j = 0; j < n; ++j) {
                const size_t i = size_t(d) * kKvPageTokens + j;
                ASSERT_TRUE(same_bits(want[i], got[i])) << "hd=" << hd << " n_rot=" << n_rot << " neox=" << neox
                                                         << " n=" << n << " d=" << d << " j=" << j;
              }
          }
        }
      }
    }
  }
}

// The fused decode+rotate kernel of pre-RoPE per-channel keys against the
// stages run one by one (decode, outliers, rotation), over formats, head
// sizes, partial rotation, both pairings and awkward page fills.
TEST(KvDecode, FusedKeyDecodeRotateMatchesStages) {
  for (const DecoderPath& path : decoder_paths()) {
    SCOPED_TRACE(path.name);
    const KernelSet ks = kernels_of(path);
    std::mt19937 rng(5);
    int checked = 0;
    for (const KvFormat& f : kv_format_table()) {
      if (!f.keys_pre_rope) continue;
      for (int hd : {64, 32, 80, 128}) {
        const KvGeometry g{3, hd};
        const KvTensorCalibration cal = make_cal(f, g.row(), rng);
        const auto codec = make_kv_codec(f, KvRole::key, g, &cal);
        for (int n_rot : {hd, hd / 2}) {
          const int half = n_rot / 2;
          const std::vector<float> cs = random_angles(half, rng);
          for (bool neox : {false, true})
            for (int n : {1, 31, 33, 63, 64}) {
              const std::vector<uint8_t> page = random_page(*codec, g, n, rng);
              for (int head = 0; head < g.n_kv_heads; ++head) {
                std::vector<float> want(size_t(hd) * kKvPageTokens, 0.0f), got(want.size(), 0.0f);
                kv_decode_tile(ks, codec->layout(), page.data(), head, n, want.data());
                kv_rotate_key_tile(ks, want.data(), n, cs.data(), half, neox);
                // AVX2 fuses every bit width (and takes what AVX-512 does not:
                // 8 bits); the portable and AVX-512 decoders up to 4 bits.
                const bool fused = path.decoders == TileDecoders::avx2 || path.decoders == TileDecoders::avx512 ||
                                   f.bits <= 4;
#if defined(__x86_64__)
                if (path.decoders == TileDecoders::avx512 && f.bits <= 4) {
                  std::vector<float> own(want.size(), 0.0f);
                  ASSERT_TRUE(simd::kv_decode_rotate_keys_avx512(codec->layout(), page.data(), head, n, own.data(),
                                                                 cs.data(), half, neox))
                      << f.name << ": the AVX-512 fused decoder left it to AVX2's";
                }
#endif
                ASSERT_EQ(kv_decode_rotate_keys(ks, codec->layout(), page.data(), head, n, got.data(), cs.data(), half, neox), fused)
                    << f.name;
                if (!fused) continue;
                float mx = 0;
                for (int d = 0; d < hd; ++d)
                  for (int j = 0; j < n; ++j) mx = std::max(mx, std::fabs(want[size_t(d) * kKvPageTokens + j]));
                for (int d = 0; d < hd; ++d)
                  for (int j = 0; j < n; ++j) {
                    const size_t i = size_t(d) * kKvPageTokens + j;
                    ASSERT_LE(std::fabs(want[i] - got[i]), 4e-7f * mx)
                        << f.name << " hd=" << hd << " n_rot=" << n_rot << " neox=" << neox << " n=" << n
                        << " head=" << head << " d=" << d << " j=" << j << ": " << got[i] << " vs " << want[i];
                  }
                ++checked;
              }
            }
        }
      }
    }
    EXPECT_GT(checked, 0);
  }
}

// Keys scored where they are decoded (kv_score_rotated_keys) against the
// fused decode + rotation followed by plain dot products: 1-4 query rows (5 declined),
// head sizes, partial rotation, both pairings, awkward page fills, and a row
// of 16 heads x 128 whose 1 % outliers (22 a slot) take two hit lists. Equal
// up to summation order.
TEST(KvDecode, KeysScoredInDecodeMatchDecodeThenDot) {
  for (const DecoderPath& path : decoder_paths()) {
    SCOPED_TRACE(path.name);
    const KernelSet ks = kernels_of(path);
    std::mt19937 rng(9);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int checked = 0;
    for (const KvFormat& f : kv_format_table()) {
      if (!f.keys_pre_rope) continue;
      for (const KvGeometry g : {KvGeometry{3, 64}, KvGeometry{3, 32}, KvGeometry{3, 80}, KvGeometry{3, 128},
                                 KvGeometry{16, 128}}) {
        const int hd = g.head_dim;
        if (g.n_kv_heads == 16 && f.outlier_fraction == 0) continue;  // only there for the outlier walk
        const KvTensorCalibration cal = make_cal(f, g.row(), rng);
        const auto codec = make_kv_codec(f, KvRole::key, g, &cal);
        const bool scores = path.decoders == TileDecoders::avx512 && f.scheme == KvScheme::quant &&
                            f.key_scaling == KvKeyScaling::per_channel && f.bits <= 4;
        for (int n_rot : {hd, hd / 2}) {
          const int half = n_rot / 2;
          const std::vector<float> cs = random_angles(half, rng);
          for (bool neox : {false, true})
            for (int n : {1, 33, 64}) {
              const std::vector<uint8_t> page = random_page(*codec, g, n, rng);
              for (int head : {0, g.n_kv_heads - 1})
                for (int rows = 1; rows <= 5; ++rows) {
                  std::vector<float> q(size_t(rows) * hd);
                  for (auto& x : q) x = nd(rng);
                  std::vector<float> got(size_t(rows) * kKvPageTokens, 0.0f);
                  ASSERT_EQ(kv_score_rotated_keys(ks, codec->layout(), page.data(), head, n, cs.data(), half, neox, q.data(), rows,
                                                  got.data()),
                            scores && rows <= 4)
                      << f.name << " rows=" << rows;
                  // The up-front answer callers decide by says the same.
                  ASSERT_EQ(kv_scores_rotated_keys(ks, codec->layout(), rows), scores && rows <= 4) << f.name << " rows=" << rows;
                  if (!scores || rows > 4) continue;
                  std::vector<float> kt(size_t(hd) * kKvPageTokens, 0.0f);
                  if (!kv_decode_rotate_keys(ks, codec->layout(), page.data(), head, n, kt.data(), cs.data(), half, neox)) {
                    kv_decode_tile(ks, codec->layout(), page.data(), head, n, kt.data());
                    kv_rotate_key_tile(ks, kt.data(), n, cs.data(), half, neox);
                  }
                  for (int r = 0; r < rows; ++r)
                    for (int j = 0; j < n; ++j) {
                      double want = 0, mag = 0;
                      for (int d = 0; d < hd; ++d) {
                        const double t = double(q[size_t(r) * hd + d]) * kt[size_t(d) * kKvPageTokens + j];
                        want += t;
                        mag += std::fabs(t);
                      }
                      ASSERT_LE(std::fabs(got[size_t(r) * kKvPageTokens + j] - want), 2e-6 * mag + 1e-30)
                          << f.name << " " << g.n_kv_heads << "x" << hd << " n_rot=" << n_rot << " neox=" << neox
                          << " n=" << n << " head=" << head << " rows=" << rows << " r=" << r << " j=" << j;
                    }
                  ++checked;
                }
            }
        }
      }
    }
    if (path.decoders == TileDecoders::avx512) {
      EXPECT_GT(checked, 0);
    }
  }
}

// The cache's view (decode + sink/window patches + rotation at each slot's
// position) gives the same tiles on the fast and the scalar path.
TEST(KvDecode, CacheViewTilesSameOnBothPaths) {
  for (const DecoderPath& path : decoder_paths()) {
    SCOPED_TRACE(path.name);
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (const char* name : {"f16", "q8_0", "q4_0", "int4", "int3-ch", "int4-ch-1%", "nuq4-1%", "nuq3-1%", "nuq2-1%", "nuq8"}) {
      const KvFormat& f = kv_format(name);
      KvCacheConfig c;
      c.n_layers = 1;
      c.n_kv_heads = 2;
      c.head_dim = 64;
      c.n_ctx = 300;
      c.k_format = &f;
      c.v_format = &f;
      c.rope.head_dim = 64;
      c.rope.n_rot = 64;
      c.sink_tokens = 5;
      c.window_tokens = 40;
      if (f.needs_calibration(KvRole::key) || f.needs_calibration(KvRole::value)) {
        c.k_calibration.push_back(make_cal(f, c.n_kv_heads * c.head_dim, rng));
        c.v_calibration.push_back(make_cal(f, c.n_kv_heads * c.head_dim, rng));
      }
      KvCache cache(c);
      const int64_t n = 161;
      std::vector<int32_t> pos(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(3 * i + 2);
      std::vector<float> k(size_t(n) * 128), v(size_t(n) * 128);
      for (auto& x : k) x = nd(rng);
      for (auto& x : v) x = nd(rng);
      cache.begin_batch(pos);
      cache.store(0, k.data(), v.data());
      cache.end_batch();
      const KvLayerView view = cache.view(0);
      for (int64_t p = 0; p < 3; ++p)
        for (int h = 0; h < 2; ++h)
          for (int64_t fp_from : {kKvNoWindow, kv_window_from(view, pos.back())}) {
            std::vector<float> kw(64 * 64, 0.0f), vw(64 * 64, 0.0f), kg(64 * 64, 0.0f), vg(64 * 64, 0.0f);
            const KernelSet ref = reference_kernels(), ks = kernels_of(path);
            kv_decode_key_tile(ref, view, p, h, kw.data(), fp_from);
            kv_decode_value_tile(ref, view, p, h, vw.data(), fp_from);
            kv_decode_key_tile(ks, view, p, h, kg.data(), fp_from);
            kv_decode_value_tile(ks, view, p, h, vg.data(), fp_from);
            const int m = view.page_tokens(p);
            // Pre-RoPE keys of pages without full-precision slots take the fused
            // decode+rotate kernel: equal up to the rounding of adding the rotated
            // outlier residuals after the rotation (bounded by a few ulp of the
            // largest element); everything else bit for bit.
            float kmax = 0;
            for (float x : kw) kmax = std::max(kmax, std::fabs(x));
            const float tol = f.keys_pre_rope ? 4e-7f * kmax : 0.0f;
            for (int j = 0; j < m; ++j)
              for (int d = 0; d < 64; ++d) {
                const float a = kw[size_t(d) * 64 + j], b = kg[size_t(d) * 64 + j];
                ASSERT_TRUE(same_bits(a, b) || std::fabs(a - b) <= tol)
                    << name << " keys page " << p << " head " << h << " slot " << j << " dim " << d << ": " << b
                    << " vs " << a;
                ASSERT_TRUE(same_bits(vw[size_t(j) * 64 + d], vg[size_t(j) * 64 + d]))
                    << name << " values page " << p << " head " << h << " slot " << j << " dim " << d;
              }
          }
    }
  }
}

}  // namespace
}  // namespace kvq

// The KV format table: consistency of each row, lookup by name, and the
// reference codecs (f32 exact; f16 = IEEE half round-to-nearest-even, checked
// against an independent rounding written here in double arithmetic).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "base/fp16.h"
#include "formats/kv_format.h"
#include "kvq/error.h"

namespace kvq {
namespace {

// A calibration that fits any row of `g`: bounds +-3 per channel, and a
// random sorted codebook of 2^bits entries spanning [-1, 1] (its ends at -1
// and 1, as a fitted codebook's reach the scaled extremes: a random one that
// missed a whole side could not represent half the values at all).
KvTensorCalibration synthetic_calibration(const KvFormat& f, const KvGeometry& g, std::mt19937& rng) {
  KvTensorCalibration cal;
  cal.lower.assign(size_t(g.row()), -3.0f);
  cal.upper.assign(size_t(g.row()), 3.0f);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  if (f.scheme == KvScheme::quant) {
    cal.codebook.resize(size_t(1) << f.bits);
    for (auto& v : cal.codebook) v = u(rng);
    std::sort(cal.codebook.begin(), cal.codebook.end());
    cal.codebook.front() = -1.0f;
    cal.codebook.back() = 1.0f;
  }
  return cal;
}

TEST(KvFormat, TableRowsAreConsistent) {
  const auto table = kv_format_table();
  ASSERT_GE(table.size(), 2u);
  std::set<std::string> names;
  std::mt19937 rng(3);
  for (const KvFormat& f : table) {
    SCOPED_TRACE(std::string(f.name));
    EXPECT_FALSE(f.name.empty());
    EXPECT_FALSE(f.description.empty());
    EXPECT_TRUE(names.insert(std::string(f.name)).second) << "duplicate name";
    if (f.scheme == KvScheme::quant) {
      EXPECT_GE(f.bits, 1);
      EXPECT_LE(f.bits, 8);
    }
    if (f.keys_pre_rope) {
      EXPECT_TRUE(f.scheme == KvScheme::quant) << "only quant rows store keys pre-RoPE";
    }
    for (KvRole role : {KvRole::key, KvRole::value})
      for (KvGeometry g : {KvGeometry{1, 64}, KvGeometry{3, 80}, KvGeometry{3, 64}, KvGeometry{8, 128}}) {
        SCOPED_TRACE(std::to_string(g.n_kv_heads) + "x" + std::to_string(g.head_dim));
        const KvTensorCalibration cal = synthetic_calibration(f, g, rng);
        const auto codec = make_kv_codec(f, role, g, f.needs_calibration(role) ? &cal : nullptr);
        ASSERT_NE(codec, nullptr);
        const auto accounting = make_kv_codec(f, role, g, nullptr, true);
        // The accounting codec (no calibration) sizes pages like the real one.
        const KvPageBytes p = codec->page_layout();
        EXPECT_EQ(p.total(), codec->page_bytes());
        EXPECT_EQ(accounting->page_bytes(), codec->page_bytes());
        EXPECT_EQ(accounting->page_layout().scales, p.scales);
        EXPECT_EQ(accounting->page_layout().outliers, p.outliers);
        EXPECT_EQ(accounting->fixed_bytes(), codec->fixed_bytes());
        EXPECT_GE(p.codes, uint64_t(g.row()) * kKvPageTokens * uint64_t(f.bits) / 8);
        // The advertised cost is exactly what a page holds.
        EXPECT_DOUBLE_EQ(kv_bits_per_element(f, role, g),
                         double(codec->page_bytes()) * 8 / (double(g.row()) * kKvPageTokens));
        // Every codec encodes and decodes a page (values near the calibrated range).
        std::vector<uint8_t> page(codec->page_bytes(), 0);
        std::normal_distribution<float> nd(0.0f, 1.0f);
        std::vector<float> row(size_t(g.row()));
        for (int j = 0; j < kKvPageTokens; ++j) {
          for (auto& v : row) v = nd(rng);
          codec->encode(row.data(), j, page.data());
        }
        std::vector<float> tile(size_t(g.head_dim) * kKvPageTokens);
        for (int h = 0; h < g.n_kv_heads; ++h) {
          codec->decode(page.data(), h, kKvPageTokens, tile.data());
          for (float v : tile) ASSERT_TRUE(std::isfinite(v));
        }
        // Values: the last row encoded, decoded (token-major) within a loose bound.
        if (role == KvRole::value) {
          codec->decode(page.data(), g.n_kv_heads - 1, kKvPageTokens, tile.data());
          for (int d = 0; d < g.head_dim; ++d)
            EXPECT_NEAR(tile[size_t(63 * g.head_dim + d)], row[size_t((g.n_kv_heads - 1) * g.head_dim + d)],
                        f.bits >= 4 ? 1.5 : 4.0);
        }
      }
  }
  EXPECT_EQ(kKvPageTokens, 64);
}

// Bits per element from the spec's formulas, computed here independently.
TEST(KvFormat, BitsPerElementFormulas) {
  const KvGeometry small{3, 64}, big{8, 128};  // rows 192 and 1024
  auto bits = [](const char* name, KvRole role, const KvGeometry& g) { return kv_bits_per_element(kv_format(name), role, g); };
  // nuq4-1% at row 192: k = 1 outlier per tail, 24 bits each (fp16 + u8 index).
  EXPECT_DOUBLE_EQ(bits("nuq4-1%", KvRole::key, small), 4.25);
  EXPECT_DOUBLE_EQ(bits("nuq4-1%", KvRole::value, small), 4.0 + 32.0 / 192 + 0.25);
  // Row 1024: k = ceil(0.005 * 1024) = 6 per tail, 32 bits each (fp16 + u16 index).
  EXPECT_DOUBLE_EQ(bits("nuq4-1%", KvRole::key, big), 4.0 + 12.0 * 32 / 1024);
  EXPECT_DOUBLE_EQ(bits("nuq4-1%", KvRole::value, big), 4.0 + 32.0 / 1024 + 12.0 * 32 / 1024);
  EXPECT_DOUBLE_EQ(bits("int4", KvRole::key, small), 4.0 + 32.0 / 192);
  EXPECT_DOUBLE_EQ(bits("int3-ch", KvRole::key, small), 3.0);
  EXPECT_DOUBLE_EQ(bits("int3-ch", KvRole::value, small), 3.0 + 32.0 / 192);
  EXPECT_DOUBLE_EQ(bits("int2-ch-1%", KvRole::key, small), 2.25);
  // Values pack each head's D codes to whole bytes: D = 40 at 3 bits is 15 bytes.
  EXPECT_DOUBLE_EQ(bits("int3", KvRole::value, KvGeometry{1, 40}), 15.0 * 8 / 40 + 32.0 / 40);
  EXPECT_DOUBLE_EQ(bits("q8_0", KvRole::key, small), 8.5);
  EXPECT_DOUBLE_EQ(bits("q4_0", KvRole::value, small), 4.5);
  EXPECT_DOUBLE_EQ(bits("q4_0", KvRole::value, KvGeometry{2, 40}), 2.0 * 18 * 8 / 40);  // padded to 64
}

TEST(KvFormat, KnownRows) {
  const KvGeometry g{3, 64};
  const KvFormat& f32 = kv_format("f32");
  EXPECT_EQ(kv_bits_per_element(f32, KvRole::key, g), 32.0);
  EXPECT_EQ(kv_bits_per_element(f32, KvRole::value, g), 32.0);
  EXPECT_FALSE(f32.keys_pre_rope);
  EXPECT_FALSE(f32.needs_calibration(KvRole::key));
  const KvFormat& f16 = kv_format("f16");
  EXPECT_EQ(kv_bits_per_element(f16, KvRole::key, g), 16.0);
  EXPECT_EQ(kv_bits_per_element(f16, KvRole::value, g), 16.0);
  EXPECT_FALSE(f16.keys_pre_rope);
  EXPECT_FALSE(f16.needs_calibration(KvRole::key));
}

TEST(KvFormat, FindByName) {
  for (const KvFormat& f : kv_format_table()) {
    EXPECT_EQ(find_kv_format(f.name), &f);
    EXPECT_EQ(&kv_format(f.name), &f);
  }
  EXPECT_EQ(find_kv_format(""), nullptr);
  EXPECT_EQ(find_kv_format("F16"), nullptr);  // names are exact
  EXPECT_EQ(find_kv_format("f16 "), nullptr);
  EXPECT_EQ(find_kv_format("q9_0"), nullptr);
}

TEST(KvFormat, UnknownNameErrorListsValidNames) {
  try {
    kv_format("q3_bogus");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("q3_bogus"), std::string::npos) << msg;
    for (const KvFormat& f : kv_format_table())
      EXPECT_NE(msg.find(std::string(f.name)), std::string::npos) << msg << " lacks " << f.name;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "one-line message";
  }
}

// Encodes x as value rows of one 64-wide head (one token per 64 values, a page
// per 64 tokens) and decodes them back: the codec's own round trip.
std::vector<float> codec_round_trip(const KvFormat& f, const std::vector<float>& x) {
  const KvGeometry g{1, 64};
  const auto codec = make_kv_codec(f, KvRole::value, g, nullptr);
  const size_t per_page = size_t(g.row()) * kKvPageTokens;
  std::vector<float> padded(x), out;
  padded.resize((x.size() + per_page - 1) / per_page * per_page, 0.0f);
  std::vector<uint8_t> page(codec->page_bytes());
  std::vector<float> tile(per_page);
  for (size_t p0 = 0; p0 < padded.size(); p0 += per_page) {
    for (int slot = 0; slot < kKvPageTokens; ++slot) codec->encode(&padded[p0 + size_t(slot) * 64], slot, page.data());
    codec->decode(page.data(), 0, kKvPageTokens, tile.data());
    out.insert(out.end(), tile.begin(), tile.end());
  }
  out.resize(x.size());
  return out;
}

TEST(KvFormat, F32RoundTripIsBitExact) {
  const KvFormat& f = kv_format("f32");
  std::vector<float> x = {0.0f, -0.0f, 1.0f, -3.5f, std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  std::mt19937 rng(1);
  for (int i = 0; i < 1000; ++i) x.push_back(bits_to_f32(rng()));
  const std::vector<float> y = codec_round_trip(f, x);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(f32_to_bits(y[i]), f32_to_bits(x[i])) << i;
}

// IEEE binary16 round-to-nearest-even of a float, computed independently in
// double: the quantum is 2^(e-10) for normal results (e = floor(log2|x|) >= -14)
// and 2^-24 for subnormal ones; magnitudes that round to >= 65520 overflow.
double half_round(float xf) {
  const double x = xf;
  if (std::isnan(x)) return x;
  if (std::isinf(x)) return x;
  const double ax = std::fabs(x);
  if (ax == 0) return x;
  int e = int(std::floor(std::log2(ax)));
  // log2 of values just below a power of two may round up: fix e exactly.
  while (std::ldexp(1.0, e) > ax) --e;
  while (std::ldexp(1.0, e + 1) <= ax) ++e;
  if (e < -14) e = -14;
  const double quantum = std::ldexp(1.0, e - 10);
  const double r = std::nearbyint(ax / quantum) * quantum;  // ties to even (default mode)
  if (r >= 65520.0) return std::copysign(INFINITY, x);
  return std::copysign(r, x);
}

TEST(KvFormat, F16RoundTripIsHalfRounding) {
  const KvFormat& f = kv_format("f16");
  std::vector<float> x = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, -65504.0f, 65519.0f, 65519.996f, 65520.0f,
                          1e6f, -1e6f, 6.1035156e-05f /* 2^-14 */, 5.9604645e-08f /* 2^-24 */,
                          2.9802322e-08f /* 2^-25: tie -> 0 */, 8.940697e-08f /* 1.5 * 2^-24: tie -> 2^-23 */,
                          1.0009766f /* 1 + 2^-10 */, 1.00048828125f /* tie -> 1 */, 1.00146484375f /* tie -> 1+2^-9 */,
                          std::numeric_limits<float>::denorm_min(), 3.0e-8f, 1e-10f};
  std::mt19937 rng(2);
  // Random bit patterns over the whole float range, and over the half range.
  for (int i = 0; i < 20000; ++i) x.push_back(bits_to_f32(rng()));
  std::uniform_real_distribution<float> u(-70000.0f, 70000.0f);
  for (int i = 0; i < 20000; ++i) x.push_back(u(rng));
  std::uniform_real_distribution<float> small(-1e-4f, 1e-4f);
  for (int i = 0; i < 20000; ++i) x.push_back(small(rng));
  // Exact ties between adjacent halves across many exponents.
  for (int e = -24; e <= 15; ++e)
    for (int m = 0; m < 8; ++m) {
      const double q = std::ldexp(1.0, std::max(e, -14) - 10);
      const double base = std::ldexp(1.0, e) + m * q;
      x.push_back(float(base + q / 2));
      x.push_back(float(-(base + q / 2)));
    }

  const std::vector<float> y = codec_round_trip(f, x);
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = half_round(x[i]);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(y[i])) << "x bits " << std::hex << f32_to_bits(x[i]);
      continue;
    }
    ASSERT_EQ(double(y[i]), want) << "x=" << x[i] << " bits 0x" << std::hex << f32_to_bits(x[i]);
    ASSERT_EQ(std::signbit(y[i]), std::signbit(x[i])) << "sign of " << x[i];
    // The codec stores exactly the fp16 helper's rounding.
    ASSERT_EQ(f32_to_bits(y[i]), f32_to_bits(fp16_to_f32(f32_to_fp16(x[i]))));
  }
}

TEST(KvFormat, F16DecodeEncodeOfEveryHalfIsIdentity) {
  // Every half value (as a float) survives the f16 codec unchanged.
  const KvFormat& f = kv_format("f16");
  std::vector<float> x(65536);
  for (uint32_t i = 0; i < 65536; ++i) x[i] = fp16_to_f32(uint16_t(i));
  const std::vector<float> y = codec_round_trip(f, x);
  for (uint32_t i = 0; i < 65536; ++i) {
    const bool is_nan = (i & 0x7c00) == 0x7c00 && (i & 0x3ff) != 0;
    if (is_nan) {
      ASSERT_TRUE(std::isnan(y[i])) << std::hex << i;
    } else {
      ASSERT_EQ(f32_to_bits(y[i]), f32_to_bits(x[i])) << "half 0x" << std::hex << i;
    }
  }
}

}  // namespace
}  // namespace kvq

namespace kvq {
namespace {

// kv_hadamard against the normalised Sylvester matrix written out here:
// H[i][j] = (-1)^popcount(i & j) / sqrt(n), in double; and H H x = x.
TEST(KvFormat, HadamardIsTheNormalisedSylvesterMatrix) {
  std::mt19937 rng(17);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int n = 1; n <= 256; n *= 2) {
    std::vector<float> x(static_cast<size_t>(n));
    for (auto& v : x) v = nd(rng);
    std::vector<float> y = x;
    kv_hadamard(y.data(), n);
    double norm = 0;
    for (float v : x) norm += double(v) * v;
    for (int i = 0; i < n; ++i) {
      double want = 0;
      for (int j = 0; j < n; ++j) want += (__builtin_popcount(unsigned(i & j)) % 2 ? -1.0 : 1.0) * x[size_t(j)];
      want /= std::sqrt(double(n));
      EXPECT_NEAR(y[size_t(i)], want, 1e-6 * std::sqrt(norm) * (1 + std::log2(double(n)))) << "n=" << n << " i=" << i;
    }
    kv_hadamard(y.data(), n);
    for (int i = 0; i < n; ++i) EXPECT_NEAR(y[size_t(i)], x[size_t(i)], 1e-6 * std::sqrt(norm) * (1 + std::log2(double(n))));
  }
  EXPECT_TRUE(kv_is_power_of_two(64));
  EXPECT_FALSE(kv_is_power_of_two(80));
  EXPECT_FALSE(kv_is_power_of_two(0));
}

}  // namespace
}  // namespace kvq

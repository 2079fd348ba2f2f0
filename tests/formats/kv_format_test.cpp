// The KV format table: consistency of each row, lookup by name, and the
// reference codecs (f32 exact; f16 = IEEE half round-to-nearest-even, checked
// against an independent rounding written here in double arithmetic).
#include <gtest/gtest.h>

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

TEST(KvFormat, TableRowsAreConsistent) {
  const auto table = kv_format_table();
  ASSERT_GE(table.size(), 2u);
  std::set<std::string> names;
  for (const KvFormat& f : table) {
    SCOPED_TRACE(std::string(f.name));
    EXPECT_FALSE(f.name.empty());
    EXPECT_FALSE(f.description.empty());
    EXPECT_TRUE(names.insert(std::string(f.name)).second) << "duplicate name";
    if (f.scheme != KvScheme::f32 && f.scheme != KvScheme::f16) continue;  // codecs being written
    for (KvRole role : {KvRole::key, KvRole::value})
      for (KvGeometry g : {KvGeometry{1, 64}, KvGeometry{3, 80}}) {
        const auto codec = make_kv_codec(f, role, g, nullptr);
        ASSERT_NE(codec, nullptr);
        // The advertised cost is exactly what a page holds.
        EXPECT_DOUBLE_EQ(kv_bits_per_element(f, role, g),
                         double(codec->page_bytes()) * 8 / (double(g.row()) * kKvPageTokens));
      }
  }
  EXPECT_EQ(kKvPageTokens, 64);
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

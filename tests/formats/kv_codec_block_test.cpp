// q8_0 / q4_0 KV codecs: the page bytes are ggml's blocks (checked against the
// weight quantizer of src/quant), layout [head][slot][block], keys decode
// channel-major, values token-major, a head dimension that is not a multiple
// of 32 is zero-padded, and non-finite rows encode without UB.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "base/fp16.h"
#include "formats/kv_format.h"
#include "quant/quant.h"

namespace kvq {
namespace {

struct BlockCase {
  const char* name;
  GgmlType type;
  int block_bytes;
};
const BlockCase kCases[] = {{"q8_0", GgmlType::Q8_0, 34}, {"q4_0", GgmlType::Q4_0, 18}};

std::vector<float> random_row(std::mt19937& rng, int n, float scale = 1.0f) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = nd(rng);
  return x;
}

TEST(KvCodecBlock, BytesEqualGgmlQuantizer) {
  std::mt19937 rng(11);
  for (const BlockCase& bc : kCases)
    for (KvRole role : {KvRole::key, KvRole::value})
      for (KvGeometry g : {KvGeometry{1, 64}, KvGeometry{3, 64}, KvGeometry{4, 128}, KvGeometry{2, 32}}) {
        SCOPED_TRACE(std::string(bc.name) + " H=" + std::to_string(g.n_kv_heads) + " D=" + std::to_string(g.head_dim));
        const auto codec = make_kv_codec(kv_format(bc.name), role, g, nullptr);
        const int nb = g.head_dim / 32;
        const uint64_t blocks = uint64_t(g.n_kv_heads) * kKvPageTokens * nb;
        ASSERT_EQ(codec->page_bytes(), blocks * uint64_t(bc.block_bytes));
        EXPECT_EQ(codec->page_layout().scales, blocks * 2);
        std::vector<uint8_t> page(codec->page_bytes(), 0);
        std::vector<std::vector<float>> rows;
        for (int j = 0; j < kKvPageTokens; ++j) {
          rows.push_back(random_row(rng, g.row(), j % 5 == 0 ? 30.0f : 1.0f));
          if (j == 3) rows.back().assign(size_t(g.row()), 0.0f);  // an all-zero row: d = 0
          codec->encode(rows.back().data(), j, page.data());
        }
        std::vector<uint8_t> want(size_t(nb) * bc.block_bytes);
        for (int h = 0; h < g.n_kv_heads; ++h)
          for (int j = 0; j < kKvPageTokens; ++j) {
            quantize_row(bc.type, rows[size_t(j)].data() + h * g.head_dim, want.data(), g.head_dim, SimdLevel::scalar);
            const uint8_t* got = page.data() + (size_t(h) * kKvPageTokens + size_t(j)) * want.size();
            ASSERT_EQ(0, std::memcmp(got, want.data(), want.size())) << "head " << h << " slot " << j;
          }
        // Decoding is ggml's dequantization, laid out as the tile wants.
        std::vector<float> tile(size_t(g.head_dim) * kKvPageTokens), ref(size_t(g.head_dim));
        for (int h = 0; h < g.n_kv_heads; ++h) {
          codec->decode(page.data(), h, kKvPageTokens, tile.data());
          for (int j = 0; j < kKvPageTokens; ++j) {
            const uint8_t* blk = page.data() + (size_t(h) * kKvPageTokens + size_t(j)) * want.size();
            dequantize_row(bc.type, blk, ref.data(), g.head_dim, SimdLevel::scalar);
            for (int d = 0; d < g.head_dim; ++d) {
              const float got = role == KvRole::key ? tile[size_t(d) * kKvPageTokens + j] : tile[size_t(j) * g.head_dim + d];
              ASSERT_EQ(got, ref[size_t(d)]) << "head " << h << " slot " << j << " d " << d;
            }
          }
        }
      }
}

TEST(KvCodecBlock, PaddedHeadDim40) {
  // D = 40: two blocks per head, the second holding 8 elements and 24 zeros.
  std::mt19937 rng(12);
  const KvGeometry g{2, 40};
  for (const BlockCase& bc : kCases)
    for (KvRole role : {KvRole::key, KvRole::value}) {
      SCOPED_TRACE(bc.name);
      const auto codec = make_kv_codec(kv_format(bc.name), role, g, nullptr);
      ASSERT_EQ(codec->page_bytes(), uint64_t(2) * kKvPageTokens * 2 * bc.block_bytes);
      std::vector<uint8_t> page(codec->page_bytes(), 0);
      const int n = 37;  // a partial page
      std::vector<std::vector<float>> rows;
      for (int j = 0; j < n; ++j) {
        rows.push_back(random_row(rng, g.row()));
        codec->encode(rows.back().data(), j, page.data());
      }
      std::vector<float> padded(64, 0.0f), ref(64);
      std::vector<uint8_t> want(size_t(2) * bc.block_bytes);
      std::vector<float> tile(size_t(g.head_dim) * kKvPageTokens);
      for (int h = 0; h < g.n_kv_heads; ++h) {
        codec->decode(page.data(), h, n, tile.data());
        for (int j = 0; j < n; ++j) {
          std::copy_n(rows[size_t(j)].data() + h * 40, 40, padded.begin());
          quantize_row(bc.type, padded.data(), want.data(), 64, SimdLevel::scalar);
          const uint8_t* got = page.data() + (size_t(h) * kKvPageTokens + size_t(j)) * want.size();
          ASSERT_EQ(0, std::memcmp(got, want.data(), want.size())) << "head " << h << " slot " << j;
          dequantize_row(bc.type, want.data(), ref.data(), 64, SimdLevel::scalar);
          for (int d = 0; d < 40; ++d) {
            const float v = role == KvRole::key ? tile[size_t(d) * kKvPageTokens + j] : tile[size_t(j) * 40 + d];
            ASSERT_EQ(v, ref[size_t(d)]);
            // And the quantization error is within half a step (q8_0) / one step (q4_0).
            const float x = rows[size_t(j)][size_t(h * 40 + d)];
            ASSERT_LE(std::fabs(v - x), bc.type == GgmlType::Q8_0 ? 0.05f : 0.8f) << x;
          }
        }
      }
    }
}

TEST(KvCodecBlock, NonFiniteRowsEncodeWithoutUB) {
  const KvGeometry g{1, 64};
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (const BlockCase& bc : kCases) {
    SCOPED_TRACE(bc.name);
    const auto codec = make_kv_codec(kv_format(bc.name), KvRole::value, g, nullptr);
    std::vector<uint8_t> page(codec->page_bytes(), 0);
    std::vector<float> row(64, 1.0f);
    row[1] = nan;
    row[40] = inf;
    row[41] = -inf;
    codec->encode(row.data(), 0, page.data());
    std::vector<float> all_nan(64, nan);
    codec->encode(all_nan.data(), 1, page.data());
    std::vector<float> huge(64, 3e38f);
    huge[5] = -3e38f;
    codec->encode(huge.data(), 2, page.data());
    std::vector<float> tile(64 * 64);
    codec->decode(page.data(), 0, 3, tile.data());
    // The first block of row 0 (NaN ignored by the scale) still decodes its finite elements.
    EXPECT_NEAR(tile[0], 1.0f, 0.2f);
    EXPECT_NEAR(tile[2], 1.0f, 0.2f);
  }
}

}  // namespace
}  // namespace kvq

// Dense b-bit packing: the helpers against an independent bit-by-bit model of
// the spec (bit t of code i is stream bit i*b + t; byte m holds stream bits
// 8m..8m+7, LSB first), at awkward lengths for every width.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "formats/kv_bitpack.h"

namespace kvq {
namespace {

std::vector<uint8_t> pack_bit_by_bit(const std::vector<uint8_t>& codes, int b) {
  std::vector<uint8_t> out((codes.size() * size_t(b) + 7) / 8, 0);
  for (size_t i = 0; i < codes.size(); ++i)
    for (int t = 0; t < b; ++t) {
      const size_t bit = i * size_t(b) + size_t(t);
      if ((codes[i] >> t) & 1) out[bit / 8] = uint8_t(out[bit / 8] | (1u << (bit % 8)));
    }
  return out;
}

const int kLengths[] = {1, 2, 7, 31, 33, 63, 64, 127, 192};

TEST(BitPack, PackMatchesBitByBitModel) {
  std::mt19937 rng(7);
  for (int b = 1; b <= 8; ++b)
    for (int n : kLengths) {
      SCOPED_TRACE("b=" + std::to_string(b) + " n=" + std::to_string(n));
      std::vector<uint8_t> codes(static_cast<size_t>(n));
      for (auto& c : codes) c = uint8_t(rng() & ((1u << b) - 1));
      const std::vector<uint8_t> want = pack_bit_by_bit(codes, b);
      ASSERT_EQ(int64_t(want.size()), kv_packed_bytes(n, b));
      // A guard byte after the packed bytes must stay untouched.
      std::vector<uint8_t> got(want.size() + 1, 0xa5);
      kv_pack(codes.data(), n, b, got.data());
      EXPECT_EQ(got[want.size()], 0xa5);
      got.resize(want.size());
      EXPECT_EQ(got, want);

      std::vector<uint8_t> back(size_t(n), 0xff);
      kv_unpack(want.data(), n, b, back.data());
      EXPECT_EQ(back, codes);
    }
}

TEST(BitPack, StoreCodeInPlaceMatchesModel) {
  std::mt19937 rng(8);
  for (int b = 1; b <= 8; ++b)
    for (int n : kLengths) {
      SCOPED_TRACE("b=" + std::to_string(b) + " n=" + std::to_string(n));
      std::vector<uint8_t> codes(static_cast<size_t>(n));
      for (auto& c : codes) c = uint8_t(rng() & ((1u << b) - 1));
      // Start from garbage (all ones) and store every code in a shuffled order:
      // each store must clear its old bits and keep its neighbours'.
      std::vector<uint8_t> run(size_t(kv_packed_bytes(n, b)) + 1, 0xff);
      std::vector<int> order(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i) order[size_t(i)] = i;
      std::shuffle(order.begin(), order.end(), rng);
      for (int i : order) kv_store_code(run.data(), i, b, codes[size_t(i)]);
      EXPECT_EQ(run.back(), 0xff) << "wrote past the run";
      std::vector<uint8_t> want = pack_bit_by_bit(codes, b);
      // Pad bits of the last byte were not codes: they keep their old ones.
      const int pad = int(want.size()) * 8 - n * b;
      if (pad > 0) want.back() = uint8_t(want.back() | (0xff << (8 - pad)));
      run.pop_back();
      EXPECT_EQ(run, want);
    }
}

}  // namespace
}  // namespace kvq

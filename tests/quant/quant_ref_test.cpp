// Scalar references of the weight/activation block types: known-answer blocks
// built by hand, fp16/bf16 conversions, quantizer rounding rules and error
// bounds, dot products, matmul_ref, and the bit-exact check against fixtures
// produced by the gguf Python package (tests/python/test_quant_vs_gguf_py.py).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "base/cpu.h"
#include "base/error.h"
#include "base/fp16.h"
#include "gguf/gguf.h"
#include "quant/blocks.h"
#include "quant/quant.h"
#include "quant/quant_ref.h"

namespace kvq {
namespace {

using T = GgmlType;

const QuantTraits& traits(GgmlType t) {
  const QuantTraits* q = quant_traits(t);
  if (!q) throw std::runtime_error("no traits for " + std::string(ggml_type_name(t)));
  return *q;
}

size_t row_bytes(GgmlType t, int64_t n) {
  const auto& q = traits(t);
  return size_t(n / q.block_elems) * size_t(q.block_bytes);
}

std::vector<uint8_t> quantize(GgmlType t, const std::vector<float>& x) {
  std::vector<uint8_t> out(row_bytes(t, int64_t(x.size())));
  traits(t).from_float_ref(x.data(), out.data(), int64_t(x.size()));
  return out;
}

std::vector<float> dequantize(GgmlType t, const void* src, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  traits(t).to_float_ref(src, out.data(), n);
  return out;
}

uint16_t h(float f) { return f32_to_fp16(f); }
void put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
uint16_t get16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

// Normal values with occasional large outliers (heavy tail), as weights have.
std::vector<float> random_row(std::mt19937& rng, int64_t n, float scale = 1.0f) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::student_t_distribution<float> td(2.0f);
  std::uniform_int_distribution<int> pick(0, 9);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = pick(rng) == 0 ? std::clamp(td(rng), -50.0f, 50.0f) * scale : nd(rng);
  return x;
}

// Random bytes with the f16 scale fields set to sane finite values.
std::vector<uint8_t> random_blocks(std::mt19937& rng, GgmlType t, int64_t n) {
  std::vector<uint8_t> b(row_bytes(t, n));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& v : b) v = uint8_t(byte(rng));
  std::uniform_real_distribution<float> scale(1e-3f, 0.05f);
  const auto& q = traits(t);
  for (size_t off = 0; off < b.size(); off += size_t(q.block_bytes)) {
    uint8_t* blk = b.data() + off;
    switch (t) {
      case T::Q4_0: case T::Q5_0: case T::Q8_0: put16(blk, h(scale(rng))); break;
      case T::Q4_1: case T::Q5_1:
        put16(blk, h(scale(rng)));
        put16(blk + 2, h(-8 * scale(rng)));
        break;
      case T::Q4_K: case T::Q5_K:
        put16(blk, h(scale(rng)));
        put16(blk + 2, h(scale(rng)));
        break;
      case T::Q6_K: put16(blk + offsetof(BlockQ6_K, d), h(scale(rng))); break;
      default: break;
    }
  }
  return b;
}

// A weight row of n elements of type t: quantized from random floats where a
// quantizer exists, random valid blocks otherwise.
std::vector<uint8_t> random_weights(std::mt19937& rng, GgmlType t, int64_t n) {
  if (traits(t).from_float_ref) return quantize(t, random_row(rng, n, 0.05f));
  return random_blocks(rng, t, n);
}

const GgmlType kWeightTypes[] = {T::F32, T::F16, T::BF16, T::Q4_0, T::Q4_1, T::Q5_0,
                                 T::Q5_1, T::Q8_0, T::Q4_K, T::Q5_K, T::Q6_K};

// ------------------------------------------------------------------ traits

TEST(QuantTraits, TableMatchesGgmlSizes) {
  for (GgmlType t : {T::F32, T::F16, T::BF16, T::Q4_0, T::Q4_1, T::Q5_0, T::Q5_1, T::Q8_0,
                     T::Q8_1, T::Q4_K, T::Q5_K, T::Q6_K, T::Q8_K}) {
    SCOPED_TRACE(std::string(ggml_type_name(t)));
    const QuantTraits* q = quant_traits(t);
    ASSERT_NE(q, nullptr);
    EXPECT_EQ(q->type, t);
    auto sz = ggml_type_size(uint32_t(t));
    ASSERT_TRUE(sz.has_value());
    EXPECT_EQ(q->block_elems, sz->block_elems);
    EXPECT_EQ(q->block_bytes, sz->block_bytes);
    EXPECT_NE(q->to_float_ref, nullptr);
    // Every vec_dot_type can quantize activations.
    const QuantTraits* a = quant_traits(q->vec_dot_type);
    ASSERT_NE(a, nullptr);
    EXPECT_NE(a->from_float_ref, nullptr);
  }
  for (GgmlType t : kWeightTypes) EXPECT_NE(traits(t).vec_dot_ref, nullptr) << ggml_type_name(t);
  EXPECT_EQ(traits(T::Q4_0).vec_dot_type, T::Q8_0);
  EXPECT_EQ(traits(T::Q5_0).vec_dot_type, T::Q8_0);
  EXPECT_EQ(traits(T::Q8_0).vec_dot_type, T::Q8_0);
  EXPECT_EQ(traits(T::Q4_1).vec_dot_type, T::Q8_1);
  EXPECT_EQ(traits(T::Q5_1).vec_dot_type, T::Q8_1);
  EXPECT_EQ(traits(T::Q4_K).vec_dot_type, T::Q8_K);
  EXPECT_EQ(traits(T::Q5_K).vec_dot_type, T::Q8_K);
  EXPECT_EQ(traits(T::Q6_K).vec_dot_type, T::Q8_K);
  EXPECT_EQ(traits(T::F16).vec_dot_type, T::F32);
  EXPECT_EQ(traits(T::BF16).vec_dot_type, T::F32);
  EXPECT_EQ(traits(T::F32).vec_dot_type, T::F32);
  // Activation-only rows have no dot product.
  EXPECT_EQ(traits(T::Q8_1).vec_dot_ref, nullptr);
  EXPECT_EQ(traits(T::Q8_K).vec_dot_ref, nullptr);
  // K-quant quantizers are not provided.
  EXPECT_EQ(traits(T::Q4_K).from_float_ref, nullptr);
}

TEST(QuantTraits, UnsupportedTypes) {
  for (GgmlType t : {T::Q2_K, T::Q3_K, T::I8, T::I16, T::I32, T::I64, T::F64})
    EXPECT_EQ(quant_traits(t), nullptr) << ggml_type_name(t);
  EXPECT_EQ(quant_traits(GgmlType(1234)), nullptr);
}

// ------------------------------------------------------------- fp16 / bf16

TEST(Fp16, KnownBitPatterns) {
  struct { uint16_t bits; float value; } cases[] = {
      {0x0000, 0.0f}, {0x3c00, 1.0f}, {0xc000, -2.0f}, {0x3555, 0.333251953125f},
      {0x7bff, 65504.0f}, {0xfbff, -65504.0f}, {0x0400, 6.103515625e-05f},
      {0x0001, 5.9604644775390625e-08f}, {0x03ff, 6.097555160522461e-05f},
      {0x8001, -5.9604644775390625e-08f}, {0x3800, 0.5f}, {0x3c01, 1.0009765625f},
  };
  for (auto c : cases) {
    EXPECT_EQ(f32_to_bits(fp16_to_f32(c.bits)), f32_to_bits(c.value)) << std::hex << c.bits;
    EXPECT_EQ(f32_to_fp16(c.value), c.bits) << c.value;
  }
  EXPECT_EQ(f32_to_bits(fp16_to_f32(0x8000)), 0x80000000u);  // -0
  EXPECT_EQ(f32_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(fp16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(fp16_to_f32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(fp16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(fp16_to_f32(0x7c01)));
  // NaN payloads are kept (shifted into the f32 mantissa), sign too.
  EXPECT_EQ(f32_to_bits(fp16_to_f32(0xfe01)), 0xffc02000u);
  EXPECT_EQ(f32_to_fp16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(f32_to_fp16(-std::numeric_limits<float>::infinity()), 0xfc00);
  const uint16_t nan = f32_to_fp16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x03ff, 0);
  EXPECT_NE(f32_to_fp16(bits_to_f32(0x7f800001u)) & 0x03ff, 0);  // sNaN stays NaN, not inf
}

TEST(Fp16, RoundingTiesAndOverflow) {
  const float ulp1 = 1.0f / 1024;  // fp16 ulp at 1
  EXPECT_EQ(f32_to_fp16(1.0f + ulp1 / 2), 0x3c00);         // tie -> even (down)
  EXPECT_EQ(f32_to_fp16(1.0f + 3 * ulp1 / 2), 0x3c02);     // tie -> even (up)
  EXPECT_EQ(f32_to_fp16(std::nextafter(1.0f + ulp1 / 2, 2.0f)), 0x3c01);
  EXPECT_EQ(f32_to_fp16(std::nextafter(1.0f + ulp1 / 2, 0.0f)), 0x3c00);
  EXPECT_EQ(f32_to_fp16(2047.5f), 0x67ff + 1);               // 2047.5 tie between 2047 and 2048 -> 2048
  EXPECT_EQ(f32_to_fp16(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_fp16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(f32_to_fp16(65520.0f), 0x7c00);                  // tie at the top rounds to inf
  EXPECT_EQ(f32_to_fp16(1e10f), 0x7c00);
  EXPECT_EQ(f32_to_fp16(-1e10f), 0xfc00);
  // Subnormal results (unit 2^-24).
  const float s = 5.9604644775390625e-08f;  // 2^-24
  EXPECT_EQ(f32_to_fp16(s), 0x0001);
  EXPECT_EQ(f32_to_fp16(s / 2), 0x0000);                     // tie -> even (0)
  EXPECT_EQ(f32_to_fp16(std::nextafter(s / 2, 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_fp16(3 * s / 2), 0x0002);                 // tie -> even (2)
  EXPECT_EQ(f32_to_fp16(5 * s / 2), 0x0002);                 // tie -> even (2)
  EXPECT_EQ(f32_to_fp16(-3 * s / 2), 0x8002);
  EXPECT_EQ(f32_to_fp16(1023.5f * s), 0x0400);               // largest tie rounds up to the smallest normal
  EXPECT_EQ(f32_to_fp16(1022.5f * s), 0x03fe);
  EXPECT_EQ(f32_to_fp16(bits_to_f32(0x00000001u)), 0x0000);  // f32 subnormal -> 0
  EXPECT_EQ(f32_to_fp16(bits_to_f32(0x80000001u)), 0x8000);
  EXPECT_EQ(f32_to_fp16(1e-30f), 0x0000);
}

TEST(Fp16, AllHalvesRoundTrip) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const uint16_t hb = uint16_t(b);
    const float f = fp16_to_f32(hb);
    if ((hb & 0x7c00) == 0x7c00 && (hb & 0x03ff)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << b;
      continue;
    }
    ASSERT_EQ(f32_to_fp16(f), hb) << std::hex << b;
  }
}

// Against an independent rule: find the neighbouring halves and compare x with
// their midpoint (exact in double), ties to the even mantissa.
TEST(Fp16, RandomFloatsRoundToNearestEven) {
  std::vector<double> pos;  // all finite non-negative halves, ascending
  for (uint32_t b = 0; b <= 0x7bff; ++b) pos.push_back(double(fp16_to_f32(uint16_t(b))));
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits(0, 0xffffffffu);
  std::uniform_real_distribution<float> mag(-30.0f, 17.0f);
  for (int i = 0; i < 200000; ++i) {
    float x = i % 2 ? bits_to_f32(bits(rng)) : std::ldexp(1.0f + (bits(rng) >> 9) * 0x1p-23f, int(mag(rng)));
    if (std::isnan(x)) continue;
    if (i % 4 == 1) x = -x;
    const double a = std::fabs(double(x));
    uint16_t expect;
    if (a >= 65520.0) {
      expect = 0x7c00;
    } else {
      size_t hi = size_t(std::upper_bound(pos.begin(), pos.end(), a) - pos.begin());
      if (hi > 0 && pos[hi - 1] == a) {
        expect = uint16_t(hi - 1);
      } else {
        const size_t lo = hi - 1;
        const double hv = hi < pos.size() ? pos[hi] : 65536.0;
        const double mid = (pos[lo] + hv) / 2;
        if (a < mid) expect = uint16_t(lo);
        else if (a > mid) expect = uint16_t(hi);
        else expect = uint16_t((lo & 1) ? hi : lo);
      }
    }
    if (std::signbit(x)) expect |= 0x8000;
    ASSERT_EQ(f32_to_fp16(x), expect) << std::hex << f32_to_bits(x);
  }
}

TEST(Bf16, KnownBitPatterns) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x3f808000u)), 0x3f80);  // tie -> even (down)
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x3f818000u)), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x3f808001u)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x7f7fffffu)), 0x7f80);  // FLT_MAX rounds to inf
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x00008000u)), 0x0000);  // subnormal tie -> even
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x00018000u)), 0x0002);
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x00010001u)), 0x0001);
  // NaN: top bits kept, quiet bit forced (never rounds into inf).
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x7f800001u)), 0x7fc0);
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0xff81ffffu)), 0xffc1);
  EXPECT_EQ(f32_to_bf16(bits_to_f32(0x7fffffffu)), 0x7fff);
  for (uint32_t b = 0; b < 0x10000; ++b)
    ASSERT_EQ(f32_to_bits(bf16_to_f32(uint16_t(b))), b << 16);
}

// ---------------------------------------------------- known-answer blocks

TEST(QuantRef, Q4_0KnownBlock) {
  BlockQ4_0 b;
  b.d = 0x3800;  // 0.5
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(j | ((15 - j) << 4));
  auto y = dequantize(T::Q4_0, &b, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 0.5f * float(j - 8)) << j;
    EXPECT_EQ(y[j + 16], 0.5f * float(7 - j)) << j;
  }
  EXPECT_EQ(y[0], -4.0f);
  EXPECT_EQ(y[16], 3.5f);
}

TEST(QuantRef, Q4_1KnownBlock) {
  BlockQ4_1 b;
  b.d = 0x3800;  // 0.5
  b.m = 0xbc00;  // -1
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(j | ((15 - j) << 4));
  auto y = dequantize(T::Q4_1, &b, 32);
  const float lo[16] = {-1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 6.5};
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], lo[j]) << j;
    EXPECT_EQ(y[j + 16], lo[15 - j]) << j;
  }
}

TEST(QuantRef, Q5_0KnownBlock) {
  BlockQ5_0 b;
  b.d = 0x3400;  // 0.25
  // q_j = j: low nibble j & 15, 5th bit set for j >= 16.
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(j | (j << 4));
  const uint32_t qh = 0xffff0000u;
  std::memcpy(b.qh, &qh, 4);
  auto y = dequantize(T::Q5_0, &b, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], 0.25f * float(j - 16)) << j;
  // Single high bit: element 3 gets +16.
  const uint32_t one = 1u << 3;
  std::memcpy(b.qh, &one, 4);
  y = dequantize(T::Q5_0, &b, 32);
  EXPECT_EQ(y[3], 0.25f * float(3 + 16 - 16));
  EXPECT_EQ(y[19], 0.25f * float(3 - 16));
}

TEST(QuantRef, Q5_1KnownBlock) {
  BlockQ5_1 b;
  b.d = 0x4000;  // 2
  b.m = 0x3800;  // 0.5
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(j | (j << 4));
  const uint32_t qh = 0xffff0000u;
  std::memcpy(b.qh, &qh, 4);
  auto y = dequantize(T::Q5_1, &b, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], 2.0f * float(j) + 0.5f) << j;
  EXPECT_EQ(y[31], 62.5f);
}

TEST(QuantRef, Q8KnownBlocks) {
  BlockQ8_0 b;
  b.d = 0x3000;  // 0.125
  for (int j = 0; j < 32; ++j) b.qs[j] = int8_t(j * 8 - 128);
  auto y = dequantize(T::Q8_0, &b, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], 0.125f * float(j * 8 - 128)) << j;
  EXPECT_EQ(y[0], -16.0f);

  BlockQ8_K k{};
  k.d = -0.25f;
  for (int j = 0; j < 256; ++j) k.qs[j] = int8_t(j - 128);
  y = dequantize(T::Q8_K, &k, 256);
  for (int j = 0; j < 256; ++j) EXPECT_EQ(y[j], -0.25f * float(j - 128)) << j;
}

// The 12 packed scale bytes, decoded by hand (see quant_ref.cpp for the layout).
const uint8_t kKScales[12] = {0xC1, 0x42, 0x03, 0xFF, 0x80, 0x01, 0x3E, 0x43, 0x21, 0x43, 0x65, 0x87};
const int kKSc[8] = {1, 2, 3, 63, 49, 19, 5, 55};
const int kKMin[8] = {0, 1, 62, 3, 34, 4, 6, 24};

TEST(QuantRef, KScaleUnpacking) {
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    ref::unpack_k_scale_min(kKScales, j, &sc, &m);
    EXPECT_EQ(sc, kKSc[j]) << j;
    EXPECT_EQ(m, kKMin[j]) << j;
  }
}

TEST(QuantRef, Q4_KKnownBlock) {
  BlockQ4_K b;
  b.d = 0x3800;     // 0.5
  b.dmin = 0x3400;  // 0.25
  std::memcpy(b.scales, kKScales, 12);
  // 64-element chunk c: low nibbles of qs[32c+l] are sub-block 2c, high nibbles 2c+1.
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) b.qs[32 * c + l] = uint8_t((l & 15) | (((l + c) & 15) << 4));
  auto y = dequantize(T::Q4_K, &b, 256);
  for (int s = 0; s < 8; ++s) {
    for (int l = 0; l < 32; ++l) {
      const int q = s % 2 == 0 ? (l & 15) : ((l + s / 2) & 15);
      EXPECT_EQ(y[32 * s + l], 0.5f * float(kKSc[s]) * float(q) - 0.25f * float(kKMin[s]))
          << s << " " << l;
    }
  }
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_EQ(y[33], 0.75f);    // sc 2, min 1, q 1
  EXPECT_EQ(y[133], 114.0f);  // sc 49, min 34, q 5
  EXPECT_EQ(y[255], 49.0f);   // sc 55, min 24, q 2
}

TEST(QuantRef, Q5_KKnownBlock) {
  BlockQ5_K b;
  b.d = 0x3800;     // 0.5
  b.dmin = 0x3400;  // 0.25
  std::memcpy(b.scales, kKScales, 12);
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) b.qs[32 * c + l] = uint8_t((l & 15) | (((l + c) & 15) << 4));
  for (int l = 0; l < 32; ++l) b.qh[l] = uint8_t(l * 37 + 11);
  auto y = dequantize(T::Q5_K, &b, 256);
  for (int s = 0; s < 8; ++s) {
    for (int l = 0; l < 32; ++l) {
      const int lo = s % 2 == 0 ? (l & 15) : ((l + s / 2) & 15);
      const int q = lo | (((b.qh[l] >> s) & 1) << 4);
      EXPECT_EQ(y[32 * s + l], 0.5f * float(kKSc[s]) * float(q) - 0.25f * float(kKMin[s]))
          << s << " " << l;
    }
  }
  // qh[0] = 11 = 0b1011: element 0 (s 0) has bit 0 set -> q = 16.
  EXPECT_EQ(y[0], 0.5f * 1 * 16 - 0.0f);
  // Element 64 (s 2, l 0): bit 2 of 11 is 0 -> q = 0 -> -dmin*62.
  EXPECT_EQ(y[64], -15.5f);
}

TEST(QuantRef, Q6_KKnownBlock) {
  BlockQ6_K b{};
  b.d = 0x3800;  // 0.5
  for (auto& s : b.scales) s = 1;
  b.scales[0] = 3;
  b.scales[2] = -2;
  b.scales[4] = 7;
  b.scales[6] = -1;
  b.scales[15] = -128;
  b.ql[0] = 0x5A;
  b.qh[0] = 0xE4;  // 0b11'10'01'00
  auto y = dequantize(T::Q6_K, &b, 256);
  EXPECT_EQ(y[0], 0.5f * 3 * (10 - 32));   // ql[0] low = 10, qh bits 0-1 = 0
  EXPECT_EQ(y[32], 0.5f * -2 * (16 - 32)); // ql[32] low = 0, qh bits 2-3 = 1
  EXPECT_EQ(y[64], 0.5f * 7 * (37 - 32));  // ql[0] high = 5, qh bits 4-5 = 2
  EXPECT_EQ(y[96], 0.5f * -1 * (48 - 32)); // ql[32] high = 0, qh bits 6-7 = 3
  EXPECT_EQ(y[0], -33.0f);
  EXPECT_EQ(y[32], 16.0f);
  EXPECT_EQ(y[64], 17.5f);
  EXPECT_EQ(y[96], -8.0f);
  EXPECT_EQ(y[1], -48.0f);   // q = -32, scale 3
  EXPECT_EQ(y[16], -16.0f);  // scale 1
  EXPECT_EQ(y[255], 0.5f * -128 * -32);

  // Full pattern against the layout rule: element 128h+32k+l.
  for (int i = 0; i < 128; ++i) b.ql[i] = uint8_t(i * 29 + 3);
  for (int i = 0; i < 64; ++i) b.qh[i] = uint8_t(i * 53 + 7);
  for (int i = 0; i < 16; ++i) b.scales[i] = int8_t(i * 17 - 120);
  y = dequantize(T::Q6_K, &b, 256);
  for (int hh = 0; hh < 2; ++hh)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 32; ++l) {
        const int e = 128 * hh + 32 * k + l;
        const uint8_t lb = b.ql[64 * hh + 32 * (k % 2) + l];
        const int lo = k < 2 ? lb & 15 : lb >> 4;
        const int hi = (b.qh[32 * hh + l] >> (2 * k)) & 3;
        EXPECT_EQ(y[e], 0.5f * float(b.scales[e / 16]) * float((lo | (hi << 4)) - 32)) << e;
      }
}

// ----------------------------------------------------- quantizer rules

TEST(QuantRef, Q8QuantizersRoundingRules) {
  std::vector<float> x(256, 0.0f);
  const float head[] = {127, -127, 63.5f, -63.5f, 0.5f, -0.5f, 1.5f, 2.5f, -2.5f};
  std::copy(std::begin(head), std::end(head), x.begin());

  // Q8_0 / Q8_1: d = 127/127 = 1, ties round away from zero.
  std::vector<float> x32(x.begin(), x.begin() + 32);
  auto q0 = quantize(T::Q8_0, x32);
  BlockQ8_0 b0;
  std::memcpy(&b0, q0.data(), sizeof b0);
  EXPECT_EQ(b0.d, 0x3c00);
  const int8_t e0[] = {127, -127, 64, -64, 1, -1, 2, 3, -3};
  for (int j = 0; j < 9; ++j) EXPECT_EQ(b0.qs[j], e0[j]) << j;
  for (int j = 9; j < 32; ++j) EXPECT_EQ(b0.qs[j], 0);

  auto q1 = quantize(T::Q8_1, x32);
  BlockQ8_1 b1;
  std::memcpy(&b1, q1.data(), sizeof b1);
  EXPECT_EQ(b1.d, 0x3c00);
  for (int j = 0; j < 9; ++j) EXPECT_EQ(b1.qs[j], e0[j]) << j;
  EXPECT_EQ(b1.s, 0x4000);  // s = d * sum(q) = 2

  // Q8_K: iscale = -127/max (max = 127, the first of the largest magnitude),
  // ties to even, d = 1/iscale = -1.
  auto qk = quantize(T::Q8_K, x);
  BlockQ8_K bk;
  std::memcpy(&bk, qk.data(), sizeof bk);
  EXPECT_EQ(bk.d, -1.0f);
  const int8_t ek[] = {-127, 127, -64, 64, 0, 0, -2, -2, 2};
  for (int j = 0; j < 9; ++j) EXPECT_EQ(bk.qs[j], ek[j]) << j;
  EXPECT_EQ(bk.bsums[0], -2);
  for (int g = 1; g < 16; ++g) EXPECT_EQ(bk.bsums[g], 0);

  // All-zero blocks: d = 0, q = 0.
  std::vector<float> z(256, 0.0f);
  auto zk = quantize(T::Q8_K, z);
  EXPECT_TRUE(std::all_of(zk.begin(), zk.end(), [](uint8_t v) { return v == 0; }));
  auto z0 = quantize(T::Q8_0, std::vector<float>(32, 0.0f));
  EXPECT_TRUE(std::all_of(z0.begin(), z0.end(), [](uint8_t v) { return v == 0; }));
}

TEST(QuantRef, WeightQuantizersKnownBlocks) {
  std::vector<float> x(32, 0.0f);
  {  // Q4_0: max (signed) = -8 -> d = 1; q = min(15, trunc(x + 8.5))
    const float v[] = {-8, 7, 7.5f, 0.5f, -0.5f, 0.49f, 1, -1};
    std::fill(x.begin(), x.end(), 0.0f);
    std::copy(std::begin(v), std::end(v), x.begin());
    auto q = quantize(T::Q4_0, x);
    EXPECT_EQ(get16(q.data()), 0x3c00);
    const int e[] = {0, 15, 15, 9, 8, 8, 9, 7};
    for (int j = 0; j < 8; ++j) EXPECT_EQ(q[2 + j], uint8_t(e[j] | (8 << 4))) << j;
    for (int j = 8; j < 16; ++j) EXPECT_EQ(q[2 + j], 0x88) << j;
  }
  {  // Q4_1: min -1, max 14 -> d = 1, m = -1; q = min(15, trunc(x + 1 + 0.5))
    const float v[] = {-1, 14, 0.5f, 0.49f, 3};
    std::fill(x.begin(), x.end(), 0.0f);
    std::copy(std::begin(v), std::end(v), x.begin());
    auto q = quantize(T::Q4_1, x);
    EXPECT_EQ(get16(q.data()), 0x3c00);
    EXPECT_EQ(get16(q.data() + 2), 0xbc00);
    const int e[] = {0, 15, 2, 1, 4};
    for (int j = 0; j < 5; ++j) EXPECT_EQ(q[4 + j], uint8_t(e[j] | (1 << 4))) << j;
    for (int j = 5; j < 16; ++j) EXPECT_EQ(q[4 + j], 0x11) << j;
  }
  {  // Q5_0: max -16 -> d = 1; q = min(31, trunc(x + 16.5))
    const float v[] = {-16, 15, 15.5f, 0.5f, -0.5f};
    std::fill(x.begin(), x.end(), 0.0f);
    std::copy(std::begin(v), std::end(v), x.begin());
    auto q = quantize(T::Q5_0, x);
    BlockQ5_0 b;
    std::memcpy(&b, q.data(), sizeof b);
    EXPECT_EQ(b.d, 0x3c00);
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    EXPECT_EQ(qh, 0xfffffffeu);  // q = 0, 31, 31, 17, 16, then 16...
    const int lo[] = {0, 15, 15, 1, 0};
    for (int j = 0; j < 5; ++j) EXPECT_EQ(b.qs[j], lo[j]) << j;
  }
  {  // Q5_1: min -1, max 30 -> d = 1, m = -1; q = min(31, trunc(x + 1.5))
    const float v[] = {-1, 30, 0.5f, 0.49f, 15};
    std::fill(x.begin(), x.end(), 0.0f);
    std::copy(std::begin(v), std::end(v), x.begin());
    auto q = quantize(T::Q5_1, x);
    BlockQ5_1 b;
    std::memcpy(&b, q.data(), sizeof b);
    EXPECT_EQ(b.d, 0x3c00);
    EXPECT_EQ(b.m, 0xbc00);
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    EXPECT_EQ(qh, 0x00000012u);  // q = 0, 31, 2, 1, 16, then 1...
    const int lo[] = {0, 15, 2, 1, 0};
    for (int j = 0; j < 5; ++j) EXPECT_EQ(b.qs[j], uint8_t(lo[j] | (1 << 4))) << j;
  }
}

// Largest |x - dequant(quantize(x))| an activation quantizer may make in a block
// of scale d. Q8_0/Q8_1: q = round(x / d) with the f32 d, stored with d rounded
// to fp16: d/2 from rounding q plus |q| <= 127 steps of the fp16 error of d
// (<= 2^-11 d relative, or half an fp16 subnormal step). The 2e-5 covers the
// f32 rounding of x * (1/d) (relative 2^-24 of values up to 127).
double act_bound(GgmlType t, double d16) {
  if (t == T::Q8_K) return std::fabs(d16) * (0.5 + 2e-5);
  const double dd = std::max(std::fabs(d16) * 0x1p-10, 0x1p-25);
  return (std::fabs(d16) + dd) * (0.5 + 2e-5) + 127.5 * dd;
}

TEST(QuantRef, ActivationRoundTripBounds) {
  std::mt19937 rng(11);
  for (GgmlType t : {T::Q8_0, T::Q8_1, T::Q8_K}) {
    SCOPED_TRACE(std::string(ggml_type_name(t)));
    const int be = traits(t).block_elems, bb = traits(t).block_bytes;
    for (float scale : {1.0f, 1e-3f, 1e-6f, 100.0f}) {
      const int64_t n = be * 9;
      auto x = random_row(rng, n, scale);
      for (int j = 0; j < be; ++j) x[size_t(3 * be + j)] = 0.0f;  // one all-zero block
      auto q = quantize(t, x);
      auto y = dequantize(t, q.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t* blk = q.data() + (i / be) * bb;
        double d;
        if (t == T::Q8_K) { float f; std::memcpy(&f, blk, 4); d = f; }
        else d = fp16_to_f32(get16(blk));
        ASSERT_LE(std::fabs(double(x[i]) - double(y[i])), act_bound(t, d))
            << "i=" << i << " x=" << x[i] << " d=" << d;
        // Strict d/2 bound where d is exactly representable (Q8_K keeps f32 d).
        if (t == T::Q8_K) {
          const int8_t qi = int8_t(blk[4 + (i % be)]);
          ASSERT_LE(std::fabs(double(x[i]) - double(qi) * d), std::fabs(d) * (0.5 + 2e-5));
        }
      }
      if (t == T::Q8_1) {  // s = fp16(d * sum(q)) with the unrounded f32 d = amax/127
        for (int64_t b = 0; b < n / be; ++b) {
          const uint8_t* blk = q.data() + b * bb;
          int sum = 0;
          float amax = 0;
          for (int j = 0; j < 32; ++j) {
            sum += int8_t(blk[4 + j]);
            amax = std::max(amax, std::fabs(x[size_t(b * 32 + j)]));
          }
          const float d32 = amax / 127.0f;
          EXPECT_EQ(get16(blk), f32_to_fp16(d32)) << b;
          EXPECT_EQ(get16(blk + 2), f32_to_fp16(float(sum) * d32)) << b;
        }
      }
      if (t == T::Q8_K) {
        for (int64_t b = 0; b < n / be; ++b) {
          BlockQ8_K k;
          std::memcpy(&k, q.data() + b * bb, sizeof k);
          for (int g = 0; g < 16; ++g) {
            int s = 0;
            for (int l = 0; l < 16; ++l) s += k.qs[16 * g + l];
            EXPECT_EQ(k.bsums[g], s) << b << " " << g;
          }
        }
      }
    }
  }
}

TEST(QuantRef, WeightQuantizerRoundTripBounds) {
  std::mt19937 rng(12);
  for (GgmlType t : {T::Q4_0, T::Q4_1, T::Q5_0, T::Q5_1, T::Q8_0, T::F16, T::BF16, T::F32}) {
    SCOPED_TRACE(std::string(ggml_type_name(t)));
    const int be = traits(t).block_elems;
    const int64_t n = 32 * 13;
    auto x = random_row(rng, n, 0.02f);
    auto q = quantize(t, x);
    auto y = dequantize(t, q.data(), n);
    for (int64_t b = 0; b < n / 32; ++b) {
      double mn = 1e30, mx = -1e30, amax = 0;
      for (int j = 0; j < 32; ++j) {
        const double v = x[size_t(b * 32 + j)];
        mn = std::min(mn, v), mx = std::max(mx, v), amax = std::max(amax, std::fabs(v));
      }
      // One quantization step of the type (clamping can cost a whole step at the
      // extreme of the _0 types), plus fp16 rounding of the scale and min.
      double step;
      switch (t) {
        case T::Q4_0: step = amax / 8; break;
        case T::Q5_0: step = amax / 16; break;
        case T::Q4_1: step = (mx - mn) / 15; break;
        case T::Q5_1: step = (mx - mn) / 31; break;
        case T::Q8_0: step = amax / 127 / 2; break;
        case T::F16: step = amax * 0x1p-11; break;
        case T::BF16: step = amax * 0x1p-8; break;
        default: step = 0; break;
      }
      const double bound = step * (1 + 1e-3) + amax * 0x1p-10;
      for (int j = 0; j < 32; ++j) {
        const size_t i = size_t(b * 32 + j);
        ASSERT_LE(std::fabs(double(x[i]) - double(y[i])), t == T::F32 ? 0.0 : bound)
            << "block " << b << " j " << j << " x " << x[i] << " y " << y[i];
      }
    }
    (void)be;
  }
}

// ------------------------------------------------------------ dot products

struct DotCase {
  double got, exact_q, exact_f, tol_q, bound_f;
};

// vec_dot_ref(w, quantize(a)) with the two references it must agree with:
// exact_q: the double dot of dequant(w) and dequant(quantize(a)), which it
// equals up to float rounding of the block scales (tol_q);
// exact_f: the double dot of dequant(w) and a itself, off by at most the
// activation quantization error (bound_f).
DotCase run_dot(GgmlType wt, const std::vector<uint8_t>& w, const std::vector<float>& a) {
  const int64_t n = int64_t(a.size());
  const auto& tr = traits(wt);
  const GgmlType at = tr.vec_dot_type;
  const auto& atr = traits(at);
  auto qa = quantize(at, a);
  DotCase r{};
  r.got = tr.vec_dot_ref(n, w.data(), qa.data());
  auto wd = dequantize(wt, w.data(), n);
  auto ad = dequantize(at, qa.data(), n);
  double abs_sum = 0, s_term = 0, act = 0;
  for (int64_t i = 0; i < n; ++i) {
    r.exact_q += double(wd[i]) * double(ad[i]);
    r.exact_f += double(wd[i]) * double(a[i]);
    abs_sum += std::fabs(double(wd[i]) * double(ad[i]));
  }
  if (at != T::F32) {
    const int be = atr.block_elems;
    for (int64_t b = 0; b < n / be; ++b) {
      const uint8_t* ab = qa.data() + b * atr.block_bytes;
      double d;
      if (at == T::Q8_K) { float f; std::memcpy(&f, ab, 4); d = f; }
      else d = fp16_to_f32(get16(ab));
      double wabs = 0;
      for (int j = 0; j < be; ++j) wabs += std::fabs(double(wd[size_t(b * be + j)]));
      act += wabs * act_bound(at, d);
      if (at == T::Q8_1) {
        // The min term uses s = fp16(d32 * sum(q)) instead of d16 * sum(q):
        // |s - d16 sum| <= |s - d32 sum| + |sum| |d32 - d16|, each an fp16 rounding
        // (relative 2^-11, or absolute 2^-25 in the subnormal range).
        int sum = 0;
        for (int j = 0; j < 32; ++j) sum += int8_t(ab[4 + j]);
        const double s = fp16_to_f32(get16(ab + 2));
        const double m = fp16_to_f32(get16(w.data() + b * tr.block_bytes + 2));
        s_term += std::fabs(m) * ((std::fabs(s) + std::fabs(d * sum)) * 0x1p-10 +
                                  (std::abs(sum) + 1) * 0x1p-24);
      }
    }
  }
  r.tol_q = abs_sum * 1e-5 + s_term + 1e-30;
  r.bound_f = act + r.tol_q;
  return r;
}

TEST(QuantRef, VecDotMatchesDequantizedDot) {
  std::mt19937 rng(21);
  for (GgmlType wt : kWeightTypes) {
    const int be = traits(traits(wt).vec_dot_type).block_elems;
    const int wbe = traits(wt).block_elems;
    const int unit = std::max({be, wbe, 32});  // lengths in units of the larger block
    for (int blocks : {1, 3, 7, 33}) {
      if (unit == 256 && blocks == 33) continue;
      SCOPED_TRACE(std::string(ggml_type_name(wt)) + " blocks=" + std::to_string(blocks));
      const int64_t n = int64_t(unit) * blocks;
      for (int rep = 0; rep < 5; ++rep) {
        auto w = random_weights(rng, wt, n);
        // rep 4: activation scales in the fp16 subnormal range.
        auto a = random_row(rng, n, rep == 3 ? 1e-3f : rep == 4 ? 1e-6f : 1.0f);
        DotCase c = run_dot(wt, w, a);
        EXPECT_NEAR(c.got, c.exact_q, c.tol_q);
        EXPECT_NEAR(c.got, c.exact_f, c.bound_f);
      }
    }
  }
}

TEST(QuantRef, VecDotSmallExact) {
  // Q4_0 (d 0.5, nibbles j / 15-j) against Q8_0 of a = 1..32: exact integers.
  BlockQ4_0 w;
  w.d = 0x3800;
  for (int j = 0; j < 16; ++j) w.qs[j] = uint8_t(j | ((15 - j) << 4));
  std::vector<float> a(32);
  for (int j = 0; j < 32; ++j) a[j] = float(j % 8) - 3.0f;  // amax 4 -> d = 4/127
  auto qa = quantize(T::Q8_0, a);
  const float got = traits(T::Q4_0).vec_dot_ref(32, &w, qa.data());
  auto wd = dequantize(T::Q4_0, &w, 32);
  auto ad = dequantize(T::Q8_0, qa.data(), 32);
  double e = 0;
  for (int j = 0; j < 32; ++j) e += double(wd[j]) * double(ad[j]);
  EXPECT_NEAR(got, e, std::fabs(e) * 1e-6 + 1e-6);
}

TEST(QuantRef, UnalignedPointers) {
  std::mt19937 rng(31);
  for (GgmlType wt : kWeightTypes) {
    SCOPED_TRACE(std::string(ggml_type_name(wt)));
    const int64_t n = 512;
    auto w = random_weights(rng, wt, n);
    std::vector<uint8_t> shifted(w.size() + 1);
    std::memcpy(shifted.data() + 1, w.data(), w.size());
    auto y0 = dequantize(wt, w.data(), n);
    auto y1 = dequantize(wt, shifted.data() + 1, n);
    EXPECT_EQ(0, std::memcmp(y0.data(), y1.data(), y0.size() * 4));
    const GgmlType at = traits(wt).vec_dot_type;
    auto a = random_row(rng, n);
    auto qa = quantize(at, a);
    std::vector<uint8_t> qs(qa.size() + 3);
    std::memcpy(qs.data() + 3, qa.data(), qa.size());
    // F32 activations are read as floats; only the quantized ones may be unaligned.
    const void* ap = at == T::F32 ? static_cast<const void*>(qa.data()) : qs.data() + 3;
    EXPECT_EQ(traits(wt).vec_dot_ref(n, w.data(), qa.data()),
              traits(wt).vec_dot_ref(n, shifted.data() + 1, ap));
  }
}

// ------------------------------------------------------------------ matmul

TEST(QuantRef, MatmulRefMatchesVecDot) {
  std::mt19937 rng(41);
  for (GgmlType wt : kWeightTypes) {
    SCOPED_TRACE(std::string(ggml_type_name(wt)));
    const int64_t cols = traits(wt).block_elems == 256 ? 512 : 96, rows = 5, tokens = 3;
    const uint64_t rb = row_bytes(wt, cols) + 6;  // padded stride
    std::vector<uint8_t> w(size_t(rb * rows), 0xAB);
    for (int64_t r = 0; r < rows; ++r) {
      auto row = random_weights(rng, wt, cols);
      std::memcpy(w.data() + r * rb, row.data(), row.size());
    }
    auto x = random_row(rng, cols * tokens);
    std::vector<float> y(size_t(rows * tokens), -1.0f);
    matmul_ref(WeightView{wt, rows, cols, w.data(), rb}, x.data(), y.data(), tokens);
    const auto& tr = traits(wt);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<float> xt(x.begin() + t * cols, x.begin() + (t + 1) * cols);
      auto qa = quantize(tr.vec_dot_type, xt);
      for (int64_t r = 0; r < rows; ++r)
        EXPECT_EQ(y[size_t(t * rows + r)], tr.vec_dot_ref(cols, w.data() + r * rb, qa.data()))
            << t << " " << r;
    }
  }
}

TEST(QuantRef, MatmulRefRejectsBadShapes) {
  std::vector<uint8_t> w(4096);
  std::vector<float> x(1024), y(16);
  EXPECT_THROW(matmul_ref(WeightView{T::Q8_K, 1, 256, w.data(), 292}, x.data(), y.data(), 1), Error);
  EXPECT_THROW(matmul_ref(WeightView{T::Q2_K, 1, 256, w.data(), 84}, x.data(), y.data(), 1), Error);
  EXPECT_THROW(matmul_ref(WeightView{T::Q4_0, 1, 48, w.data(), 36}, x.data(), y.data(), 1), Error);
  EXPECT_THROW(matmul_ref(WeightView{T::Q4_0, 1, 64, w.data(), 35}, x.data(), y.data(), 1), Error);
}

// ------------------------------------------- fixtures from the Python package

// The fixture GGUF holds, per case NAME: the tensor NAME (raw blocks), NAME.expected
// (f32 from gguf.quants.dequantize) and, for cases python quantized itself,
// NAME.input (the f32 it quantized). Written by tests/python/test_quant_vs_gguf_py.py.
const char* fixture_path() {
  const char* p = std::getenv("KVQ_QUANT_FIXTURE");
  return p && *p ? p : nullptr;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

std::vector<float> as_floats(const gguf::TensorInfo& t) {
  std::vector<float> v(size_t(t.n_elements()));
  std::memcpy(v.data(), t.data, v.size() * 4);
  return v;
}

// Bitwise comparison; reports the first few differing elements.
::testing::AssertionResult same_bits(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  size_t bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    if (f32_to_bits(got[i]) != f32_to_bits(want[i])) {
      if (bad++ < 5) {
        char buf[160];
        std::snprintf(buf, sizeof buf, " [%zu] got %.9g (0x%08x) want %.9g (0x%08x);", i,
                      double(got[i]), f32_to_bits(got[i]), double(want[i]), f32_to_bits(want[i]));
        first += buf;
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " differ:" << first;
}

TEST(QuantFixture, DequantMatchesPython) {
  const char* path = fixture_path();
  if (!path) GTEST_SKIP() << "KVQ_QUANT_FIXTURE not set (run tests/python/test_quant_vs_gguf_py.py)";
  const gguf::File f = gguf::File::open(path);
  const auto n_expected = f.get_int("kvq.quant_fixture.n_dequant");
  ASSERT_TRUE(n_expected.has_value());
  int checked = 0;
  for (const auto& t : f.tensors()) {
    if (ends_with(t.name, ".expected") || ends_with(t.name, ".input")) continue;
    const gguf::TensorInfo* e = f.find_tensor(std::string(t.name) + ".expected");
    if (!e) continue;
    SCOPED_TRACE(std::string(t.name));
    ASSERT_EQ(e->type, T::F32);
    ASSERT_EQ(e->n_elements(), t.n_elements());
    const QuantTraits* q = quant_traits(t.type);
    ASSERT_NE(q, nullptr) << ggml_type_name(t.type);
    const auto want = as_floats(*e);
    const int64_t n = t.n_elements();
    const int64_t row = t.dims.at(0);
    ASSERT_EQ(row % q->block_elems, 0);
    const size_t rb = size_t(row / q->block_elems) * size_t(q->block_bytes);
    ASSERT_EQ(t.n_bytes, rb * size_t(n / row));

    std::vector<float> got(static_cast<size_t>(n));
    q->to_float_ref(t.data, got.data(), n);
    EXPECT_TRUE(same_bits(got, want)) << "to_float_ref";

    // The dispatched path, at every SIMD level this CPU has.
    for (int lv = 0; lv <= int(detected_simd_level()); ++lv) {
      std::fill(got.begin(), got.end(), -12345.0f);
      for (int64_t r = 0; r < n / row; ++r)
        dequantize_row(t.type, t.data + size_t(r) * rb, got.data() + r * row, row, SimdLevel(lv));
      EXPECT_TRUE(same_bits(got, want)) << "dequantize_row at " << simd_level_name(SimdLevel(lv));
    }
    ++checked;
  }
  EXPECT_EQ(checked, *n_expected);
}

TEST(QuantFixture, QuantizeMatchesPython) {
  const char* path = fixture_path();
  if (!path) GTEST_SKIP() << "KVQ_QUANT_FIXTURE not set (run tests/python/test_quant_vs_gguf_py.py)";
  const gguf::File f = gguf::File::open(path);
  const auto n_expected = f.get_int("kvq.quant_fixture.n_quantize");
  ASSERT_TRUE(n_expected.has_value());
  int checked = 0;
  for (const auto& t : f.tensors()) {
    if (ends_with(t.name, ".expected") || ends_with(t.name, ".input")) continue;
    const gguf::TensorInfo* in = f.find_tensor(std::string(t.name) + ".input");
    if (!in) continue;
    SCOPED_TRACE(std::string(t.name));
    ASSERT_EQ(in->type, T::F32);
    ASSERT_EQ(in->n_elements(), t.n_elements());
    const QuantTraits* q = quant_traits(t.type);
    ASSERT_NE(q, nullptr);
    ASSERT_NE(q->from_float_ref, nullptr) << ggml_type_name(t.type);
    const auto x = as_floats(*in);
    const int64_t n = t.n_elements(), row = t.dims.at(0);
    const size_t rb = size_t(row / q->block_elems) * size_t(q->block_bytes);
    ASSERT_EQ(t.n_bytes, rb * size_t(n / row));
    std::vector<uint8_t> got(t.n_bytes, 0xCD);
    for (int64_t r = 0; r < n / row; ++r)
      q->from_float_ref(x.data() + r * row, got.data() + size_t(r) * rb, row);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < got.size(); ++i)
      if (got[i] != t.data[i] && bad++ == 0) first = i;
    EXPECT_EQ(bad, 0u) << "bytes differ; first at byte " << first << " (block "
                       << first / size_t(q->block_bytes) << "): got " << int(got[first])
                       << " want " << int(t.data[first]);
    ++checked;
  }
  EXPECT_EQ(checked, *n_expected);
}

}  // namespace
}  // namespace kvq

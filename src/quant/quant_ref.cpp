// Scalar references for the GGUF block types; see quant_ref.h for the exact
// rounding rules and accumulation precision.

// Bit-exactness needs each float op rounded separately: never fuse a*b+c into
// an FMA (GCC contracts across statements even in ISO mode on FMA targets).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "quant/quant_ref.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstring>

#include "base/fp16.h"
#include "quant/blocks.h"

namespace kvq::ref {

namespace {

// Field readers: blocks may sit at any address (odd block sizes, mmapped files).
inline float ld_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_f32(h);
}
inline void st_f16(uint8_t* p, float f) {
  const uint16_t h = f32_to_fp16(f);
  std::memcpy(p, &h, 2);
}
inline float ld_f32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}
inline uint32_t ld_u32(const uint8_t* p) {
  uint32_t u;
  std::memcpy(&u, p, 4);
  return u;
}
inline int16_t ld_i16(const uint8_t* p) {
  int16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline const uint8_t* bytes(const void* p) { return static_cast<const uint8_t*>(p); }
inline uint8_t* bytes(void* p) { return static_cast<uint8_t*>(p); }

// Round half away from zero (C roundf), the rule of the Q8_0/Q8_1 reference.
inline int round_away(float x) { return int(std::round(x)); }

// Round half to even via the 1.5*2^23 trick, the rule of the Q8_K reference.
// Valid for |x| < 2^22, which the callers guarantee (|x| <= ~127).
inline int round_even(float x) {
  const float v = x + 12582912.f;
  int32_t i;
  std::memcpy(&i, &v, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// Signed element with the largest magnitude (first one on ties) and that magnitude.
inline void signed_absmax(const float* x, int n, float* max, float* amax) {
  float m = 0.0f, am = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float a = std::fabs(x[j]);
    if (am < a) {
      am = a;
      m = x[j];
    }
  }
  *max = m;
  *amax = am;
}

inline void min_max(const float* x, int n, float* mn, float* mx) {
  float lo = FLT_MAX, hi = -FLT_MAX;
  for (int j = 0; j < n; ++j) {
    if (x[j] < lo) lo = x[j];
    if (x[j] > hi) hi = x[j];
  }
  *mn = lo;
  *mx = hi;
}

constexpr size_t kQ4_0_d = offsetof(BlockQ4_0, d), kQ4_0_qs = offsetof(BlockQ4_0, qs);
constexpr size_t kQ4_1_d = offsetof(BlockQ4_1, d), kQ4_1_m = offsetof(BlockQ4_1, m),
                 kQ4_1_qs = offsetof(BlockQ4_1, qs);
constexpr size_t kQ5_0_d = offsetof(BlockQ5_0, d), kQ5_0_qh = offsetof(BlockQ5_0, qh),
                 kQ5_0_qs = offsetof(BlockQ5_0, qs);
constexpr size_t kQ5_1_d = offsetof(BlockQ5_1, d), kQ5_1_m = offsetof(BlockQ5_1, m),
                 kQ5_1_qh = offsetof(BlockQ5_1, qh), kQ5_1_qs = offsetof(BlockQ5_1, qs);
constexpr size_t kQ8_0_d = offsetof(BlockQ8_0, d), kQ8_0_qs = offsetof(BlockQ8_0, qs);
constexpr size_t kQ8_1_d = offsetof(BlockQ8_1, d), kQ8_1_s = offsetof(BlockQ8_1, s),
                 kQ8_1_qs = offsetof(BlockQ8_1, qs);
constexpr size_t kQ4_K_d = offsetof(BlockQ4_K, d), kQ4_K_dmin = offsetof(BlockQ4_K, dmin),
                 kQ4_K_sc = offsetof(BlockQ4_K, scales), kQ4_K_qs = offsetof(BlockQ4_K, qs);
constexpr size_t kQ5_K_d = offsetof(BlockQ5_K, d), kQ5_K_dmin = offsetof(BlockQ5_K, dmin),
                 kQ5_K_sc = offsetof(BlockQ5_K, scales), kQ5_K_qh = offsetof(BlockQ5_K, qh),
                 kQ5_K_qs = offsetof(BlockQ5_K, qs);
constexpr size_t kQ6_K_ql = offsetof(BlockQ6_K, ql), kQ6_K_qh = offsetof(BlockQ6_K, qh),
                 kQ6_K_sc = offsetof(BlockQ6_K, scales), kQ6_K_d = offsetof(BlockQ6_K, d);
constexpr size_t kQ8_K_d = offsetof(BlockQ8_K, d), kQ8_K_qs = offsetof(BlockQ8_K, qs),
                 kQ8_K_bs = offsetof(BlockQ8_K, bsums);

// Unpacked 4/5-bit values of a legacy block: q[j] for j < 32 (j < 16 from the
// low nibbles of qs, j >= 16 from the high nibbles; 5th bit j of qh).
inline void unpack_nibbles(const uint8_t* qs, uint8_t q[QK]) {
  for (int j = 0; j < QK / 2; ++j) {
    q[j] = qs[j] & 0x0f;
    q[j + QK / 2] = qs[j] >> 4;
  }
}
inline void unpack_5bit(const uint8_t* qs, const uint8_t* qh_bytes, uint8_t q[QK]) {
  const uint32_t qh = ld_u32(qh_bytes);
  unpack_nibbles(qs, q);
  for (int j = 0; j < QK; ++j) q[j] |= uint8_t(((qh >> j) & 1u) << 4);
}

// The 256 4-bit values of a Q4_K/Q5_K super-block in element order: sub-block
// 2c takes the low nibbles of qs[32c..32c+31], sub-block 2c+1 the high ones.
// Q5_K adds bit s of qh[l] as the 5th bit of element 32s+l.
inline void unpack_k_quants(const uint8_t* qs, const uint8_t* qh, uint8_t q[QK_K]) {
  for (int c = 0; c < QK_K / 64; ++c) {
    for (int l = 0; l < 32; ++l) {
      q[64 * c + l] = qs[32 * c + l] & 0x0f;
      q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
    }
  }
  if (qh) {
    for (int s = 0; s < QK_K / 32; ++s)
      for (int l = 0; l < 32; ++l) q[32 * s + l] |= uint8_t(((qh[l] >> s) & 1) << 4);
  }
}

// Q6_K: element 128h + 32k + l (h < 2, k < 4, l < 32) has low 4 bits from
// ql[64h + 32(k&1) + l] (low nibble for k < 2, high for k >= 2) and high 2 bits
// from qh[32h + l] >> 2k. Returned as signed q - 32.
inline void unpack_q6_k(const uint8_t* ql, const uint8_t* qh, int8_t q[QK_K]) {
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 4; ++k) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t lo_byte = ql[64 * h + 32 * (k & 1) + l];
        const int lo = k < 2 ? (lo_byte & 0x0f) : (lo_byte >> 4);
        const int hi = (qh[32 * h + l] >> (2 * k)) & 3;
        q[128 * h + 32 * k + l] = int8_t((lo | (hi << 4)) - 32);
      }
    }
  }
}

}  // namespace

void unpack_k_scale_min(const uint8_t s[12], int j, uint8_t* scale, uint8_t* min) {
  // Bytes 0..3: scales 0..3 (low 6 bits) and the top 2 bits of scales 4..7;
  // bytes 4..7: mins 0..3 and the top 2 bits of mins 4..7; bytes 8..11: the low
  // 4 bits of scales 4..7 (low nibble) and mins 4..7 (high nibble).
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = uint8_t((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
    *min = uint8_t((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

// ---------------------------------------------------------------- dequantize

void dequantize_f32(const void* src, float* dst, int64_t n) {
  std::memcpy(dst, src, size_t(n) * 4);
}

void dequantize_f16(const void* src, float* dst, int64_t n) {
  const uint8_t* p = bytes(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = ld_f16(p + 2 * i);
}

void dequantize_bf16(const void* src, float* dst, int64_t n) {
  const uint8_t* p = bytes(src);
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    dst[i] = bf16_to_f32(h);
  }
}

void dequantize_q4_0(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ4_0), dst += QK) {
    const float d = ld_f16(b + kQ4_0_d);
    uint8_t q[QK];
    unpack_nibbles(b + kQ4_0_qs, q);
    for (int j = 0; j < QK; ++j) dst[j] = float(int(q[j]) - 8) * d;
  }
}

void dequantize_q4_1(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ4_1), dst += QK) {
    const float d = ld_f16(b + kQ4_1_d), m = ld_f16(b + kQ4_1_m);
    uint8_t q[QK];
    unpack_nibbles(b + kQ4_1_qs, q);
    for (int j = 0; j < QK; ++j) dst[j] = float(q[j]) * d + m;
  }
}

void dequantize_q5_0(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ5_0), dst += QK) {
    const float d = ld_f16(b + kQ5_0_d);
    uint8_t q[QK];
    unpack_5bit(b + kQ5_0_qs, b + kQ5_0_qh, q);
    for (int j = 0; j < QK; ++j) dst[j] = float(int(q[j]) - 16) * d;
  }
}

void dequantize_q5_1(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ5_1), dst += QK) {
    const float d = ld_f16(b + kQ5_1_d), m = ld_f16(b + kQ5_1_m);
    uint8_t q[QK];
    unpack_5bit(b + kQ5_1_qs, b + kQ5_1_qh, q);
    for (int j = 0; j < QK; ++j) dst[j] = float(q[j]) * d + m;
  }
}

void dequantize_q8_0(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ8_0), dst += QK) {
    const float d = ld_f16(b + kQ8_0_d);
    const int8_t* q = reinterpret_cast<const int8_t*>(b + kQ8_0_qs);
    for (int j = 0; j < QK; ++j) dst[j] = float(q[j]) * d;
  }
}

void dequantize_q8_1(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ8_1), dst += QK) {
    const float d = ld_f16(b + kQ8_1_d);
    const int8_t* q = reinterpret_cast<const int8_t*>(b + kQ8_1_qs);
    for (int j = 0; j < QK; ++j) dst[j] = float(q[j]) * d;
  }
}

void dequantize_q4_k(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK_K; ++i, b += sizeof(BlockQ4_K), dst += QK_K) {
    const float d = ld_f16(b + kQ4_K_d), dmin = ld_f16(b + kQ4_K_dmin);
    uint8_t q[QK_K];
    unpack_k_quants(b + kQ4_K_qs, nullptr, q);
    for (int s = 0; s < QK_K / 32; ++s) {
      uint8_t sc, m;
      unpack_k_scale_min(b + kQ4_K_sc, s, &sc, &m);
      const float d1 = d * float(sc), m1 = dmin * float(m);
      for (int l = 0; l < 32; ++l) dst[32 * s + l] = d1 * float(q[32 * s + l]) - m1;
    }
  }
}

void dequantize_q5_k(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK_K; ++i, b += sizeof(BlockQ5_K), dst += QK_K) {
    const float d = ld_f16(b + kQ5_K_d), dmin = ld_f16(b + kQ5_K_dmin);
    uint8_t q[QK_K];
    unpack_k_quants(b + kQ5_K_qs, b + kQ5_K_qh, q);
    for (int s = 0; s < QK_K / 32; ++s) {
      uint8_t sc, m;
      unpack_k_scale_min(b + kQ5_K_sc, s, &sc, &m);
      const float d1 = d * float(sc), m1 = dmin * float(m);
      for (int l = 0; l < 32; ++l) dst[32 * s + l] = d1 * float(q[32 * s + l]) - m1;
    }
  }
}

void dequantize_q6_k(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK_K; ++i, b += sizeof(BlockQ6_K), dst += QK_K) {
    const float d = ld_f16(b + kQ6_K_d);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + kQ6_K_sc);
    int8_t q[QK_K];
    unpack_q6_k(b + kQ6_K_ql, b + kQ6_K_qh, q);
    for (int g = 0; g < QK_K / 16; ++g) {
      const float dg = d * float(sc[g]);
      for (int l = 0; l < 16; ++l) dst[16 * g + l] = dg * float(q[16 * g + l]);
    }
  }
}

void dequantize_q8_k(const void* src, float* dst, int64_t n) {
  const uint8_t* b = bytes(src);
  for (int64_t i = 0; i < n / QK_K; ++i, b += sizeof(BlockQ8_K), dst += QK_K) {
    const float d = ld_f32(b + kQ8_K_d);
    const int8_t* q = reinterpret_cast<const int8_t*>(b + kQ8_K_qs);
    for (int j = 0; j < QK_K; ++j) dst[j] = d * float(q[j]);
  }
}

// ------------------------------------------------------------------ quantize

void quantize_f32(const float* src, void* dst, int64_t n) {
  std::memcpy(dst, src, size_t(n) * 4);
}

void quantize_f16(const float* src, void* dst, int64_t n) {
  uint8_t* p = bytes(dst);
  for (int64_t i = 0; i < n; ++i) st_f16(p + 2 * i, src[i]);
}

void quantize_bf16(const float* src, void* dst, int64_t n) {
  uint8_t* p = bytes(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = f32_to_bf16(src[i]);
    std::memcpy(p + 2 * i, &h, 2);
  }
}

void quantize_q8_0(const float* x, void* dst, int64_t n) {
  uint8_t* b = bytes(dst);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ8_0), x += QK) {
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    st_f16(b + kQ8_0_d, d);
    int8_t* q = reinterpret_cast<int8_t*>(b + kQ8_0_qs);
    for (int j = 0; j < QK; ++j) q[j] = int8_t(round_away(x[j] * id));
  }
}

void quantize_q8_1(const float* x, void* dst, int64_t n) {
  uint8_t* b = bytes(dst);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ8_1), x += QK) {
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    st_f16(b + kQ8_1_d, d);
    int8_t* q = reinterpret_cast<int8_t*>(b + kQ8_1_qs);
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      q[j] = int8_t(round_away(x[j] * id));
      sum += q[j];
    }
    // With the unrounded d, as the reference does (s is then rounded to fp16 once).
    st_f16(b + kQ8_1_s, float(sum) * d);
  }
}

void quantize_q8_k(const float* x, void* dst, int64_t n) {
  uint8_t* b = bytes(dst);
  for (int64_t i = 0; i < n / QK_K; ++i, b += sizeof(BlockQ8_K), x += QK_K) {
    float max, amax;
    signed_absmax(x, QK_K, &max, &amax);
    int8_t* q = reinterpret_cast<int8_t*>(b + kQ8_K_qs);
    int16_t bsums[QK_K / 16] = {};
    float d = 0.0f;
    if (amax == 0.0f) {
      std::memset(q, 0, QK_K);
    } else {
      // Scaling by -127/max maps the extreme element to exactly -127, so every
      // q fits [-127, 127] (the clamp only guards rounding at the top).
      const float iscale = -127.0f / max;
      for (int j = 0; j < QK_K; ++j) {
        const int v = round_even(iscale * x[j]);
        q[j] = int8_t(v < 127 ? v : 127);
      }
      for (int g = 0; g < QK_K / 16; ++g) {
        int s = 0;
        for (int l = 0; l < 16; ++l) s += q[16 * g + l];
        bsums[g] = int16_t(s);
      }
      d = 1.0f / iscale;
    }
    std::memcpy(b + kQ8_K_d, &d, 4);
    std::memcpy(b + kQ8_K_bs, bsums, sizeof(bsums));
  }
}

void quantize_q4_0(const float* x, void* dst, int64_t n) {
  uint8_t* b = bytes(dst);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ4_0), x += QK) {
    float max, amax;
    signed_absmax(x, QK, &max, &amax);
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    st_f16(b + kQ4_0_d, d);
    for (int j = 0; j < QK / 2; ++j) {
      const float x0 = x[j] * id, x1 = x[j + QK / 2] * id;
      const int q0 = std::min(15, int(x0 + 8.5f)), q1 = std::min(15, int(x1 + 8.5f));
      b[kQ4_0_qs + j] = uint8_t(q0 | (q1 << 4));
    }
  }
}

void quantize_q4_1(const float* x, void* dst, int64_t n) {
  uint8_t* b = bytes(dst);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ4_1), x += QK) {
    float mn, mx;
    min_max(x, QK, &mn, &mx);
    const float d = (mx - mn) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    st_f16(b + kQ4_1_d, d);
    st_f16(b + kQ4_1_m, mn);
    for (int j = 0; j < QK / 2; ++j) {
      const float x0 = (x[j] - mn) * id, x1 = (x[j + QK / 2] - mn) * id;
      const int q0 = std::min(15, int(x0 + 0.5f)), q1 = std::min(15, int(x1 + 0.5f));
      b[kQ4_1_qs + j] = uint8_t(q0 | (q1 << 4));
    }
  }
}

namespace {
void store_5bit(const int q[QK], uint8_t* qs, uint8_t* qh_bytes) {
  uint32_t qh = 0;
  for (int j = 0; j < QK / 2; ++j) qs[j] = uint8_t((q[j] & 0x0f) | ((q[j + QK / 2] & 0x0f) << 4));
  for (int j = 0; j < QK; ++j) qh |= uint32_t((q[j] >> 4) & 1) << j;
  std::memcpy(qh_bytes, &qh, 4);
}
}  // namespace

void quantize_q5_0(const float* x, void* dst, int64_t n) {
  uint8_t* b = bytes(dst);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ5_0), x += QK) {
    float max, amax;
    signed_absmax(x, QK, &max, &amax);
    const float d = max / -16.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    st_f16(b + kQ5_0_d, d);
    int q[QK];
    for (int j = 0; j < QK; ++j) q[j] = std::min(31, int(x[j] * id + 16.5f));
    store_5bit(q, b + kQ5_0_qs, b + kQ5_0_qh);
  }
}

void quantize_q5_1(const float* x, void* dst, int64_t n) {
  uint8_t* b = bytes(dst);
  for (int64_t i = 0; i < n / QK; ++i, b += sizeof(BlockQ5_1), x += QK) {
    float mn, mx;
    min_max(x, QK, &mn, &mx);
    const float d = (mx - mn) / 31.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    st_f16(b + kQ5_1_d, d);
    st_f16(b + kQ5_1_m, mn);
    int q[QK];
    for (int j = 0; j < QK; ++j) q[j] = std::min(31, int((x[j] - mn) * id + 0.5f));
    store_5bit(q, b + kQ5_1_qs, b + kQ5_1_qh);
  }
}

// -------------------------------------------------------------- dot products

float vec_dot_f32_f32(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);  // weight bytes: any alignment
  const float* y = static_cast<const float*>(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += double(ld_f32(x + 4 * i)) * double(y[i]);
  return float(acc);
}

float vec_dot_f16_f32(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const float* y = static_cast<const float*>(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += double(ld_f16(x + 2 * i)) * double(y[i]);
  return float(acc);
}

float vec_dot_bf16_f32(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const float* y = static_cast<const float*>(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, x + 2 * i, 2);
    acc += double(bf16_to_f32(h)) * double(y[i]);
  }
  return float(acc);
}

float vec_dot_q4_0_q8_0(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const uint8_t* y = bytes(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n / QK; ++i, x += sizeof(BlockQ4_0), y += sizeof(BlockQ8_0)) {
    uint8_t q[QK];
    unpack_nibbles(x + kQ4_0_qs, q);
    const int8_t* qa = reinterpret_cast<const int8_t*>(y + kQ8_0_qs);
    int sumi = 0;
    for (int j = 0; j < QK; ++j) sumi += (int(q[j]) - 8) * qa[j];
    acc += double(float(sumi) * (ld_f16(x + kQ4_0_d) * ld_f16(y + kQ8_0_d)));
  }
  return float(acc);
}

float vec_dot_q4_1_q8_1(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const uint8_t* y = bytes(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n / QK; ++i, x += sizeof(BlockQ4_1), y += sizeof(BlockQ8_1)) {
    uint8_t q[QK];
    unpack_nibbles(x + kQ4_1_qs, q);
    const int8_t* qa = reinterpret_cast<const int8_t*>(y + kQ8_1_qs);
    int sumi = 0;
    for (int j = 0; j < QK; ++j) sumi += int(q[j]) * qa[j];
    // sum_j (d q_j + m) da qa_j = d da sumi + m (da sum qa) = d da sumi + m s
    acc += double(float(sumi) * (ld_f16(x + kQ4_1_d) * ld_f16(y + kQ8_1_d)) +
                  ld_f16(x + kQ4_1_m) * ld_f16(y + kQ8_1_s));
  }
  return float(acc);
}

float vec_dot_q5_0_q8_0(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const uint8_t* y = bytes(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n / QK; ++i, x += sizeof(BlockQ5_0), y += sizeof(BlockQ8_0)) {
    uint8_t q[QK];
    unpack_5bit(x + kQ5_0_qs, x + kQ5_0_qh, q);
    const int8_t* qa = reinterpret_cast<const int8_t*>(y + kQ8_0_qs);
    int sumi = 0;
    for (int j = 0; j < QK; ++j) sumi += (int(q[j]) - 16) * qa[j];
    acc += double(float(sumi) * (ld_f16(x + kQ5_0_d) * ld_f16(y + kQ8_0_d)));
  }
  return float(acc);
}

float vec_dot_q5_1_q8_1(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const uint8_t* y = bytes(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n / QK; ++i, x += sizeof(BlockQ5_1), y += sizeof(BlockQ8_1)) {
    uint8_t q[QK];
    unpack_5bit(x + kQ5_1_qs, x + kQ5_1_qh, q);
    const int8_t* qa = reinterpret_cast<const int8_t*>(y + kQ8_1_qs);
    int sumi = 0;
    for (int j = 0; j < QK; ++j) sumi += int(q[j]) * qa[j];
    acc += double(float(sumi) * (ld_f16(x + kQ5_1_d) * ld_f16(y + kQ8_1_d)) +
                  ld_f16(x + kQ5_1_m) * ld_f16(y + kQ8_1_s));
  }
  return float(acc);
}

float vec_dot_q8_0_q8_0(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const uint8_t* y = bytes(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n / QK; ++i, x += sizeof(BlockQ8_0), y += sizeof(BlockQ8_0)) {
    const int8_t* qw = reinterpret_cast<const int8_t*>(x + kQ8_0_qs);
    const int8_t* qa = reinterpret_cast<const int8_t*>(y + kQ8_0_qs);
    int sumi = 0;
    for (int j = 0; j < QK; ++j) sumi += qw[j] * qa[j];
    acc += double(float(sumi) * (ld_f16(x + kQ8_0_d) * ld_f16(y + kQ8_0_d)));
  }
  return float(acc);
}

namespace {
// Shared by Q4_K and Q5_K: q holds the unsigned values, the min term uses bsums.
double dot_k_scale_min(const uint8_t* blk, size_t off_d, size_t off_dmin, size_t off_sc,
                       const uint8_t q[QK_K], const uint8_t* y) {
  const int8_t* qa = reinterpret_cast<const int8_t*>(y + kQ8_K_qs);
  const float da = ld_f32(y + kQ8_K_d);
  int sumi = 0, summ = 0;  // |sumi| < 8*63*32*31*127 < 2^31
  for (int s = 0; s < QK_K / 32; ++s) {
    uint8_t sc, m;
    unpack_k_scale_min(blk + off_sc, s, &sc, &m);
    int dot = 0;
    for (int l = 0; l < 32; ++l) dot += int(q[32 * s + l]) * qa[32 * s + l];
    sumi += int(sc) * dot;
    summ += int(m) * (ld_i16(y + kQ8_K_bs + 2 * (2 * s)) + ld_i16(y + kQ8_K_bs + 2 * (2 * s + 1)));
  }
  const float d = da * ld_f16(blk + off_d), dmin = da * ld_f16(blk + off_dmin);
  // sum_j (d sc q_j - dmin m) da qa_j = d*da*sum(sc*dot) - dmin*da*sum(m*bsum)
  return double(d * float(sumi) - dmin * float(summ));
}
}  // namespace

float vec_dot_q4_k_q8_k(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const uint8_t* y = bytes(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n / QK_K; ++i, x += sizeof(BlockQ4_K), y += sizeof(BlockQ8_K)) {
    uint8_t q[QK_K];
    unpack_k_quants(x + kQ4_K_qs, nullptr, q);
    acc += dot_k_scale_min(x, kQ4_K_d, kQ4_K_dmin, kQ4_K_sc, q, y);
  }
  return float(acc);
}

float vec_dot_q5_k_q8_k(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const uint8_t* y = bytes(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n / QK_K; ++i, x += sizeof(BlockQ5_K), y += sizeof(BlockQ8_K)) {
    uint8_t q[QK_K];
    unpack_k_quants(x + kQ5_K_qs, x + kQ5_K_qh, q);
    acc += dot_k_scale_min(x, kQ5_K_d, kQ5_K_dmin, kQ5_K_sc, q, y);
  }
  return float(acc);
}

float vec_dot_q6_k_q8_k(int64_t n, const void* w, const void* a) {
  const uint8_t* x = bytes(w);
  const uint8_t* y = bytes(a);
  double acc = 0.0;
  for (int64_t i = 0; i < n / QK_K; ++i, x += sizeof(BlockQ6_K), y += sizeof(BlockQ8_K)) {
    int8_t q[QK_K];
    unpack_q6_k(x + kQ6_K_ql, x + kQ6_K_qh, q);
    const int8_t* sc = reinterpret_cast<const int8_t*>(x + kQ6_K_sc);
    const int8_t* qa = reinterpret_cast<const int8_t*>(y + kQ8_K_qs);
    int sumi = 0;  // |sumi| <= 16*128*16*32*127 < 2^31
    for (int g = 0; g < QK_K / 16; ++g) {
      int dot = 0;
      for (int l = 0; l < 16; ++l) dot += int(q[16 * g + l]) * qa[16 * g + l];
      sumi += int(sc[g]) * dot;
    }
    const float d = ld_f16(x + kQ6_K_d) * ld_f32(y + kQ8_K_d);
    acc += double(d * float(sumi));
  }
  return float(acc);
}

}  // namespace kvq::ref

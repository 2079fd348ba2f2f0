#include "kernels/cpu/rope.h"

#include <cmath>

#include "base/error.h"

namespace kvq {

Rope::Rope(const RopeSpec& spec) : spec_(spec) {
  if (spec.n_rot <= 0 || spec.n_rot % 2 != 0 || spec.n_rot > spec.head_dim)
    fail("rope: dimension count {} is not an even number in 1..{}", spec.n_rot, spec.head_dim);
  if (!(spec.freq_base > 0)) fail("rope: frequency base {} must be positive", spec.freq_base);
  const int half = spec.n_rot / 2;
  if (!spec.freq_factors.empty() && int(spec.freq_factors.size()) != half)
    fail("rope: {} frequency factors given, expected {}", spec.freq_factors.size(), half);
  inv_freq_.resize(half);
  for (int i = 0; i < half; ++i) {
    double f = std::pow(double(spec.freq_base), -2.0 * i / spec.n_rot);
    if (!spec.freq_factors.empty()) f /= spec.freq_factors[i];
    inv_freq_[i] = f;
  }
}

void Rope::angles(int64_t pos, float* cos_out, float* sin_out) const {
  const double p = double(pos) * spec_.freq_scale;
  for (size_t i = 0; i < inv_freq_.size(); ++i) {
    const double theta = p * inv_freq_[i];
    cos_out[i] = float(std::cos(theta));
    sin_out[i] = float(std::sin(theta));
  }
}

void Rope::rotate(float* x, const float* c, const float* s) const {
  const int half = spec_.n_rot / 2;
  if (spec_.neox) {
    for (int i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * c[i] - b * s[i];
      x[i + half] = a * s[i] + b * c[i];
    }
  } else {
    for (int i = 0; i < half; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      x[2 * i] = a * c[i] - b * s[i];
      x[2 * i + 1] = a * s[i] + b * c[i];
    }
  }
}

void Rope::apply(float* x, int n_heads, int64_t pos) const {
  const int half = spec_.n_rot / 2;
  float c[512], s[512];
  KVQ_ASSERT(half <= 512);
  angles(pos, c, s);
  for (int h = 0; h < n_heads; ++h) rotate(x + int64_t(h) * spec_.head_dim, c, s);
}

}  // namespace kvq

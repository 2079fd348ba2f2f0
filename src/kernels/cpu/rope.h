// Rotary position embedding. Two pairings exist in GGUF models: "normal"
// (dims 2i and 2i+1 rotate together; llama-architecture GGUFs, whose Q/K weights
// were permuted at conversion) and "neox" (dims i and i + n_rot/2).
// Only the first n_rot dims of each head rotate; the rest pass through.
#pragma once
#include <cstdint>
#include <vector>

namespace kvq {

struct RopeSpec {
  int head_dim = 0;
  int n_rot = 0;                 // rotated dims per head (even, <= head_dim)
  float freq_base = 10000.0f;
  float freq_scale = 1.0f;       // linear scaling: position * freq_scale
  bool neox = false;
  std::vector<float> freq_factors;  // optional per-pair divisors (n_rot/2), e.g. Llama 3.1
};

// Precomputed inverse frequencies; rotates vectors in place.
class Rope {
 public:
  Rope() = default;
  explicit Rope(const RopeSpec& spec);
  const RopeSpec& spec() const { return spec_; }

  // x: n_heads vectors of head_dim floats, all at position `pos`.
  void apply(float* x, int n_heads, int64_t pos) const;
  // cos/sin of each pair at `pos` (n_rot/2 each), for callers that fuse RoPE.
  void angles(int64_t pos, float* cos_out, float* sin_out) const;
  // Rotates one head vector with precomputed angles.
  void rotate(float* x, const float* cos_v, const float* sin_v) const;

 private:
  RopeSpec spec_;
  std::vector<double> inv_freq_;  // n_rot/2
};

}  // namespace kvq

// logits -> token: greedy, or temperature + top-k + top-p with a seeded RNG.
#include <algorithm>
#include <cmath>

#include "base/error.h"
#include "kvq/kvq.h"

namespace kvq {

namespace {
uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

Sampler::Sampler(const SamplerParams& params) : params_(params), state_(params.seed) {
  if (!(params.temperature >= 0) || !std::isfinite(params.temperature))
    fail("temperature {} must be a finite number >= 0", params.temperature);
  if (!(params.top_p > 0 && params.top_p <= 1)) fail("top-p {} must be in (0, 1]", params.top_p);
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (logits.empty()) fail("sampler: empty logits");
  if (params_.temperature <= 0) {
    return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  scratch_.resize(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) scratch_[i] = {logits[i], int32_t(i)};
  size_t n = scratch_.size();
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  if (params_.top_k > 0 && size_t(params_.top_k) < n) {
    std::partial_sort(scratch_.begin(), scratch_.begin() + params_.top_k, scratch_.end(), by_logit);
    n = size_t(params_.top_k);
  } else {
    std::sort(scratch_.begin(), scratch_.end(), by_logit);
  }
  // Softmax at temperature over the kept candidates (sorted, largest first).
  const double mx = scratch_[0].first;
  std::vector<double> p(n);
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += (p[i] = std::exp((scratch_[i].first - mx) / params_.temperature));
  if (params_.top_p < 1) {
    double cum = 0;
    size_t keep = n;
    for (size_t i = 0; i < n; ++i) {
      cum += p[i] / sum;
      if (cum >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
    sum = 0;
    for (size_t i = 0; i < n; ++i) sum += p[i];
  }
  const double u = double(splitmix64(state_) >> 11) * 0x1.0p-53 * sum;
  double cum = 0;
  for (size_t i = 0; i < n; ++i) {
    cum += p[i];
    if (u < cum) return scratch_[i].second;
  }
  return scratch_[n - 1].second;
}

}  // namespace kvq

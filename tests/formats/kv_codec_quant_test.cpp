// KvScheme::quant codecs (intN, intN-ch[-post], nuqN, *-1%): every table row
// against an independent reference written element by element from the spec
// in docs/formats.md (decoded tiles must match bit for bit), error bounds per
// bit width on normal and heavy-tailed data, outlier extraction with planted
// outliers, page layout sizes, and bad calibration / non-finite input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "base/fp16.h"
#include "formats/kv_format.h"
#include "kvq/error.h"

namespace kvq {
namespace {

using Rows = std::vector<std::vector<float>>;

float fp16_round(float x) { return fp16_to_f32(f32_to_fp16(x)); }

std::vector<float> uniform_table(int bits) {
  const int n = 1 << bits;
  std::vector<float> l(static_cast<size_t>(n));
  for (int c = 0; c < n; ++c) l[size_t(c)] = float(-1.0 + 2.0 * c / (n - 1));
  return l;
}

// The spec, element by element: one token row -> its decoded row (all heads).
struct Reference {
  Reference(const KvFormat& f, KvRole role, const KvGeometry& g, const KvTensorCalibration* cal)
      : g(g), bits(f.bits), k(kv_outliers_per_tail(f.outlier_fraction, g.row())) {
    per_channel = role == KvRole::key && f.key_scaling == KvKeyScaling::per_channel;
    L = f.levels == KvLevels::codebook ? cal->codebook : uniform_table(f.bits);
    if (per_channel)
      for (int c = 0; c < g.row(); ++c) {
        zp_c.push_back((cal->upper[size_t(c)] + cal->lower[size_t(c)]) / 2);
        r_c.push_back((cal->upper[size_t(c)] - cal->lower[size_t(c)]) / 2);
      }
  }

  static float unit(float x, float zp, float r) {
    if (!(r > 0) || !std::isfinite(r)) return 0.0f;
    return (x - zp) / r;
  }
  // Nearest level, ties to the lower index, NaN -> 0, by plain search in double.
  int nearest(float u) const {
    if (std::isnan(u)) return 0;
    if (std::isinf(u)) return u > 0 ? int(L.size()) - 1 : 0;
    int best = 0;
    double best_dist = std::fabs(double(u) - L[0]);
    for (size_t c = 1; c < L.size(); ++c) {
      const double dist = std::fabs(double(u) - L[c]);
      if (dist < best_dist) best = int(c), best_dist = dist;
    }
    return best;
  }

  // Per-token scale and outliers of the last decode_row call (for inspection).
  float zp_tok = 0, r_tok = 0;
  std::vector<int> high, low;

  std::vector<float> decode_row(const std::vector<float>& x) {
    const int n = g.row();
    std::vector<float> zp(static_cast<size_t>(n)), r(static_cast<size_t>(n));
    high.clear();
    low.clear();
    using Cand = std::pair<float, int>;  // (rank key, index)
    auto best_first = [](const Cand& a, const Cand& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
    if (per_channel) {
      std::vector<Cand> hi, lo;
      for (int c = 0; c < n; ++c) {
        zp[size_t(c)] = zp_c[size_t(c)];
        r[size_t(c)] = r_c[size_t(c)];
        const float u = unit(x[size_t(c)], zp[size_t(c)], r[size_t(c)]);
        if (u > 1) hi.push_back({u, c});
        if (u < -1) lo.push_back({-u, c});
      }
      std::sort(hi.begin(), hi.end(), best_first);
      std::sort(lo.begin(), lo.end(), best_first);
      for (int t = 0; t < k && t < int(hi.size()); ++t) high.push_back(hi[size_t(t)].second);
      for (int t = 0; t < k && t < int(lo.size()); ++t) low.push_back(lo[size_t(t)].second);
    } else {
      std::vector<Cand> by_value;
      for (int c = 0; c < n; ++c)
        if (!std::isnan(x[size_t(c)])) by_value.push_back({x[size_t(c)], c});
      std::sort(by_value.begin(), by_value.end(), best_first);
      for (int t = 0; t < k && t < int(by_value.size()); ++t) high.push_back(by_value[size_t(t)].second);
      std::vector<Cand> rest;  // the others, by value negated: smallest first
      for (const Cand& cd : by_value)
        if (std::find(high.begin(), high.end(), cd.second) == high.end()) rest.push_back({-cd.first, cd.second});
      std::sort(rest.begin(), rest.end(), best_first);
      for (int t = 0; t < k && t < int(rest.size()); ++t) low.push_back(rest[size_t(t)].second);
      double mn = 0, mx = 0;
      bool any = false;
      for (int c = 0; c < n; ++c) {
        const bool outlier = std::count(high.begin(), high.end(), c) || std::count(low.begin(), low.end(), c);
        if (outlier || std::isnan(x[size_t(c)])) continue;
        if (!any) mn = mx = x[size_t(c)], any = true;
        mn = std::min<double>(mn, x[size_t(c)]);
        mx = std::max<double>(mx, x[size_t(c)]);
      }
      zp_tok = fp16_round((float(mx) + float(mn)) / 2);
      r_tok = fp16_round((float(mx) - float(mn)) / 2);
      std::fill(zp.begin(), zp.end(), zp_tok);
      std::fill(r.begin(), r.end(), r_tok);
    }
    std::vector<float> dense(static_cast<size_t>(n));
    for (int c = 0; c < n; ++c)
      dense[size_t(c)] = zp[size_t(c)] + r[size_t(c)] * L[size_t(nearest(unit(x[size_t(c)], zp[size_t(c)], r[size_t(c)])))];
    std::vector<float> out = dense;
    // 2k slots: high tail then low tail, unused ones (0 residual, index 0).
    for (const auto* tail : {&high, &low})
      for (int t = 0; t < k; ++t) {
        if (t < int(tail->size())) {
          const int c = (*tail)[size_t(t)];
          out[size_t(c)] += fp16_round(x[size_t(c)] - dense[size_t(c)]);
        } else {
          out[0] += 0.0f;
        }
      }
    return out;
  }

  KvGeometry g;
  int bits, k;
  bool per_channel = false;
  std::vector<float> L, zp_c, r_c;
};

// Channel structure like real keys: per-channel offset and scale, optionally
// Student-t tails and a few channels 20x larger.
Rows make_rows(std::mt19937& rng, const KvGeometry& g, int n, bool heavy) {
  const int row = g.row();
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::student_t_distribution<float> td(3.0f);
  std::vector<float> mu(static_cast<size_t>(row)), sc(static_cast<size_t>(row));
  for (int c = 0; c < row; ++c) {
    mu[size_t(c)] = 0.5f * nd(rng);
    sc[size_t(c)] = std::exp(0.4f * nd(rng));
  }
  if (heavy)
    for (int i = 0; i < 3; ++i) sc[size_t(rng() % unsigned(row))] *= 20.0f;
  Rows rows(static_cast<size_t>(n), std::vector<float>(static_cast<size_t>(row)));
  for (auto& r : rows)
    for (int c = 0; c < row; ++c) r[size_t(c)] = mu[size_t(c)] + sc[size_t(c)] * (heavy ? td(rng) : nd(rng));
  return rows;
}

// Calibration the way a calibrate step would make it: per-channel min/max of a
// sample (shrunk toward the centre so that some elements fall outside), and a
// codebook (the uniform levels, or random sorted values in [-1, 1]).
KvTensorCalibration make_calibration(const KvFormat& f, const Rows& sample, std::mt19937& rng, float shrink,
                                     bool random_codebook) {
  KvTensorCalibration cal;
  const size_t row = sample[0].size();
  cal.lower.assign(row, INFINITY);
  cal.upper.assign(row, -INFINITY);
  for (const auto& r : sample)
    for (size_t c = 0; c < row; ++c) {
      cal.lower[c] = std::min(cal.lower[c], r[c]);
      cal.upper[c] = std::max(cal.upper[c], r[c]);
    }
  for (size_t c = 0; c < row; ++c) {
    const float mid = (cal.lower[c] + cal.upper[c]) / 2, half = (cal.upper[c] - cal.lower[c]) / 2 * shrink;
    cal.lower[c] = mid - half;
    cal.upper[c] = mid + half;
  }
  if (f.levels == KvLevels::codebook) {
    if (random_codebook) {
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      cal.codebook.resize(size_t(1) << f.bits);
      for (auto& v : cal.codebook) v = u(rng);
      std::sort(cal.codebook.begin(), cal.codebook.end());
    } else {
      cal.codebook = uniform_table(f.bits);
    }
  }
  return cal;
}

std::vector<const KvFormat*> quant_formats() {
  std::vector<const KvFormat*> out;
  for (const KvFormat& f : kv_format_table())
    if (f.scheme == KvScheme::quant) out.push_back(&f);
  return out;
}

const KvGeometry kGeometries[] = {{1, 64}, {3, 64}, {2, 80}, {4, 128}, {1, 40}};

// Encodes rows into slots 0..n-1 of a page and decodes every head: decoded[j][c].
Rows encode_decode(const KvCodec& codec, KvRole role, const KvGeometry& g, const Rows& rows) {
  const int n = int(rows.size());
  std::vector<uint8_t> page(codec.page_bytes(), 0);
  for (int j = 0; j < n; ++j) codec.encode(rows[size_t(j)].data(), j, page.data());
  Rows out(size_t(n), std::vector<float>(size_t(g.row())));
  std::vector<float> tile(size_t(g.head_dim) * kKvPageTokens);
  for (int h = 0; h < g.n_kv_heads; ++h) {
    codec.decode(page.data(), h, n, tile.data());
    for (int j = 0; j < n; ++j)
      for (int d = 0; d < g.head_dim; ++d)
        out[size_t(j)][size_t(h * g.head_dim + d)] =
            role == KvRole::key ? tile[size_t(d) * kKvPageTokens + size_t(j)] : tile[size_t(j) * g.head_dim + size_t(d)];
  }
  return out;
}

std::string trace(const KvFormat& f, KvRole role, const KvGeometry& g) {
  return std::string(f.name) + (role == KvRole::key ? " keys" : " values") + " H=" + std::to_string(g.n_kv_heads) +
         " D=" + std::to_string(g.head_dim);
}

TEST(KvCodecQuant, MatchesReferenceBitForBit) {
  std::mt19937 rng(21);
  for (const KvFormat* f : quant_formats())
    for (KvRole role : {KvRole::key, KvRole::value})
      for (const KvGeometry& g : kGeometries)
        for (bool heavy : {false, true}) {
          SCOPED_TRACE(trace(*f, role, g) + (heavy ? " heavy" : " normal"));
          const int n = heavy ? 45 : kKvPageTokens;  // partial pages too
          const Rows rows = make_rows(rng, g, n, heavy);
          const KvTensorCalibration cal = make_calibration(*f, rows, rng, heavy ? 0.5f : 0.9f, heavy);
          const auto codec = make_kv_codec(*f, role, g, &cal);
          const Rows got = encode_decode(*codec, role, g, rows);
          Reference ref(*f, role, g, &cal);
          for (int j = 0; j < n; ++j) {
            const std::vector<float> want = ref.decode_row(rows[size_t(j)]);
            for (int c = 0; c < g.row(); ++c)
              ASSERT_EQ(f32_to_bits(got[size_t(j)][size_t(c)]), f32_to_bits(want[size_t(c)]))
                  << "slot " << j << " channel " << c << " x=" << rows[size_t(j)][size_t(c)] << " got "
                  << got[size_t(j)][size_t(c)] << " want " << want[size_t(c)];
          }
        }
}

// Error bounds straight from the definitions, independent of the reference:
// uniform levels: |x - x^| <= r / (2^b - 1) (half a step) plus fp16/f32 slack
// for elements inside [zp - r, zp + r]; codebook: x^ is the value of the
// nearest centroid; outliers: x within fp16 rounding of the residual.
TEST(KvCodecQuant, ErrorBoundsPerBitWidth) {
  std::mt19937 rng(22);
  for (const KvFormat* f : quant_formats())
    for (KvRole role : {KvRole::key, KvRole::value})
      for (const KvGeometry& g : kGeometries)
        for (bool heavy : {false, true}) {
          SCOPED_TRACE(trace(*f, role, g) + (heavy ? " heavy" : " normal"));
          const Rows rows = make_rows(rng, g, kKvPageTokens, heavy);
          const KvTensorCalibration cal = make_calibration(*f, rows, rng, 0.8f, true);
          const auto codec = make_kv_codec(*f, role, g, &cal);
          const Rows got = encode_decode(*codec, role, g, rows);
          Reference ref(*f, role, g, &cal);  // only for the scales and outlier sets
          const std::vector<float> L = f->levels == KvLevels::codebook ? cal.codebook : uniform_table(f->bits);
          int n_outliers = 0;
          for (int j = 0; j < kKvPageTokens; ++j) {
            ref.decode_row(rows[size_t(j)]);
            for (int c = 0; c < g.row(); ++c) {
              const float x = rows[size_t(j)][size_t(c)], y = got[size_t(j)][size_t(c)];
              float zp = ref.zp_tok, r = ref.r_tok;
              if (ref.per_channel) zp = ref.zp_c[size_t(c)], r = ref.r_c[size_t(c)];
              const bool outlier = std::count(ref.high.begin(), ref.high.end(), c) || std::count(ref.low.begin(), ref.low.end(), c);
              const double slack = 4e-7 * (std::fabs(x) + std::fabs(zp) + std::fabs(r));
              if (outlier) {
                ++n_outliers;
                // Residual = x - dense, at most |x| + |zp| + |r| (dense lies in [zp - r, zp + r]).
                ASSERT_LE(std::fabs(double(x) - y), std::ldexp(std::fabs(x) + std::fabs(zp) + r, -11) + slack) << c;
                continue;
              }
              if (!(r > 0)) continue;
              const double u = (double(x) - zp) / r;
              if (f->levels == KvLevels::uniform) {
                if (std::fabs(u) > 1.0) continue;  // clipped: no bound beyond the range
                ASSERT_LE(std::fabs(double(x) - y), double(r) / ((1 << f->bits) - 1) + slack)
                    << "slot " << j << " channel " << c << " x=" << x << " zp=" << zp << " r=" << r;
              } else {
                // The decoded value is zp + r * (the centroid nearest to u).
                double best = 1e300;
                for (float l : L) best = std::min(best, std::fabs(u - l));
                const double dist = std::fabs((double(y) - zp) / r - u);
                ASSERT_LE(dist, best + 1e-5) << "not the nearest centroid: slot " << j << " channel " << c;
              }
            }
          }
          if (f->outlier_fraction > 0 && (role == KvRole::value || heavy)) {
            EXPECT_GT(n_outliers, 0);
          }
        }
}

TEST(KvCodecQuant, PageLayoutSizes) {
  for (const KvFormat* f : quant_formats())
    for (KvRole role : {KvRole::key, KvRole::value})
      for (KvGeometry g : {KvGeometry{3, 64}, KvGeometry{2, 80}, KvGeometry{8, 128}, KvGeometry{1, 40}}) {
        SCOPED_TRACE(trace(*f, role, g));
        const auto codec = make_kv_codec(*f, role, g, nullptr, /*for_accounting=*/true);
        const KvPageBytes p = codec->page_layout();
        const uint64_t H = uint64_t(g.n_kv_heads), D = uint64_t(g.head_dim), row = H * D, b = uint64_t(f->bits);
        const bool per_channel = role == KvRole::key && f->key_scaling == KvKeyScaling::per_channel;
        if (role == KvRole::key) EXPECT_EQ(p.codes, row * 8 * b);
        else EXPECT_EQ(p.codes, H * 64 * ((D * b + 7) / 8));
        EXPECT_EQ(p.scales, per_channel ? 0u : 64u * 4);
        const uint64_t k = f->outlier_fraction > 0 ? uint64_t(std::ceil(f->outlier_fraction / 2 * double(row) - 1e-9)) : 0;
        EXPECT_EQ(p.outliers, 64 * 2 * k * (2 + (row <= 256 ? 1 : 2)));
        // Bounds, codebook, and for codes of <= 4 bits the decoders' lookup planes
        // (64 bytes for L, 64 per channel for per-channel keys).
        const uint64_t planes = b <= 4 ? 64 * (1 + (per_channel ? row : 0)) : 0;
        EXPECT_EQ(codec->fixed_bytes(),
                  (per_channel ? row * 8 : 0) + (f->levels == KvLevels::codebook ? (uint64_t(1) << b) * 4 : 0) + planes);
      }
}

// Reads the fp16 zero-point and range a value page stores for `slot`.
std::pair<float, float> stored_scale(const KvCodec& codec, const std::vector<uint8_t>& page, int slot) {
  uint16_t zp, r;
  const size_t at = size_t(codec.page_layout().codes) + size_t(slot) * 4;
  std::memcpy(&zp, page.data() + at, 2);
  std::memcpy(&r, page.data() + at + 2, 2);
  return {fp16_to_f32(zp), fp16_to_f32(r)};
}

TEST(KvCodecQuant, ValueOutliersArePlantedOnesAndTrimmedScaleIgnoresThem) {
  const KvFormat& f = kv_format("nuq4-1%");
  for (KvGeometry g : {KvGeometry{3, 64}, KvGeometry{8, 128}}) {
    SCOPED_TRACE(g.row());
    const int row = g.row(), k = kv_outliers_per_tail(0.01f, row);
    ASSERT_EQ(k, row == 192 ? 1 : 6);
    std::mt19937 rng(23);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> x(static_cast<size_t>(row));
    for (auto& v : x) v = u(rng);
    x[7] = -1.0f;  // the bulk spans exactly [-1, 1] once the outliers are set aside
    x[8] = 1.0f;
    std::vector<int> hi, lo;
    for (int t = 0; t < k; ++t) {
      hi.push_back((37 * t + 100) % row);
      lo.push_back((53 * t + 11) % row);
      x[size_t(hi.back())] = 500.0f + 37.0f * t;
      x[size_t(lo.back())] = -300.0f - 11.0f * t;
    }
    KvTensorCalibration cal;
    cal.codebook = uniform_table(4);
    const auto codec = make_kv_codec(f, KvRole::value, g, &cal);
    std::vector<uint8_t> page(codec->page_bytes(), 0);
    codec->encode(x.data(), 5, page.data());
    const auto [zp, r] = stored_scale(*codec, page, 5);
    EXPECT_EQ(zp, 0.0f);
    EXPECT_EQ(r, 1.0f);
    const Rows got = [&] {
      std::vector<float> tile(size_t(g.head_dim) * kKvPageTokens);
      Rows out(1, std::vector<float>(size_t(row)));
      for (int h = 0; h < g.n_kv_heads; ++h) {
        codec->decode(page.data(), h, 6, tile.data());
        for (int d = 0; d < g.head_dim; ++d) out[0][size_t(h * g.head_dim + d)] = tile[size_t(5 * g.head_dim + d)];
      }
      return out;
    }();
    for (int c : hi) EXPECT_NEAR(got[0][size_t(c)], x[size_t(c)], std::ldexp(600.0, -11)) << c;
    for (int c : lo) EXPECT_NEAR(got[0][size_t(c)], x[size_t(c)], std::ldexp(400.0, -11)) << c;
    for (int c = 0; c < row; ++c)
      if (std::abs(x[size_t(c)]) <= 1.0f) {
        EXPECT_LE(std::fabs(got[0][size_t(c)] - x[size_t(c)]), 1.0f / 15 + 1e-6f) << c;
      }
  }
}

TEST(KvCodecQuant, KeyOutliersBeyondCalibratedBounds) {
  // Bounds [-1, 1] on every channel; 3 planted high outliers (fewer than k = 6:
  // the unused slots must be harmless) and 8 low ones (more than k: the 6 of
  // largest |u| are kept, the other two clip to the lowest level).
  const KvFormat& f = kv_format("int4-ch-1%");
  const KvGeometry g{8, 128};
  const int row = g.row(), k = kv_outliers_per_tail(0.01f, row);
  ASSERT_EQ(k, 6);
  KvTensorCalibration cal;
  cal.lower.assign(size_t(row), -1.0f);
  cal.upper.assign(size_t(row), 1.0f);
  std::mt19937 rng(24);
  std::uniform_real_distribution<float> u(-0.95f, 0.95f);
  std::vector<float> x(static_cast<size_t>(row));
  for (auto& v : x) v = u(rng);
  const int hi[] = {0, 300, 1023};
  for (int i = 0; i < 3; ++i) x[size_t(hi[i])] = 3.0f + float(i);
  const int lo[] = {5, 6, 128, 129, 700, 701, 900, 901};
  for (int i = 0; i < 8; ++i) x[size_t(lo[i])] = -2.0f - float(i);  // lo[0], lo[1] least extreme
  const auto codec = make_kv_codec(f, KvRole::key, g, &cal);
  const Rows got = encode_decode(*codec, KvRole::key, g, Rows{x});
  for (int c : hi) EXPECT_NEAR(got[0][size_t(c)], x[size_t(c)], std::ldexp(6.0, -11)) << c;
  for (int i = 2; i < 8; ++i) EXPECT_NEAR(got[0][size_t(lo[i])], x[size_t(lo[i])], std::ldexp(12.0, -11)) << lo[i];
  EXPECT_EQ(got[0][5], -1.0f);  // clipped to the lowest level
  EXPECT_EQ(got[0][6], -1.0f);
  for (int c = 0; c < row; ++c)
    if (std::fabs(x[size_t(c)]) < 1.0f) {
      EXPECT_LE(std::fabs(got[0][size_t(c)] - x[size_t(c)]), 1.0f / 15 + 1e-6f) << c;
    }

  // A row inside the bounds stores no outlier: every slot is residual 0 at index 0.
  std::vector<uint8_t> page(codec->page_bytes(), 0xee);
  codec->encode(x.data(), 0, page.data());  // overwrite slot 0's garbage
  std::vector<float> inside(size_t(row), 0.5f);
  codec->encode(inside.data(), 1, page.data());
  const KvPageBytes layout = codec->page_layout();
  const uint8_t* res = page.data() + layout.codes + layout.scales + 1 * 2 * k * 2;
  const uint8_t* idx = page.data() + layout.codes + layout.scales + 64 * 2 * k * 2 + 1 * 2 * k * 2;
  for (int s = 0; s < 4 * k; ++s) EXPECT_EQ(res[s], 0) << s;
  for (int s = 0; s < 4 * k; ++s) EXPECT_EQ(idx[s], 0) << s;
  std::vector<float> tile(size_t(128) * kKvPageTokens);
  codec->decode(page.data(), 0, 2, tile.data());
  EXPECT_EQ(tile[0 * kKvPageTokens + 1], uniform_table(4)[11]);  // 0.5 -> level 11 (0.4667), +0 from the unused slots
}

TEST(KvCodecQuant, TiesGoToTheLowerLevel) {
  // Uniform levels are symmetric, so u = 0 sits exactly between the two middle
  // levels: the lower one wins. Per-channel bounds [-1, 1] make u = x.
  const KvGeometry g{1, 64};
  for (const char* name : {"int2-ch", "int3-ch", "int4-ch"}) {
    SCOPED_TRACE(name);
    const KvFormat& f = kv_format(name);
    const std::vector<float> L = uniform_table(f.bits);
    const int mid = (1 << f.bits) / 2 - 1;
    ASSERT_EQ(double(L[size_t(mid)]) + L[size_t(mid + 1)], 0.0);
    KvTensorCalibration cal;
    cal.lower.assign(64, -1.0f);
    cal.upper.assign(64, 1.0f);
    const auto codec = make_kv_codec(f, KvRole::key, g, &cal);
    std::vector<float> x(64, 0.0f);
    const Rows got = encode_decode(*codec, KvRole::key, g, Rows{x});
    EXPECT_EQ(got[0][0], L[size_t(mid)]);
  }
  // A codebook with exactly representable midpoints: -0.75 and -0.125 are ties.
  KvTensorCalibration cal;
  cal.lower.assign(64, -1.0f);
  cal.upper.assign(64, 1.0f);
  cal.codebook = {-1.0f, -0.5f, 0.25f, 1.0f};
  for (KvRole role : {KvRole::key, KvRole::value}) {
    const auto codec = make_kv_codec(kv_format("nuq2"), role, g, &cal);
    std::vector<float> x(64, 0.0f);
    x[0] = -1.0f;  // values: min -1, max 1 give zp 0, r 1 as well
    x[1] = 1.0f;
    x[2] = -0.75f;
    x[3] = -0.125f;
    x[4] = 0.625f;
    x[5] = -0.7499999f;  // just above the tie
    const Rows got = encode_decode(*codec, role, g, Rows{x});
    EXPECT_EQ(got[0][2], -1.0f);
    EXPECT_EQ(got[0][3], -0.5f);
    EXPECT_EQ(got[0][4], 0.25f);
    EXPECT_EQ(got[0][5], -0.5f);
  }
}

void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected kvq::Error mentioning " << parts[0];
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << msg << " lacks " << p;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(KvCodecQuant, BadCalibrationIsAClearError) {
  const KvGeometry g{3, 64};
  const KvFormat& nuq4 = kv_format("nuq4");
  KvTensorCalibration good;
  good.lower.assign(192, -1.0f);
  good.upper.assign(192, 1.0f);
  good.codebook = uniform_table(4);
  EXPECT_NO_THROW(make_kv_codec(nuq4, KvRole::key, g, &good));
  EXPECT_NO_THROW(make_kv_codec(nuq4, KvRole::value, g, &good));

  auto bad = good;
  bad.codebook.pop_back();
  expect_error([&] { make_kv_codec(nuq4, KvRole::value, g, &bad); }, {"nuq4", "15", "16"});
  bad = good;
  std::swap(bad.codebook[3], bad.codebook[4]);
  expect_error([&] { make_kv_codec(nuq4, KvRole::key, g, &bad); }, {"nuq4", "sorted"});
  bad = good;
  bad.codebook[2] = NAN;
  expect_error([&] { make_kv_codec(nuq4, KvRole::key, g, &bad); }, {"nuq4", "finite"});
  bad = good;
  bad.lower[17] = NAN;
  expect_error([&] { make_kv_codec(nuq4, KvRole::key, g, &bad); }, {"nuq4", "17", "finite"});
  bad = good;
  bad.upper[9] = INFINITY;
  expect_error([&] { make_kv_codec(kv_format("int4-ch"), KvRole::key, g, &bad); }, {"int4-ch", "9", "finite"});
  bad = good;
  bad.upper[4] = -2.0f;
  expect_error([&] { make_kv_codec(nuq4, KvRole::key, g, &bad); }, {"nuq4", "channel 4", "upper"});
  bad = good;
  bad.lower.resize(100);
  expect_error([&] { make_kv_codec(nuq4, KvRole::key, g, &bad); }, {"nuq4", "100", "192"});
  expect_error([&] { make_kv_codec(nuq4, KvRole::key, g, nullptr); }, {"nuq4", "calibration"});

  // Built for accounting only: sizes answer, encode refuses.
  const auto acc = make_kv_codec(nuq4, KvRole::key, g, nullptr, true);
  EXPECT_EQ(acc->page_bytes(), uint64_t(192) * 32);
  std::vector<uint8_t> page(acc->page_bytes());
  std::vector<float> x(192, 0.0f);
  expect_error([&] { acc->encode(x.data(), 0, page.data()); }, {"nuq4", "accounting"});
}

TEST(KvCodecQuant, NonFiniteInputsAreDefined) {
  // NaN, +-inf and huge values: encoding must not hit UB (this test runs under
  // UBSan in CI), decoding yields some float, and finite neighbours survive
  // where the spec says they do.
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const KvGeometry g{3, 64};
  std::mt19937 rng(25);
  for (const KvFormat* f : quant_formats())
    for (KvRole role : {KvRole::key, KvRole::value}) {
      SCOPED_TRACE(trace(*f, role, g));
      Rows rows = make_rows(rng, g, 6, false);
      const KvTensorCalibration cal = make_calibration(*f, rows, rng, 1.0f, true);
      rows[0][3] = nan;
      rows[1][10] = inf;
      rows[1][11] = -inf;
      rows[2].assign(192, nan);
      rows[3].assign(192, inf);
      rows[4][0] = 3e38f;
      rows[4][1] = -3e38f;
      rows[5][100] = 1e6f;
      const auto codec = make_kv_codec(*f, role, g, &cal);
      const Rows got = encode_decode(*codec, role, g, rows);
      // NaN elements do not disturb the others of their row.
      const float tol = f->bits >= 3 ? 1.0f : 3.0f;
      for (int c = 0; c < 192; c += 17)
        if (c != 3) {
          EXPECT_NEAR(got[0][size_t(c)], rows[0][size_t(c)], tol * 4) << c;
        }
      if (role == KvRole::value && f->outlier_fraction > 0) {
        // +-inf are the row's outliers: decoded as themselves, the rest is unharmed.
        EXPECT_EQ(got[1][10], inf);
        EXPECT_EQ(got[1][11], -inf);
        EXPECT_NEAR(got[1][50], rows[1][50], tol * 4);
      }
    }
}

}  // namespace
}  // namespace kvq

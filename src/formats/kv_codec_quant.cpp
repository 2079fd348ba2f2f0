// KvScheme::quant: b-bit codes on a level table L in [-1, 1] (uniform levels
// for intN, calibrated centroids for nuqN), rescaled by a zero-point zp and a
// range r: code = nearest level to u = (x - zp) / r, x^ = zp + r * L[code].
// Keys are scaled per channel (calibrated, fixed per layer) or per token;
// values always per token, over the whole layer row. With a dense-and-sparse
// outlier fraction, each token vector also keeps 2k elements as an fp16
// residual on top of their dense code. docs/formats.md is the bit-exact spec.
//
// Arithmetic is binary32 throughout (u = (x - zp) / r, x^ = zp + r * L[c],
// each operation rounded), so an independent implementation can reproduce
// the decoded tiles bit for bit.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/fp16.h"
#include "formats/kv_bitpack.h"
#include "formats/kv_codecs.h"

namespace kvq {
namespace {

// Codes are packed and unpacked in chunks of this many: a multiple of 8, so
// every chunk starts on a byte boundary whatever the bit width.
constexpr int kChunk = 64;

inline void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// A buffer on the stack for the usual small sizes, on the heap past that
// (outlier lists: k per tail is 1..13 for 1% of rows up to 2560 wide).
template <class T, int N>
class SmallBuf {
 public:
  explicit SmallBuf(int n) {
    if (n > N) heap_.resize(size_t(n));
    p_ = n > N ? heap_.data() : local_;
  }
  T& operator[](int i) { return p_[i]; }
  T* data() { return p_; }

 private:
  T local_[N];
  std::vector<T> heap_;
  T* p_;
};

// One outlier candidate: its rank key (value or |u|) and its row index.
struct Candidate {
  float key;
  int index;
};

// Keeps the `cap` candidates with the largest keys, best first. A new
// candidate must beat the current worst strictly, so on equal keys the one
// seen first (the lower index) stays: the selection is deterministic.
class TopK {
 public:
  TopK(Candidate* buf, int cap) : c_(buf), cap_(cap) {}
  void offer(float key, int index) {
    if (cap_ == 0 || (n_ == cap_ && !(key > c_[n_ - 1].key))) return;
    int i = n_ < cap_ ? n_++ : n_ - 1;
    while (i > 0 && key > c_[i - 1].key) {
      c_[i] = c_[i - 1];
      --i;
    }
    c_[i] = {key, index};
  }
  int size() const { return n_; }
  const Candidate& operator[](int i) const { return c_[i]; }
  bool contains(int index) const {
    for (int i = 0; i < n_; ++i)
      if (c_[i].index == index) return true;
    return false;
  }

 private:
  Candidate* c_;
  int cap_;
  int n_ = 0;
};

// The uniform level table: L_c = -1 + 2c / (2^b - 1).
std::vector<float> uniform_levels(int bits) {
  const int n = 1 << bits;
  std::vector<float> l(static_cast<size_t>(n));
  for (int c = 0; c < n; ++c) l[size_t(c)] = float(-1.0 + 2.0 * c / (n - 1));
  return l;
}

// The decoder reads only the layout (KvCodecLayout), so the kernels' scalar
// fallback and the codec are one function.

// Channel-major tile dst[d * T + j].
void decode_keys(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int D = L.head_dim, nlev = 1 << L.bits;
  const float* lv = L.levels;
  float zps[kKvPageTokens], rs[kKvPageTokens];
  if (!L.per_channel)
    for (int j = 0; j < n; ++j) {
      const uint8_t* sc = page + L.codes_bytes + int64_t(j) * 4;
      zps[j] = fp16_to_f32(load_u16(sc));
      rs[j] = fp16_to_f32(load_u16(sc + 2));
    }
  uint8_t codes[kKvPageTokens];
  float table[kKvPageTokens];
  for (int d = 0; d < D; ++d) {
    const int c = head * D + d;
    kv_unpack(page + int64_t(c) * L.run_bytes, kKvPageTokens, L.bits, codes);
    float* out = dst + int64_t(d) * kKvPageTokens;
    if (!L.per_channel) {
      for (int j = 0; j < n; ++j) out[j] = zps[j] + rs[j] * lv[codes[j]];
    } else if (nlev <= kKvPageTokens) {
      // The channel's levels scaled once (2^b <= 64 entries), then a lookup per slot.
      const float zp = L.zp[size_t(c)], r = L.range[size_t(c)];
      for (int l = 0; l < nlev; ++l) table[l] = zp + r * lv[l];
      for (int j = 0; j < n; ++j) out[j] = table[codes[j]];
    } else {
      const float zp = L.zp[size_t(c)], r = L.range[size_t(c)];
      for (int j = 0; j < n; ++j) out[j] = zp + r * lv[codes[j]];
    }
  }
}

// Token-major tile dst[j * D + d].
void decode_values(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int D = L.head_dim;
  const float* lv = L.levels;
  uint8_t codes[kChunk];
  for (int j = 0; j < n; ++j) {
    const uint8_t* sc = page + L.codes_bytes + int64_t(j) * 4;
    const float zp = fp16_to_f32(load_u16(sc)), r = fp16_to_f32(load_u16(sc + 2));
    const uint8_t* run = page + (int64_t(head) * kKvPageTokens + j) * L.run_bytes;
    float* out = dst + int64_t(j) * D;
    for (int d0 = 0; d0 < D; d0 += kChunk) {
      const int m = std::min(kChunk, D - d0);
      kv_unpack(run + int64_t(d0) / 8 * L.bits, m, L.bits, codes);
      for (int d = 0; d < m; ++d) out[d0 + d] = zp + r * lv[codes[d]];
    }
  }
}

// Adds each stored residual whose index falls in `head` to its element.
void add_outliers(const KvCodecLayout& L, const uint8_t* page, int head, int n, float* dst) {
  const int k = L.outliers_per_tail;
  if (k == 0) return;
  const int D = L.head_dim;
  const int first = head * D;
  for (int j = 0; j < n; ++j) {
    const uint8_t* res = page + L.res_off + int64_t(j) * 2 * k * 2;
    const uint8_t* idx = page + L.idx_off + int64_t(j) * 2 * k * L.idx_bytes;
    for (int s = 0; s < 2 * k; ++s) {
      const int index = L.idx_bytes == 1 ? idx[s] : load_u16(idx + 2 * s);
      const int d = index - first;
      if (d < 0 || d >= D) continue;
      const float r = fp16_to_f32(load_u16(res + 2 * s));
      if (L.role == KvRole::key) dst[int64_t(d) * kKvPageTokens + j] += r;
      else dst[int64_t(j) * D + d] += r;
    }
  }
}

class QuantCodec final : public KvCodec {
 public:
  QuantCodec(const KvFormat& f, KvRole role, const KvGeometry& g, const KvTensorCalibration* cal, bool accounting)
      : name_(f.name),
        role_(role),
        g_(g),
        bits_(f.bits),
        nlev_(1 << f.bits),
        per_channel_(role == KvRole::key && f.key_scaling == KvKeyScaling::per_channel),
        codebook_(f.levels == KvLevels::codebook),
        k_(kv_outliers_per_tail(f.outlier_fraction, g.row())),
        idx_bytes_(g.row() <= 256 ? 1 : 2) {
    if (f.bits < 1 || f.bits > 8) fail("KV cache type '{}': {} bits per code (quant formats take 1..8)", f.name, f.bits);
    const char* what = role == KvRole::key ? "keys" : "values";
    const int row = g.row();
    if (k_ > 0 && row > 65536) fail("KV cache type '{}': rows of {} elements are too wide for 16-bit outlier indices", f.name, row);
    // Layout of a page part: codes, then per-slot scales, then outliers.
    if (role == KvRole::key) {
      run_bytes_ = int64_t(kKvPageTokens) * bits_ / 8;  // one channel, all 64 slots: always whole bytes
      codes_bytes_ = int64_t(row) * run_bytes_;
    } else {
      run_bytes_ = kv_packed_bytes(g.head_dim, bits_);  // one head of one slot
      codes_bytes_ = int64_t(g.n_kv_heads) * kKvPageTokens * run_bytes_;
    }
    scales_bytes_ = per_channel_ ? 0 : int64_t(kKvPageTokens) * 4;
    res_off_ = codes_bytes_ + scales_bytes_;
    idx_off_ = res_off_ + int64_t(kKvPageTokens) * 2 * k_ * 2;
    outlier_bytes_ = int64_t(kKvPageTokens) * 2 * k_ * (2 + idx_bytes_);

    bool have_levels = true, have_bounds = true;
    if (codebook_) {
      if (!cal) {
        have_levels = false;
      } else {
        const auto& cb = cal->codebook;
        if (int64_t(cb.size()) != nlev_)
          fail("KV cache type '{}': codebook for its {} has {} entries, needs {} (2^{})", f.name, what, cb.size(),
               nlev_, bits_);
        for (size_t i = 0; i < cb.size(); ++i) {
          if (!std::isfinite(cb[i])) fail("KV cache type '{}': codebook entry {} for its {} is not finite", f.name, i, what);
          if (i > 0 && cb[i] < cb[i - 1])
            fail("KV cache type '{}': codebook for its {} is not sorted (entry {} < entry {})", f.name, what, i, i - 1);
        }
        levels_ = cb;
      }
    } else {
      levels_ = uniform_levels(bits_);
    }
    if (per_channel_) {
      if (!cal) {
        have_bounds = false;
      } else {
        if (int64_t(cal->lower.size()) != row || int64_t(cal->upper.size()) != row)
          fail("KV cache type '{}': key calibration has {} lower / {} upper bounds, needs {} ({} heads x {})", f.name,
               cal->lower.size(), cal->upper.size(), row, g.n_kv_heads, g.head_dim);
        zp_.resize(size_t(row));
        r_.resize(size_t(row));
        for (int c = 0; c < row; ++c) {
          const float lo = cal->lower[size_t(c)], hi = cal->upper[size_t(c)];
          if (!std::isfinite(lo) || !std::isfinite(hi))
            fail("KV cache type '{}': key calibration bound of channel {} is not finite", f.name, c);
          if (hi < lo) fail("KV cache type '{}': key calibration of channel {} has upper {} < lower {}", f.name, c, hi, lo);
          zp_[size_t(c)] = (hi + lo) / 2;
          r_[size_t(c)] = (hi - lo) / 2;
        }
      }
    }
    ready_ = have_levels && have_bounds;
    if (!ready_ && !accounting)
      fail("KV cache type '{}' needs calibration for its {} (run kvq calibrate, or pass --kv-calib FILE)", f.name, what);
    if (!levels_.empty()) {
      // Decision thresholds between neighbouring levels, in double: exact for
      // binary32 levels of similar magnitude, so "nearest level, ties to the
      // lower index" is decided without rounding.
      mids_.resize(size_t(nlev_ - 1));
      for (int c = 0; c + 1 < nlev_; ++c) mids_[size_t(c)] = (double(levels_[size_t(c)]) + levels_[size_t(c + 1)]) / 2;
    }
    // Byte planes of 16-entry tables (see KvCodecLayout): byte b of entry l at [b * 16 + l].
    auto put_planes = [](uint8_t* planes, int l, float x) {
      uint32_t u;
      std::memcpy(&u, &x, 4);
      for (int b = 0; b < 4; ++b) planes[b * 16 + l] = uint8_t(u >> (8 * b));
    };
    // Codes of up to 4 bits index 16-entry tables (entries past 2^bits stay 0).
    if (bits_ <= 4 && !levels_.empty()) {
      level_planes_.resize(64);
      for (int l = 0; l < nlev_; ++l) put_planes(level_planes_.data(), l, levels_[size_t(l)]);
    }
    if (per_channel_ && bits_ <= 4 && ready_) {
      // Each channel's decoded levels zp_c + r_c * L[l] (exactly dequant()'s
      // arithmetic), stored as byte planes: byte b of level l at [c][b][l], the
      // tables of 16-entry byte-shuffle lookups.
      channel_planes_.resize(size_t(row) * 64);
      for (int c = 0; c < row; ++c)
        for (int l = 0; l < nlev_; ++l)
          put_planes(channel_planes_.data() + size_t(c) * 64, l, dequant(zp_[size_t(c)], r_[size_t(c)], uint32_t(l)));
    }
    layout_.scheme = KvScheme::quant;
    layout_.role = role;
    layout_.n_kv_heads = g.n_kv_heads;
    layout_.head_dim = g.head_dim;
    layout_.bits = bits_;
    layout_.levels = levels_.empty() ? nullptr : levels_.data();
    layout_.per_channel = per_channel_;
    layout_.zp = zp_.empty() ? nullptr : zp_.data();
    layout_.range = r_.empty() ? nullptr : r_.data();
    layout_.run_bytes = run_bytes_;
    layout_.codes_bytes = codes_bytes_;
    layout_.outliers_per_tail = k_;
    layout_.idx_bytes = idx_bytes_;
    layout_.res_off = res_off_;
    layout_.idx_off = idx_off_;
    layout_.channel_planes = channel_planes_.empty() ? nullptr : channel_planes_.data();
    layout_.level_planes = level_planes_.empty() ? nullptr : level_planes_.data();
  }

  KvPageBytes page_layout() const override {
    return {uint64_t(codes_bytes_), uint64_t(scales_bytes_), uint64_t(outlier_bytes_)};
  }

  uint64_t fixed_bytes() const override {
    // Bounds and codebook, plus the lookup planes built from them (see the constructor).
    const uint64_t planes = bits_ <= 4 ? 64 * (1 + (per_channel_ ? uint64_t(g_.row()) : 0)) : 0;
    return (per_channel_ ? uint64_t(g_.row()) * 2 * 4 : 0) + (codebook_ ? uint64_t(nlev_) * 4 : 0) + planes;
  }

  void encode(const float* row, int slot, uint8_t* page) const override {
    check_ready();
    if (per_channel_) encode_per_channel(row, slot, page);
    else encode_per_token(row, slot, page);
  }

  void decode(const uint8_t* page, int head, int n, float* dst) const override {
    check_ready();
    kv_quant_decode(layout_, page, head, n, dst);
  }

 private:
  void check_ready() const {
    if (!ready_) fail("KV cache type '{}': codec built for size accounting only (no calibration)", name_);
  }

  // u = (x - zp) / r; 0 when the range is not a positive finite number.
  static float unit(float x, float zp, float r) {
    if (!(r > 0.0f) || !std::isfinite(r)) return 0.0f;
    return (x - zp) / r;
  }

  // Index of the level nearest to u, ties to the lower index: the number of
  // thresholds u lies strictly above (binary search), then back to the first
  // of equal levels. NaN compares false everywhere and gets code 0; +-inf get
  // the end levels. No float->int conversion, so no UB on any input.
  uint32_t nearest(float u) const {
    const double du = u;
    int lo = 0;
    if (nlev_ <= 16) {
      // Few levels: count the thresholds below u without branches (the same
      // count the binary search finds, since the thresholds are sorted); a
      // data-dependent branch per level step mispredicts half the time.
      for (int c = 0; c + 1 < nlev_; ++c) lo += du > mids_[size_t(c)];
    } else {
      int hi = nlev_ - 1;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (du > mids_[size_t(mid)]) lo = mid + 1;
        else hi = mid;
      }
    }
    while (lo > 0 && levels_[size_t(lo - 1)] == levels_[size_t(lo)]) --lo;
    return uint32_t(lo);
  }

  float dequant(float zp, float r, uint32_t code) const { return zp + r * levels_[code]; }

  uint8_t* key_run(uint8_t* page, int c) const { return page + int64_t(c) * run_bytes_; }
  uint8_t* residuals(uint8_t* page, int slot) const { return page + res_off_ + int64_t(slot) * 2 * k_ * 2; }
  uint8_t* indices(uint8_t* page, int slot) const { return page + idx_off_ + int64_t(slot) * 2 * k_ * idx_bytes_; }

  // Writes the 2k outlier slots of one token: high tail then low tail, each
  // best first; unused slots get residual 0 at index 0 (adding 0 is harmless).
  void store_outliers(uint8_t* page, int slot, const TopK& high, const TopK& low, const float* row,
                      const float* xhat_of) const {
    uint8_t* res = residuals(page, slot);
    uint8_t* idx = indices(page, slot);
    for (int s = 0; s < 2 * k_; ++s) {
      const TopK& tail = s < k_ ? high : low;
      const int t = s < k_ ? s : s - k_;
      uint16_t r16 = 0;
      int index = 0;
      if (t < tail.size()) {
        index = tail[t].index;
        r16 = f32_to_fp16(row[index] - xhat_of[t + (s < k_ ? 0 : k_)]);
      }
      store_u16(res + 2 * s, r16);
      if (idx_bytes_ == 1) idx[s] = uint8_t(index);
      else store_u16(idx + 2 * s, uint16_t(index));
    }
  }

  // Keys with calibrated per-channel zp/range: codes into each channel's run;
  // outlier candidates are elements beyond the bounds (|u| > 1), the k of
  // largest |u| per tail.
  void encode_per_channel(const float* row, int slot, uint8_t* page) const {
    const int n = g_.row();
    SmallBuf<Candidate, 32> hbuf(k_), lbuf(k_);
    TopK high(hbuf.data(), k_), low(lbuf.data(), k_);
    for (int c = 0; c < n; ++c) {
      const float u = unit(row[c], zp_[size_t(c)], r_[size_t(c)]);
      kv_store_code(key_run(page, c), slot, bits_, nearest(u));
      if (u > 1.0f) high.offer(u, c);
      else if (u < -1.0f) low.offer(-u, c);
    }
    if (k_ == 0) return;
    SmallBuf<float, 64> xhat(2 * k_);
    for (int t = 0; t < high.size(); ++t) xhat[t] = dense_value_per_channel(row, high[t].index);
    for (int t = 0; t < low.size(); ++t) xhat[k_ + t] = dense_value_per_channel(row, low[t].index);
    store_outliers(page, slot, high, low, row, xhat.data());
  }

  float dense_value_per_channel(const float* row, int c) const {
    const float zp = zp_[size_t(c)], r = r_[size_t(c)];
    return dequant(zp, r, nearest(unit(row[c], zp, r)));
  }

  // Values (and per-token keys): outliers are the k largest and k smallest
  // elements of the row (NaN never is one); zp/range come from the min/max of
  // the rest, rounded to fp16 before coding since the decoder only has those.
  void encode_per_token(const float* row, int slot, uint8_t* page) const {
    const int n = g_.row();
    SmallBuf<Candidate, 32> hbuf(k_), lbuf(k_);
    TopK high(hbuf.data(), k_), low(lbuf.data(), k_);
    if (k_ > 0) {
      for (int i = 0; i < n; ++i)
        if (!std::isnan(row[i])) high.offer(row[i], i);
      for (int i = 0; i < n; ++i)
        if (!std::isnan(row[i]) && !high.contains(i)) low.offer(-row[i], i);
    }
    // Outlier indices in increasing order, to skip them in one pass.
    SmallBuf<int, 64> skip(2 * k_ + 1);
    int n_skip = 0;
    for (int t = 0; t < high.size(); ++t) skip[n_skip++] = high[t].index;
    for (int t = 0; t < low.size(); ++t) skip[n_skip++] = low[t].index;
    std::sort(skip.data(), skip.data() + n_skip);
    skip[n_skip] = n;  // sentinel
    float mn = 0.0f, mx = 0.0f;
    bool any = false;
    for (int i = 0, s = 0; i < n; ++i) {
      if (i == skip[s]) {
        ++s;
        continue;
      }
      const float x = row[i];
      if (std::isnan(x)) continue;
      if (!any) mn = mx = x, any = true;
      mn = std::min(mn, x);
      mx = std::max(mx, x);
    }
    const uint16_t zp16 = f32_to_fp16((mx + mn) / 2), r16 = f32_to_fp16((mx - mn) / 2);
    const float zp = fp16_to_f32(zp16), r = fp16_to_f32(r16);
    uint8_t* sc = page + codes_bytes_ + int64_t(slot) * 4;
    store_u16(sc, zp16);
    store_u16(sc + 2, r16);

    const int D = g_.head_dim;
    if (role_ == KvRole::key) {
      for (int c = 0; c < n; ++c) kv_store_code(key_run(page, c), slot, bits_, nearest(unit(row[c], zp, r)));
    } else {
      uint8_t codes[kChunk];
      for (int h = 0; h < g_.n_kv_heads; ++h) {
        uint8_t* run = page + (int64_t(h) * kKvPageTokens + slot) * run_bytes_;
        for (int d0 = 0; d0 < D; d0 += kChunk) {
          const int m = std::min(kChunk, D - d0);
          for (int d = 0; d < m; ++d) codes[d] = uint8_t(nearest(unit(row[h * D + d0 + d], zp, r)));
          kv_pack(codes, m, bits_, run + int64_t(d0) / 8 * bits_);
        }
      }
    }
    if (k_ == 0) return;
    SmallBuf<float, 64> xhat(2 * k_);
    for (int t = 0; t < high.size(); ++t) xhat[t] = dequant(zp, r, nearest(unit(row[high[t].index], zp, r)));
    for (int t = 0; t < low.size(); ++t) xhat[k_ + t] = dequant(zp, r, nearest(unit(row[low[t].index], zp, r)));
    store_outliers(page, slot, high, low, row, xhat.data());
  }

  std::string name_;
  KvRole role_;
  KvGeometry g_;
  int bits_;
  int nlev_;
  bool per_channel_;  // keys with calibrated per-channel zp/range
  bool codebook_;
  int k_;             // outlier slots per tail
  int idx_bytes_;     // outlier index width: 1 for rows <= 256, else 2
  bool ready_ = false;
  int64_t run_bytes_ = 0;      // keys: one channel's 64 codes; values: one head's D codes
  int64_t codes_bytes_ = 0;
  int64_t scales_bytes_ = 0;   // per-slot fp16 zp and range (values, per-token keys)
  int64_t res_off_ = 0, idx_off_ = 0, outlier_bytes_ = 0;
  std::vector<float> levels_;  // the level table L (2^b sorted entries)
  std::vector<double> mids_;   // thresholds between neighbouring levels
  std::vector<float> zp_, r_;  // per-channel keys: zero-point and range per row channel
  std::vector<uint8_t> channel_planes_;  // per-channel keys, <= 4 bits: KvCodecLayout::channel_planes
  std::vector<uint8_t> level_planes_;    // codes of <= 4 bits: KvCodecLayout::level_planes
};

}  // namespace

void kv_quant_decode(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst) {
  if (layout.role == KvRole::key) decode_keys(layout, page, head, n, dst);
  else decode_values(layout, page, head, n, dst);
  add_outliers(layout, page, head, n, dst);
}

std::unique_ptr<KvCodec> make_quant_kv_codec(const KvFormat& f, KvRole role, const KvGeometry& g,
                                             const KvTensorCalibration* calibration, bool for_accounting) {
  return std::make_unique<QuantCodec>(f, role, g, calibration, for_accounting);
}

}  // namespace kvq

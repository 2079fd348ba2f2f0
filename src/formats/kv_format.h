// What a KV cache format IS: one row per format in a table, and the codec
// that turns token rows into page bytes and back.
//
// The cache stores K and V in pages of kKvPageTokens tokens. A codec owns the
// layout of its half of a page (keys or values, every KV head). Decoding yields
// one head's tile of floats: keys channel-major ([head_dim][kKvPageTokens]: one
// channel's values for every token of the page adjacent — what per-channel key
// quantization wants, and what lets attention score a tile with broadcasts and
// no transposes), values token-major ([kKvPageTokens][head_dim]).
// docs/formats.md specifies each format bit-exactly.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

namespace kvq {

constexpr int kKvPageTokens = 64;

enum class KvRole { key, value };

struct KvGeometry {
  int n_kv_heads = 0;
  int head_dim = 0;
  int row() const { return n_kv_heads * head_dim; }  // elements of one token's K (or V)
};

// How a format stores its elements.
enum class KvScheme {
  f32,    // plain binary32
  f16,    // plain binary16
  q8_0,   // ggml-style blocks of 32 along the head dimension, fp16 scale, int8 codes
  q4_0,   // same with 4-bit codes
  quant,  // N-bit codes on a level table in [-1, 1], rescaled per vector (see below)
};

// For KvScheme::quant: which level table the codes index.
enum class KvLevels {
  uniform,   // 2^bits evenly spaced levels from -1 to 1 (intN)
  codebook,  // 2^bits sorted centroids fitted offline per layer and tensor (nuqN)
};

// For KvScheme::quant keys: where the zero-point and range of an element come from.
// (Values are always scaled per token: their zero-point and range come from the
// token's own outlier-trimmed min/max over the whole layer row.)
enum class KvKeyScaling {
  per_token,    // like values: per token row, online
  per_channel,  // per channel, fixed offline by calibration (KVQuant)
};

// One row of the format table. A quant row maps an element x of a vector with
// zero-point zp and range r to code c = nearest level to (x - zp) / r, and back
// to zp + r * level[c]. With outliers, each token vector also keeps a fixed
// number of elements exactly (a 16-bit residual on top of the dense code).
struct KvFormat {
  std::string_view name;         // what users type
  std::string_view description;
  KvScheme scheme;
  int bits;                      // bits per code (quant: 1..8); 32/16/8/4 for the others
  KvLevels levels;               // quant only
  KvKeyScaling key_scaling;      // quant only
  bool keys_pre_rope;            // keys stored before RoPE (rotated after decoding)
  float outlier_fraction;        // dense-and-sparse: share of each vector kept exactly (0: none)
  bool kvquant;                  // a KVQuant recipe: the cache keeps an attention sink by default
  // Each head vector of keys / values multiplied by the normalised
  // Walsh-Hadamard matrix (kv_hadamard) before it is encoded, spreading an
  // outlier channel over the whole vector; attention rotates its queries and
  // outputs instead of the keys and values (H is orthogonal and its own
  // inverse). Head sizes must be powers of two.
  bool rotate_k = false;
  bool rotate_v = false;

  // Whether make_kv_codec needs a KvTensorCalibration for this role.
  bool needs_calibration(KvRole role) const {
    if (scheme != KvScheme::quant) return false;
    return levels == KvLevels::codebook || (role == KvRole::key && key_scaling == KvKeyScaling::per_channel);
  }
};

// Offline calibration of one layer's K or V, for formats that need it (KVQuant).
struct KvTensorCalibration {
  // Keys scaled per channel: bounds per channel (row() values each); zero-point
  // (upper+lower)/2, range (upper-lower)/2. With outliers these are the
  // thresholds beyond which an element is an outlier. Empty otherwise.
  std::vector<float> lower, upper;
  // KvLevels::codebook: 2^bits sorted centroids in [-1, 1]. Empty otherwise.
  std::vector<float> codebook;
};

// Bytes of one page's key or value part, by what they hold.
struct KvPageBytes {
  uint64_t codes = 0;     // dense codes (or plain elements)
  uint64_t scales = 0;    // per-token / per-block scales and zero-points
  uint64_t outliers = 0;  // sparse outlier slots (residual + index)
  uint64_t total() const { return codes + scales + outliers; }
};

// Where a codec keeps what, for fast kernels that read pages directly
// (src/kernels/cpu/kv_decode*.cpp). A plain description of the layout in
// docs/formats.md plus the per-layer constants; the codec's decode() stays the
// oracle. Pointers stay valid as long as the codec lives.
struct KvCodecLayout {
  KvScheme scheme = KvScheme::f32;
  KvRole role = KvRole::key;
  int n_kv_heads = 0;
  int head_dim = 0;
  // KvScheme::quant
  int bits = 0;
  const float* levels = nullptr;   // 2^bits level table L
  bool per_channel = false;        // keys with calibrated per-channel zp/range
  const float* zp = nullptr;       // per row channel (per_channel only)
  const float* range = nullptr;
  // Per-channel keys of up to 4 bits: each row channel's 2^bits decoded levels
  // zp_c + r_c * L[l] as 4 byte planes of 16 (byte b of level l at
  // [c * 64 + b * 16 + l]; entries past 2^bits are 0), the tables of
  // byte-shuffle lookups; null otherwise.
  const uint8_t* channel_planes = nullptr;
  // Codes of up to 4 bits: the level table L itself as the same 4 byte planes
  // (64 bytes); set whenever `levels` is and bits <= 4.
  const uint8_t* level_planes = nullptr;
  int64_t run_bytes = 0;           // keys: one channel's 64 codes; values: one head vector
  int64_t codes_bytes = 0;         // scales (fp16 zp, fp16 range per slot) start here
  int outliers_per_tail = 0;       // k: each slot holds 2k (fp16 residual, index) pairs
  int idx_bytes = 1;               // outlier index width (1 or 2)
  int64_t res_off = 0, idx_off = 0;
  // KvScheme::q8_0 / q4_0: one head vector of one slot, [head][slot][block]
  int64_t slot_bytes = 0;
};

// One layer's K or V storage in one format. Immutable and thread-safe after construction.
class KvCodec {
 public:
  virtual ~KvCodec() = default;
  // Bytes of this tensor's part of one page (every head, kKvPageTokens tokens).
  uint64_t page_bytes() const { return page_layout().total(); }
  virtual KvPageBytes page_layout() const = 0;
  // Bytes held once per layer, outside the pages (per-channel zero-points and
  // ranges, codebook). Counted in the cache's memory.
  virtual uint64_t fixed_bytes() const { return 0; }
  // Encodes one token row (row() floats; keys as the format wants them, see
  // KvFormat::keys_pre_rope) into slot `slot` of `page`. Each token is encoded
  // once. Non-finite inputs must not cause undefined behaviour (they encode to
  // some defined code; the model rejects the batch anyway).
  virtual void encode(const float* row, int slot, uint8_t* page) const = 0;
  // Decodes head `head` for slots [0, n) into a tile: keys channel-major
  // dst[d * kKvPageTokens + j], values token-major dst[j * head_dim + d].
  // Slots >= n of the tile are left unspecified.
  virtual void decode(const uint8_t* page, int head, int n, float* dst) const = 0;
  // The layout for fast kernels (valid only for a codec that can decode).
  const KvCodecLayout& layout() const { return layout_; }

 protected:
  KvCodecLayout layout_;
};

// The reference decode of any codec from its layout alone (what KvCodec::decode
// does): the scalar oracle of the fast tile decoders and their fallback, so a
// kernel needs the layout, never the codec object.
void kv_decode_ref(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst);

std::span<const KvFormat> kv_format_table();
const KvFormat* find_kv_format(std::string_view name);  // nullptr if unknown
const KvFormat& kv_format(std::string_view name);      // throws listing valid names

// The codec of `format` for one layer's keys or values. `calibration` must be
// given when format.needs_calibration(role) (throws otherwise, and when its
// sizes do not match the geometry and bits); it may be null for size
// accounting only when `for_accounting` is true.
std::unique_ptr<KvCodec> make_kv_codec(const KvFormat& format, KvRole role, const KvGeometry& geometry,
                                       const KvTensorCalibration* calibration, bool for_accounting = false);

// The normalised Walsh-Hadamard transform of x[0..n), n a power of two, in
// place: butterflies (a, b) -> (a + b, a - b) at strides 1, 2, 4, ... n/2,
// then every element times binary32(1/sqrt(n)). Orthogonal and symmetric, so
// applying it twice gives x back (up to rounding). docs/formats.md, "Rotated
// formats".
void kv_hadamard(float* x, int n);
bool kv_is_power_of_two(int n);

// Sparse outlier slots per tail (low and high) of a vector of `width` elements:
// ceil(fraction / 2 * width), at least 1 when fraction > 0.
int kv_outliers_per_tail(float fraction, int width);

// Storage cost of a format in bits per element, everything in a page included.
double kv_bits_per_element(const KvFormat& format, KvRole role, const KvGeometry& geometry);

}  // namespace kvq

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

// Offline calibration of one layer's K or V, for formats that need it
// (KVQuant): per-channel bounds and a codebook in the normalised domain.
struct KvTensorCalibration {
  std::vector<float> lower, upper;  // per channel (row() values)
  std::vector<float> codebook;      // sorted centroids in [-1, 1]
};

// One layer's K or V storage in one format. Immutable and thread-safe after construction.
class KvCodec {
 public:
  virtual ~KvCodec() = default;
  // Bytes of this tensor's part of one page (every head, kKvPageTokens tokens).
  virtual uint64_t page_bytes() const = 0;
  // Encodes one token row (row() floats; keys as the format wants them, see
  // KvFormat::keys_pre_rope) into slot `slot` of `page`. Each token is encoded once.
  virtual void encode(const float* row, int slot, uint8_t* page) const = 0;
  // Decodes head `head` for slots [0, n) into a tile: keys channel-major
  // dst[d * kKvPageTokens + j], values token-major dst[j * head_dim + d].
  // Slots >= n of the tile are left unspecified.
  virtual void decode(const uint8_t* page, int head, int n, float* dst) const = 0;
};

struct KvFormat {
  std::string_view name;          // what users type
  std::string_view description;
  bool keys_pre_rope;             // keys stored before RoPE (rotated after decoding)
  bool needs_calibration;         // make_codec requires a KvTensorCalibration
  // `calibration` may be null when the format needs none, or when only
  // page_bytes() will be asked (size accounting).
  std::unique_ptr<KvCodec> (*make_codec)(KvRole role, const KvGeometry& geometry,
                                         const KvTensorCalibration* calibration);
};

std::span<const KvFormat> kv_format_table();
const KvFormat* find_kv_format(std::string_view name);  // nullptr if unknown
const KvFormat& kv_format(std::string_view name);      // throws listing valid names

// Storage cost of a format in bits per element, everything in a page included.
double kv_bits_per_element(const KvFormat& format, KvRole role, const KvGeometry& geometry);

}  // namespace kvq

// Factories of the codecs behind the format table (kv_format.cpp dispatches
// on KvFormat::scheme). Internal to src/formats.
#pragma once
#include <memory>

#include "formats/kv_format.h"

namespace kvq {

// KvScheme::q8_0 and KvScheme::q4_0 (kv_codec_block.cpp).
std::unique_ptr<KvCodec> make_block_kv_codec(const KvFormat& format, KvRole role, const KvGeometry& geometry);
void kv_block_decode(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst);

// KvScheme::quant (kv_codec_quant.cpp). `calibration` may be null only when
// for_accounting is true or the format needs none for this role; a codec
// built for accounting without calibration answers page_layout() and
// fixed_bytes() but throws from encode/decode.
std::unique_ptr<KvCodec> make_quant_kv_codec(const KvFormat& format, KvRole role, const KvGeometry& geometry,
                                             const KvTensorCalibration* calibration, bool for_accounting);
void kv_quant_decode(const KvCodecLayout& layout, const uint8_t* page, int head, int n, float* dst);

}  // namespace kvq

// Tensor element types as numbered by the GGUF format, with their storage sizes.
// This is the one place that knows type ids, names and block geometry; the
// quant module adds conversion and dot-product functions on top (quant/quant.h).
#pragma once
#include <cstdint>
#include <optional>
#include <string_view>

namespace kvq {

enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30,
};

struct GgmlTypeSize {
  GgmlType type;
  std::string_view name;
  int block_elems;  // elements per block (1 for plain types)
  int block_bytes;  // bytes per block
};

// Size info for a type id read from a file; nullopt for ids kvq does not know.
std::optional<GgmlTypeSize> ggml_type_size(uint32_t type_id);
std::string_view ggml_type_name(GgmlType type);

// Bytes of a row of n elements, or nullopt if n is not a multiple of the block size.
std::optional<uint64_t> ggml_row_bytes(GgmlType type, int64_t n);

}  // namespace kvq

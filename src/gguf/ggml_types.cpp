#include "gguf/ggml_types.h"

#include <array>

namespace kvq {

namespace {
constexpr std::array<GgmlTypeSize, 20> kTypes = {{
    {GgmlType::F32, "f32", 1, 4},        {GgmlType::F16, "f16", 1, 2},
    {GgmlType::Q4_0, "q4_0", 32, 18},    {GgmlType::Q4_1, "q4_1", 32, 20},
    {GgmlType::Q5_0, "q5_0", 32, 22},    {GgmlType::Q5_1, "q5_1", 32, 24},
    {GgmlType::Q8_0, "q8_0", 32, 34},    {GgmlType::Q8_1, "q8_1", 32, 36},
    {GgmlType::Q2_K, "q2_k", 256, 84},   {GgmlType::Q3_K, "q3_k", 256, 110},
    {GgmlType::Q4_K, "q4_k", 256, 144},  {GgmlType::Q5_K, "q5_k", 256, 176},
    {GgmlType::Q6_K, "q6_k", 256, 210},  {GgmlType::Q8_K, "q8_k", 256, 292},
    {GgmlType::I8, "i8", 1, 1},          {GgmlType::I16, "i16", 1, 2},
    {GgmlType::I32, "i32", 1, 4},        {GgmlType::I64, "i64", 1, 8},
    {GgmlType::F64, "f64", 1, 8},        {GgmlType::BF16, "bf16", 1, 2},
}};
}  // namespace

std::optional<GgmlTypeSize> ggml_type_size(uint32_t type_id) {
  for (const auto& t : kTypes)
    if (uint32_t(t.type) == type_id) return t;
  return std::nullopt;
}

std::string_view ggml_type_name(GgmlType type) {
  auto t = ggml_type_size(uint32_t(type));
  return t ? t->name : std::string_view("unknown");
}

std::optional<uint64_t> ggml_row_bytes(GgmlType type, int64_t n) {
  auto t = ggml_type_size(uint32_t(type));
  if (!t || n < 0 || n % t->block_elems != 0) return std::nullopt;
  return uint64_t(n / t->block_elems) * uint64_t(t->block_bytes);
}

}  // namespace kvq

// GGUF files (versions 2 and 3): a read-only memory-mapped view with every
// count, offset and size validated against the file before use, and a small
// writer (tests write fixtures with it; calibration writes sidecars with it).
// Knows nothing about models.
//
// All errors throw kvq::Error("PATH: what is wrong").
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gguf/ggml_types.h"

namespace kvq::gguf {

enum class ValueType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6,
  BOOL = 7, STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
std::string_view value_type_name(ValueType t);

// One metadata value. Strings point into the mapped file (valid while the File lives).
class Value {
 public:
  ValueType type() const { return type_; }
  // Scalars. as_int accepts every integer type (and bool) and fails on values that
  // do not fit int64; as_float accepts float and integer types.
  std::optional<int64_t> as_int() const;
  std::optional<uint64_t> as_uint() const;
  std::optional<double> as_float() const;
  std::optional<bool> as_bool() const;
  std::optional<std::string_view> as_string() const;
  // Arrays (type() == ARRAY). Element accessors check the index and element type.
  ValueType array_type() const { return array_type_; }
  uint64_t array_size() const { return array_size_; }
  std::string_view string_at(uint64_t i) const;
  int64_t int_at(uint64_t i) const;
  double float_at(uint64_t i) const;
  // "uint32", "array of string", ... (for messages).
  std::string describe() const;

 private:
  friend class File;
  friend struct ValueBuilder;
  ValueType type_ = ValueType::UINT8;
  ValueType array_type_ = ValueType::UINT8;
  uint64_t array_size_ = 0;
  uint64_t bits_ = 0;              // scalar payload (integers, floats as raw bits, bool)
  std::string_view str_;           // STRING payload
  const uint8_t* array_data_ = nullptr;          // numeric array payload
  std::vector<std::string_view> array_strings_;  // STRING array payload
  const std::string* path_ = nullptr;            // for element-access error messages
  std::string_view key_;
};

struct KeyValue {
  std::string_view key;
  Value value;
};

struct TensorInfo {
  std::string_view name;
  std::vector<int64_t> dims;  // dims[0] is the contiguous (fastest) dimension, as in GGUF
  GgmlType type;
  uint64_t offset;            // from the start of the data section
  uint64_t n_bytes;           // validated: fits inside the file
  const uint8_t* data;        // pointer into the mapping
  int64_t n_elements() const;
};

class File {
 public:
  // mmap + parse + validate. Throws kvq::Error("PATH: ...") on anything malformed.
  static File open(const std::string& path);
  // Same, over bytes in memory (fuzzing, tests). `name` is used in error messages.
  static File from_bytes(std::vector<uint8_t> bytes, const std::string& name = "<memory>");

  File(File&&) noexcept;
  File& operator=(File&&) noexcept;
  ~File();

  const std::string& path() const;
  uint32_t version() const;
  uint64_t alignment() const;
  uint64_t file_size() const;
  uint64_t data_offset() const;  // file offset of the (aligned) tensor data section

  const std::vector<KeyValue>& metadata() const;
  const Value* find(std::string_view key) const;  // nullptr if absent
  // Typed getters: nullopt when absent; throw "PATH: key K has type T, expected ..." on a wrong type.
  std::optional<int64_t> get_int(std::string_view key) const;
  std::optional<double> get_float(std::string_view key) const;
  std::optional<bool> get_bool(std::string_view key) const;
  std::optional<std::string_view> get_string(std::string_view key) const;
  // The array value (throws if present but not an array); nullptr if absent.
  const Value* get_array(std::string_view key) const;

  const std::vector<TensorInfo>& tensors() const;
  const TensorInfo* find_tensor(std::string_view name) const;  // nullptr if absent

 private:
  struct Impl;
  explicit File(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Writes GGUF v3. Keys and tensors are written in the order they were added.
class Writer {
 public:
  Writer();
  ~Writer();
  void set_alignment(uint64_t alignment);  // default 32
  void add_uint8(std::string_view key, uint8_t v);
  void add_int8(std::string_view key, int8_t v);
  void add_uint16(std::string_view key, uint16_t v);
  void add_int16(std::string_view key, int16_t v);
  void add_int64(std::string_view key, int64_t v);
  void add_uint32(std::string_view key, uint32_t v);
  void add_int32(std::string_view key, int32_t v);
  void add_uint64(std::string_view key, uint64_t v);
  void add_float32(std::string_view key, float v);
  void add_float64(std::string_view key, double v);
  void add_bool(std::string_view key, bool v);
  void add_string(std::string_view key, std::string_view v);
  void add_string_array(std::string_view key, const std::vector<std::string>& v);
  void add_int32_array(std::string_view key, const std::vector<int32_t>& v);
  void add_float32_array(std::string_view key, const std::vector<float>& v);
  // Array of any fixed-size element type (not STRING/ARRAY): `count` little-endian
  // elements of that type at `elems`.
  void add_array(std::string_view key, ValueType elem_type, const void* elems, uint64_t count);
  // `data` must hold exactly the bytes of a tensor of `type` and `dims`.
  void add_tensor(std::string_view name, GgmlType type, const std::vector<int64_t>& dims,
                  const void* data, uint64_t n_bytes);
  std::vector<uint8_t> to_bytes() const;
  void write(const std::string& path) const;  // throws kvq::Error on I/O failure

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvq::gguf

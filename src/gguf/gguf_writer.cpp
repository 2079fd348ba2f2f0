// GGUF v3 writer. Layout: header, key/values, tensor infos, padding to the
// alignment, then each tensor's data padded to the alignment (the last one too,
// as other GGUF readers size the data section that way).
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <unordered_set>

#include "base/error.h"
#include "gguf/gguf.h"

namespace kvq::gguf {

namespace {

uint64_t fixed_size(ValueType t) {
  switch (t) {
    case ValueType::UINT8: case ValueType::INT8: case ValueType::BOOL: return 1;
    case ValueType::UINT16: case ValueType::INT16: return 2;
    case ValueType::UINT32: case ValueType::INT32: case ValueType::FLOAT32: return 4;
    case ValueType::UINT64: case ValueType::INT64: case ValueType::FLOAT64: return 8;
    default: return 0;
  }
}

void put_bytes(std::vector<uint8_t>& out, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  out.insert(out.end(), b, b + n);
}
template <class T>
void put(std::vector<uint8_t>& out, T v) {
  put_bytes(out, &v, sizeof v);
}
void put_str(std::vector<uint8_t>& out, std::string_view s) {
  put<uint64_t>(out, s.size());
  put_bytes(out, s.data(), s.size());
}

}  // namespace

struct Writer::Impl {
  struct Kv {
    std::string key;
    std::vector<uint8_t> encoded;  // type + value
  };
  struct Tensor {
    std::string name;
    GgmlType type;
    std::vector<int64_t> dims;
    std::vector<uint8_t> data;
  };
  uint64_t alignment = 32;
  std::vector<Kv> kvs;
  std::unordered_set<std::string> keys;
  std::vector<Tensor> tensors;
  std::unordered_set<std::string> names;

  std::vector<uint8_t>& add(std::string_view key, ValueType t) {
    if (!keys.insert(std::string(key)).second) fail("gguf writer: duplicate key '{}'", key);
    kvs.push_back({std::string(key), {}});
    put<uint32_t>(kvs.back().encoded, uint32_t(t));
    return kvs.back().encoded;
  }
  template <class T>
  void scalar(std::string_view key, ValueType t, T v) {
    put(add(key, t), v);
  }
};

Writer::Writer() : impl_(std::make_unique<Impl>()) {}
Writer::~Writer() = default;

void Writer::set_alignment(uint64_t alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > 0xffffffffu)
    fail("gguf writer: alignment {} is not a non-zero 32-bit power of two", alignment);
  impl_->alignment = alignment;
}

void Writer::add_uint8(std::string_view key, uint8_t v) { impl_->scalar(key, ValueType::UINT8, v); }
void Writer::add_int8(std::string_view key, int8_t v) { impl_->scalar(key, ValueType::INT8, v); }
void Writer::add_uint16(std::string_view key, uint16_t v) { impl_->scalar(key, ValueType::UINT16, v); }
void Writer::add_int16(std::string_view key, int16_t v) { impl_->scalar(key, ValueType::INT16, v); }
void Writer::add_int64(std::string_view key, int64_t v) { impl_->scalar(key, ValueType::INT64, v); }
void Writer::add_uint32(std::string_view key, uint32_t v) { impl_->scalar(key, ValueType::UINT32, v); }
void Writer::add_int32(std::string_view key, int32_t v) { impl_->scalar(key, ValueType::INT32, v); }
void Writer::add_uint64(std::string_view key, uint64_t v) { impl_->scalar(key, ValueType::UINT64, v); }
void Writer::add_float32(std::string_view key, float v) { impl_->scalar(key, ValueType::FLOAT32, v); }
void Writer::add_float64(std::string_view key, double v) { impl_->scalar(key, ValueType::FLOAT64, v); }
void Writer::add_bool(std::string_view key, bool v) { impl_->scalar(key, ValueType::BOOL, uint8_t(v ? 1 : 0)); }
void Writer::add_string(std::string_view key, std::string_view v) { put_str(impl_->add(key, ValueType::STRING), v); }

void Writer::add_string_array(std::string_view key, const std::vector<std::string>& v) {
  auto& out = impl_->add(key, ValueType::ARRAY);
  put<uint32_t>(out, uint32_t(ValueType::STRING));
  put<uint64_t>(out, v.size());
  for (const auto& s : v) put_str(out, s);
}

void Writer::add_array(std::string_view key, ValueType elem_type, const void* elems, uint64_t count) {
  const uint64_t es = fixed_size(elem_type);
  if (es == 0) fail("gguf writer: key '{}': add_array needs a fixed-size element type, not {}", key,
                    value_type_name(elem_type));
  auto& out = impl_->add(key, ValueType::ARRAY);
  put<uint32_t>(out, uint32_t(elem_type));
  put<uint64_t>(out, count);
  if (count) put_bytes(out, elems, size_t(count * es));
}

void Writer::add_int32_array(std::string_view key, const std::vector<int32_t>& v) {
  add_array(key, ValueType::INT32, v.data(), v.size());
}
void Writer::add_float32_array(std::string_view key, const std::vector<float>& v) {
  add_array(key, ValueType::FLOAT32, v.data(), v.size());
}

void Writer::add_tensor(std::string_view name, GgmlType type, const std::vector<int64_t>& dims, const void* data,
                        uint64_t n_bytes) {
  const auto ts = ggml_type_size(uint32_t(type));
  if (!ts) fail("gguf writer: tensor '{}': unknown type {}", name, uint32_t(type));
  if (dims.empty() || dims.size() > 4) fail("gguf writer: tensor '{}': {} dims, expected 1..4", name, dims.size());
  uint64_t n = 1;
  for (int64_t d : dims) {
    if (d < 1) fail("gguf writer: tensor '{}': dim {} < 1", name, d);
    if (n > uint64_t(INT64_MAX) / uint64_t(d)) fail("gguf writer: tensor '{}': element count overflows", name);
    n *= uint64_t(d);
  }
  if (dims[0] % ts->block_elems != 0)
    fail("gguf writer: tensor '{}': dim 0 = {} is not a multiple of the {} block size {}", name, dims[0], ts->name,
         ts->block_elems);
  const uint64_t expect = n / uint64_t(ts->block_elems) * uint64_t(ts->block_bytes);
  if (n_bytes != expect)
    fail("gguf writer: tensor '{}': {} bytes given, a {} tensor of that shape needs {}", name, n_bytes, ts->name,
         expect);
  if (!impl_->names.insert(std::string(name)).second) fail("gguf writer: duplicate tensor '{}'", name);
  const auto* p = static_cast<const uint8_t*>(data);
  impl_->tensors.push_back({std::string(name), type, dims, std::vector<uint8_t>(p, p + n_bytes)});
}

std::vector<uint8_t> Writer::to_bytes() const {
  const Impl& m = *impl_;
  const uint64_t a = m.alignment;
  auto pad_to = [a](uint64_t n) { return (n + a - 1) / a * a; };

  std::vector<Impl::Kv> kvs = m.kvs;
  if (m.keys.count("general.alignment")) {
    // A caller-supplied alignment key must agree with the layout we write.
    for (const auto& kv : kvs) {
      if (kv.key != "general.alignment") continue;
      uint32_t t, v = 0;
      std::memcpy(&t, kv.encoded.data(), 4);
      if (t == uint32_t(ValueType::UINT32)) std::memcpy(&v, kv.encoded.data() + 4, 4);
      if (t != uint32_t(ValueType::UINT32) || v != a)
        fail("gguf writer: key 'general.alignment' disagrees with set_alignment({})", a);
    }
  } else if (a != 32) {
    Impl::Kv kv{"general.alignment", {}};
    put<uint32_t>(kv.encoded, uint32_t(ValueType::UINT32));
    put<uint32_t>(kv.encoded, uint32_t(a));
    kvs.insert(kvs.begin(), std::move(kv));
  }

  std::vector<uint8_t> out = {'G', 'G', 'U', 'F'};
  put<uint32_t>(out, 3);
  put<uint64_t>(out, m.tensors.size());
  put<uint64_t>(out, kvs.size());
  for (const auto& kv : kvs) {
    put_str(out, kv.key);
    put_bytes(out, kv.encoded.data(), kv.encoded.size());
  }
  uint64_t offset = 0;
  for (const auto& t : m.tensors) {
    put_str(out, t.name);
    put<uint32_t>(out, uint32_t(t.dims.size()));
    for (int64_t d : t.dims) put<uint64_t>(out, uint64_t(d));
    put<uint32_t>(out, uint32_t(t.type));
    put<uint64_t>(out, offset);
    offset += pad_to(t.data.size());
  }
  if (!m.tensors.empty()) {
    out.resize(pad_to(out.size()), 0);
    for (const auto& t : m.tensors) {
      put_bytes(out, t.data.data(), t.data.size());
      out.resize(pad_to(out.size()), 0);
    }
  }
  return out;
}

void Writer::write(const std::string& path) const {
  const std::vector<uint8_t> bytes = to_bytes();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) fail("{}: cannot create: {}", path, std::strerror(errno));
  const size_t n = std::fwrite(bytes.data(), 1, bytes.size(), f);
  const bool ok = n == bytes.size() && std::fflush(f) == 0;
  const int e = errno;
  if (std::fclose(f) != 0 || !ok) fail("{}: write failed: {}", path, std::strerror(e ? e : EIO));
}

}  // namespace kvq::gguf

// GGUF reader. The file is untrusted: every count, offset and size is checked
// against the bytes actually remaining before it is used, so a hostile header
// produces an error rather than a huge allocation, a long loop or a wild read.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <unordered_set>

#include "base/error.h"
#include "gguf/gguf.h"

static_assert(std::endian::native == std::endian::little, "GGUF reader assumes a little-endian host");

namespace kvq::gguf {

namespace {

constexpr uint64_t kDefaultAlignment = 32;
constexpr int kMaxArrayDepth = 8;  // arrays of arrays: bounded recursion
// Counts only bound how much is parsed; memory grows with what actually parses,
// so a large file with a bogus count cannot trigger a huge up-front allocation.
constexpr uint64_t kMaxReserve = 1 << 16;

// Fixed payload size of a scalar value type, 0 for STRING / ARRAY / unknown.
uint64_t scalar_size(ValueType t) {
  switch (t) {
    case ValueType::UINT8: case ValueType::INT8: case ValueType::BOOL: return 1;
    case ValueType::UINT16: case ValueType::INT16: return 2;
    case ValueType::UINT32: case ValueType::INT32: case ValueType::FLOAT32: return 4;
    case ValueType::UINT64: case ValueType::INT64: case ValueType::FLOAT64: return 8;
    default: return 0;
  }
}

bool is_known(uint32_t t) { return t <= uint32_t(ValueType::FLOAT64); }
bool is_integer(ValueType t) {
  switch (t) {
    case ValueType::UINT8: case ValueType::INT8: case ValueType::UINT16: case ValueType::INT16:
    case ValueType::UINT32: case ValueType::INT32: case ValueType::UINT64: case ValueType::INT64:
      return true;
    default: return false;
  }
}
bool is_signed(ValueType t) {
  return t == ValueType::INT8 || t == ValueType::INT16 || t == ValueType::INT32 || t == ValueType::INT64;
}
bool is_float(ValueType t) { return t == ValueType::FLOAT32 || t == ValueType::FLOAT64; }

// Raw little-endian bits -> sign/zero-extended 64-bit pattern.
uint64_t load_bits(const uint8_t* p, ValueType t) {
  switch (t) {
    case ValueType::UINT8: case ValueType::BOOL: return p[0];
    case ValueType::INT8: return uint64_t(int64_t(int8_t(p[0])));
    case ValueType::UINT16: { uint16_t v; std::memcpy(&v, p, 2); return v; }
    case ValueType::INT16: { int16_t v; std::memcpy(&v, p, 2); return uint64_t(int64_t(v)); }
    case ValueType::UINT32: case ValueType::FLOAT32: { uint32_t v; std::memcpy(&v, p, 4); return v; }
    case ValueType::INT32: { int32_t v; std::memcpy(&v, p, 4); return uint64_t(int64_t(v)); }
    default: { uint64_t v; std::memcpy(&v, p, 8); return v; }
  }
}

double bits_as_double(uint64_t bits, ValueType t) {
  if (t == ValueType::FLOAT32) { float f; uint32_t b = uint32_t(bits); std::memcpy(&f, &b, 4); return f; }
  double d; std::memcpy(&d, &bits, 8); return d;
}

// Printable, bounded rendering of untrusted text for one-line error messages.
std::string quoted(std::string_view s) {
  std::string out = "'";
  size_t n = 0;
  for (unsigned char c : s) {
    if (++n > 80) { out += "..."; break; }
    if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') out += char(c);
    else out += fmt::format("\\x{:02x}", c);
  }
  return out + "'";
}

}  // namespace

std::string_view value_type_name(ValueType t) {
  switch (t) {
    case ValueType::UINT8: return "uint8";
    case ValueType::INT8: return "int8";
    case ValueType::UINT16: return "uint16";
    case ValueType::INT16: return "int16";
    case ValueType::UINT32: return "uint32";
    case ValueType::INT32: return "int32";
    case ValueType::FLOAT32: return "float32";
    case ValueType::BOOL: return "bool";
    case ValueType::STRING: return "string";
    case ValueType::ARRAY: return "array";
    case ValueType::UINT64: return "uint64";
    case ValueType::INT64: return "int64";
    case ValueType::FLOAT64: return "float64";
  }
  return "unknown";
}

// ---------------------------------------------------------------- Value

std::optional<int64_t> Value::as_int() const {
  if (type_ == ValueType::BOOL) return int64_t(bits_ != 0);
  if (!is_integer(type_)) return std::nullopt;
  if (type_ == ValueType::UINT64 && bits_ > uint64_t(std::numeric_limits<int64_t>::max())) return std::nullopt;
  return int64_t(bits_);
}

std::optional<uint64_t> Value::as_uint() const {
  if (type_ == ValueType::BOOL) return uint64_t(bits_ != 0);
  if (!is_integer(type_)) return std::nullopt;
  if (is_signed(type_) && int64_t(bits_) < 0) return std::nullopt;
  return bits_;
}

std::optional<double> Value::as_float() const {
  if (is_float(type_)) return bits_as_double(bits_, type_);
  if (!is_integer(type_)) return std::nullopt;
  return is_signed(type_) ? double(int64_t(bits_)) : double(bits_);
}

std::optional<bool> Value::as_bool() const {
  if (type_ != ValueType::BOOL) return std::nullopt;
  return bits_ != 0;
}

std::optional<std::string_view> Value::as_string() const {
  if (type_ != ValueType::STRING) return std::nullopt;
  return str_;
}

namespace {
[[noreturn]] void element_error(const std::string* path, std::string_view key, const std::string& what) {
  fail("{}: key {}: {}", path ? *path : std::string("<gguf>"), quoted(key), what);
}
}  // namespace

std::string_view Value::string_at(uint64_t i) const {
  if (type_ != ValueType::ARRAY || array_type_ != ValueType::STRING)
    element_error(path_, key_, fmt::format("is not an array of strings ({})", describe()));
  if (i >= array_size_) element_error(path_, key_, fmt::format("index {} out of range (array size {})", i, array_size_));
  return array_strings_[i];
}

int64_t Value::int_at(uint64_t i) const {
  if (type_ != ValueType::ARRAY || !(is_integer(array_type_) || array_type_ == ValueType::BOOL))
    element_error(path_, key_, fmt::format("is not an array of integers ({})", describe()));
  if (i >= array_size_) element_error(path_, key_, fmt::format("index {} out of range (array size {})", i, array_size_));
  const uint64_t bits = load_bits(array_data_ + i * scalar_size(array_type_), array_type_);
  if (array_type_ == ValueType::UINT64 && bits > uint64_t(std::numeric_limits<int64_t>::max()))
    element_error(path_, key_, fmt::format("element {} = {} does not fit int64", i, bits));
  return int64_t(bits);
}

double Value::float_at(uint64_t i) const {
  if (type_ != ValueType::ARRAY || !(is_integer(array_type_) || is_float(array_type_)))
    element_error(path_, key_, fmt::format("is not a numeric array ({})", describe()));
  if (i >= array_size_) element_error(path_, key_, fmt::format("index {} out of range (array size {})", i, array_size_));
  const uint64_t bits = load_bits(array_data_ + i * scalar_size(array_type_), array_type_);
  if (is_float(array_type_)) return bits_as_double(bits, array_type_);
  return is_signed(array_type_) ? double(int64_t(bits)) : double(bits);
}

std::string Value::describe() const {
  if (type_ != ValueType::ARRAY) return std::string(value_type_name(type_));
  return fmt::format("array of {}", value_type_name(array_type_));
}

int64_t TensorInfo::n_elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;  // validated against overflow when read
  return n;
}

// ---------------------------------------------------------------- File

namespace {

// Bounds-checked cursor over the file bytes.
struct Cursor {
  const std::string* path;
  const uint8_t* base;
  uint64_t size;
  uint64_t pos = 0;

  [[noreturn]] void fail_at(const std::string& what) const { throw Error(*path + ": " + what); }
  uint64_t left() const { return size - pos; }
  [[noreturn]] void eof(uint64_t n, const std::string& what) const {
    fail_at(fmt::format("unexpected end of file reading {} at offset {} (needs {} bytes, {} left)", what, pos, n,
                         left()));
  }
  const uint8_t* take(uint64_t n, const std::string& what) {
    if (n > left()) eof(n, what);
    const uint8_t* p = base + pos;
    pos += n;
    return p;
  }
  uint32_t u32(const std::string& what) { uint32_t v; std::memcpy(&v, take(4, what), 4); return v; }
  uint64_t u64(const std::string& what) { uint64_t v; std::memcpy(&v, take(8, what), 8); return v; }
  std::string_view str(const std::string& what) {
    const uint64_t start = pos;
    const uint64_t n = u64(what + " length");
    if (n > left())
      fail_at(fmt::format("{} at offset {} has length {}, past end of file ({} bytes left)", what, start, n, left()));
    return {reinterpret_cast<const char*>(take(n, what)), size_t(n)};
  }
};

}  // namespace


struct File::Impl {
  std::string path;
  std::vector<uint8_t> owned;       // from_bytes
  void* map = nullptr;              // open(): the mapping
  size_t map_size = 0;
  const uint8_t* base = nullptr;
  uint64_t size = 0;
  uint32_t version = 0;
  uint64_t alignment = kDefaultAlignment;
  uint64_t data_start = 0;
  std::vector<KeyValue> metadata;
  std::unordered_map<std::string_view, size_t> key_index;
  std::vector<TensorInfo> tensors;
  std::unordered_map<std::string_view, size_t> tensor_index;

  ~Impl() {
    if (map) ::munmap(map, map_size);
  }

  [[noreturn]] void error(const std::string& what) const { throw Error(path + ": " + what); }

  void parse();
  void read_array(Cursor& c, Value& v, const std::string& kname, int depth);
};


void File::Impl::parse() {
  Cursor c{&path, base, size};
  if (size < 4 || std::memcmp(base, "GGUF", 4) != 0) {
    if (size == 0) error("not a GGUF file (bad magic): file is empty");
    error("not a GGUF file (bad magic)");
  }
  c.pos = 4;
  version = c.u32("version");
  if (version == 1) error("GGUF version 1 is not supported (only versions 2 and 3)");
  if (version != 2 && version != 3) {
    // A byte-swapped small version means a big-endian file.
    if (version >= 0x01000000u && (version & 0xffffu) == 0)
      error(fmt::format("big-endian GGUF (version field {:#x}) is not supported", version));
    error(fmt::format("unsupported GGUF version {} (only versions 2 and 3)", version));
  }
  const uint64_t n_tensors = c.u64("tensor count");
  const uint64_t n_kv = c.u64("metadata key/value count");
  // Minimum encoded sizes: a key/value is key length (8) + type (4) + >= 1 byte;
  // a tensor info is name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
  if (n_kv > c.left() / 13)
    error(fmt::format("metadata key/value count {} runs past end of file (the remaining {} bytes hold at most {})", n_kv,
                      c.left(), c.left() / 13));
  if (n_tensors > c.left() / 32)
    error(fmt::format("tensor count {} runs past end of file (the remaining {} bytes hold at most {})", n_tensors, c.left(),
                      c.left() / 32));

  metadata.reserve(size_t(std::min<uint64_t>(n_kv, kMaxReserve)));
  for (uint64_t i = 0; i < n_kv; ++i) {
    KeyValue kv;
    const uint64_t key_pos = c.pos;
    kv.key = c.str(fmt::format("key of metadata entry {}", i));
    const std::string kname = "key " + quoted(kv.key);
    if (key_index.count(kv.key)) error(fmt::format("duplicate metadata {} (at offset {})", kname, key_pos));
    Value& v = kv.value;
    v.path_ = &path;
    v.key_ = kv.key;
    const uint32_t t = c.u32(kname + " value type");
    if (!is_known(t)) error(fmt::format("{} has unknown value type {}", kname, t));
    v.type_ = ValueType(t);
    if (v.type_ == ValueType::STRING) {
      v.str_ = c.str(kname + " string value");
    } else if (v.type_ == ValueType::ARRAY) {
      read_array(c, v, kname, 0);
    } else {
      const uint64_t n = scalar_size(v.type_);
      const uint8_t* p = c.take(n, kname + " value");
      if (v.type_ == ValueType::BOOL && p[0] > 1)
        error(fmt::format("{} is a bool with invalid byte value {}", kname, p[0]));
      v.bits_ = load_bits(p, v.type_);
    }
    key_index.emplace(kv.key, metadata.size());
    metadata.push_back(std::move(kv));
  }

  if (auto it = key_index.find("general.alignment"); it != key_index.end()) {
    const Value& v = metadata[it->second].value;
    const auto a = v.as_uint();
    if (!is_integer(v.type()) || !a)
      error(fmt::format("key 'general.alignment' has type {}, expected an unsigned integer", v.describe()));
    if (*a == 0 || (*a & (*a - 1)) != 0)
      error(fmt::format("key 'general.alignment' = {} is not a non-zero power of two", *a));
    alignment = *a;
  }

  tensors.reserve(size_t(std::min<uint64_t>(n_tensors, kMaxReserve)));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo ti{};
    const uint64_t info_pos = c.pos;
    ti.name = c.str(fmt::format("name of tensor {}", i));
    const std::string tname = "tensor " + quoted(ti.name);
    if (tensor_index.count(ti.name)) error(fmt::format("duplicate {} (info at offset {})", tname, info_pos));
    const uint32_t n_dims = c.u32(tname + " n_dims");
    if (n_dims < 1 || n_dims > 4) error(fmt::format("{} has n_dims {}, expected 1..4", tname, n_dims));
    uint64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim = c.u64(fmt::format("{} dim {}", tname, d));
      if (dim == 0) error(fmt::format("{} has dim {} = 0", tname, d));
      if (dim > uint64_t(std::numeric_limits<int64_t>::max()) ||
          n_elements > uint64_t(std::numeric_limits<int64_t>::max()) / dim)
        error(fmt::format("{} element count overflows at dim {} = {}", tname, d, dim));
      n_elements *= dim;
      ti.dims.push_back(int64_t(dim));
    }
    const uint32_t type_id = c.u32(tname + " type");
    const auto ts = ggml_type_size(type_id);
    if (!ts) error(fmt::format("{} has unknown tensor type {}", tname, type_id));
    ti.type = ts->type;
    if (ti.dims[0] % ts->block_elems != 0)
      error(fmt::format("{} dim 0 = {} is not a multiple of the {} block size {}", tname, ti.dims[0], ts->name,
                        ts->block_elems));
    const uint64_t n_blocks = n_elements / uint64_t(ts->block_elems);
    if (n_blocks > std::numeric_limits<uint64_t>::max() / uint64_t(ts->block_bytes))
      error(fmt::format("{} byte size overflows", tname));
    ti.n_bytes = n_blocks * uint64_t(ts->block_bytes);
    ti.offset = c.u64(tname + " offset");
    if (ti.offset % alignment != 0)
      error(fmt::format("{} offset {} is not a multiple of the alignment {}", tname, ti.offset, alignment));
    tensor_index.emplace(ti.name, tensors.size());
    tensors.push_back(std::move(ti));
  }

  // Data section: the first aligned offset after the tensor infos. No overflow:
  // the padding is below the alignment (<= 2^63) and info_end is below 2^63.
  const uint64_t info_end = c.pos;
  const uint64_t rem = info_end % alignment;
  data_start = info_end + (rem ? alignment - rem : 0);
  if (!tensors.empty() && data_start > size)
    error(fmt::format("data section (aligned to {}) would start past end of file (tensor infos end at offset {}, "
                      "file is {} bytes)",
                      alignment, info_end, size));

  const uint64_t data_size = tensors.empty() ? 0 : size - data_start;
  for (TensorInfo& ti : tensors) {
    if (ti.offset > data_size || ti.n_bytes > data_size - ti.offset)
      error(fmt::format("tensor {} data [{}, +{}) at file offset {} extends past end of file (data section holds {} "
                        "bytes)",
                        quoted(ti.name), ti.offset, ti.n_bytes, data_start + std::min(ti.offset, data_size),
                        data_size));
    ti.data = base + data_start + ti.offset;
  }
  std::vector<const TensorInfo*> by_offset;
  by_offset.reserve(tensors.size());
  for (const TensorInfo& ti : tensors) by_offset.push_back(&ti);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo* a = by_offset[i - 1];
    const TensorInfo* b = by_offset[i];
    if (a->offset + a->n_bytes > b->offset)
      error(fmt::format("tensors {} [{}, {}) and {} [{}, {}) overlap", quoted(a->name), a->offset,
                        a->offset + a->n_bytes, quoted(b->name), b->offset, b->offset + b->n_bytes));
  }
}

// Arrays: element type, count, payload. Numeric payloads stay in the file;
// string arrays get a view per element; arrays of arrays are validated and
// skipped (their elements are not accessible through Value).
void File::Impl::read_array(Cursor& c, Value& v, const std::string& kname, int depth) {
  if (depth >= kMaxArrayDepth) error(fmt::format("{} has arrays nested deeper than {}", kname, kMaxArrayDepth));
  const uint32_t et = c.u32(kname + " array element type");
  if (!is_known(et)) error(fmt::format("{} is an array of unknown value type {}", kname, et));
  const uint64_t count_pos = c.pos;
  const uint64_t n = c.u64(kname + " array length");
  const ValueType elem = ValueType(et);
  if (depth == 0) {
    v.array_type_ = elem;
    v.array_size_ = n;
  }
  const uint64_t min_elem = elem == ValueType::STRING ? 8 : elem == ValueType::ARRAY ? 12 : scalar_size(elem);
  if (n > c.left() / min_elem)
    error(fmt::format("{} array of {} has {} elements (count at offset {}), past end of file ({} bytes left)", kname,
                      value_type_name(elem), n, count_pos, c.left()));
  if (elem == ValueType::STRING) {
    if (depth == 0) v.array_strings_.reserve(size_t(std::min<uint64_t>(n, kMaxReserve)));
    for (uint64_t i = 0; i < n; ++i) {
      std::string_view s = c.str(fmt::format("{} element {}", kname, i));
      if (depth == 0) v.array_strings_.push_back(s);
    }
  } else if (elem == ValueType::ARRAY) {
    Value inner;
    for (uint64_t i = 0; i < n; ++i) read_array(c, inner, kname, depth + 1);
  } else {
    const uint8_t* p = c.take(n * min_elem, kname + " array data");
    if (elem == ValueType::BOOL)
      for (uint64_t i = 0; i < n; ++i)
        if (p[i] > 1) error(fmt::format("{} bool element {} has invalid byte value {}", kname, i, p[i]));
    if (depth == 0) v.array_data_ = p;
  }
}

File::File(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
File::File(File&&) noexcept = default;
File& File::operator=(File&&) noexcept = default;
File::~File() = default;

File File::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) impl->error(fmt::format("cannot open: {}", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    impl->error(fmt::format("cannot stat: {}", std::strerror(e)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    impl->error("not a regular file");
  }
  impl->size = uint64_t(st.st_size);
  if (impl->size > 0) {
    void* m = ::mmap(nullptr, size_t(impl->size), PROT_READ, MAP_PRIVATE, fd, 0);
    const int e = errno;
    ::close(fd);
    if (m == MAP_FAILED) impl->error(fmt::format("cannot mmap {} bytes: {}", impl->size, std::strerror(e)));
    impl->map = m;
    impl->map_size = size_t(impl->size);
    impl->base = static_cast<const uint8_t*>(m);
  } else {
    ::close(fd);
  }
  impl->parse();
  return File(std::move(impl));
}

File File::from_bytes(std::vector<uint8_t> bytes, const std::string& name) {
  auto impl = std::make_unique<Impl>();
  impl->path = name;
  impl->owned = std::move(bytes);
  impl->base = impl->owned.data();
  impl->size = impl->owned.size();
  impl->parse();
  return File(std::move(impl));
}

const std::string& File::path() const { return impl_->path; }
uint32_t File::version() const { return impl_->version; }
uint64_t File::alignment() const { return impl_->alignment; }
uint64_t File::file_size() const { return impl_->size; }
uint64_t File::data_offset() const { return impl_->data_start; }
const std::vector<KeyValue>& File::metadata() const { return impl_->metadata; }

const Value* File::find(std::string_view key) const {
  auto it = impl_->key_index.find(key);
  return it == impl_->key_index.end() ? nullptr : &impl_->metadata[it->second].value;
}

namespace {
[[noreturn]] void type_error(const std::string& path, std::string_view key, const Value& v, const char* expected) {
  fail("{}: key {} has type {}, expected {}", path, quoted(key), v.describe(), expected);
}
}  // namespace

std::optional<int64_t> File::get_int(std::string_view key) const {
  const Value* v = find(key);
  if (!v) return std::nullopt;
  if (!is_integer(v->type()) && v->type() != ValueType::BOOL) type_error(path(), key, *v, "an integer");
  auto r = v->as_int();
  if (!r) fail("{}: key {} value {} does not fit int64", path(), quoted(key), v->bits_);
  return r;
}

std::optional<double> File::get_float(std::string_view key) const {
  const Value* v = find(key);
  if (!v) return std::nullopt;
  auto r = v->as_float();
  if (!r) type_error(path(), key, *v, "a number");
  return r;
}

std::optional<bool> File::get_bool(std::string_view key) const {
  const Value* v = find(key);
  if (!v) return std::nullopt;
  auto r = v->as_bool();
  if (!r) type_error(path(), key, *v, "bool");
  return r;
}

std::optional<std::string_view> File::get_string(std::string_view key) const {
  const Value* v = find(key);
  if (!v) return std::nullopt;
  auto r = v->as_string();
  if (!r) type_error(path(), key, *v, "string");
  return r;
}

const Value* File::get_array(std::string_view key) const {
  const Value* v = find(key);
  if (v && v->type() != ValueType::ARRAY) type_error(path(), key, *v, "an array");
  return v;
}

const std::vector<TensorInfo>& File::tensors() const { return impl_->tensors; }

const TensorInfo* File::find_tensor(std::string_view name) const {
  auto it = impl_->tensor_index.find(name);
  return it == impl_->tensor_index.end() ? nullptr : &impl_->tensors[it->second];
}

}  // namespace kvq::gguf

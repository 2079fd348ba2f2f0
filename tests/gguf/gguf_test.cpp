#include "gguf/gguf.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "test_util.h"

namespace kvq::gguf {
namespace {

// ---------------------------------------------------------------- helpers

// Hand-assembled GGUF bytes, for inputs the Writer refuses to produce.
struct Raw {
  std::vector<uint8_t> b;
  Raw& bytes(const void* p, size_t n) {
    const auto* c = static_cast<const uint8_t*>(p);
    b.insert(b.end(), c, c + n);
    return *this;
  }
  Raw& u8(uint8_t v) { return bytes(&v, 1); }
  Raw& u32(uint32_t v) { return bytes(&v, 4); }
  Raw& u64(uint64_t v) { return bytes(&v, 8); }
  Raw& str(std::string_view s) { u64(s.size()); return bytes(s.data(), s.size()); }
  Raw& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    bytes("GGUF", 4);
    u32(version);
    u64(n_tensors);
    return u64(n_kv);
  }
  Raw& kv_u32(std::string_view key, uint32_t v) { str(key); u32(uint32_t(ValueType::UINT32)); return u32(v); }
  Raw& tensor_info(std::string_view name, std::vector<uint64_t> dims, uint32_t type, uint64_t offset) {
    str(name);
    u32(uint32_t(dims.size()));
    for (uint64_t d : dims) u64(d);
    u32(type);
    return u64(offset);
  }
  Raw& pad(size_t alignment = 32) {
    while (b.size() % alignment) b.push_back(0);
    return *this;
  }
  Raw& zeros(size_t n) {
    b.resize(b.size() + n, 0);
    return *this;
  }
};

std::string error_of(std::vector<uint8_t> bytes, const std::string& name = "bad.gguf") {
  try {
    File f = File::from_bytes(std::move(bytes), name);
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

// The error names the file first, is one line and contains `needle`.
#define EXPECT_GGUF_ERROR(bytes, needle)                                           \
  do {                                                                             \
    const std::string msg_ = error_of(bytes);                                      \
    EXPECT_EQ(msg_.rfind("bad.gguf: ", 0), 0u) << msg_;                            \
    EXPECT_NE(msg_.find(needle), std::string::npos) << "message: " << msg_;        \
    EXPECT_EQ(msg_.find('\n'), std::string::npos) << msg_;                         \
  } while (0)

std::vector<uint8_t> f32_bytes(std::vector<float> v) {
  std::vector<uint8_t> out(v.size() * 4);
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// A small valid file whose last tensor ends exactly at the end of the file, so
// that every proper prefix is invalid.
std::vector<uint8_t> small_valid_file() {
  Writer w;
  w.add_string("general.architecture", "tiny");
  w.add_uint32("tiny.block_count", 2);
  w.add_string_array("tokenizer.ggml.tokens", {"a", "bc", ""});
  w.add_float32_array("scores", {0.5f, -1.0f});
  std::vector<float> x(8), y(16);
  for (int i = 0; i < 8; ++i) x[size_t(i)] = float(i);
  for (int i = 0; i < 16; ++i) y[size_t(i)] = -float(i);
  auto xb = f32_bytes(x), yb = f32_bytes(y);
  w.add_tensor("x", GgmlType::F32, {8}, xb.data(), xb.size());
  w.add_tensor("y", GgmlType::F32, {4, 4}, yb.data(), yb.size());
  return w.to_bytes();
}

// ---------------------------------------------------------------- writer -> reader

TEST(GgufRoundTrip, EveryMetadataType) {
  Writer w;
  w.add_uint8("u8", 200);
  w.add_int8("i8", -100);
  w.add_uint16("u16", 60000);
  w.add_int16("i16", -30000);
  w.add_uint32("u32", 4000000000u);
  w.add_int32("i32", -2000000000);
  w.add_uint64("u64", 18000000000000000000ull);
  w.add_int64("i64", -9000000000000000000ll);
  w.add_float32("f32", 1.5f);
  w.add_float64("f64", -2.25e300);
  w.add_bool("yes", true);
  w.add_bool("no", false);
  w.add_string("s", "h\xc3\xa9llo");
  w.add_string("empty", "");
  w.add_string_array("sa", {"one", "", "three"});
  w.add_int32_array("ia", {1, -2, 3});
  w.add_float32_array("fa", {0.25f, -8.0f});
  const uint8_t u8a[] = {0, 255};
  const int8_t i8a[] = {-128, 127};
  const uint16_t u16a[] = {65535};
  const int16_t i16a[] = {-32768};
  const uint32_t u32a[] = {7, 4294967295u};
  const uint64_t u64a[] = {1, 18446744073709551615ull};
  const int64_t i64a[] = {-5};
  const double f64a[] = {3.5, -0.0};
  const uint8_t ba[] = {1, 0, 1};
  w.add_array("u8a", ValueType::UINT8, u8a, 2);
  w.add_array("i8a", ValueType::INT8, i8a, 2);
  w.add_array("u16a", ValueType::UINT16, u16a, 1);
  w.add_array("i16a", ValueType::INT16, i16a, 1);
  w.add_array("u32a", ValueType::UINT32, u32a, 2);
  w.add_array("u64a", ValueType::UINT64, u64a, 2);
  w.add_array("i64a", ValueType::INT64, i64a, 1);
  w.add_array("f64a", ValueType::FLOAT64, f64a, 2);
  w.add_array("ba", ValueType::BOOL, ba, 3);
  w.add_array("none", ValueType::INT32, nullptr, 0);

  const std::string path = test::temp_dir() + "/all_types.gguf";
  w.write(path);
  const File f = File::open(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.file_size(), std::filesystem::file_size(path));
  EXPECT_TRUE(f.tensors().empty());
  ASSERT_EQ(f.metadata().size(), 27u);
  EXPECT_EQ(f.metadata()[0].key, "u8");
  EXPECT_EQ(f.metadata()[26].key, "none");

  EXPECT_EQ(f.find("u8")->type(), ValueType::UINT8);
  EXPECT_EQ(f.get_int("u8"), 200);
  EXPECT_EQ(f.get_int("i8"), -100);
  EXPECT_EQ(f.get_int("u16"), 60000);
  EXPECT_EQ(f.get_int("i16"), -30000);
  EXPECT_EQ(f.get_int("u32"), 4000000000ll);
  EXPECT_EQ(f.get_int("i32"), -2000000000);
  EXPECT_EQ(f.find("u64")->as_uint(), 18000000000000000000ull);
  EXPECT_EQ(f.find("u64")->as_int(), std::nullopt);  // does not fit int64
  EXPECT_EQ(f.get_int("i64"), -9000000000000000000ll);
  EXPECT_EQ(f.find("i64")->as_uint(), std::nullopt);
  EXPECT_EQ(f.get_float("f32"), 1.5);
  EXPECT_EQ(f.get_float("f64"), -2.25e300);
  EXPECT_EQ(f.get_float("i32"), -2000000000.0);  // integers are numbers too
  EXPECT_EQ(f.get_bool("yes"), true);
  EXPECT_EQ(f.get_bool("no"), false);
  EXPECT_EQ(f.get_int("yes"), 1);
  EXPECT_EQ(f.get_string("s"), "h\xc3\xa9llo");
  EXPECT_EQ(f.get_string("empty"), "");
  EXPECT_EQ(f.get_int("absent"), std::nullopt);
  EXPECT_EQ(f.get_string("absent"), std::nullopt);
  EXPECT_EQ(f.get_array("absent"), nullptr);
  EXPECT_EQ(f.find("absent"), nullptr);
  EXPECT_EQ(f.find("s")->as_int(), std::nullopt);
  EXPECT_EQ(f.find("u8")->as_string(), std::nullopt);
  EXPECT_EQ(f.find("f32")->as_int(), std::nullopt);

  const Value* sa = f.get_array("sa");
  ASSERT_NE(sa, nullptr);
  EXPECT_EQ(sa->array_type(), ValueType::STRING);
  ASSERT_EQ(sa->array_size(), 3u);
  EXPECT_EQ(sa->string_at(0), "one");
  EXPECT_EQ(sa->string_at(1), "");
  EXPECT_EQ(sa->string_at(2), "three");
  EXPECT_EQ(sa->describe(), "array of string");
  const Value* ia = f.get_array("ia");
  EXPECT_EQ(ia->array_type(), ValueType::INT32);
  EXPECT_EQ(ia->int_at(1), -2);
  EXPECT_EQ(ia->float_at(2), 3.0);
  EXPECT_EQ(f.get_array("fa")->float_at(0), 0.25);
  EXPECT_EQ(f.get_array("fa")->float_at(1), -8.0);
  EXPECT_EQ(f.get_array("u8a")->int_at(1), 255);
  EXPECT_EQ(f.get_array("i8a")->int_at(0), -128);
  EXPECT_EQ(f.get_array("i8a")->int_at(1), 127);
  EXPECT_EQ(f.get_array("u16a")->int_at(0), 65535);
  EXPECT_EQ(f.get_array("i16a")->int_at(0), -32768);
  EXPECT_EQ(f.get_array("u32a")->int_at(1), 4294967295ll);
  EXPECT_EQ(f.get_array("u64a")->int_at(0), 1);
  EXPECT_EQ(f.get_array("u64a")->float_at(1), 18446744073709551615.0);
  EXPECT_EQ(f.get_array("i64a")->int_at(0), -5);
  EXPECT_EQ(f.get_array("f64a")->float_at(0), 3.5);
  EXPECT_TRUE(std::signbit(f.get_array("f64a")->float_at(1)));
  EXPECT_EQ(f.get_array("ba")->int_at(0), 1);
  EXPECT_EQ(f.get_array("ba")->int_at(1), 0);
  EXPECT_EQ(f.get_array("none")->array_size(), 0u);

  // Element accessors check index and element type, naming file and key.
  auto msg = [](auto fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("<no error>");
  };
  std::string m = msg([&] { sa->string_at(3); });
  EXPECT_NE(m.find(path + ": key 'sa': index 3 out of range (array size 3)"), std::string::npos) << m;
  m = msg([&] { sa->int_at(0); });
  EXPECT_NE(m.find("'sa': is not an array of integers (array of string)"), std::string::npos) << m;
  m = msg([&] { f.get_array("fa")->int_at(0); });
  EXPECT_NE(m.find("is not an array of integers"), std::string::npos) << m;
  m = msg([&] { ia->string_at(0); });
  EXPECT_NE(m.find("is not an array of strings"), std::string::npos) << m;
  m = msg([&] { f.get_array("u64a")->int_at(1); });
  EXPECT_NE(m.find("does not fit int64"), std::string::npos) << m;
  m = msg([&] { f.find("s")->int_at(0); });
  EXPECT_NE(m.find("is not an array"), std::string::npos) << m;

  // Typed getters name the key and both types.
  m = msg([&] { f.get_string("u32"); });
  EXPECT_EQ(m, path + ": key 'u32' has type uint32, expected string");
  m = msg([&] { f.get_int("s"); });
  EXPECT_EQ(m, path + ": key 's' has type string, expected an integer");
  m = msg([&] { f.get_int("f32"); });
  EXPECT_EQ(m, path + ": key 'f32' has type float32, expected an integer");
  m = msg([&] { f.get_float("sa"); });
  EXPECT_EQ(m, path + ": key 'sa' has type array of string, expected a number");
  m = msg([&] { f.get_bool("u8"); });
  EXPECT_EQ(m, path + ": key 'u8' has type uint8, expected bool");
  m = msg([&] { f.get_array("u8"); });
  EXPECT_EQ(m, path + ": key 'u8' has type uint8, expected an array");
  m = msg([&] { f.get_int("u64"); });
  EXPECT_NE(m.find("key 'u64' value 18000000000000000000 does not fit int64"), std::string::npos) << m;
}

TEST(GgufRoundTrip, ValueTypeNames) {
  EXPECT_EQ(value_type_name(ValueType::UINT8), "uint8");
  EXPECT_EQ(value_type_name(ValueType::STRING), "string");
  EXPECT_EQ(value_type_name(ValueType::ARRAY), "array");
  EXPECT_EQ(value_type_name(ValueType::FLOAT64), "float64");
  EXPECT_EQ(value_type_name(ValueType(77)), "unknown");
}

TEST(GgufRoundTrip, TensorData) {
  Writer w;
  w.add_string("general.architecture", "t");
  std::vector<float> a(3 * 5);
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(i) * 0.5f;
  auto ab = f32_bytes(a);
  std::vector<uint8_t> h(2 * 7 * 2), q(34 * 2 * 3), k(144 * 2);
  for (size_t i = 0; i < h.size(); ++i) h[i] = uint8_t(i * 7 + 1);
  for (size_t i = 0; i < q.size(); ++i) q[i] = uint8_t(i * 13 + 5);
  for (size_t i = 0; i < k.size(); ++i) k[i] = uint8_t(i * 3);
  w.add_tensor("a", GgmlType::F32, {5, 3}, ab.data(), ab.size());
  w.add_tensor("h", GgmlType::F16, {7, 2}, h.data(), h.size());
  w.add_tensor("q", GgmlType::Q8_0, {64, 3}, q.data(), q.size());
  w.add_tensor("k", GgmlType::Q4_K, {512, 1, 1, 1}, k.data(), k.size());
  const File f = File::from_bytes(w.to_bytes(), "mem");
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.data_offset() % 32, 0u);
  struct Expect {
    const char* name;
    GgmlType type;
    std::vector<int64_t> dims;
    const std::vector<uint8_t>* data;
  };
  const Expect expect[] = {{"a", GgmlType::F32, {5, 3}, &ab},
                           {"h", GgmlType::F16, {7, 2}, &h},
                           {"q", GgmlType::Q8_0, {64, 3}, &q},
                           {"k", GgmlType::Q4_K, {512, 1, 1, 1}, &k}};
  for (size_t i = 0; i < 4; ++i) {
    const TensorInfo& t = f.tensors()[i];
    SCOPED_TRACE(expect[i].name);
    EXPECT_EQ(t.name, expect[i].name);
    EXPECT_EQ(t.type, expect[i].type);
    EXPECT_EQ(t.dims, expect[i].dims);
    EXPECT_EQ(t.n_bytes, expect[i].data->size());
    EXPECT_EQ(t.offset % 32, 0u);
    EXPECT_EQ(t.data, f.find_tensor(expect[i].name)->data);
    EXPECT_EQ(std::vector<uint8_t>(t.data, t.data + t.n_bytes), *expect[i].data);
  }
  EXPECT_EQ(f.tensors()[0].n_elements(), 15);
  EXPECT_EQ(f.tensors()[2].n_elements(), 192);
  EXPECT_EQ(f.find_tensor("nope"), nullptr);
  float v;
  std::memcpy(&v, f.find_tensor("a")->data + 4 * 7, 4);
  EXPECT_EQ(v, 3.5f);
}

TEST(GgufRoundTrip, CustomAlignmentAndMove) {
  Writer w;
  w.set_alignment(64);
  std::vector<uint8_t> d(12, 9);
  w.add_tensor("t0", GgmlType::I8, {12}, d.data(), d.size());
  w.add_tensor("t1", GgmlType::I8, {12}, d.data(), d.size());
  const std::vector<uint8_t> bytes = w.to_bytes();
  EXPECT_EQ(bytes.size() % 64, 0u);
  File f = File::from_bytes(bytes);
  EXPECT_EQ(f.path(), "<memory>");
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ(f.get_int("general.alignment"), 64);
  EXPECT_EQ(f.find_tensor("t1")->offset, 64u);
  const uint8_t* p = f.find_tensor("t1")->data;
  File g = std::move(f);  // views stay valid across a move
  EXPECT_EQ(g.find_tensor("t1")->data, p);
  EXPECT_EQ(p[11], 9);
  EXPECT_EQ(g.metadata()[0].key, "general.alignment");
}

TEST(GgufRoundTrip, WriterRejectsBadInput) {
  Writer w;
  EXPECT_THROW(w.set_alignment(0), Error);
  EXPECT_THROW(w.set_alignment(48), Error);
  w.add_uint32("k", 1);
  EXPECT_THROW(w.add_string("k", "again"), Error);
  std::vector<uint8_t> d(64);
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {4}, d.data(), 15), Error);    // wrong size
  EXPECT_THROW(w.add_tensor("t", GgmlType::Q8_0, {16}, d.data(), 17), Error);  // not a block multiple
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {}, d.data(), 0), Error);
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {1, 1, 1, 1, 1}, d.data(), 4), Error);
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {0}, d.data(), 0), Error);
  EXPECT_THROW(w.add_tensor("t", GgmlType(99), {4}, d.data(), 16), Error);
  EXPECT_THROW(w.add_array("k2", ValueType::STRING, d.data(), 1), Error);
  w.add_tensor("t", GgmlType::F32, {16}, d.data(), 64);
  EXPECT_THROW(w.add_tensor("t", GgmlType::F32, {16}, d.data(), 64), Error);
  EXPECT_THROW(w.write("/nonexistent-dir/x.gguf"), Error);
}

// ---------------------------------------------------------------- real files

TEST(GgufRealFiles, VocabularyFiles) {
  const std::map<std::string, std::pair<std::string, uint64_t>> expect = {
      {"ggml-vocab-llama-spm.gguf", {"llama", 32000}},   {"ggml-vocab-phi-3.gguf", {"llama", 32064}},
      {"ggml-vocab-gpt-2.gguf", {"gpt2", 50257}},        {"ggml-vocab-starcoder.gguf", {"gpt2", 49152}},
      {"ggml-vocab-deepseek-coder.gguf", {"gpt2", 32256}}, {"ggml-vocab-falcon.gguf", {"gpt2", 65024}},
  };
  const std::string dir = test::data_dir() + "/tokenizer-vectors";
  ASSERT_TRUE(std::filesystem::is_directory(dir)) << dir;
  int seen = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".gguf") continue;
    const std::string name = entry.path().filename().string();
    SCOPED_TRACE(name);
    const File f = File::open(entry.path().string());
    ++seen;
    EXPECT_EQ(f.version(), 3u);
    EXPECT_TRUE(f.tensors().empty());
    const auto model = f.get_string("tokenizer.ggml.model");
    ASSERT_TRUE(model.has_value());
    const Value* tokens = f.get_array("tokenizer.ggml.tokens");
    ASSERT_NE(tokens, nullptr);
    EXPECT_EQ(tokens->array_type(), ValueType::STRING);
    const Value* types = f.get_array("tokenizer.ggml.token_type");
    ASSERT_NE(types, nullptr);
    EXPECT_EQ(types->array_size(), tokens->array_size());
    EXPECT_TRUE(f.get_string("general.architecture").has_value());
    if (auto it = expect.find(name); it != expect.end()) {
      EXPECT_EQ(*model, it->second.first);
      EXPECT_EQ(tokens->array_size(), it->second.second);
    }
    if (name == "ggml-vocab-llama-spm.gguf") {
      EXPECT_EQ(tokens->string_at(0), "<unk>");
      EXPECT_EQ(tokens->string_at(1), "<s>");
      EXPECT_EQ(f.get_int("tokenizer.ggml.bos_token_id"), 1);
      EXPECT_EQ(f.get_int("tokenizer.ggml.eos_token_id"), 2);
      EXPECT_EQ(f.get_array("tokenizer.ggml.scores")->array_size(), 32000u);
      EXPECT_EQ(f.get_array("tokenizer.ggml.scores")->array_type(), ValueType::FLOAT32);
    }
    if (name == "ggml-vocab-gpt-2.gguf") {
      EXPECT_EQ(tokens->string_at(0), "!");
      EXPECT_EQ(f.get_int("tokenizer.ggml.eos_token_id"), 50256);
      EXPECT_EQ(f.get_array("tokenizer.ggml.merges")->array_size(), 50000u);
      EXPECT_EQ(f.get_string("tokenizer.ggml.pre"), "gpt-2");
    }
    // Re-reading from memory gives the same view.
    const File g = File::from_bytes(test::read_file(entry.path().string()), name);
    EXPECT_EQ(g.metadata().size(), f.metadata().size());
  }
  EXPECT_GE(seen, 6);
}

// ---------------------------------------------------------------- malformed input

TEST(GgufMalformed, EveryTruncation) {
  const std::vector<uint8_t> full = small_valid_file();
  {
    const File f = File::from_bytes(full, "full");
    ASSERT_EQ(f.tensors().size(), 2u);
    ASSERT_EQ(f.tensors()[1].offset + f.tensors()[1].n_bytes + f.data_offset(), full.size());
  }
  for (size_t n = 0; n < full.size(); ++n) {
    SCOPED_TRACE(n);
    const std::string msg = error_of(std::vector<uint8_t>(full.begin(), full.begin() + ptrdiff_t(n)));
    EXPECT_EQ(msg.rfind("bad.gguf: ", 0), 0u) << msg;
    const bool named = msg.find("bad magic") != std::string::npos || msg.find("end of file") != std::string::npos;
    EXPECT_TRUE(named) << msg;
  }
}

TEST(GgufMalformed, BadMagicAndEmpty) {
  EXPECT_GGUF_ERROR({}, "not a GGUF file (bad magic)");
  EXPECT_GGUF_ERROR(std::vector<uint8_t>({'G', 'G'}), "not a GGUF file (bad magic)");
  Raw r;
  r.bytes("GGML", 4).u32(3).u64(0).u64(0);
  EXPECT_GGUF_ERROR(r.b, "not a GGUF file (bad magic)");
  const std::string empty = test::temp_dir() + "/empty.gguf";
  test::write_file(empty, {});
  try {
    File::open(empty);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(empty + ": not a GGUF file (bad magic)", 0), 0u) << e.what();
  }
  try {
    File::open(test::temp_dir() + "/missing.gguf");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.gguf: cannot open"), std::string::npos) << e.what();
  }
  try {
    File::open(test::temp_dir());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
}

TEST(GgufMalformed, Versions) {
  EXPECT_GGUF_ERROR(Raw().header(0, 0, 1).b, "GGUF version 1 is not supported");
  EXPECT_GGUF_ERROR(Raw().header(0, 0, 99).b, "unsupported GGUF version 99");
  EXPECT_GGUF_ERROR(Raw().header(0, 0, 0x03000000).b, "big-endian");
  // Version 2 is accepted.
  const File f = File::from_bytes(Raw().header(0, 1, 2).kv_u32("a", 5).b);
  EXPECT_EQ(f.version(), 2u);
  EXPECT_EQ(f.get_int("a"), 5);
}

TEST(GgufMalformed, AbsurdCounts) {
  EXPECT_GGUF_ERROR(Raw().header(0, uint64_t(1) << 60).b, "metadata key/value count 1152921504606846976");
  EXPECT_GGUF_ERROR(Raw().header(0, ~uint64_t(0)).b, "past end of file");
  EXPECT_GGUF_ERROR(Raw().header(uint64_t(1) << 60, 0).b, "tensor count 1152921504606846976");
  EXPECT_GGUF_ERROR(Raw().header(~uint64_t(0), 0).zeros(100).b, "past end of file");
  // 2^60 strings in an array.
  Raw r;
  r.header(0, 1).str("arr").u32(uint32_t(ValueType::ARRAY)).u32(uint32_t(ValueType::STRING)).u64(uint64_t(1) << 60);
  r.zeros(64);
  EXPECT_GGUF_ERROR(r.b, "key 'arr' array of string has 1152921504606846976 elements");
  // A numeric array whose byte size would overflow 64 bits.
  Raw r2;
  r2.header(0, 1).str("arr").u32(uint32_t(ValueType::ARRAY)).u32(uint32_t(ValueType::UINT64)).u64(~uint64_t(0) / 4);
  EXPECT_GGUF_ERROR(r2.b, "past end of file");
}

TEST(GgufMalformed, StringsPastEnd) {
  Raw key;
  key.header(0, 1).u64(1000).bytes("abc", 3).zeros(20);
  EXPECT_GGUF_ERROR(key.b, "key of metadata entry 0 at offset 24 has length 1000, past end of file");
  Raw val;
  val.header(0, 1).str("name").u32(uint32_t(ValueType::STRING)).u64(~uint64_t(0)).zeros(4);
  EXPECT_GGUF_ERROR(val.b, "key 'name' string value");
  Raw elem;
  elem.header(0, 1).str("toks").u32(uint32_t(ValueType::ARRAY)).u32(uint32_t(ValueType::STRING)).u64(2);
  elem.str("ok").u64(500).zeros(8);
  EXPECT_GGUF_ERROR(elem.b, "key 'toks' element 1");
  Raw tname;
  tname.header(1, 0).u64(uint64_t(1) << 62).zeros(40);
  EXPECT_GGUF_ERROR(tname.b, "name of tensor 0");
}

TEST(GgufMalformed, ValueTypes) {
  Raw r;
  r.header(0, 1).str("weird").u32(13).u32(0);
  EXPECT_GGUF_ERROR(r.b, "key 'weird' has unknown value type 13");
  Raw a;
  a.header(0, 1).str("weird").u32(uint32_t(ValueType::ARRAY)).u32(0xffffffffu).u64(0);
  EXPECT_GGUF_ERROR(a.b, "key 'weird' is an array of unknown value type 4294967295");
  Raw b;
  b.header(0, 1).str("flag").u32(uint32_t(ValueType::BOOL)).u8(2).zeros(3);
  EXPECT_GGUF_ERROR(b.b, "key 'flag' is a bool with invalid byte value 2");
  // Unprintable key bytes are escaped so the message stays one line.
  Raw n;
  n.header(0, 1).str("a\nb").u32(99).zeros(4);
  EXPECT_GGUF_ERROR(n.b, "key 'a\\x0ab' has unknown value type 99");
}

TEST(GgufMalformed, NestedArrays) {
  // An array of two arrays (of int32 and string): accepted, elements not accessible.
  Raw r;
  r.header(0, 2).str("nest").u32(uint32_t(ValueType::ARRAY)).u32(uint32_t(ValueType::ARRAY)).u64(2);
  r.u32(uint32_t(ValueType::INT32)).u64(2).u32(1).u32(2);
  r.u32(uint32_t(ValueType::STRING)).u64(1).str("x");
  r.kv_u32("after", 7);
  const File f = File::from_bytes(r.b);
  const Value* v = f.get_array("nest");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->array_type(), ValueType::ARRAY);
  EXPECT_EQ(v->array_size(), 2u);
  EXPECT_THROW(v->int_at(0), Error);
  EXPECT_THROW(v->string_at(0), Error);
  EXPECT_EQ(f.get_int("after"), 7);
  // Deep nesting is refused rather than recursed into.
  Raw d;
  d.header(0, 1).str("deep").u32(uint32_t(ValueType::ARRAY));
  for (int i = 0; i < 20; ++i) d.u32(uint32_t(ValueType::ARRAY)).u64(1);
  d.u32(uint32_t(ValueType::UINT8)).u64(0);
  EXPECT_GGUF_ERROR(d.b, "key 'deep' has arrays nested deeper than");
  // A huge count of inner arrays fails on size, without looping.
  Raw h;
  h.header(0, 1).str("many").u32(uint32_t(ValueType::ARRAY)).u32(uint32_t(ValueType::ARRAY)).u64(uint64_t(1) << 58);
  h.zeros(48);
  EXPECT_GGUF_ERROR(h.b, "array of array has 288230376151711744 elements");
}

// One tensor info + data, with knobs for the fields under test.
std::vector<uint8_t> one_tensor(std::vector<uint64_t> dims, uint32_t type, uint64_t offset, size_t data = 32) {
  Raw r;
  r.header(1, 0).tensor_info("w", std::move(dims), type, offset).pad().zeros(data);
  return r.b;
}

TEST(GgufMalformed, Tensors) {
  EXPECT_NO_THROW(File::from_bytes(one_tensor({8}, 0, 0)));
  EXPECT_GGUF_ERROR(one_tensor({8}, 77, 0), "tensor 'w' has unknown tensor type 77");
  EXPECT_GGUF_ERROR(one_tensor({}, 0, 0), "tensor 'w' has n_dims 0, expected 1..4");
  EXPECT_GGUF_ERROR(one_tensor({1, 1, 1, 1, 1}, 0, 0), "tensor 'w' has n_dims 5, expected 1..4");
  EXPECT_GGUF_ERROR(one_tensor({8, 0}, 0, 0), "tensor 'w' has dim 1 = 0");
  EXPECT_GGUF_ERROR(one_tensor({uint64_t(1) << 32, uint64_t(1) << 32}, 0, 0),
                    "tensor 'w' element count overflows at dim 1 = 4294967296");
  EXPECT_GGUF_ERROR(one_tensor({~uint64_t(0)}, 0, 0), "element count overflows at dim 0");
  // Element count fits int64 but the byte size does not fit the file.
  EXPECT_GGUF_ERROR(one_tensor({uint64_t(1) << 61}, 0, 0), "extends past end of file");
  EXPECT_GGUF_ERROR(one_tensor({16}, uint32_t(GgmlType::Q8_0), 0), "tensor 'w' dim 0 = 16 is not a multiple of the q8_0 block size 32");
  EXPECT_GGUF_ERROR(one_tensor({8}, 0, 64), "tensor 'w' data [64, +32) at file offset");
  EXPECT_GGUF_ERROR(one_tensor({8}, 0, ~uint64_t(0) - 31), "extends past end of file");
  EXPECT_GGUF_ERROR(one_tensor({8}, 0, 0, 31), "extends past end of file");
  EXPECT_GGUF_ERROR(one_tensor({8}, 0, 16), "tensor 'w' offset 16 is not a multiple of the alignment 32");
  // Tensor infos whose aligned data section starts past the end.
  Raw r;
  r.header(1, 0).tensor_info("w", {8}, 0, 0);
  EXPECT_GGUF_ERROR(r.b, "data section (aligned to 32) would start past end of file");
}

TEST(GgufMalformed, OverlapAndDuplicates) {
  Raw o;
  o.header(2, 0).tensor_info("a", {16}, 0, 0).tensor_info("b", {8}, 0, 32).pad().zeros(96);
  EXPECT_GGUF_ERROR(o.b, "tensors 'a' [0, 64) and 'b' [32, 64) overlap");
  Raw same;
  same.header(2, 0).tensor_info("a", {8}, 0, 0).tensor_info("b", {8}, 0, 0).pad().zeros(32);
  EXPECT_GGUF_ERROR(same.b, "overlap");
  Raw ok;  // adjacent is fine, in any order
  ok.header(2, 0).tensor_info("a", {8}, 0, 32).tensor_info("b", {8}, 0, 0).pad().zeros(64);
  EXPECT_NO_THROW(File::from_bytes(ok.b));
  Raw dt;
  dt.header(2, 0).tensor_info("a", {8}, 0, 0).tensor_info("a", {8}, 0, 32).pad().zeros(64);
  EXPECT_GGUF_ERROR(dt.b, "duplicate tensor 'a'");
  Raw dk;
  dk.header(0, 2).kv_u32("k.x", 1).kv_u32("k.x", 2);
  EXPECT_GGUF_ERROR(dk.b, "duplicate metadata key 'k.x'");
}

TEST(GgufMalformed, Alignment) {
  auto with_alignment = [](uint32_t a) {
    Raw r;
    r.header(0, 1).kv_u32("general.alignment", a);
    return r.b;
  };
  EXPECT_GGUF_ERROR(with_alignment(48), "key 'general.alignment' = 48 is not a non-zero power of two");
  EXPECT_GGUF_ERROR(with_alignment(0), "key 'general.alignment' = 0 is not a non-zero power of two");
  EXPECT_EQ(File::from_bytes(with_alignment(8)).alignment(), 8u);
  Raw s;
  s.header(0, 1).str("general.alignment").u32(uint32_t(ValueType::STRING)).str("32");
  EXPECT_GGUF_ERROR(s.b, "key 'general.alignment' has type string, expected an unsigned integer");
  // With alignment 8, an offset of 8 is aligned; with the default it is not.
  Raw r;
  r.header(1, 1).kv_u32("general.alignment", 8).tensor_info("w", {2}, 0, 8).pad(8).zeros(16);
  EXPECT_EQ(File::from_bytes(r.b).find_tensor("w")->offset, 8u);
  Raw big;  // a huge alignment must not overflow the data-start computation
  big.header(1, 1).str("general.alignment").u32(uint32_t(ValueType::UINT64)).u64(uint64_t(1) << 63);
  big.tensor_info("w", {2}, 0, 0).zeros(8);
  EXPECT_GGUF_ERROR(big.b, "past end of file");
}

// ---------------------------------------------------------------- Python interop

// Driven by tests/python/test_gguf_python_interop.py through environment variables:
//   KVQ_GGUF_INTEROP_FILE + KVQ_GGUF_INTEROP_EXPECT: read a file written by the
//     Python gguf package and compare with the JSON expectation it wrote.
//   KVQ_GGUF_INTEROP_WRITE: write a fixed file for the Python side to read.
TEST(GgufInterop, Check) {
  const char* file = std::getenv("KVQ_GGUF_INTEROP_FILE");
  const char* expect_path = std::getenv("KVQ_GGUF_INTEROP_EXPECT");
  const char* write_path = std::getenv("KVQ_GGUF_INTEROP_WRITE");
  if (!file && !write_path) GTEST_SKIP() << "run by tests/python/test_gguf_python_interop.py";

  if (write_path) {
    Writer w;
    w.add_string("general.architecture", "kvqtest");
    w.add_uint8("kvq.u8", 7);
    w.add_int16("kvq.i16", -300);
    w.add_uint32("kvq.u32", 123456);
    w.add_int32("kvq.i32", -42);
    w.add_uint64("kvq.u64", 1ull << 40);
    w.add_int64("kvq.i64", -(1ll << 40));
    w.add_float32("kvq.f32", 0.125f);
    w.add_float64("kvq.f64", 1e-300);
    w.add_bool("kvq.bool", true);
    w.add_string("kvq.str", "caf\xc3\xa9");
    w.add_string_array("kvq.strs", {"x", "yy", ""});
    w.add_int32_array("kvq.ints", {3, -1, 4});
    w.add_float32_array("kvq.floats", {1.0f, -0.5f});
    std::vector<float> f32(4 * 3);
    for (size_t i = 0; i < f32.size(); ++i) f32[i] = float(i) - 5.5f;
    auto b = f32_bytes(f32);
    w.add_tensor("kvq.f32_tensor", GgmlType::F32, {4, 3}, b.data(), b.size());
    std::vector<uint8_t> q(34 * 2);
    for (size_t i = 0; i < q.size(); ++i) q[i] = uint8_t(i);
    q[0] = 0x00; q[1] = 0x3c;  // block scales: fp16 1.0, keeps values finite
    q[34] = 0x00; q[35] = 0x38;  // fp16 0.5
    w.add_tensor("kvq.q8_tensor", GgmlType::Q8_0, {32, 2}, q.data(), q.size());
    w.write(write_path);
  }
  if (!file) return;
  ASSERT_NE(expect_path, nullptr) << "KVQ_GGUF_INTEROP_EXPECT must be set with KVQ_GGUF_INTEROP_FILE";
  std::ifstream in(expect_path);
  ASSERT_TRUE(in) << expect_path;
  const nlohmann::json ex = nlohmann::json::parse(in);

  const File f = File::open(file);
  EXPECT_EQ(f.version(), ex.at("version").get<uint32_t>());
  EXPECT_EQ(f.alignment(), ex.at("alignment").get<uint64_t>());
  const auto& meta = ex.at("metadata");
  ASSERT_EQ(f.metadata().size(), meta.size());
  for (size_t i = 0; i < meta.size(); ++i) {
    const auto& m = meta[i];
    const KeyValue& kv = f.metadata()[i];
    const std::string key = m.at("key").get<std::string>();
    SCOPED_TRACE(key);
    EXPECT_EQ(kv.key, key);
    const Value& v = kv.value;
    EXPECT_EQ(value_type_name(v.type()), m.at("type").get<std::string>());
    auto check_scalar = [&](ValueType t, const nlohmann::json& j, auto get_int, auto get_float, auto get_str) {
      if (t == ValueType::STRING) {
        EXPECT_EQ(get_str(), j.get<std::string>());
      } else if (t == ValueType::BOOL) {
        EXPECT_EQ(get_int(), j.get<bool>() ? 1 : 0);
      } else if (t == ValueType::FLOAT32 || t == ValueType::FLOAT64) {
        EXPECT_EQ(get_float(), j.get<double>());
      } else if (j.is_number_unsigned()) {
        EXPECT_EQ(uint64_t(get_int()), j.get<uint64_t>());
      } else {
        EXPECT_EQ(get_int(), j.get<int64_t>());
      }
    };
    if (v.type() == ValueType::ARRAY) {
      EXPECT_EQ(value_type_name(v.array_type()), m.at("array_type").get<std::string>());
      const auto& vals = m.at("value");
      ASSERT_EQ(v.array_size(), vals.size());
      for (uint64_t k = 0; k < v.array_size(); ++k)
        check_scalar(
            v.array_type(), vals[k], [&] { return v.int_at(k); }, [&] { return v.float_at(k); },
            [&] { return std::string(v.string_at(k)); });
    } else {
      check_scalar(
          v.type(), m.at("value"),
          [&] { return v.type() == ValueType::UINT64 ? int64_t(*v.as_uint()) : *v.as_int(); },
          [&] { return *v.as_float(); }, [&] { return std::string(*v.as_string()); });
    }
  }
  const auto& tens = ex.at("tensors");
  ASSERT_EQ(f.tensors().size(), tens.size());
  for (size_t i = 0; i < tens.size(); ++i) {
    const auto& t = tens[i];
    const TensorInfo& ti = f.tensors()[i];
    SCOPED_TRACE(t.at("name").get<std::string>());
    EXPECT_EQ(ti.name, t.at("name").get<std::string>());
    EXPECT_EQ(ggml_type_name(ti.type), t.at("type").get<std::string>());
    EXPECT_EQ(ti.dims, t.at("dims").get<std::vector<int64_t>>());
    EXPECT_EQ(ti.offset, t.at("offset").get<uint64_t>());
    const std::string hex = t.at("data_hex").get<std::string>();
    ASSERT_EQ(ti.n_bytes * 2, hex.size());
    std::string got;
    for (uint64_t k = 0; k < ti.n_bytes; ++k) got += fmt::format("{:02x}", ti.data[k]);
    EXPECT_EQ(got, hex);
  }
}

}  // namespace
}  // namespace kvq::gguf

// libFuzzer target for the GGUF reader: any input must either parse or throw
// kvq::Error; every accessor of a parsed file must be safe to call.
//
// `gguf_fuzz --write-seeds DIR` writes a few valid files to start a corpus from.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "base/error.h"
#include "gguf/gguf.h"

using kvq::GgmlType;
using namespace kvq::gguf;

namespace {

volatile uint64_t g_sink;  // keeps reads from being optimised away

template <class F>
void guarded(F&& f) {
  try {
    f();
  } catch (const kvq::Error&) {
  }
}

void touch_value(const File& file, const KeyValue& kv) {
  const Value& v = kv.value;
  g_sink = g_sink + uint64_t(v.type()) + v.describe().size();
  g_sink = g_sink + v.as_int().value_or(0) + v.as_uint().value_or(0) + uint64_t(v.as_float().value_or(0) != 0) +
           v.as_bool().value_or(false) + v.as_string().value_or("").size();
  guarded([&] { g_sink = g_sink + file.get_int(kv.key).value_or(0); });
  guarded([&] { g_sink = g_sink + uint64_t(file.get_float(kv.key).value_or(0) > 0); });
  guarded([&] { g_sink = g_sink + file.get_bool(kv.key).value_or(false); });
  guarded([&] { g_sink = g_sink + file.get_string(kv.key).value_or("").size(); });
  guarded([&] { g_sink = g_sink + (file.get_array(kv.key) != nullptr); });
  g_sink = g_sink + (file.find(kv.key) == &v);
  if (v.type() != ValueType::ARRAY) return;
  // One past the end too: the index check must throw, not read.
  for (uint64_t i = 0; i <= v.array_size(); ++i) {
    guarded([&] { g_sink = g_sink + v.string_at(i).size(); });
    guarded([&] { g_sink = g_sink + uint64_t(v.int_at(i)); });
    guarded([&] { g_sink = g_sink + uint64_t(v.float_at(i) > 0); });
  }
}

void touch(const File& f) {
  g_sink = g_sink + f.version() + f.alignment() + f.file_size() + f.data_offset() + f.path().size();
  for (const KeyValue& kv : f.metadata()) touch_value(f, kv);
  for (const TensorInfo& t : f.tensors()) {
    g_sink = g_sink + uint64_t(t.n_elements()) + t.dims.size() + uint64_t(t.type) + t.offset + t.name.size();
    g_sink = g_sink + t.data[0] + t.data[t.n_bytes - 1];  // first and last byte must be mapped
    g_sink = g_sink + (f.find_tensor(t.name) != nullptr);
  }
  g_sink = g_sink + (f.find("general.architecture") != nullptr) + (f.find_tensor("") != nullptr);
}

void write_seed(const std::string& dir, const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = dir + "/" + name;
  std::FILE* out = std::fopen(path.c_str(), "wb");
  if (!out || std::fwrite(bytes.data(), 1, bytes.size(), out) != bytes.size() || std::fclose(out) != 0) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

void write_seeds(const std::string& dir) {
  std::filesystem::create_directories(dir);
  {
    Writer w;
    w.add_string("general.architecture", "llama");
    w.add_uint32("llama.block_count", 2);
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
    w.add_string("tokenizer.ggml.model", "llama");
    w.add_string_array("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a", "b"});
    w.add_float32_array("tokenizer.ggml.scores", {0, 0, 0, -1, -2});
    w.add_int32_array("tokenizer.ggml.token_type", {2, 3, 3, 1, 1});
    w.add_bool("tokenizer.ggml.add_bos_token", true);
    std::vector<uint8_t> f32(4 * 8, 1), q8(34 * 2, 2), f16(2 * 6, 3);
    w.add_tensor("token_embd.weight", GgmlType::F32, {4, 2}, f32.data(), f32.size());
    w.add_tensor("blk.0.attn_q.weight", GgmlType::Q8_0, {32, 2}, q8.data(), q8.size());
    w.add_tensor("output_norm.weight", GgmlType::F16, {6}, f16.data(), f16.size());
    write_seed(dir, "model.gguf", w.to_bytes());
  }
  {
    Writer w;
    w.set_alignment(64);
    w.add_uint8("u8", 1);
    w.add_int8("i8", -1);
    w.add_uint16("u16", 2);
    w.add_int16("i16", -2);
    w.add_int64("i64", -3);
    w.add_uint64("u64", 3);
    w.add_float64("f64", 0.5);
    const uint16_t u16s[] = {1, 2, 3};
    const uint8_t bools[] = {1, 0};
    w.add_array("u16s", ValueType::UINT16, u16s, 3);
    w.add_array("bools", ValueType::BOOL, bools, 2);
    std::vector<uint8_t> k(144, 4);
    w.add_tensor("k", GgmlType::Q4_K, {256}, k.data(), k.size());
    write_seed(dir, "types.gguf", w.to_bytes());
  }
  {
    Writer w;
    w.add_string("general.name", "empty");
    std::vector<uint8_t> v2 = w.to_bytes();
    v2[4] = 2;  // version 2 has the same layout
    write_seed(dir, "v2.gguf", v2);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  for (int i = 1; i + 1 < *argc; ++i) {
    if (std::strcmp((*argv)[i], "--write-seeds") == 0) {
      write_seeds((*argv)[i + 1]);
      std::exit(0);
    }
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const File f = File::from_bytes(std::vector<uint8_t>(data, data + size), "fuzz");
    touch(f);
  } catch (const kvq::Error& e) {
    // Messages are one line and name the input.
    const std::string msg = e.what();
    if (msg.rfind("fuzz: ", 0) != 0 || msg.find('\n') != std::string::npos) {
      std::fprintf(stderr, "malformed error message: %s\n", msg.c_str());
      std::abort();
    }
  }
  return 0;
}

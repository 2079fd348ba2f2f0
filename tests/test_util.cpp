#include "test_util.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <unistd.h>

namespace kvq::test {

std::string data_dir() {
  if (const char* d = std::getenv("KVQ_DATA_DIR")) return d;
  return KVQ_SHARED_DATA_DIR;
}

std::string default_model_path() {
  if (const char* m = std::getenv("KVQ_MODEL")) return m;
  std::string cache;
  if (const char* x = std::getenv("KVQ_CACHE_DIR")) cache = x;
  else if (const char* h = std::getenv("HOME")) cache = std::string(h) + "/.cache/kvq";
  const std::string p = cache + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  return std::filesystem::exists(p) ? p : "";
}

std::string temp_dir() {
  static const std::string dir = [] {
    auto d = std::filesystem::temp_directory_path() / ("kvq_tests_" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d.string();
  }();
  return dir;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

}  // namespace kvq::test

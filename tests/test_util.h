// Shared helpers for the C++ tests.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kvq::test {

// ../shared/data beside the repository, or $KVQ_DATA_DIR.
std::string data_dir();
// The default model if it has been fetched (scripts/fetch-model.sh), or $KVQ_MODEL; "" if absent.
std::string default_model_path();
// A fresh temporary directory for this test process.
std::string temp_dir();
std::vector<uint8_t> read_file(const std::string& path);
void write_file(const std::string& path, const std::vector<uint8_t>& bytes);

}  // namespace kvq::test

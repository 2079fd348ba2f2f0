// What a loaded Model holds (private to the runtime).
#pragma once
#include <string>

#include "gguf/gguf.h"
#include "kvq/kvq.h"
#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace kvq {

struct Model::Impl {
  gguf::File file;
  LlamaModel llama;
  Tokenizer tokenizer;
  ModelInfo info;
  std::string chat_template;  // tokenizer.chat_template, may be empty
};

}  // namespace kvq

// What a loaded Model holds (private to the runtime).
#pragma once
#include <string>

#include "gguf/gguf.h"
#include "kvcache/kv_cache.h"
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

// The model's cache geometry with these formats and context (no sink, window or
// calibration: the session adds those, calibration captures through f32).
KvCacheConfig model_cache_config(const LlamaHparams& hp, int64_t n_ctx, std::string_view type_k,
                                 std::string_view type_v);

// The resolved kernels of SessionParams::simd / attention_kernel (one-line
// errors naming the bad value).
KernelSet session_kernels(const std::string& simd, const std::string& attention_kernel);

}  // namespace kvq

// Tokenizers built from GGUF metadata (tokenizer.ggml.*): byte-level BPE
// ("gpt2" model, with the pre-tokenizer named by tokenizer.ggml.pre) and
// SentencePiece ("llama" model). Unsupported models/pre-tokenizers are rejected by name.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace kvq {
namespace gguf { class File; }

class Tokenizer {
 public:
  // Throws kvq::Error("PATH: ...") if the metadata is missing, inconsistent or unsupported.
  static Tokenizer from_gguf(const gguf::File& file);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Text -> ids. add_bos: prepend BOS (callers usually pass add_bos_default()).
  // parse_special: recognise special/control token strings (e.g. "<|im_start|>") in the text.
  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special = false) const;

  // The bytes a token stands for (may be a partial UTF-8 sequence). Control tokens
  // (BOS/EOS...) decode to "" unless `render_special`.
  std::string token_bytes(int32_t id, bool render_special = false) const;
  std::string decode(const std::vector<int32_t>& ids, bool render_special = false) const;

  int32_t n_vocab() const;
  int32_t bos_id() const;  // -1 if none
  int32_t eos_id() const;  // -1 if none
  bool add_bos_default() const;
  bool is_end_of_generation(int32_t id) const;  // EOS, EOT, <|im_end|>, <|endoftext|> ...
  std::optional<int32_t> find_token(std::string_view piece) const;  // exact vocabulary entry
  std::string_view model_name() const;  // "gpt2" / "llama"
  std::string_view pre_name() const;    // pre-tokenizer name ("" for SentencePiece)

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Accumulates token bytes and releases only complete UTF-8 characters, so a
// streamed generation never prints half a character. flush() returns the rest
// (invalid trailing bytes replaced by U+FFFD).
class Utf8Stream {
 public:
  std::string push(std::string_view bytes);
  std::string flush();

 private:
  std::string pending_;
};

}  // namespace kvq

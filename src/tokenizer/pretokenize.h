// Pre-tokenizers for byte-level BPE: split text into pieces that BPE merges never
// cross. Each pre-tokenizer is the regex split sequence used by the model's
// reference tokenizer, written as hand-made matchers over code points.
#pragma once
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

namespace kvq::pretok {

enum class Kind {
  kGpt2,           // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kLlama3,         // (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kStarcoder,      // digits isolated one by one, then kGpt2 (also SmolLM)
  kFalcon,         // punctuation runs, kGpt2, then groups of three ASCII digits
  kDeepseekCoder,  // [\r\n], \s?\p{L}+, \s?\p{P}+, CJK runs, single digits
};

// Byte ranges [first, second) of `text`, in order, covering all of it.
using Pieces = std::vector<std::pair<uint32_t, uint32_t>>;
void split(Kind kind, std::string_view text, Pieces& out);

}  // namespace kvq::pretok

// Code-point utilities for the tokenizers: UTF-8 decoding that never fails
// (invalid bytes become U+FFFD but keep their byte length), and Unicode category
// flags from the generated range table (scripts/gen-unicode-tables.py).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kvq::unicode {

enum CpFlag : uint8_t {
  kLetter = 1,     // \p{L}
  kNumber = 2,     // \p{N}
  kPunct = 4,      // \p{P}
  kSymbol = 8,     // \p{S}
  kMark = 16,      // \p{M}
  kSeparator = 32, // \p{Z}
  kOther = 64,     // \p{C} (including unassigned)
  kSpace = 128,    // \s (White_Space property)
};

namespace detail {
extern const uint32_t kRunStart[];
extern const uint8_t kRunFlags[];
extern const size_t kRunCount;
}  // namespace detail

uint8_t flags(uint32_t cp);

// Decodes one UTF-8 sequence at s[i]; sets `len` to the bytes consumed (>= 1).
// Malformed or truncated sequences yield U+FFFD with len = 1.
uint32_t decode_utf8(std::string_view s, size_t i, size_t& len);
void append_utf8(std::string& out, uint32_t cp);
// Length of a UTF-8 sequence from its first byte (1 for invalid lead bytes).
inline size_t utf8_len(uint8_t lead) {
  if (lead < 0x80) return 1;
  if ((lead & 0xE0) == 0xC0) return 2;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return 4;
  return 1;
}

}  // namespace kvq::unicode

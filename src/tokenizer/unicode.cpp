#include "tokenizer/unicode.h"

#include <algorithm>
#include <array>

namespace kvq::unicode {

namespace {
std::array<uint8_t, 128> make_ascii_table() {
  std::array<uint8_t, 128> t{};
  for (uint32_t c = 0; c < 128; ++c) {
    const uint32_t* end = detail::kRunStart + detail::kRunCount;
    const uint32_t* it = std::upper_bound(detail::kRunStart, end, c);
    t[c] = detail::kRunFlags[(it - detail::kRunStart) - 1];
  }
  return t;
}
}  // namespace

uint8_t flags(uint32_t cp) {
  static const std::array<uint8_t, 128> ascii = make_ascii_table();
  if (cp < 128) return ascii[cp];  // the common case skips the binary search
  if (cp > 0x10FFFF) return kOther;
  const uint32_t* end = detail::kRunStart + detail::kRunCount;
  const uint32_t* it = std::upper_bound(detail::kRunStart, end, cp);
  return detail::kRunFlags[(it - detail::kRunStart) - 1];
}

uint32_t decode_utf8(std::string_view s, size_t i, size_t& len) {
  const auto b0 = static_cast<uint8_t>(s[i]);
  len = 1;
  if (b0 < 0x80) return b0;
  const size_t n = utf8_len(b0);
  if (n == 1 || i + n > s.size()) return 0xFFFD;
  uint32_t cp = b0 & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    const auto b = static_cast<uint8_t>(s[i + k]);
    if ((b & 0xC0) != 0x80) return 0xFFFD;
    cp = (cp << 6) | (b & 0x3F);
  }
  // Reject overlong forms, surrogates and values beyond U+10FFFF.
  static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0xFFFD;
  len = n;
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

}  // namespace kvq::unicode

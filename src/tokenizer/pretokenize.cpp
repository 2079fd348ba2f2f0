#include "tokenizer/pretokenize.h"

#include "tokenizer/unicode.h"

namespace kvq::pretok {

namespace {

using unicode::kLetter;
using unicode::kNumber;
using unicode::kPunct;
using unicode::kSpace;

struct Cps {
  std::vector<uint32_t> cp;
  std::vector<uint8_t> fl;
  std::vector<uint32_t> off;  // byte offset of each code point, plus the end
};

// A matcher returns the length (in code points) of the match starting at p, or 0.
// `e` is the end of the current piece: each split step sees its piece as a whole
// string, so lookaheads stop there.
using Matcher = size_t (*)(const Cps&, size_t p, size_t e);

inline size_t run(const Cps& t, size_t p, size_t e, uint8_t mask) {
  size_t q = p;
  while (q < e && (t.fl[q] & mask)) ++q;
  return q - p;
}
inline size_t run_not(const Cps& t, size_t p, size_t e, uint8_t mask) {
  size_t q = p;
  while (q < e && !(t.fl[q] & mask)) ++q;
  return q - p;
}
inline uint32_t lower_ascii(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// 's|'t|'re|'ve|'m|'ll|'d (optionally case-insensitive).
inline size_t contraction(const Cps& t, size_t p, size_t e, bool icase) {
  if (t.cp[p] != '\'' || p + 1 >= e) return 0;
  auto at = [&](size_t i) { return icase ? lower_ascii(t.cp[i]) : t.cp[i]; };
  const uint32_t a = at(p + 1);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (p + 2 < e) {
    const uint32_t b = at(p + 2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  }
  return 0;
}

// \s+(?!\S)|\s+ at a whitespace position: a whitespace run followed by a
// non-space gives its last space to the next piece (unless the run is one char).
inline size_t trailing_space(const Cps& t, size_t p, size_t e) {
  const size_t n = run(t, p, e, kSpace);
  if (p + n < e && n >= 2) return n - 1;
  return n;
}

size_t match_gpt2(const Cps& t, size_t p, size_t e) {
  if (size_t n = contraction(t, p, e, false)) return n;
  const size_t q = p + (t.cp[p] == ' ' && p + 1 < e ? 1 : 0);
  const uint8_t f = t.fl[q];
  if (f & kLetter) return q - p + run(t, q, e, kLetter);
  if (f & kNumber) return q - p + run(t, q, e, kNumber);
  if (!(f & (kSpace | kLetter | kNumber))) return q - p + run_not(t, q, e, kSpace | kLetter | kNumber);
  return trailing_space(t, p, e);  // only whitespace is left
}

inline bool is_crlf(uint32_t c) { return c == '\r' || c == '\n'; }

size_t match_llama3(const Cps& t, size_t p, size_t e) {
  if (size_t n = contraction(t, p, e, true)) return n;
  const uint8_t f = t.fl[p];
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (f & kLetter) return run(t, p, e, kLetter);
  if (!is_crlf(t.cp[p]) && !(f & kNumber) && p + 1 < e && (t.fl[p + 1] & kLetter))
    return 1 + run(t, p + 1, e, kLetter);
  // \p{N}{1,3}
  if (f & kNumber) {
    const size_t n = run(t, p, e, kNumber);
    return n < 3 ? n : 3;
  }
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  const size_t q = p + (t.cp[p] == ' ' && p + 1 < e ? 1 : 0);
  if (!(t.fl[q] & (kSpace | kLetter | kNumber))) {
    size_t r = q + run_not(t, q, e, kSpace | kLetter | kNumber);
    while (r < e && is_crlf(t.cp[r])) ++r;
    return r - p;
  }
  // \s*[\r\n]+ : up to and including the last CR/LF of the whitespace run.
  const size_t n = run(t, p, e, kSpace);
  for (size_t k = p + n; k > p; --k)
    if (is_crlf(t.cp[k - 1])) return k - p;
  return trailing_space(t, p, e);
}

size_t match_single_number(const Cps& t, size_t p, size_t e) { return (t.fl[p] & kNumber) ? 1 : 0; }

// [\p{P}\$\+<=>\^~\|`]+ : Unicode punctuation plus the ASCII symbols that count as
// punctuation for ASCII.
inline bool is_falcon_punct(const Cps& t, size_t i) {
  if (t.fl[i] & kPunct) return true;
  switch (t.cp[i]) {
    case '$': case '+': case '<': case '=': case '>': case '^': case '~': case '|': case '`':
      return true;
    default:
      return false;
  }
}
size_t match_falcon_punct(const Cps& t, size_t p, size_t e) {
  size_t q = p;
  while (q < e && is_falcon_punct(t, q)) ++q;
  return q - p;
}
size_t match_three_ascii_digits(const Cps& t, size_t p, size_t e) {
  if (p + 3 > e) return 0;
  for (size_t i = p; i < p + 3; ++i)
    if (t.cp[i] < '0' || t.cp[i] > '9') return 0;
  return 3;
}

size_t match_crlf(const Cps& t, size_t p, size_t e) { return is_crlf(t.cp[p]) ? 1 : 0; }
// \s?X+
inline size_t space_then_run(const Cps& t, size_t p, size_t e, uint8_t mask) {
  if (t.fl[p] & mask) return run(t, p, e, mask);
  if ((t.fl[p] & kSpace) && p + 1 < e && (t.fl[p + 1] & mask)) return 1 + run(t, p + 1, e, mask);
  return 0;
}
size_t match_space_letters(const Cps& t, size_t p, size_t e) { return space_then_run(t, p, e, kLetter); }
size_t match_space_punct(const Cps& t, size_t p, size_t e) { return space_then_run(t, p, e, kPunct); }
// [一-龥ࠀ-一가-퟿]+
inline bool is_ds_cjk(uint32_t c) {
  return (c >= 0x0800 && c <= 0x9FA5) || (c >= 0xAC00 && c <= 0xD7FF);
}
size_t match_cjk(const Cps& t, size_t p, size_t e) {
  size_t q = p;
  while (q < e && is_ds_cjk(t.cp[q])) ++q;
  return q - p;
}

// One split step: matches and the text between them both become pieces.
void apply(const Cps& t, Matcher m, const Pieces& in, Pieces& out) {
  out.clear();
  for (auto [b, e] : in) {
    size_t gap = b;
    size_t p = b;
    while (p < e) {
      const size_t n = m(t, p, e);
      if (n == 0) {
        ++p;
        continue;
      }
      if (gap < p) out.emplace_back(uint32_t(gap), uint32_t(p));
      out.emplace_back(uint32_t(p), uint32_t(p + n));
      p += n;
      gap = p;
    }
    if (gap < e) out.emplace_back(uint32_t(gap), uint32_t(e));
  }
}

}  // namespace

void split(Kind kind, std::string_view text, Pieces& out) {
  out.clear();
  if (text.empty()) return;
  Cps t;
  t.cp.reserve(text.size());
  t.fl.reserve(text.size());
  t.off.reserve(text.size() + 1);
  for (size_t i = 0; i < text.size();) {
    size_t len;
    const uint32_t c = unicode::decode_utf8(text, i, len);
    t.cp.push_back(c);
    t.fl.push_back(unicode::flags(c));
    t.off.push_back(uint32_t(i));
    i += len;
  }
  t.off.push_back(uint32_t(text.size()));

  std::vector<Matcher> steps;
  switch (kind) {
    case Kind::kGpt2: steps = {match_gpt2}; break;
    case Kind::kLlama3: steps = {match_llama3}; break;
    case Kind::kStarcoder: steps = {match_single_number, match_gpt2}; break;
    case Kind::kFalcon:
      steps = {match_falcon_punct, match_gpt2, match_three_ascii_digits};
      break;
    case Kind::kDeepseekCoder:
      steps = {match_crlf, match_space_letters, match_space_punct, match_cjk, match_single_number};
      break;
  }
  Pieces a{{0u, uint32_t(t.cp.size())}}, b;
  for (Matcher m : steps) {
    apply(t, m, a, b);
    a.swap(b);
  }
  out.reserve(a.size());
  for (auto [s, e] : a) out.emplace_back(t.off[s], t.off[e]);
}

}  // namespace kvq::pretok

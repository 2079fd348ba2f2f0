#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <queue>
#include <unordered_map>

#include "base/error.h"
#include "gguf/gguf.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/unicode.h"

namespace kvq {

namespace {

// tokenizer.ggml.token_type values.
enum TokenType : int32_t {
  kUndefined = 0, kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6,
};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
using TokenMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// GPT-2's byte <-> printable code point mapping: printable Latin-1 bytes map to
// themselves, the other 68 bytes to U+0100.. in byte order.
struct ByteMap {
  std::array<uint32_t, 256> to_cp{};
  std::array<int16_t, 324> to_byte{};
  ByteMap() {
    to_byte.fill(-1);
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      to_cp[b] = printable ? b : next++;
      to_byte[to_cp[b]] = int16_t(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

constexpr std::string_view kSpmSpace = "\xE2\x96\x81";  // U+2581

inline uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

}  // namespace

struct Tokenizer::Impl {
  bool spm = false;
  std::string model, pre;
  pretok::Kind pre_kind = pretok::Kind::kGpt2;
  bool ignore_merges = false;  // a whole word already in the vocabulary is used as is
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  TokenMap token_to_id;
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  std::unordered_map<uint64_t, Merge> merges;  // (left id, right id) -> rank, result
  std::array<int32_t, 256> byte_token{};       // BPE: token of the mapped byte; SPM: <0xXX>
  std::vector<int32_t> specials;               // control + user-defined, longest first
  int32_t bos = -1, eos = -1, eot = -1, unk = -1, pad = -1;
  bool add_bos = false, add_space_prefix = false;
  std::vector<uint8_t> eog;

  bool mergeable(int32_t id) const { return types[id] == kNormal || types[id] == kUndefined; }
  int32_t lookup(std::string_view s) const {
    auto it = token_to_id.find(s);
    return it == token_to_id.end() ? -1 : it->second;
  }

  void encode_bpe(std::string_view text, std::vector<int32_t>& out) const;
  void bpe_word(std::string_view word, std::vector<int32_t>& out) const;
  void encode_spm(std::string_view text, std::vector<int32_t>& out) const;
};

namespace {

// A doubly linked list of symbols merged in order of a priority queue, with
// stale queue entries detected on pop (their symbols changed or died).
struct Sym {
  int32_t id;
  uint32_t start, len;  // bytes (SPM) of the symbol
  int32_t prev, next;
};

struct BpeCand {
  int32_t rank;
  int32_t left, right;
  int32_t left_id, right_id;
  bool operator>(const BpeCand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
};

struct SpmCand {
  float score;
  int32_t left, right;
  uint32_t left_len, right_len;
  int32_t id;
  // Highest score first, then leftmost.
  bool operator<(const SpmCand& o) const { return score != o.score ? score < o.score : left > o.left; }
};

}  // namespace

void Tokenizer::Impl::bpe_word(std::string_view word, std::vector<int32_t>& out) const {
  const ByteMap& bm = byte_map();
  if (ignore_merges) {
    std::string mapped;
    for (unsigned char c : word) unicode::append_utf8(mapped, bm.to_cp[c]);
    const int32_t id = lookup(mapped);
    if (id >= 0 && mergeable(id)) {
      out.push_back(id);
      return;
    }
  }
  if (word.size() == 1) {
    const int32_t id = byte_token[uint8_t(word[0])];
    if (id >= 0) out.push_back(id);
    else if (unk >= 0) out.push_back(unk);
    return;
  }
  std::vector<Sym> syms(word.size());
  for (size_t i = 0; i < word.size(); ++i)
    syms[i] = Sym{byte_token[uint8_t(word[i])], uint32_t(i), 1, int32_t(i) - 1,
                  i + 1 < word.size() ? int32_t(i + 1) : -1};
  std::priority_queue<BpeCand, std::vector<BpeCand>, std::greater<>> queue;
  auto try_pair = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0 || syms[l].id < 0 || syms[r].id < 0) return;
    auto it = merges.find(pair_key(syms[l].id, syms[r].id));
    if (it == merges.end()) return;
    queue.push(BpeCand{it->second.rank, l, r, syms[l].id, syms[r].id});
  };
  for (size_t i = 0; i + 1 < word.size(); ++i) try_pair(int32_t(i), int32_t(i + 1));
  while (!queue.empty()) {
    const BpeCand c = queue.top();
    queue.pop();
    Sym& l = syms[c.left];
    if (l.len == 0 || l.next != c.right || l.id != c.left_id || syms[c.right].id != c.right_id) continue;
    Sym& r = syms[c.right];
    l.id = merges.at(pair_key(c.left_id, c.right_id)).id;
    l.len += r.len;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    r.len = 0;
    r.id = -1;
    try_pair(l.prev, c.left);
    try_pair(c.left, l.next);
  }
  for (int32_t i = 0; i >= 0; i = syms[i].next) {
    if (syms[i].id >= 0) out.push_back(syms[i].id);
    else if (unk >= 0) out.push_back(unk);
  }
}

void Tokenizer::Impl::encode_bpe(std::string_view text, std::vector<int32_t>& out) const {
  pretok::Pieces pieces;
  pretok::split(pre_kind, text, pieces);
  for (auto [b, e] : pieces) bpe_word(text.substr(b, e - b), out);
}

void Tokenizer::Impl::encode_spm(std::string_view raw, std::vector<int32_t>& out) const {
  // Spaces become U+2581, as the SentencePiece normaliser does.
  std::string text;
  text.reserve(raw.size() + 8);
  for (char c : raw) {
    if (c == ' ') text += kSpmSpace;
    else text += c;
  }
  std::vector<Sym> syms;
  syms.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    size_t n = std::min(unicode::utf8_len(uint8_t(text[i])), text.size() - i);
    syms.push_back(Sym{-1, uint32_t(i), uint32_t(n), int32_t(syms.size()) - 1, int32_t(syms.size()) + 1});
    i += n;
  }
  if (syms.empty()) return;
  syms.back().next = -1;
  std::string_view tv = text;
  std::priority_queue<SpmCand> queue;
  auto try_pair = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const int32_t id = lookup(tv.substr(syms[l].start, syms[l].len + syms[r].len));
    if (id < 0 || !mergeable(id)) return;
    queue.push(SpmCand{scores[id], l, r, syms[l].len, syms[r].len, id});
  };
  for (size_t i = 0; i + 1 < syms.size(); ++i) try_pair(int32_t(i), int32_t(i + 1));
  while (!queue.empty()) {
    const SpmCand c = queue.top();
    queue.pop();
    Sym& l = syms[c.left];
    if (l.len != c.left_len || l.next != c.right || syms[c.right].len != c.right_len) continue;
    Sym& r = syms[c.right];
    l.len += r.len;
    l.id = c.id;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    r.len = 0;
    try_pair(l.prev, c.left);
    try_pair(c.left, l.next);
  }
  for (int32_t i = 0; i >= 0; i = syms[i].next) {
    const Sym& s = syms[i];
    int32_t id = s.id;
    if (id < 0) {
      id = lookup(tv.substr(s.start, s.len));
      if (id >= 0 && (types[id] == kControl || types[id] == kUnknown || types[id] == kUnused)) id = -1;
    }
    if (id >= 0) {
      out.push_back(id);
      continue;
    }
    // Byte fallback, else the unknown token.
    for (uint32_t k = 0; k < s.len; ++k) {
      const int32_t b = byte_token[uint8_t(text[s.start + k])];
      if (b >= 0) out.push_back(b);
      else if (unk >= 0) {
        out.push_back(unk);
        break;
      }
    }
  }
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_gguf(const gguf::File& file) {
  const std::string& path = file.path();
  auto im = std::make_unique<Impl>();
  const auto model = file.get_string("tokenizer.ggml.model");
  if (!model) fail("{}: no tokenizer (tokenizer.ggml.model is missing)", path);
  im->model = std::string(*model);
  if (im->model == "llama") im->spm = true;
  else if (im->model != "gpt2")
    fail("{}: unsupported tokenizer model '{}' (supported: gpt2, llama)", path, im->model);

  const gguf::Value* toks = file.get_array("tokenizer.ggml.tokens");
  if (!toks || toks->array_type() != gguf::ValueType::STRING)
    fail("{}: tokenizer.ggml.tokens is missing or not a string array", path);
  const uint64_t n = toks->array_size();
  if (n == 0 || n > (uint64_t(1) << 30)) fail("{}: tokenizer.ggml.tokens has {} entries", path, n);
  im->tokens.reserve(n);
  im->token_to_id.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    im->tokens.emplace_back(toks->string_at(i));
    im->token_to_id.emplace(im->tokens.back(), int32_t(i));  // the first id wins on duplicates
  }
  im->types.assign(n, kNormal);
  if (const gguf::Value* tt = file.get_array("tokenizer.ggml.token_type")) {
    if (tt->array_size() != n)
      fail("{}: tokenizer.ggml.token_type has {} entries, tokens has {}", path, tt->array_size(), n);
    for (uint64_t i = 0; i < n; ++i) im->types[i] = int32_t(tt->int_at(i));
  }
  im->scores.assign(n, 0.0f);
  if (const gguf::Value* sc = file.get_array("tokenizer.ggml.scores")) {
    if (sc->array_size() != n)
      fail("{}: tokenizer.ggml.scores has {} entries, tokens has {}", path, sc->array_size(), n);
    for (uint64_t i = 0; i < n; ++i) im->scores[i] = float(sc->float_at(i));
  } else if (im->spm) {
    fail("{}: SentencePiece tokenizer without tokenizer.ggml.scores", path);
  }

  auto special_id = [&](const char* key) -> int32_t {
    const auto v = file.get_int(key);
    if (!v) return -1;
    if (*v < 0) return -1;  // some converters write -1 for "none"
    if (uint64_t(*v) >= n) fail("{}: {} = {} is outside the vocabulary ({} tokens)", path, key, *v, n);
    return int32_t(*v);
  };
  im->bos = special_id("tokenizer.ggml.bos_token_id");
  im->eos = special_id("tokenizer.ggml.eos_token_id");
  im->eot = special_id("tokenizer.ggml.eot_token_id");
  im->unk = special_id("tokenizer.ggml.unknown_token_id");
  im->pad = special_id("tokenizer.ggml.padding_token_id");
  im->add_bos = file.get_bool("tokenizer.ggml.add_bos_token").value_or(im->spm);
  im->add_space_prefix = file.get_bool("tokenizer.ggml.add_space_prefix").value_or(im->spm);

  im->byte_token.fill(-1);
  if (im->spm) {
    if (im->unk < 0) {
      if (auto it = im->token_to_id.find("<unk>"); it != im->token_to_id.end()) im->unk = it->second;
    }
    for (int b = 0; b < 256; ++b) {
      const int32_t id = im->lookup(fmt::format("<0x{:02X}>", b));
      if (id >= 0) im->byte_token[b] = id;
    }
  } else {
    const auto pre = file.get_string("tokenizer.ggml.pre");
    im->pre = pre ? std::string(*pre) : "default";
    const std::string& p = im->pre;
    if (p == "default" || p == "gpt2" || p == "gpt-2") im->pre_kind = pretok::Kind::kGpt2;
    else if (p == "llama-bpe" || p == "llama3" || p == "smaug-bpe" || p == "dbrx") {
      im->pre_kind = pretok::Kind::kLlama3;
      im->ignore_merges = true;
    } else if (p == "starcoder" || p == "smollm" || p == "refact") im->pre_kind = pretok::Kind::kStarcoder;
    else if (p == "falcon") im->pre_kind = pretok::Kind::kFalcon;
    else if (p == "deepseek-coder") im->pre_kind = pretok::Kind::kDeepseekCoder;
    else
      fail("{}: unsupported pre-tokenizer '{}' (tokenizer.ggml.pre; supported: default, gpt2, "
           "llama-bpe, starcoder, smollm, refact, falcon, deepseek-coder)", path, p);

    const ByteMap& bm = byte_map();
    for (int b = 0; b < 256; ++b) {
      std::string s;
      unicode::append_utf8(s, bm.to_cp[b]);
      im->byte_token[b] = im->lookup(s);
    }
    const gguf::Value* merges = file.get_array("tokenizer.ggml.merges");
    if (!merges || merges->array_type() != gguf::ValueType::STRING)
      fail("{}: byte-level BPE tokenizer without tokenizer.ggml.merges", path);
    im->merges.reserve(merges->array_size());
    for (uint64_t i = 0; i < merges->array_size(); ++i) {
      const std::string_view m = merges->string_at(i);
      const size_t sp = m.find(' ', 1);
      if (sp == std::string_view::npos) fail("{}: malformed merge #{}: '{}'", path, i, m);
      const int32_t a = im->lookup(m.substr(0, sp));
      const int32_t b = im->lookup(m.substr(sp + 1));
      std::string joined(m.substr(0, sp));
      joined += m.substr(sp + 1);
      const int32_t c = im->lookup(joined);
      if (a < 0 || b < 0 || c < 0) continue;  // refers to tokens not in the vocabulary
      im->merges.emplace(pair_key(a, b), Impl::Merge{int32_t(i), c});
    }
  }

  for (uint64_t i = 0; i < n; ++i)
    if ((im->types[i] == kControl || im->types[i] == kUserDefined) && !im->tokens[i].empty())
      im->specials.push_back(int32_t(i));
  std::stable_sort(im->specials.begin(), im->specials.end(), [&](int32_t a, int32_t b) {
    return im->tokens[a].size() > im->tokens[b].size();
  });

  im->eog.assign(n, 0);
  for (int32_t id : {im->eos, im->eot})
    if (id >= 0) im->eog[id] = 1;
  static const char* const kEndNames[] = {
      "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<|end|>", "<|EOT|>",
      "<end_of_turn>", "<|end_of_text|>", "<|eom_id|>", "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"};
  for (const char* name : kEndNames) {
    const int32_t id = im->lookup(name);
    if (id >= 0 && (im->types[id] == kControl || im->types[id] == kUserDefined)) im->eog[id] = 1;
  }
  return Tokenizer(std::move(im));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos, bool parse_special) const {
  const Impl& im = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && im.bos >= 0) out.push_back(im.bos);
  bool prev_special = true;  // SentencePiece prefixes a space at the start and after specials
  auto encode_text = [&](std::string_view t) {
    if (t.empty()) return;
    if (im.spm) {
      if (im.add_space_prefix && prev_special) {
        std::string s(" ");
        s += t;
        im.encode_spm(s, out);
      } else {
        im.encode_spm(t, out);
      }
    } else {
      im.encode_bpe(t, out);
    }
    prev_special = false;
  };
  if (!parse_special || im.specials.empty()) {
    encode_text(text);
    return out;
  }
  // Longest special token first at each position; plain text between them.
  size_t start = 0;
  for (size_t i = 0; i < text.size();) {
    int32_t hit = -1;
    for (int32_t id : im.specials) {
      const std::string& s = im.tokens[id];
      if (s.size() <= text.size() - i && s[0] == text[i] && text.compare(i, s.size(), s) == 0) {
        hit = id;
        break;
      }
    }
    if (hit < 0) {
      ++i;
      continue;
    }
    encode_text(text.substr(start, i - start));
    out.push_back(hit);
    prev_special = true;
    i += im.tokens[hit].size();
    start = i;
  }
  encode_text(text.substr(start));
  return out;
}

std::string Tokenizer::token_bytes(int32_t id, bool render_special) const {
  const Impl& im = *impl_;
  if (id < 0 || id >= n_vocab()) return {};
  const std::string& t = im.tokens[id];
  switch (im.types[id]) {
    case kControl:
    case kUnused:
      return render_special ? t : std::string();
    case kUnknown:
      return render_special ? t : std::string("\xEF\xBF\xBD");
    case kUserDefined:
      return t;  // literal text
    case kByte:
      if (im.spm && t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
        return std::string(1, char(std::stoi(t.substr(3, 2), nullptr, 16)));
      }
      break;
    default:
      break;
  }
  std::string out;
  if (im.spm) {
    out.reserve(t.size());
    for (size_t i = 0; i < t.size();) {
      if (t.compare(i, kSpmSpace.size(), kSpmSpace) == 0) {
        out += ' ';
        i += kSpmSpace.size();
      } else {
        out += t[i++];
      }
    }
    return out;
  }
  const ByteMap& bm = byte_map();
  for (size_t i = 0; i < t.size();) {
    size_t len;
    const uint32_t cp = unicode::decode_utf8(t, i, len);
    if (cp < bm.to_byte.size() && bm.to_byte[cp] >= 0) out += char(bm.to_byte[cp]);
    else out.append(t, i, len);  // not a mapped byte: keep the text as is
    i += len;
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool render_special) const {
  std::string out;
  bool first_text = true;
  for (int32_t id : ids) {
    std::string b = token_bytes(id, render_special);
    // SentencePiece: the space the encoder put in front of the text is not part of it.
    if (first_text && id >= 0 && id < n_vocab() && impl_->types[id] != kControl) {
      if (impl_->spm && impl_->add_space_prefix && !b.empty() && b[0] == ' ') b.erase(0, 1);
      first_text = false;
    }
    out += b;
  }
  return out;
}

int32_t Tokenizer::n_vocab() const { return int32_t(impl_->tokens.size()); }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
bool Tokenizer::add_bos_default() const { return impl_->add_bos; }
bool Tokenizer::is_end_of_generation(int32_t id) const {
  return id >= 0 && id < n_vocab() && impl_->eog[id] != 0;
}
std::optional<int32_t> Tokenizer::find_token(std::string_view piece) const {
  const int32_t id = impl_->lookup(piece);
  if (id < 0) return std::nullopt;
  return id;
}
std::string_view Tokenizer::model_name() const { return impl_->model; }
std::string_view Tokenizer::pre_name() const { return impl_->pre; }

// ---- Utf8Stream ----

namespace {
// Length of the valid UTF-8 sequence at s[i]: > 0 if complete, 0 if it is a valid
// but truncated prefix, -1 if invalid.
int utf8_seq(std::string_view s, size_t i) {
  const auto b0 = uint8_t(s[i]);
  if (b0 < 0x80) return 1;
  int n;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) n = 2;
  else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return -1;
  }
  for (int k = 1; k < n; ++k) {
    if (i + k >= s.size()) return 0;
    const auto b = uint8_t(s[i + k]);
    if (k == 1 ? (b < lo || b > hi) : ((b & 0xC0) != 0x80)) return -1;
  }
  return n;
}

// Emits the complete characters of `in`; invalid bytes become U+FFFD. Returns the
// offset of a trailing incomplete sequence (in.size() if none, or if `final`).
size_t drain(std::string_view in, bool final, std::string& out) {
  size_t i = 0;
  while (i < in.size()) {
    const int n = utf8_seq(in, i);
    if (n > 0) {
      out.append(in.data() + i, size_t(n));
      i += size_t(n);
    } else if (n == 0 && !final) {
      return i;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
      // A truncated sequence at the end is one bad character, not several.
      if (n == 0) return in.size();
    }
  }
  return i;
}
}  // namespace

std::string Utf8Stream::push(std::string_view bytes) {
  pending_.append(bytes);
  std::string out;
  const size_t used = drain(pending_, false, out);
  pending_.erase(0, used);
  return out;
}

std::string Utf8Stream::flush() {
  std::string out;
  drain(pending_, true, out);
  pending_.clear();
  return out;
}

}  // namespace kvq

// Tokenizer implementation. Byte-level BPE: pre-tokenize (pretokenize.cpp), map
// bytes to GPT-2's printable code points, then merge adjacent symbols by merge
// rank within each piece. SentencePiece (BPE flavour): spaces become U+2581 and
// adjacent symbols merge by the highest score of the merged vocabulary entry;
// symbols left outside the vocabulary fall back to <0xXX> byte tokens.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <climits>

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

// Vocabulary lookup (text -> id): open addressing over ids into the token list,
// with a 32-bit hash check before comparing text. The first id of a duplicated
// text wins.
class TokenMap {
 public:
  void build(const std::vector<std::string>& tokens) {
    tokens_ = &tokens;
    size_t cap = 16;
    while (cap < tokens.size() * 2) cap <<= 1;
    slots_.assign(cap, Slot{0, -1});
    for (size_t i = 0; i < tokens.size(); ++i) {
      const uint64_t h = hash(tokens[i]);
      size_t j = h & (cap - 1);
      bool dup = false;
      while (slots_[j].id >= 0) {
        if (slots_[j].h == uint32_t(h >> 32) && tokens[size_t(slots_[j].id)] == tokens[i]) dup = true;
        if (dup) break;
        j = (j + 1) & (cap - 1);
      }
      if (!dup) slots_[j] = Slot{uint32_t(h >> 32), int32_t(i)};
    }
  }
  int32_t find(std::string_view s) const {
    if (slots_.empty()) return -1;
    const uint64_t h = hash(s);
    const size_t mask = slots_.size() - 1;
    for (size_t j = h & mask;; j = (j + 1) & mask) {
      const Slot& e = slots_[j];
      if (e.id < 0) return -1;
      if (e.h == uint32_t(h >> 32) && (*tokens_)[size_t(e.id)] == s) return e.id;
    }
  }

 private:
  struct Slot {
    uint32_t h;
    int32_t id;
  };
  // FNV-1a, then a multiply so both halves of the result are well mixed.
  static uint64_t hash(std::string_view s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return (h ^ (h >> 29)) * 0xBF58476D1CE4E5B9ull;
  }
  const std::vector<std::string>* tokens_ = nullptr;
  std::vector<Slot> slots_;
};

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

// Merge ranks: an open-addressing table (linear probing). Lookups dominate BPE
// time and node-based maps miss the cache on nearly every probe.
class MergeTable {
 public:
  struct Entry {
    uint64_t key = kEmpty;
    int32_t rank = 0;
    int32_t id = 0;
  };
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    slots_.assign(cap, Entry{});
    shift_ = 64 - unsigned(__builtin_ctzll(cap));
    size_ = 0;
  }
  // Keeps the first insertion of a key (the lowest rank).
  void insert(uint64_t key, int32_t rank, int32_t id) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    Entry* e = probe(key);
    if (e->key == kEmpty) {
      *e = Entry{key, rank, id};
      ++size_;
    }
  }
  const Entry* find(uint64_t key) const {
    if (slots_.empty()) return nullptr;
    const Entry* e = probe(key);
    return e->key == kEmpty ? nullptr : e;
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);  // ids are < 2^31, so never a real key
  Entry* probe(uint64_t key) const {
    const size_t mask = slots_.size() - 1;
    size_t i = size_t((key * 0x9E3779B97F4A7C15ull) >> shift_);
    while (slots_[i].key != kEmpty && slots_[i].key != key) i = (i + 1) & mask;
    return const_cast<Entry*>(&slots_[i]);
  }
  void grow() {
    std::vector<Entry> old;
    old.swap(slots_);
    reserve(old.size());
    for (const Entry& e : old)
      if (e.key != kEmpty) insert(e.key, e.rank, e.id);
  }
  std::vector<Entry> slots_;
  unsigned shift_ = 64;
  size_t size_ = 0;
};

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
  MergeTable merges;  // (left id, right id) -> rank, merged id
  std::array<int32_t, 256> byte_token{};       // BPE: token of the mapped byte; SPM: <0xXX>
  std::vector<int32_t> specials;               // control + user-defined, longest first
  int32_t bos = -1, eos = -1, eot = -1, unk = -1, pad = -1;
  bool add_bos = false, add_space_prefix = false;
  std::vector<uint8_t> eog;

  bool mergeable(int32_t id) const { return types[id] == kNormal || types[id] == kUndefined; }
  int32_t lookup(std::string_view s) const { return token_to_id.find(s); }

  void encode_bpe(std::string_view text, std::vector<int32_t>& out) const;
  struct BpeScratch;
  void bpe_word(std::string_view word, BpeScratch& scratch, std::vector<int32_t>& out) const;
  void encode_spm(std::string_view text, std::vector<int32_t>& out) const;
  struct SpmScratch;
  void spm_chunk(std::string_view text, size_t begin, size_t end, SpmScratch& sc,
                 std::vector<int32_t>& out) const;
  bool spm_split_at_space = false;  // see encode_spm
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

#ifndef KVQ_TOKENIZER_SHORT_WORD
#define KVQ_TOKENIZER_SHORT_WORD 32
#endif
// Words up to this many bytes merge by linear scans; longer ones use a heap.
constexpr int32_t kShortWord = KVQ_TOKENIZER_SHORT_WORD;

// Reused across the words of one encode() call.
struct Tokenizer::Impl::BpeScratch {
  std::vector<Sym> syms;
  std::vector<int32_t> rank;  // rank of the pair (i, next(i)), or INT32_MAX
  std::vector<BpeCand> heap;
  std::string mapped;
};

void Tokenizer::Impl::bpe_word(std::string_view word, BpeScratch& sc, std::vector<int32_t>& out) const {
  const ByteMap& bm = byte_map();
  if (ignore_merges) {
    sc.mapped.clear();
    for (unsigned char c : word) unicode::append_utf8(sc.mapped, bm.to_cp[c]);
    const int32_t id = lookup(sc.mapped);
    if (id >= 0 && mergeable(id)) {
      out.push_back(id);
      return;
    }
  }
  const int32_t n = int32_t(word.size());
  if (n == 1) {
    const int32_t id = byte_token[uint8_t(word[0])];
    if (id >= 0) out.push_back(id);
    else if (unk >= 0) out.push_back(unk);
    return;
  }
  auto& syms = sc.syms;
  syms.resize(size_t(n));
  for (int32_t i = 0; i < n; ++i)
    syms[i] = Sym{byte_token[uint8_t(word[i])], uint32_t(i), 1, i - 1, i + 1 < n ? i + 1 : -1};
  auto pair_rank = [&](int32_t l, int32_t r, int32_t* merged) -> int32_t {
    if (l < 0 || r < 0 || syms[l].id < 0 || syms[r].id < 0) return INT32_MAX;
    const MergeTable::Entry* e = merges.find(pair_key(syms[l].id, syms[r].id));
    if (!e) return INT32_MAX;
    if (merged) *merged = e->id;
    return e->rank;
  };
  auto merge = [&](int32_t li) {
    Sym& l = syms[li];
    Sym& r = syms[l.next];
    int32_t merged = -1;
    pair_rank(li, l.next, &merged);
    l.id = merged;
    l.len += r.len;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = li;
    r.len = 0;
    r.id = -1;
  };

  if (n <= kShortWord) {
    // Short words (nearly all): scan for the lowest-ranked adjacent pair; only the
    // two pairs next to a merge need new lookups.
    auto& rank = sc.rank;
    rank.resize(size_t(n));
    for (int32_t i = 0; i < n; ++i) rank[i] = pair_rank(i, syms[i].next, nullptr);
    for (;;) {
      int32_t best = -1, best_rank = INT32_MAX;
      for (int32_t i = 0; i >= 0; i = syms[i].next)
        if (rank[i] < best_rank) best_rank = rank[i], best = i;  // strict: leftmost on ties
      if (best < 0) break;
      merge(best);
      rank[best] = pair_rank(best, syms[best].next, nullptr);
      if (syms[best].prev >= 0) rank[syms[best].prev] = pair_rank(syms[best].prev, best, nullptr);
    }
  } else {
    // Long words: a min-heap of candidate pairs; stale entries are skipped on pop.
    auto& heap = sc.heap;
    heap.clear();
    auto push = [&](int32_t l, int32_t r) {
      const int32_t rk = pair_rank(l, r, nullptr);
      if (rk == INT32_MAX) return;
      heap.push_back(BpeCand{rk, l, r, syms[l].id, syms[r].id});
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    };
    for (int32_t i = 0; i + 1 < n; ++i) push(i, i + 1);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<>());
      const BpeCand c = heap.back();
      heap.pop_back();
      const Sym& l = syms[c.left];
      if (l.len == 0 || l.next != c.right || l.id != c.left_id || syms[c.right].id != c.right_id) continue;
      merge(c.left);
      push(syms[c.left].prev, c.left);
      push(c.left, syms[c.left].next);
    }
  }
  for (int32_t i = 0; i >= 0; i = syms[i].next) {
    if (syms[i].id >= 0) out.push_back(syms[i].id);
    else if (unk >= 0) out.push_back(unk);
  }
}

void Tokenizer::Impl::encode_bpe(std::string_view text, std::vector<int32_t>& out) const {
  pretok::Pieces pieces;
  pretok::split(pre_kind, text, pieces);
  BpeScratch scratch;
  for (auto [b, e] : pieces) bpe_word(text.substr(b, e - b), scratch, out);
}

struct Tokenizer::Impl::SpmScratch {
  std::vector<Sym> syms;
  std::vector<SpmCand> heap;
};

void Tokenizer::Impl::encode_spm(std::string_view raw, std::vector<int32_t>& out) const {
  // Spaces become U+2581, as the SentencePiece normaliser does.
  std::string text;
  text.reserve(raw.size() + 8);
  for (char c : raw) {
    if (c == ' ') text += kSpmSpace;
    else text += c;
  }
  SpmScratch sc;
  if (!spm_split_at_space) {
    spm_chunk(text, 0, text.size(), sc, out);
    return;
  }
  // No vocabulary entry has a space after another character, so no merge can
  // cross the start of a "▁..." run: merging each chunk separately gives the same
  // result as merging the whole text, with small heaps.
  size_t chunk = 0;
  for (size_t i = 3; i + 3 <= text.size(); ++i) {
    if (text.compare(i, 3, kSpmSpace) == 0 && text.compare(i - 3, 3, kSpmSpace) != 0) {
      spm_chunk(text, chunk, i, sc, out);
      chunk = i;
    }
  }
  spm_chunk(text, chunk, text.size(), sc, out);
}

void Tokenizer::Impl::spm_chunk(std::string_view text, size_t begin, size_t end, SpmScratch& sc,
                                std::vector<int32_t>& out) const {
  if (begin >= end) return;
  std::vector<Sym>& syms = sc.syms;
  syms.clear();
  for (size_t i = begin; i < end;) {
    size_t n;  // one code point; a malformed byte stands alone (and falls back to <0xXX>)
    unicode::decode_utf8(text.substr(0, end), i, n);
    syms.push_back(Sym{-1, uint32_t(i), uint32_t(n), int32_t(syms.size()) - 1, int32_t(syms.size()) + 1});
    i += n;
  }
  syms.back().next = -1;
  std::vector<SpmCand>& heap = sc.heap;
  heap.clear();
  auto try_pair = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const int32_t id = lookup(text.substr(syms[l].start, syms[l].len + syms[r].len));
    if (id < 0 || !mergeable(id)) return;
    heap.push_back(SpmCand{scores[id], l, r, syms[l].len, syms[r].len, id});
    std::push_heap(heap.begin(), heap.end());
  };
  for (size_t i = 0; i + 1 < syms.size(); ++i) try_pair(int32_t(i), int32_t(i + 1));
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const SpmCand c = heap.back();
    heap.pop_back();
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
      id = lookup(text.substr(s.start, s.len));
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
  for (uint64_t i = 0; i < n; ++i) im->tokens.emplace_back(toks->string_at(i));
  im->token_to_id.build(im->tokens);
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
      im->unk = im->lookup("<unk>");
    }
    for (int b = 0; b < 256; ++b) {
      const int32_t id = im->lookup(fmt::format("<0x{:02X}>", b));
      if (id >= 0) im->byte_token[b] = id;
    }
    im->spm_split_at_space = true;
    for (uint64_t i = 0; i < n && im->spm_split_at_space; ++i) {
      const std::string& t = im->tokens[i];
      if (!im->mergeable(int32_t(i))) continue;
      for (size_t p = t.find(kSpmSpace, 1); p != std::string::npos; p = t.find(kSpmSpace, p + 1)) {
        if (p < 3 || t.compare(p - 3, 3, kSpmSpace) != 0) {
          im->spm_split_at_space = false;
          break;
        }
      }
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
      im->merges.insert(pair_key(a, b), int32_t(i), c);
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
      // Literal text, except where the vocabulary supplies a byte-level byte
      // symbol only as a user-defined token (then it stands for that byte).
      if (!im.spm) {
        size_t len;
        const uint32_t cp = unicode::decode_utf8(t, 0, len);
        const ByteMap& bm = byte_map();
        if (len == t.size() && cp < bm.to_byte.size() && bm.to_byte[cp] >= 0 &&
            im.byte_token[size_t(bm.to_byte[cp])] == id)
          return std::string(1, char(bm.to_byte[cp]));
      }
      return t;
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

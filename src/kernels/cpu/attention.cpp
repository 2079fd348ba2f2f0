#include "kernels/cpu/attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "base/error.h"
#include "base/fp16.h"
#include "base/threads.h"
#include "kernels/cpu/attention_tile.h"
#include "kernels/cpu/kv_decode.h"
#include "kernels/cpu/kv_tile.h"
#include "kernels/cpu/softmax_state.h"

namespace kvq {

using attn::kTile;
static_assert(attn::kTile == kKvPageTokens, "attention tiles are cache pages");

namespace attn {

bool packed_values_supported(KvScheme scheme, int bits, int head_dim) {
  return scheme == KvScheme::quant && bits >= 2 && bits <= 4 && head_dim % 32 == 0;
}

bool packed_values_supported(const KvCodecLayout& L) {
  return L.role == KvRole::value && L.levels && packed_values_supported(L.scheme, L.bits, L.head_dim);
}

void tile_step_scalar(const TileStep& t) {
  const SoftmaxRows state{t.m, t.l, t.acc, t.hd};
  for (int r = 0; r < t.rows; ++r) {
    const float* q = t.q + int64_t(r) * t.hd;
    float* s = t.s + int64_t(r) * kTile;
    for (int j = 0; j < t.n; ++j) {
      if (t.kpos[j] > t.row_pos[r]) {
        s[j] = kNoScore;
        continue;
      }
      float dot = 0;
      for (int d = 0; d < t.hd; ++d) dot += q[d] * t.kt[d * kTile + j];
      s[j] = dot;
    }
    state.update(r, s, t.n, t.v);
  }
}

}  // namespace attn

std::string attention_kernel_name(const KernelSet& ks, int head_dim, const KvFormat* decode_values) {
  const bool packed = decode_values && attn::packed_values_supported(decode_values->scheme, decode_values->bits, head_dim);
  return attention_kernel_name(ks, attention_kernel_for(ks, head_dim, packed));
}

namespace {

attn::TileStepFn tile_step_of(const KernelSet& ks, AttentionKernel kernel) {
  switch (kernel) {
#if defined(__x86_64__)
    case AttentionKernel::avx2: return attn::tile_step_avx2;
    case AttentionKernel::avx512: return attn::tile_step_avx512;
#endif
    case AttentionKernel::portable: return attn::portable_tile_step(ks.portable_target);
    default: return attn::tile_step_scalar;
  }
}

constexpr int kPackedValuesMaxRows = 6;  // two 3-row blocks of the tile step
// Pre-RoPE keys are rotated relative to their page (KvLayerView::rope_rel_cs)
// for blocks of up to this many query rows (decode and short batches) instead
// of at absolute positions, whose angles are composed per page and head
// (kv_page_angles): turning the rows back by the page's first angle costs
// about as much as composing once for 24 rows (docs/BENCHMARKS.md, "Kernel
// choices"). Prefill's larger blocks compose once per 4x the rows.
constexpr int kRelativeRopeMaxRows = 24;

// Requests a page's bytes ahead of use, a slice at a time. Pages are separate
// allocations and the hardware prefetchers do not follow the jump from one to
// the next, so decode asks for the next page while it attends the current one:
// each head's share of it, in three slices spread over that head's stages
// (before its keys are decoded, before its tile step, after it). One burst of
// the whole share (~70 lines for a 4-bit page) filled the core's miss buffers
// and stalled the pipeline at the prefetch loop itself (docs/BENCHMARKS.md,
// "Kernel choices").
class PagePrefetch {
 public:
  // Slices of [lo, hi) of `page` (null: nothing to request).
  void start(const uint8_t* page, uint64_t lo, uint64_t hi, int slices) {
    page_ = page;
    at_ = lo / 64 * 64;
    end_ = hi;
    slice_ = (hi - at_ + uint64_t(slices) * 64 - 1) / (uint64_t(slices) * 64) * 64;
  }
  void next_slice() { request(slice_); }
  void rest() { request(end_); }

 private:
  void request(uint64_t bytes) {
    if (!page_) return;
    for (const uint64_t stop = std::min(end_, at_ + bytes); at_ < stop; at_ += 64) __builtin_prefetch(page_ + at_, 0, 3);
  }

  const uint8_t* page_ = nullptr;
  uint64_t at_ = 0, end_ = 0, slice_ = 0;
};

// How one attention call is cut into tasks and which kernels they run,
// decided once per call.
struct Plan {
  int group = 0;               // query heads per KV head
  int64_t qb_tokens = 0;       // query tokens per block
  int64_t n_qblocks = 0;
  int64_t n_tiles = 0;
  int heads_per_task = 0;      // decode: every KV head; more blocks: one
  bool prefetch_pages = false;
  int64_t n_split = 1;         // key ranges per (heads, block): flash-decoding
  int64_t tiles_per_split = 0;
  int64_t base_tasks = 0, n_tasks = 0;
  int rows_max = 0;            // rows of one KV head in a block
  int task_rows = 0;           // state rows of one task
  attn::TileStepFn tile_step = nullptr;
  bool packed_values = false;  // values read from their codes by the step
  bool relative_rope = false;  // keys rotated relative to their page
  bool score_in_decode = false;
  int half_rot = 0;
};

Plan make_plan(const AttentionArgs& a, int n_threads) {
  const KvLayerView& kv = a.kv;
  if (a.n_heads % kv.n_kv_heads != 0) fail("attention: {} query heads not a multiple of {} KV heads", a.n_heads, kv.n_kv_heads);
  Plan p;
  p.group = a.n_heads / kv.n_kv_heads;
  // Query blocks: a few tokens x every query head of the group share each decoded
  // tile. Long batches (prefill) take 4x larger blocks, so each tile of a
  // quantized cache is decoded once per 96 query rows rather than per 24
  // (there are still >= 4 blocks per KV head to spread over the threads).
  const int64_t small_block = std::max(1, 24 / p.group), large_block = std::max(1, 96 / p.group);
  p.qb_tokens = a.n_q >= 4 * large_block ? large_block : small_block;
  p.n_qblocks = (a.n_q + p.qb_tokens - 1) / p.qb_tokens;
  p.n_tiles = (kv.n_tokens + kTile - 1) / kTile;
  // Decode (one query block): a task covers every KV head of its pages, so it
  // streams whole pages (keys of all heads, then values) front to back and
  // requests the next page while it attends the current one (PagePrefetch).
  p.heads_per_task = p.n_qblocks == 1 ? kv.n_kv_heads : 1;
  p.prefetch_pages = p.heads_per_task == kv.n_kv_heads;
  const int n_hblocks = kv.n_kv_heads / p.heads_per_task;
  // Split the key range (flash-decoding) when there are too few (heads, block)
  // tasks to keep every thread busy to the end: aim at ~12 tasks per thread
  // (tasks are taken dynamically, so the last one bounds the imbalance) but
  // keep each split at >= 4 tiles so the merge stays negligible.
  p.base_tasks = int64_t(n_hblocks) * p.n_qblocks;
  const int64_t want_tasks = 12 * int64_t(n_threads);
  if (n_threads > 1 && p.base_tasks < want_tasks && p.n_tiles > 1)
    p.n_split = std::clamp<int64_t>((want_tasks + p.base_tasks - 1) / p.base_tasks, 1, std::max<int64_t>(1, p.n_tiles / 4));
  p.tiles_per_split = (p.n_tiles + p.n_split - 1) / p.n_split;
  p.n_tasks = p.base_tasks * p.n_split;
  // (A batch shorter than a block has fewer rows: decode's 3 decide the kernel
  // below, not a block's capacity.)
  p.rows_max = int(std::min(p.qb_tokens, a.n_q)) * p.group;
  p.task_rows = p.rows_max * p.heads_per_task;
  const bool packed_layout = attn::packed_values_supported(kv.v);
  const AttentionKernel kernel =
      attention_kernel_for(a.kernels, kv.head_dim, packed_layout && p.rows_max <= kPackedValuesMaxRows);
  p.tile_step = tile_step_of(a.kernels, kernel);
  p.packed_values = kernel != AttentionKernel::scalar && packed_layout;
  // (The scalar reference keeps rotating each key at its own position.)
  p.relative_rope = kernel != AttentionKernel::scalar && kv.keys_pre_rope && p.rows_max <= kRelativeRopeMaxRows;
  p.half_rot = kv.rope ? kv.rope->spec().n_rot / 2 : 0;
  // Scores computed by the key decoder (kv_score_key_tile): the AVX-512 step
  // over pre-RoPE keys the scorer takes, up to 4 rows (decode of a GQA group
  // of <= 4; more rows would decode the keys once per 4). Decided here, once:
  // a page whose keys it declined would compose its angles twice.
  p.score_in_decode = kernel == AttentionKernel::avx512 && kv.keys_pre_rope &&
                      kv_scores_rotated_keys(a.kernels, kv.k, p.rows_max);
  return p;
}

// One thread's buffers, sized for the plan.
struct Scratch {
  std::vector<float> q, q_page, kt, v, s, acc, m, l;
  std::vector<int32_t> row_pos;
  void resize_for(const Plan& p, int hd) {
    q.resize(size_t(p.task_rows) * hd);
    q_page.resize(size_t(p.rows_max) * hd);
    kt.resize(size_t(hd) * kTile);
    v.resize(size_t(hd) * kTile);
    s.resize(size_t(p.rows_max) * kTile);
    acc.resize(size_t(p.task_rows) * hd);
    m.resize(p.task_rows);
    l.resize(p.task_rows);
    row_pos.resize(p.rows_max);
  }
};

// One task: the query rows of KV heads [h0, h0 + heads_per_task) in query
// block qb over the pages of one key range, each head's rows at
// hh * rows_max of the task's state.
class Task {
 public:
  Task(const AttentionArgs& a, const Plan& p, Scratch& sc, int64_t task) : a_(a), kv_(a.kv), p_(p), sc_(sc) {
    split_ = task % p.n_split;
    const int64_t qb = (task / p.n_split) % p.n_qblocks;
    h0_ = int(task / p.n_split / p.n_qblocks) * p.heads_per_task;
    t0_ = qb * p.qb_tokens;
    t1_ = std::min(a.n_q, t0_ + p.qb_tokens);
    rows_ = int(t1_ - t0_) * p.group;
  }

  void run() {
    load_queries();
    state().reset(p_.task_rows);
    const int64_t p0 = split_ * p_.tiles_per_split, p1 = std::min(p_.n_tiles, p0 + p_.tiles_per_split);
    // Recent window: slots >= fp_all are full precision for every query of the
    // block, slots >= fp_some for its earliest one. Where the two differ inside
    // a tile, each query token gets the tile as it alone sees it.
    fp_all_ = kv_window_from(kv_, max_pos_);
    fp_some_ = kv_window_from(kv_, a_.q_pos[t0_]);
    for (int64_t p = p0; p < p1; ++p) {
      if (kv_.positions[p * kTile] > max_pos_) break;  // positions increase: nothing visible beyond
      for (int hh = 0; hh < p_.heads_per_task; ++hh) attend_page(p, p1, hh);
    }
  }

  // The rows' outputs, normalised (an unsplit key range) ...
  void write_output() const {
    for (int hh = 0; hh < p_.heads_per_task; ++hh)
      for (int r = 0; r < rows_; ++r) {
        float* out = out_row(hh, r);
        state().finish(hh * p_.rows_max + r, out);
        if (kv_.v_rotated) kv_hadamard(out, kv_.head_dim);  // sum_j p_j H v_j = H sum_j p_j v_j
      }
  }
  // ... or their states, for the merge: per row (m, l, acc[hd]).
  void write_partial(float* states) const {
    const int hd = kv_.head_dim;
    for (int hh = 0; hh < p_.heads_per_task; ++hh)
      for (int r = 0; r < rows_; ++r) {
        const int sr = hh * p_.rows_max + r;
        float* st = states + size_t(sr) * (hd + 2);
        st[0] = sc_.m[sr];
        st[1] = sc_.l[sr];
        std::copy_n(sc_.acc.data() + size_t(sr) * hd, hd, st + 2);
      }
  }

 private:
  attn::SoftmaxRows state() const { return {sc_.m.data(), sc_.l.data(), sc_.acc.data(), kv_.head_dim}; }
  float* out_row(int hh, int r) const {
    const int64_t t = t0_ + r / p_.group;
    return a_.out + (t * a_.n_heads + (h0_ + hh) * p_.group + r % p_.group) * kv_.head_dim;
  }

  // The block's queries, pre-multiplied by the softmax scale, and each row's position.
  void load_queries() {
    const int hd = kv_.head_dim, group = p_.group;
    max_pos_ = std::numeric_limits<int32_t>::min();
    for (int64_t t = t0_; t < t1_; ++t) {
      for (int g = 0; g < group; ++g) sc_.row_pos[int(t - t0_) * group + g] = a_.q_pos[t];
      max_pos_ = std::max(max_pos_, a_.q_pos[t]);
    }
    for (int hh = 0; hh < p_.heads_per_task; ++hh)
      for (int64_t t = t0_; t < t1_; ++t)
        for (int g = 0; g < group; ++g) {
          const int r = hh * p_.rows_max + int(t - t0_) * group + g;
          const float* src = a_.q + (t * a_.n_heads + (h0_ + hh) * group + g) * hd;
          for (int d = 0; d < hd; ++d) sc_.q[size_t(r) * hd + d] = src[d] * a_.scale;
        }
  }

  // Page p of KV head h0 + hh: one tile step for the rows (per query token
  // where the recent window cuts the tile differently for each).
  void attend_page(int64_t p, int64_t p_end, int hh) {
    const KernelSet& ks = a_.kernels;
    const int hd = kv_.head_dim, kvh = h0_ + hh;
    const int n = kv_.page_tokens(p);
    const int64_t s0 = p * kTile, s1 = s0 + n;
    const bool relative = p_.relative_rope && kv_.page_consecutive(p);
    PagePrefetch prefetch;  // this head's share of the next page
    if (p_.prefetch_pages && p + 1 < p_end)
      prefetch.start(kv_.pages[p + 1], kv_.page_bytes * hh / p_.heads_per_task,
                     kv_.page_bytes * (hh + 1) / p_.heads_per_task, 3);
    prefetch.next_slice();
    const int64_t hr = int64_t(hh) * p_.rows_max;
    const float* q = sc_.q.data() + hr * hd;
    if (relative) {  // the rows turned back by the page's first angle
      const float* back = kv_.rope_page_back + p * 2 * p_.half_rot;
      std::copy_n(q, size_t(rows_) * hd, sc_.q_page.data());
      for (int r = 0; r < rows_; ++r) kv_.rope->rotate(sc_.q_page.data() + int64_t(r) * hd, back, back + p_.half_rot);
      q = sc_.q_page.data();
    }
    if (fp_some_ >= fp_all_ || fp_some_ >= s1 || fp_all_ <= s0) {
      // Keys scored where they are decoded when the step can take the scores
      // (the key tile then never leaves registers).
      const bool scored =
          p_.score_in_decode && kv_score_key_tile(ks, kv_, p, kvh, q, rows_, sc_.s.data(), fp_all_, relative);
      if (!scored) kv_decode_key_tile(ks, kv_, p, kvh, sc_.kt.data(), fp_all_, relative);
      prefetch.next_slice();
      attn::TileStep ts{q, rows_, hd, sc_.kt.data(), sc_.v.data(), n, kv_.positions + s0,
                        sc_.row_pos.data(), sc_.m.data() + hr, sc_.l.data() + hr, sc_.acc.data() + hr * hd, sc_.s.data()};
      ts.scored = scored;
      // Values accumulated straight from the packed codes redo the lookups
      // for every 3 query rows: that pays for a few rows (decode); more
      // rows decode the value tile once and reuse it.
      if (p_.packed_values && rows_ <= kPackedValuesMaxRows && kv_.all_quantized(p, fp_all_)) {
        ts.v = nullptr;  // read from the page by the step itself
        ts.v_layout = &kv_.v;
        ts.v_page = kv_.pages[p] + kv_.v_offset;
        ts.v_head = kvh;
      } else {
        kv_decode_value_tile(ks, kv_, p, kvh, sc_.v.data(), fp_all_);
      }
      p_.tile_step(ts);
      prefetch.next_slice();
      return;
    }
    for (int64_t t = t0_; t < t1_; ++t) {
      const int64_t fp = kv_window_from(kv_, a_.q_pos[t]);
      const int64_t r0 = (t - t0_) * p_.group;
      kv_decode_key_tile(ks, kv_, p, kvh, sc_.kt.data(), fp, relative);
      kv_decode_value_tile(ks, kv_, p, kvh, sc_.v.data(), fp);
      p_.tile_step({q + r0 * hd, p_.group, hd, sc_.kt.data(), sc_.v.data(), n, kv_.positions + s0,
                    sc_.row_pos.data() + r0, sc_.m.data() + hr + r0, sc_.l.data() + hr + r0,
                    sc_.acc.data() + (hr + r0) * hd, sc_.s.data()});
    }
    prefetch.rest();
  }

  const AttentionArgs& a_;
  const KvLayerView& kv_;
  const Plan& p_;
  Scratch& sc_;
  int64_t split_ = 0, t0_ = 0, t1_ = 0;
  int h0_ = 0, rows_ = 0;
  int32_t max_pos_ = 0;
  int64_t fp_all_ = kKvNoWindow, fp_some_ = kKvNoWindow;
};

// The split key ranges' states of base tasks [b0, b1) merged into the output.
void merge_splits(const AttentionArgs& a, const Plan& p, const float* partial, int64_t b0, int64_t b1) {
  const int hd = a.kv.head_dim;
  const int64_t stride = hd + 2;
  std::vector<float> acc(hd);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t qb = b % p.n_qblocks;
    const int h0 = int(b / p.n_qblocks) * p.heads_per_task;
    const int64_t t0 = qb * p.qb_tokens, t1 = std::min(a.n_q, t0 + p.qb_tokens);
    const int rows = int(t1 - t0) * p.group;
    for (int hh = 0; hh < p.heads_per_task; ++hh)
      for (int r = 0; r < rows; ++r) {
        const int sr = hh * p.rows_max + r;
        const int64_t t = t0 + r / p.group;
        float* dst = a.out + (t * a.n_heads + (h0 + hh) * p.group + r % p.group) * hd;
        // Split sp of this row sits at ((b * n_split + sp) * task_rows + sr) * stride.
        attn::softmax_merge(partial + (size_t(b * p.n_split) * p.task_rows + sr) * stride, p.n_split,
                            int64_t(p.task_rows) * stride, hd, acc.data(), dst);
        if (a.kv.v_rotated) kv_hadamard(dst, hd);
      }
  }
}

}  // namespace

void attention(const AttentionArgs& args, ThreadPool& pool) {
  // Keys stored rotated: q . k = (H q) . (H k), H orthogonal; every query
  // vector turned once here rather than by each task that reads it.
  std::vector<float> q_rotated;
  AttentionArgs a = args;
  if (a.kv.k_rotated) {
    const int hd = a.kv.head_dim;
    q_rotated.assign(a.q, a.q + a.n_q * a.n_heads * hd);
    for (int64_t i = 0; i < a.n_q * a.n_heads; ++i) kv_hadamard(q_rotated.data() + i * hd, hd);
    a.q = q_rotated.data();
  }
  const Plan plan = make_plan(a, pool.size());
  // Partial states when the key range is split: per task, rows x (m, l, acc[hd]).
  const int64_t state_stride = a.kv.head_dim + 2;
  std::vector<float> partial(plan.n_split > 1 ? size_t(plan.n_tasks * plan.task_rows * state_stride) : 0);
  std::atomic<int64_t> next{0};
  pool.run([&](int, int) {
    thread_local Scratch sc;
    sc.resize_for(plan, a.kv.head_dim);
    for (int64_t task; (task = next.fetch_add(1)) < plan.n_tasks;) {
      Task t(a, plan, sc, task);
      t.run();
      if (plan.n_split == 1) t.write_output();
      else t.write_partial(partial.data() + size_t(task) * plan.task_rows * state_stride);
    }
  });
  if (plan.n_split == 1) return;
  // One base task (decode): merge here rather than waking the pool again.
  auto merge = [&](int64_t b0, int64_t b1) { merge_splits(a, plan, partial.data(), b0, b1); };
  if (plan.base_tasks == 1) merge(0, 1);
  else pool.parallel_for(plan.base_tasks, merge);
}

void attention_ref(const AttentionArgs& a) {
  const KvLayerView& kv = a.kv;
  const int hd = kv.head_dim;
  const int group = a.n_heads / kv.n_kv_heads;
  const int64_t row = int64_t(kv.n_kv_heads) * hd;
  // Per slot: the key/value as decoded from the codes (sink slots from the sink
  // store), and as the recent-window store holds it (where it holds it).
  std::vector<float> k(size_t(kv.n_tokens) * hd), v(size_t(kv.n_tokens) * hd), tile(size_t(hd) * kTile);
  std::vector<float> kw(size_t(kv.n_tokens) * hd), vw(size_t(kv.n_tokens) * hd);
  std::vector<double> score(size_t(kv.n_tokens));
  for (int h = 0; h < kv.n_kv_heads; ++h) {
    // Every key and value of this head as the cache decodes them; pre-RoPE
    // keys rotated here with Rope::apply, independently of the tile path.
    for (int64_t p = 0; p * kTile < kv.n_tokens; ++p) {
      const int n = kv.page_tokens(p);
      kv_decode_ref(kv.k, kv.pages[p], h, n, tile.data());
      for (int j = 0; j < n; ++j) {
        float* key = &k[(p * kTile + j) * hd];
        for (int d = 0; d < hd; ++d) key[d] = tile[size_t(d) * kTile + j];
      }
      kv_decode_ref(kv.v, kv.pages[p] + kv.v_offset, h, n, tile.data());
      std::copy_n(tile.data(), size_t(n) * hd, &v[p * kTile * hd]);
    }
    for (int64_t i = 0; i < kv.n_tokens; ++i) {
      for (int d = 0; d < hd; ++d) {
        if (i < kv.sink_tokens) {
          k[i * hd + d] = fp16_to_f32(kv.sink_k[i * row + h * hd + d]);
          v[i * hd + d] = fp16_to_f32(kv.sink_v[i * row + h * hd + d]);
        }
        if (kv.window_tokens > 0 && i >= kv.window_first) {
          kw[i * hd + d] = fp16_to_f32(kv.window_k[(i % kv.window_capacity) * row + h * hd + d]);
          vw[i * hd + d] = fp16_to_f32(kv.window_v[(i % kv.window_capacity) * row + h * hd + d]);
        }
      }
      // Rotated formats: back to the model's domain (H is its own inverse).
      for (float* x : {&k[i * hd], &kw[i * hd]})
        if (kv.k_rotated) kv_hadamard(x, hd);
      for (float* x : {&v[i * hd], &vw[i * hd]})
        if (kv.v_rotated) kv_hadamard(x, hd);
      if (kv.keys_pre_rope) {
        kv.rope->apply(&k[i * hd], 1, kv.positions[i]);
        kv.rope->apply(&kw[i * hd], 1, kv.positions[i]);
      }
    }
    for (int64_t t = 0; t < a.n_q; ++t) {
      auto full_precision = [&](int64_t i) {
        return kv.window_tokens > 0 && int64_t(kv.positions[i]) > int64_t(a.q_pos[t]) - kv.window_tokens;
      };
      for (int g = 0; g < group; ++g) {
        const int qh = h * group + g;
        const float* q = a.q + (t * a.n_heads + qh) * hd;
        double mx = -INFINITY;
        int64_t n_vis = 0;
        for (int64_t i = 0; i < kv.n_tokens && kv.positions[i] <= a.q_pos[t]; ++i, ++n_vis) {
          const float* key = full_precision(i) ? &kw[i * hd] : &k[i * hd];
          double dot = 0;
          for (int d = 0; d < hd; ++d) dot += double(q[d]) * key[d];
          score[i] = dot * a.scale;
          mx = std::max(mx, score[i]);
        }
        double sum = 0;
        for (int64_t i = 0; i < n_vis; ++i) sum += (score[i] = std::exp(score[i] - mx));
        float* out = a.out + (t * a.n_heads + qh) * hd;
        for (int d = 0; d < hd; ++d) {
          double o = 0;
          for (int64_t i = 0; i < n_vis; ++i) o += score[i] * (full_precision(i) ? vw : v)[i * hd + d];
          out[d] = n_vis ? float(o / sum) : 0.0f;
        }
      }
    }
  }
}

}  // namespace kvq

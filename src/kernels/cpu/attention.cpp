#include "kernels/cpu/attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "base/cpu.h"
#include "base/error.h"
#include "base/fp16.h"
#include "base/threads.h"
#include "kernels/cpu/attention_tile.h"
#include "kernels/cpu/kv_decode.h"

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
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < t.rows; ++r) {
    const float* q = t.q + int64_t(r) * t.hd;
    float* s = t.s + int64_t(r) * kTile;
    float tile_max = neg_inf;
    for (int j = 0; j < t.n; ++j) {
      if (t.kpos[j] > t.row_pos[r]) {
        s[j] = neg_inf;
        continue;
      }
      float dot = 0;
      for (int d = 0; d < t.hd; ++d) dot += q[d] * t.kt[d * kTile + j];
      s[j] = dot;
      tile_max = std::max(tile_max, dot);
    }
    if (tile_max == neg_inf) continue;  // nothing visible in this tile
    const float m_new = std::max(t.m[r], tile_max);
    const float corr = std::exp(t.m[r] - m_new);
    float* acc = t.acc + int64_t(r) * t.hd;
    for (int d = 0; d < t.hd; ++d) acc[d] *= corr;
    float sum = 0;
    for (int j = 0; j < t.n; ++j) {
      const float p = std::exp(s[j] - m_new);  // exp(-inf) = 0 for masked keys
      sum += p;
      const float* v = t.v + int64_t(j) * t.hd;
      for (int d = 0; d < t.hd; ++d) acc[d] += p * v[d];
    }
    t.l[r] = t.l[r] * corr + sum;
    t.m[r] = m_new;
  }
}

}  // namespace attn

namespace {

std::atomic<AttentionKernel> g_kernel{AttentionKernel::automatic};

}  // namespace

void set_attention_kernel(AttentionKernel kernel) { g_kernel.store(kernel); }

AttentionKernel attention_kernel_for(int head_dim, bool packed_values) {
  if (attention_scalar()) return AttentionKernel::scalar;
  const AttentionKernel pinned = g_kernel.load(std::memory_order_relaxed);
  // What an AVX2 CPU runs: the portable kernel takes the head sizes AVX2's cannot.
  const AttentionKernel avx2_or_portable = head_dim % 8 == 0 ? AttentionKernel::avx2 : AttentionKernel::portable;
  if (pinned == AttentionKernel::avx2) {
    if (simd_level() < SimdLevel::avx2) fail("attention: the AVX2 kernel was asked for on a CPU without AVX2");
    return avx2_or_portable;
  }
  // What an AVX-512 CPU runs: the AVX-512 kernel (Zen 5, one thread, 4K, per
  // tile: 0.97-0.99 us for the 2/3/4-bit KVQuant presets against 1.22-1.25 on
  // the AVX2 kernel and 1.59-1.81 on the portable one; f16 0.72 against 0.73 /
  // 0.83); for other head sizes AVX2's where it reads values from their codes
  // (its 1.25 against the portable kernel's 1.6), else the portable kernel.
  const AttentionKernel avx512_or_other = head_dim % 16 == 0 ? AttentionKernel::avx512
                                          : packed_values     ? avx2_or_portable
                                                              : AttentionKernel::portable;
  if (pinned == AttentionKernel::avx512) {
    if (simd_level() < SimdLevel::avx512) fail("attention: the AVX-512 kernel was asked for on a CPU without AVX-512");
    return avx512_or_other;
  }
  if (pinned != AttentionKernel::automatic) return pinned;
  switch (simd_level()) {
    case SimdLevel::avx512: return avx512_or_other;
    case SimdLevel::avx2: return avx2_or_portable;
    default:
      // Lowered to scalar on a SIMD CPU: the reference path, as for every kernel.
      return detected_simd_level() == SimdLevel::scalar ? AttentionKernel::portable : AttentionKernel::scalar;
  }
}

std::string attention_kernel_name(int head_dim, const KvFormat* decode_values) {
  const bool packed = decode_values && attn::packed_values_supported(decode_values->scheme, decode_values->bits, head_dim);
  switch (attention_kernel_for(head_dim, packed)) {
    case AttentionKernel::avx2: return "avx2";
    case AttentionKernel::avx512: return "avx512";
    case AttentionKernel::portable: return std::string("portable/") + attn::portable_target_name();
    default: return "scalar";
  }
}

namespace {

using TileStepFn = void (*)(const attn::TileStep&);

TileStepFn tile_step_of(AttentionKernel kernel) {
  switch (kernel) {
#if defined(__x86_64__)
    case AttentionKernel::avx2: return attn::tile_step_avx2;
    case AttentionKernel::avx512: return attn::tile_step_avx512;
#endif
    case AttentionKernel::portable: return attn::tile_step_portable;
    default: return attn::tile_step_scalar;
  }
}

constexpr int kPackedValuesMaxRows = 6;  // two 3-row blocks of the tile step
// Pre-RoPE keys are rotated relative to their page (KvLayerView::rope_rel_cs)
// for blocks of up to this many query rows (decode and short batches) instead
// of at absolute positions, whose angles are composed per page and head
// (KvLayerView::page_angles, ~0.4 us on the Zen 5 host): turning the rows back
// by the page's first angle costs ~20 ns a row, far less for decode's 3 rows,
// about as much for 24. Prefill's larger blocks compose once per 4x the rows.
constexpr int kRelativeRopeMaxRows = 24;

// Requests a page's bytes ahead of use, a slice at a time. Pages are separate
// allocations and the hardware prefetchers do not follow the jump from one to
// the next, so decode asks for the next page while it attends the current one:
// each head's share of it, in three slices spread over that head's stages
// (before its keys are decoded, before its tile step, after it). One burst of
// the whole share (~70 lines for a 4-bit page) filled the core's miss buffers
// and stalled the pipeline at the prefetch loop itself.
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

struct Scratch {
  std::vector<float> q, q_page, kt, v, s, acc, m, l;
  std::vector<int32_t> row_pos;
};

}  // namespace

void attention(const AttentionArgs& a, ThreadPool& pool) {
  const KvLayerView& kv = a.kv;
  const int hd = kv.head_dim;
  if (a.n_heads % kv.n_kv_heads != 0) fail("attention: {} query heads not a multiple of {} KV heads", a.n_heads, kv.n_kv_heads);
  const int group = a.n_heads / kv.n_kv_heads;

  // Query blocks: a few tokens x every query head of the group share each decoded
  // tile. Long batches (prefill) take 4x larger blocks, so each tile of a
  // quantized cache is decoded once per 96 query rows rather than per 24
  // (there are still >= 4 blocks per KV head to spread over the threads).
  const int64_t small_block = std::max(1, 24 / group), large_block = std::max(1, 96 / group);
  const int64_t qb_tokens = a.n_q >= 4 * large_block ? large_block : small_block;
  const int64_t n_qblocks = (a.n_q + qb_tokens - 1) / qb_tokens;
  const int64_t n_tiles = (kv.n_tokens + kTile - 1) / kTile;
  // Decode (one query block): a task covers every KV head of its pages, so it
  // streams whole pages (keys of all heads, then values) front to back; more
  // query blocks: one KV head per task.
  const int heads_per_task = n_qblocks == 1 ? kv.n_kv_heads : 1;
  // In decode the next page is requested while the current one is attended
  // (PagePrefetch). Zen 5, 16K, 30 layers, two threads: nuq4-1% 23 -> 15 ms in
  // one burst per head, -> 12.6 ms in three slices; f16 25 -> 19 -> 17.8. (On a
  // Zen 3 host one burst measured neutral; a whole page at once made f16 13 %
  // slower there.)
  const bool prefetch_pages = heads_per_task == kv.n_kv_heads;
  const uint64_t page_bytes = kv.v_offset + kv.v_codec->page_bytes();
  const int n_hblocks = kv.n_kv_heads / heads_per_task;
  // Split the key range (flash-decoding) when there are too few (heads, block)
  // tasks to keep every thread busy to the end: aim at ~12 tasks per thread
  // (tasks are taken dynamically, so the last one bounds the imbalance) but
  // keep each split at >= 4 tiles so the merge stays negligible.
  const int64_t base_tasks = int64_t(n_hblocks) * n_qblocks;
  int64_t n_split = 1;
  const int64_t want_tasks = 12 * int64_t(pool.size());
  if (pool.size() > 1 && base_tasks < want_tasks && n_tiles > 1)
    n_split = std::clamp<int64_t>((want_tasks + base_tasks - 1) / base_tasks, 1, std::max<int64_t>(1, n_tiles / 4));
  const int64_t tiles_per_split = (n_tiles + n_split - 1) / n_split;
  const int64_t n_tasks = base_tasks * n_split;
  // Rows of one KV head in a block (a batch shorter than a block has fewer:
  // decode's 3 decide the kernel below, not a block's capacity).
  const int rows_max = int(std::min(qb_tokens, a.n_q)) * group;
  const bool packed_layout = attn::packed_values_supported(kv.v_codec->layout());
  const AttentionKernel kernel = attention_kernel_for(hd, packed_layout && rows_max <= kPackedValuesMaxRows);
  const auto tile_step = tile_step_of(kernel);
  const bool packed_values = kernel != AttentionKernel::scalar && packed_layout;
  // (The scalar reference keeps rotating each key at its own position.)
  const bool relative_rope = kernel != AttentionKernel::scalar && kv.keys_pre_rope && rows_max <= kRelativeRopeMaxRows;
  const int half_rot = kv.rope ? kv.rope->spec().n_rot / 2 : 0;
  // Scores computed by the key decoder (KvLayerView::score_keys): the AVX-512
  // step over pre-RoPE keys the scorer takes, up to 4 rows (decode of a GQA
  // group of <= 4; more rows would decode the keys once per 4). Decided here,
  // once: a page whose keys it declined would compose its angles twice.
  const bool score_in_decode = kernel == AttentionKernel::avx512 && kv.keys_pre_rope &&
                               kv_scores_rotated_keys(*kv.k_codec, rows_max);
  const int task_rows = rows_max * heads_per_task;    // state rows of one task

  // Partial states when the key range is split: per task, rows x (m, l, acc[hd]).
  const int64_t state_stride = hd + 2;
  std::vector<float> partial(n_split > 1 ? size_t(n_tasks * task_rows * state_stride) : 0);

  std::atomic<int64_t> next{0};
  pool.run([&](int, int) {
    thread_local Scratch sc;
    sc.q.resize(size_t(task_rows) * hd);
    sc.q_page.resize(size_t(rows_max) * hd);
    sc.kt.resize(size_t(hd) * kTile);
    sc.v.resize(size_t(hd) * kTile);
    sc.s.resize(size_t(rows_max) * kTile);
    sc.acc.resize(size_t(task_rows) * hd);
    sc.m.resize(task_rows);
    sc.l.resize(task_rows);
    sc.row_pos.resize(rows_max);
    for (int64_t task; (task = next.fetch_add(1)) < n_tasks;) {
      const int64_t split = task % n_split;
      const int64_t qb = (task / n_split) % n_qblocks;
      const int h0 = int(task / n_split / n_qblocks) * heads_per_task;
      const int64_t t0 = qb * qb_tokens, t1 = std::min(a.n_q, t0 + qb_tokens);
      const int rows = int(t1 - t0) * group;
      int32_t max_pos = std::numeric_limits<int32_t>::min();
      for (int64_t t = t0; t < t1; ++t) {
        for (int g = 0; g < group; ++g) sc.row_pos[int(t - t0) * group + g] = a.q_pos[t];
        max_pos = std::max(max_pos, a.q_pos[t]);
      }
      // Rows of head h0 + hh start at hh * rows_max.
      for (int hh = 0; hh < heads_per_task; ++hh)
        for (int64_t t = t0; t < t1; ++t)
          for (int g = 0; g < group; ++g) {
            const int r = hh * rows_max + int(t - t0) * group + g;
            const float* src = a.q + (t * a.n_heads + (h0 + hh) * group + g) * hd;
            for (int d = 0; d < hd; ++d) sc.q[size_t(r) * hd + d] = src[d] * a.scale;
          }
      std::fill(sc.m.begin(), sc.m.end(), -std::numeric_limits<float>::infinity());
      std::fill(sc.l.begin(), sc.l.end(), 0.0f);
      std::fill(sc.acc.begin(), sc.acc.end(), 0.0f);
      const int64_t p0 = split * tiles_per_split, p1 = std::min(n_tiles, p0 + tiles_per_split);
      // Recent window: slots >= fp_all are full precision for every query of the
      // block, slots >= fp_some for its earliest one. Where the two differ inside
      // a tile, each query token gets the tile as it alone sees it.
      const int64_t fp_all = kv.window_from(max_pos), fp_some = kv.window_from(a.q_pos[t0]);
      for (int64_t p = p0; p < p1; ++p) {
        if (kv.positions[p * kTile] > max_pos) break;  // positions increase: nothing visible beyond
        const int n = int(std::min<int64_t>(kTile, kv.n_tokens - p * kTile));
        const int64_t s0 = p * kTile, s1 = s0 + n;
        const bool relative = relative_rope && kv.page_consecutive(p);
        for (int hh = 0; hh < heads_per_task; ++hh) {
          const int kvh = h0 + hh;
          PagePrefetch prefetch;  // this head's share of the next page
          if (prefetch_pages && p + 1 < p1)
            prefetch.start(kv.pages[p + 1], page_bytes * hh / heads_per_task, page_bytes * (hh + 1) / heads_per_task, 3);
          prefetch.next_slice();
          const int64_t hr = int64_t(hh) * rows_max;
          const float* q = sc.q.data() + hr * hd;
          if (relative) {  // the rows turned back by the page's first angle
            const float* back = kv.rope_page_back + p * 2 * half_rot;
            std::copy_n(q, size_t(rows) * hd, sc.q_page.data());
            for (int r = 0; r < rows; ++r) kv.rope->rotate(sc.q_page.data() + int64_t(r) * hd, back, back + half_rot);
            q = sc.q_page.data();
          }
          if (fp_some >= fp_all || fp_some >= s1 || fp_all <= s0) {
            // Keys scored where they are decoded when the step can take the
            // scores (the key tile then never leaves registers).
            const bool scored = score_in_decode && kv.score_keys(p, kvh, q, rows, sc.s.data(), fp_all, relative);
            if (!scored) kv.decode_keys(p, kvh, sc.kt.data(), fp_all, relative);
            prefetch.next_slice();
            attn::TileStep ts{q, rows, hd, sc.kt.data(), sc.v.data(), n, kv.positions + s0,
                              sc.row_pos.data(), sc.m.data() + hr, sc.l.data() + hr, sc.acc.data() + hr * hd, sc.s.data()};
            ts.scored = scored;
            // Values accumulated straight from the packed codes redo the lookups
            // for every 3 query rows: that pays for a few rows (decode); more
            // rows decode the value tile once and reuse it.
            if (packed_values && rows <= kPackedValuesMaxRows && kv.all_quantized(p, fp_all)) {
              ts.v = nullptr;  // read from the page by the step itself
              ts.v_layout = &kv.v_codec->layout();
              ts.v_page = kv.pages[p] + kv.v_offset;
              ts.v_head = kvh;
            } else {
              kv.decode_values(p, kvh, sc.v.data(), fp_all);
            }
            tile_step(ts);
            prefetch.next_slice();
            continue;
          }
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t fp = kv.window_from(a.q_pos[t]);
            const int64_t r0 = (t - t0) * group;
            kv.decode_keys(p, kvh, sc.kt.data(), fp, relative);
            kv.decode_values(p, kvh, sc.v.data(), fp);
            tile_step({q + r0 * hd, group, hd, sc.kt.data(), sc.v.data(), n, kv.positions + s0,
                       sc.row_pos.data() + r0, sc.m.data() + hr + r0, sc.l.data() + hr + r0,
                       sc.acc.data() + (hr + r0) * hd, sc.s.data()});
          }
          prefetch.rest();
        }
      }
      for (int hh = 0; hh < heads_per_task; ++hh) {
        for (int r = 0; r < rows; ++r) {
          const int sr = hh * rows_max + r;
          if (n_split == 1) {
            const int64_t t = t0 + r / group;
            float* dst = a.out + (t * a.n_heads + (h0 + hh) * group + r % group) * hd;
            const float inv = sc.l[sr] > 0 ? 1.0f / sc.l[sr] : 0.0f;
            for (int d = 0; d < hd; ++d) dst[d] = sc.acc[size_t(sr) * hd + d] * inv;
          } else {
            float* st = partial.data() + (size_t(task) * task_rows + sr) * state_stride;
            st[0] = sc.m[sr];
            st[1] = sc.l[sr];
            std::copy_n(sc.acc.data() + size_t(sr) * hd, hd, st + 2);
          }
        }
      }
    }
  });
  if (n_split == 1) return;

  // Merge the split states: rescale each part to the common max, then normalise.
  auto merge = [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(hd);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t qb = b % n_qblocks;
      const int h0 = int(b / n_qblocks) * heads_per_task;
      const int64_t t0 = qb * qb_tokens, t1 = std::min(a.n_q, t0 + qb_tokens);
      const int rows = int(t1 - t0) * group;
      for (int hh = 0; hh < heads_per_task; ++hh) {
        for (int r = 0; r < rows; ++r) {
          const int sr = hh * rows_max + r;
          auto state = [&](int64_t sp) { return partial.data() + (size_t(b * n_split + sp) * task_rows + sr) * state_stride; };
          float m = -std::numeric_limits<float>::infinity();
          for (int64_t sp = 0; sp < n_split; ++sp) m = std::max(m, state(sp)[0]);
          float l = 0;
          std::fill(acc.begin(), acc.end(), 0.0f);
          if (m != -std::numeric_limits<float>::infinity()) {
            for (int64_t sp = 0; sp < n_split; ++sp) {
              const float* st = state(sp);
              if (st[1] == 0) continue;
              const float w = std::exp(st[0] - m);
              l += st[1] * w;
              for (int d = 0; d < hd; ++d) acc[d] += st[2 + d] * w;
            }
          }
          const int64_t t = t0 + r / group;
          float* dst = a.out + (t * a.n_heads + (h0 + hh) * group + r % group) * hd;
          const float inv = l > 0 ? 1.0f / l : 0.0f;
          for (int d = 0; d < hd; ++d) dst[d] = acc[d] * inv;
        }
      }
    }
  };
  // One base task (decode): merge here rather than waking the pool again.
  if (base_tasks == 1) merge(0, 1);
  else pool.parallel_for(base_tasks, merge);
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
      kv.k_codec->decode(kv.pages[p], h, n, tile.data());
      for (int j = 0; j < n; ++j) {
        float* key = &k[(p * kTile + j) * hd];
        for (int d = 0; d < hd; ++d) key[d] = tile[size_t(d) * kTile + j];
      }
      kv.v_codec->decode(kv.pages[p] + kv.v_offset, h, n, tile.data());
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

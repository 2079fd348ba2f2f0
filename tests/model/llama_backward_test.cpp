// Gradient checks of the activation backward pass (src/model/llama_backward.cpp):
// every piece and the whole tiny random llama against central finite
// differences in double precision; the float path against the double path;
// determinism over thread counts. Each check prints its relative error
// (max |analytic - numeric| / max |numeric|).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "base/cpu.h"
#include "base/error.h"
#include "base/threads.h"
#include "gguf/gguf.h"
#include "model/llama.h"
#include "model/llama_backward.h"
#include "quant/quant.h"
#include "tiny_llama.h"

namespace kvq {
namespace {

// The kernels a test runs unless it loops over levels itself.
const SimdLevel simd = detected_simd_level();


using Vec = std::vector<double>;

Vec random_vec(size_t n, std::mt19937& rng, double sd = 1.0) {
  std::normal_distribution<double> nd(0.0, sd);
  Vec v(n);
  for (double& x : v) x = nd(rng);
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Central differences of f at x for every element: (f(x+h) - f(x-h)) / 2h.
Vec numeric_grad(Vec x, const std::function<double(const Vec&)>& f, double h = 1e-5) {
  Vec g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

double rel_error(const Vec& analytic, const Vec& numeric) {
  double num = 0, den = 0;
  for (size_t i = 0; i < analytic.size(); ++i) {
    num = std::max(num, std::abs(analytic[i] - numeric[i]));
    den = std::max(den, std::abs(numeric[i]));
  }
  return den > 0 ? num / den : num;
}

void report(const std::string& what, double err) {
  std::printf("[ gradcheck ] %-40s relative error %.2e\n", what.c_str(), err);
}

TEST(LlamaBackward, RmsNormMatchesFiniteDifferences) {
  std::mt19937 rng(1);
  const int n = 3, dim = 16;
  const Vec x = random_vec(n * dim, rng), dy = random_vec(n * dim, rng);
  std::vector<float> w(dim);
  for (int i = 0; i < dim; ++i) w[size_t(i)] = 0.5f + 0.1f * float(i);
  auto f = [&](const Vec& xx) {
    Vec y(xx.size());
    rmsnorm_fwd(xx.data(), w.data(), y.data(), n, dim, 1e-5f);
    return dot(y, dy);
  };
  Vec dx(x.size(), 0.25);  // accumulates: start from a known value
  rmsnorm_bwd(x.data(), w.data(), dy.data(), dx.data(), n, dim, 1e-5f);
  for (double& v : dx) v -= 0.25;
  const double err = rel_error(dx, numeric_grad(x, f));
  report("rmsnorm", err);
  EXPECT_LT(err, 1e-8);
}

TEST(LlamaBackward, RopeMatchesFiniteDifferences) {
  for (bool neox : {false, true}) {
    std::mt19937 rng(2);
    RopeSpec spec;
    spec.head_dim = 8;
    spec.n_rot = 6;  // two dims pass through
    spec.neox = neox;
    const int n = 5, heads = 2;
    std::vector<int32_t> pos = {0, 1, 7, 30, 1000};
    const auto ang = rope_angles<double>(spec, pos.data(), n);
    const Vec x = random_vec(size_t(n * heads * spec.head_dim), rng), dy = random_vec(x.size(), rng);
    auto f = [&](const Vec& xx) {
      Vec y = xx;
      rope_rotate(spec, ang, y.data(), n, heads, false);
      return dot(y, dy);
    };
    Vec dx = dy;
    rope_rotate(spec, ang, dx.data(), n, heads, true);
    const double err = rel_error(dx, numeric_grad(x, f));
    report(neox ? "rope (neox pairs)" : "rope (llama pairs)", err);
    EXPECT_LT(err, 1e-8);
    // Agrees with the inference kernel's rotation.
    const Rope rope(spec);
    for (int t = 0; t < n; ++t) {
      std::vector<float> xf(size_t(heads * spec.head_dim));
      for (size_t i = 0; i < xf.size(); ++i) xf[i] = float(x[size_t(t) * xf.size() + i]);
      rope.apply(xf.data(), heads, pos[size_t(t)]);
      Vec y = x;
      rope_rotate(spec, ang, y.data(), n, heads, false);
      for (size_t i = 0; i < xf.size(); ++i) EXPECT_NEAR(xf[i], y[size_t(t) * xf.size() + i], 1e-4);
    }
  }
}

TEST(LlamaBackward, SwigluAndMlpMatchFiniteDifferences) {
  std::mt19937 rng(3);
  const int n = 4, d = 8, ff = 12;
  const Vec g = random_vec(n * ff, rng, 2.0), u = random_vec(n * ff, rng), dh = random_vec(n * ff, rng);
  Vec dg(g.size()), du(u.size());
  swiglu_bwd(g.data(), u.data(), dh.data(), dg.data(), du.data(), n * ff);
  auto fg = [&](const Vec& gg) {
    Vec h(gg.size());
    swiglu_fwd(gg.data(), u.data(), h.data(), n * ff);
    return dot(h, dh);
  };
  auto fu = [&](const Vec& uu) {
    Vec h(uu.size());
    swiglu_fwd(g.data(), uu.data(), h.data(), n * ff);
    return dot(h, dh);
  };
  const double eg = rel_error(dg, numeric_grad(g, fg)), eu = rel_error(du, numeric_grad(u, fu));
  report("swiglu d/dgate", eg);
  report("swiglu d/dup", eu);
  EXPECT_LT(eg, 1e-8);
  EXPECT_LT(eu, 1e-8);

  // The MLP: y = W_down swiglu(W_gate x, W_up x) with F32 weights.
  auto weights = [&](int rows, int cols) {
    std::vector<float> w(size_t(rows * cols));
    std::normal_distribution<float> nd(0.0f, 0.4f);
    for (float& v : w) v = nd(rng);
    return w;
  };
  auto wg = weights(ff, d), wu = weights(ff, d), wd = weights(d, ff);
  const WeightView Wg{GgmlType::F32, ff, d, wg.data(), uint64_t(d) * 4}, Wu{GgmlType::F32, ff, d, wu.data(), uint64_t(d) * 4},
      Wd{GgmlType::F32, d, ff, wd.data(), uint64_t(ff) * 4};
  ThreadPool pool(2);
  const Vec x = random_vec(n * d, rng), dy = random_vec(n * d, rng);
  auto f = [&](const Vec& xx) {
    Vec a(n * ff), b(n * ff), h(n * ff), y(n * d);
    linear_fwd(Wg, xx.data(), a.data(), n, pool, simd);
    linear_fwd(Wu, xx.data(), b.data(), n, pool, simd);
    swiglu_fwd(a.data(), b.data(), h.data(), n * ff);
    linear_fwd(Wd, h.data(), y.data(), n, pool, simd);
    return dot(y, dy);
  };
  Vec a(n * ff), b(n * ff), dhh(n * ff), da(n * ff), db(n * ff), dx(n * d);
  linear_fwd(Wg, x.data(), a.data(), n, pool, simd);
  linear_fwd(Wu, x.data(), b.data(), n, pool, simd);
  linear_bwd(Wd, dy.data(), dhh.data(), n, false, pool, simd);
  swiglu_bwd(a.data(), b.data(), dhh.data(), da.data(), db.data(), n * ff);
  linear_bwd(Wg, da.data(), dx.data(), n, false, pool, simd);
  linear_bwd(Wu, db.data(), dx.data(), n, true, pool, simd);
  const double em = rel_error(dx, numeric_grad(x, f));
  report("mlp (swiglu + 3 linears)", em);
  EXPECT_LT(em, 1e-8);
}

TEST(LlamaBackward, LinearBackwardOfQuantizedWeights) {
  // Q4_1 rows (the default model's type): dx = W^T dy with W dequantized, over
  // token counts that exercise the 4-token blocks and the remainder.
  std::mt19937 rng(4);
  const int rows = 70, cols = 64;
  std::vector<float> wf(size_t(rows * cols));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& v : wf) v = nd(rng);
  const QuantTraits* tr = quant_traits(GgmlType::Q4_1);
  ASSERT_TRUE(tr && tr->from_float_ref);
  const uint64_t row_bytes = uint64_t(cols / tr->block_elems) * uint64_t(tr->block_bytes);
  std::vector<uint8_t> q(row_bytes * rows);
  for (int r = 0; r < rows; ++r) tr->from_float_ref(wf.data() + r * cols, q.data() + r * row_bytes, cols);
  std::vector<float> deq(wf.size());
  for (int r = 0; r < rows; ++r) tr->to_float_ref(q.data() + r * row_bytes, deq.data() + r * cols, cols);
  const WeightView W{GgmlType::Q4_1, rows, cols, q.data(), row_bytes};
  // Also F32 widths that take the FMA kernel's half-block (24) and its fallback (20).
  std::vector<float> f24(size_t(rows * 24)), f20(size_t(rows * 20));
  for (float& v : f24) v = nd(rng);
  for (float& v : f20) v = nd(rng);
  const WeightView W24{GgmlType::F32, rows, 24, f24.data(), 24 * 4}, W20{GgmlType::F32, rows, 20, f20.data(), 20 * 4};
  for (SimdLevel level : {SimdLevel::scalar, SimdLevel::avx2}) {
    const SimdLevel simd = std::min(level, detected_simd_level());
    for (const auto& [Wt, ref_w] : {std::pair{W, deq.data()}, std::pair{W24, f24.data()}, std::pair{W20, f20.data()}})
      for (int threads : {1, 3})
        for (int n : {1, 5, 9}) {
          const int64_t c_n = Wt.cols;
          ThreadPool pool(threads);
          std::vector<float> dy(size_t(n * rows)), dx(size_t(n * c_n), 7.0f);
          for (float& v : dy) v = nd(rng);
          linear_bwd(Wt, dy.data(), dx.data(), n, false, pool, simd);
          double err = 0;
          for (int t = 0; t < n; ++t)
            for (int64_t c = 0; c < c_n; ++c) {
              double ref = 0;
              for (int r = 0; r < rows; ++r) ref += double(dy[size_t(t * rows + r)]) * ref_w[size_t(r * c_n + c)];
              err = std::max(err, std::abs(ref - dx[size_t(t * c_n + c)]) / (1 + std::abs(ref)));
            }
          EXPECT_LT(err, 1e-5) << "cols " << c_n << " n " << n << " threads " << threads << " simd "
                               << simd_level_name(simd);
        }
  }
}

TEST(LlamaBackward, AttentionMatchesFiniteDifferences) {
  std::mt19937 rng(5);
  AttnShape s{7, 4, 2, 4, 0.5};
  ThreadPool pool(2);
  const size_t qn = size_t(s.n * s.n_head * s.head_dim), kn = size_t(s.n * s.n_head_kv * s.head_dim);
  const Vec q = random_vec(qn, rng), k = random_vec(kn, rng), v = random_vec(kn, rng), d_o = random_vec(qn, rng);
  auto loss = [&](const Vec& qq, const Vec& kk, const Vec& vv) {
    Vec o(qn), lse(size_t(s.n * s.n_head));
    attention_fwd(s, qq.data(), kk.data(), vv.data(), o.data(), lse.data(), pool, simd);
    return dot(o, d_o);
  };
  Vec o(qn), lse(size_t(s.n * s.n_head)), dq(qn), dk(kn), dv(kn);
  attention_fwd(s, q.data(), k.data(), v.data(), o.data(), lse.data(), pool, simd);
  // The forward against a direct softmax.
  for (int h = 0; h < s.n_head; ++h)
    for (int64_t i = 0; i < s.n; ++i) {
      const int g = h / 2;
      std::vector<double> p(size_t(i + 1));
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double sc = 0;
        for (int d = 0; d < 4; ++d) sc += q[size_t((i * 4 + h) * 4 + d)] * k[size_t((j * 2 + g) * 4 + d)];
        p[size_t(j)] = sc * s.scale;
        mx = std::max(mx, p[size_t(j)]);
      }
      for (auto& x : p) sum += (x = std::exp(x - mx));
      for (int d = 0; d < 4; ++d) {
        double ref = 0;
        for (int64_t j = 0; j <= i; ++j) ref += p[size_t(j)] / sum * v[size_t((j * 2 + g) * 4 + d)];
        EXPECT_NEAR(o[size_t((i * 4 + h) * 4 + d)], ref, 1e-12);
      }
    }
  attention_bwd(s, q.data(), k.data(), v.data(), o.data(), lse.data(), d_o.data(), dq.data(), dk.data(), dv.data(), pool, simd);
  const double eq = rel_error(dq, numeric_grad(q, [&](const Vec& x) { return loss(x, k, v); }));
  const double ek = rel_error(dk, numeric_grad(k, [&](const Vec& x) { return loss(q, x, v); }));
  const double ev = rel_error(dv, numeric_grad(v, [&](const Vec& x) { return loss(q, k, x); }));
  report("attention dQ (causal, GQA 4/2)", eq);
  report("attention dK", ek);
  report("attention dV", ev);
  EXPECT_LT(eq, 1e-8);
  EXPECT_LT(ek, 1e-8);
  EXPECT_LT(ev, 1e-8);
}

TEST(LlamaBackward, AttentionOverSeveralRowBlocksAndKeyTiles) {
  // n = 150: several 16-row blocks, three 64-key tiles, a ragged last block.
  // Sampled elements against central differences; the float paths against double.
  std::mt19937 rng(6);
  AttnShape s{150, 3, 1, 8, 1.0 / std::sqrt(8.0)};
  ThreadPool pool(2);
  const size_t qn = size_t(s.n * s.n_head * s.head_dim), kn = size_t(s.n * s.n_head_kv * s.head_dim);
  const Vec q = random_vec(qn, rng, 1.5), k = random_vec(kn, rng, 1.5), v = random_vec(kn, rng), d_o = random_vec(qn, rng);
  auto loss = [&](const Vec& qq, const Vec& kk, const Vec& vv) {
    Vec o(qn), lse(size_t(s.n * s.n_head));
    attention_fwd(s, qq.data(), kk.data(), vv.data(), o.data(), lse.data(), pool, simd);
    return dot(o, d_o);
  };
  Vec o(qn), lse(size_t(s.n * s.n_head)), dq(qn), dk(kn), dv(kn);
  attention_fwd(s, q.data(), k.data(), v.data(), o.data(), lse.data(), pool, simd);
  attention_bwd(s, q.data(), k.data(), v.data(), o.data(), lse.data(), d_o.data(), dq.data(), dk.data(), dv.data(), pool, simd);
  const Vec* grads[3] = {&dq, &dk, &dv};
  const char* names[3] = {"dQ", "dK", "dV"};
  for (int which = 0; which < 3; ++which) {
    Vec x = which == 0 ? q : which == 1 ? k : v;
    std::uniform_int_distribution<size_t> pick(0, x.size() - 1);
    Vec ana, num;
    for (int e = 0; e < 25; ++e) {
      const size_t i = pick(rng);
      const double x0 = x[i], h = 1e-5;
      auto f = [&](double val) {
        x[i] = val;
        const double r = which == 0 ? loss(x, k, v) : which == 1 ? loss(q, x, v) : loss(q, k, x);
        x[i] = x0;
        return r;
      };
      num.push_back((f(x0 + h) - f(x0 - h)) / (2 * h));
      ana.push_back((*grads[which])[i]);
    }
    const double err = rel_error(ana, num);
    report(std::string("attention n=150 (sampled) ") + names[which], err);
    EXPECT_LT(err, 1e-7);
  }
  for (SimdLevel level : {SimdLevel::scalar, SimdLevel::avx2}) {
    const SimdLevel simd = std::min(level, detected_simd_level());
    auto f32 = [](const Vec& x) { return std::vector<float>(x.begin(), x.end()); };
    const auto qf = f32(q), kf = f32(k), vf = f32(v), dof = f32(d_o);
    std::vector<float> of(qn), lf(size_t(s.n * s.n_head)), dqf(qn), dkf(kn), dvf(kn);
    attention_fwd(s, qf.data(), kf.data(), vf.data(), of.data(), lf.data(), pool, simd);
    attention_bwd(s, qf.data(), kf.data(), vf.data(), of.data(), lf.data(), dof.data(), dqf.data(), dkf.data(), dvf.data(), pool, simd);
    auto vec = [](const std::vector<float>& x) { return Vec(x.begin(), x.end()); };
    EXPECT_LT(rel_error(vec(of), o), 1e-5);
    EXPECT_LT(rel_error(vec(dqf), dq), 1e-4);
    EXPECT_LT(rel_error(vec(dkf), dk), 1e-4);
    EXPECT_LT(rel_error(vec(dvf), dv), 1e-4);
  }
}

// A tiny random llama with F32 weights: d=16, 4 heads / 2 KV heads of 4, 2 layers,
// ff 24, vocab 11. Tied output head unless `untied`.
struct TinyLlama {
  gguf::File file;
  LlamaModel model;
  static gguf::File make(bool untied, uint32_t seed) {
    test::TinyLlamaSpec s;  // the defaults: d=16, 4 heads / 2 KV heads of 4, 2 layers, ff 24, vocab 11
    s.untied = untied;
    s.seed = seed;
    return test::tiny_llama_gguf(s);
  }
  explicit TinyLlama(bool untied = false, uint32_t seed = 7) : file(make(untied, seed)), model(file) {}
};

const std::vector<int32_t> kTokens = {1, 5, 3, 9, 0, 10, 4};

TEST(LlamaBackward, WholeModelKvGradientsMatchFiniteDifferences) {
  for (bool untied : {false, true}) {
    TinyLlama tiny(untied);
    const LlamaHparams& hp = tiny.model.hparams();
    ThreadPool pool(2), one(1);  // one thread for the hundreds of tiny loss evaluations (no wake-ups)
    const int64_t n = int64_t(kTokens.size());
    const int kvd = hp.kv_dim();
    std::vector<Vec> K(size_t(hp.n_layer)), V(K.size()), dK(K.size()), dV(K.size());
    int calls = 0, expect_layer = hp.n_layer - 1;
    const double loss = llama_window_kv_grads<double>(
        tiny.model, kTokens.data(), n, pool, simd, [&](int l, const double* k, const double* v, const double* dk, const double* dv) {
          EXPECT_EQ(l, expect_layer--);
          ++calls;
          K[size_t(l)].assign(k, k + n * kvd);
          V[size_t(l)].assign(v, v + n * kvd);
          dK[size_t(l)].assign(dk, dk + n * kvd);
          dV[size_t(l)].assign(dv, dv + n * kvd);
        });
    EXPECT_EQ(calls, hp.n_layer);
    EXPECT_NEAR(loss, llama_window_loss<double>(tiny.model, kTokens.data(), n, pool, simd), 1e-12 * std::abs(loss));
    EXPECT_GT(loss, 0);
    for (int l = 0; l < hp.n_layer; ++l)
      for (int which = 0; which < 2; ++which) {
        // Every element of the layer's K (or V): perturb it alone, difference the loss.
        Vec num(size_t(n * kvd));
        for (size_t e = 0; e < num.size(); ++e) {
          auto at = [&](double delta) {
            return llama_window_loss<double>(tiny.model, kTokens.data(), n, one, simd, [&](int li, double* k, double* v) {
              if (li == l) (which == 0 ? k : v)[e] += delta;
            });
          };
          const double h = 1e-5;
          num[e] = (at(h) - at(-h)) / (2 * h);
        }
        const Vec& ana = which == 0 ? dK[size_t(l)] : dV[size_t(l)];
        const double err = rel_error(ana, num);
        report(std::string("whole model ") + (untied ? "(untied) " : "(tied) ") + (which == 0 ? "dL/dK" : "dL/dV") +
                   " layer " + std::to_string(l),
               err);
        EXPECT_LT(err, 1e-6);
        // The last token's K/V only reach the loss through itself: its query has no target.
        for (int c = 0; c < kvd; ++c) EXPECT_EQ(ana[size_t((n - 1) * kvd + c)], 0.0);
      }
  }
}

TEST(LlamaBackward, FloatPathAgreesWithDoubleAndIsDeterministic) {
  // Both kernel paths (scalar, AVX2 where the CPU has it).
  for (SimdLevel level : {SimdLevel::scalar, SimdLevel::avx2}) {
  const SimdLevel simd = std::min(level, detected_simd_level());
  TinyLlama tiny(true, 11);
  const LlamaHparams& hp = tiny.model.hparams();
  const int64_t n = int64_t(kTokens.size());
  const int kvd = hp.kv_dim();
  ThreadPool p1(1), p3(3);
  std::vector<Vec> dd(size_t(hp.n_layer));
  llama_window_kv_grads<double>(tiny.model, kTokens.data(), n, p1, simd, [&](int l, const double*, const double*, const double* dk, const double* dv) {
    dd[size_t(l)].assign(dk, dk + n * kvd);
    dd[size_t(l)].insert(dd[size_t(l)].end(), dv, dv + n * kvd);
  });
  std::vector<std::vector<float>> f1(size_t(hp.n_layer)), f3(size_t(hp.n_layer));
  auto grab = [&](std::vector<std::vector<float>>& out) {
    return [&out, n, kvd](int l, const float*, const float*, const float* dk, const float* dv) {
      out[size_t(l)].assign(dk, dk + n * kvd);
      out[size_t(l)].insert(out[size_t(l)].end(), dv, dv + n * kvd);
    };
  };
  const double l1 = llama_window_kv_grads<float>(tiny.model, kTokens.data(), n, p1, simd, grab(f1));
  const double l3 = llama_window_kv_grads<float>(tiny.model, kTokens.data(), n, p3, simd, grab(f3));
  EXPECT_EQ(l1, l3);
  for (int l = 0; l < hp.n_layer; ++l) {
    EXPECT_EQ(f1[size_t(l)], f3[size_t(l)]) << "layer " << l << ": thread count changed the gradients";
    const Vec fl(f1[size_t(l)].begin(), f1[size_t(l)].end());
    const double err = rel_error(fl, dd[size_t(l)]);
    report(std::string("float vs double (") + simd_level_name(simd) + "), layer " + std::to_string(l), err);
    EXPECT_LT(err, 1e-4);
  }
  }
}

TEST(LlamaBackward, RejectsTooShortWindowsAndBadTokens) {
  TinyLlama tiny;
  ThreadPool pool(1);
  const int32_t one = 1;
  EXPECT_THROW(llama_window_kv_grads<float>(tiny.model, &one, 1, pool, simd, {}), Error);
  const std::vector<int32_t> bad = {1, 11};
  EXPECT_THROW(llama_window_loss<float>(tiny.model, bad.data(), 2, pool, simd), Error);
}

}  // namespace
}  // namespace kvq

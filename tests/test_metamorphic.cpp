// Metamorphic checks on every available backend: relations between runs that the contract
// implies (a covering window equals full attention, g = 1 equals full, a windowed row equals
// full attention over its sliced keys, LSE merge of key splits, GQA equals MHA with repeated
// heads, ...), plus float64 computations written here from the contract (not from the library)
// for attention and pooling.
#include <cstdio>

#include "test_util.hpp"
#include "tolerance.hpp"

namespace cca::test {
namespace {

constexpr int64_t kB = 2, kT = 29, kHq = 4, kHkv = 2, kD = 32;
// One thread: these problems are tiny, and threading is covered by the consistency grid.
// (With two OpenMP threads per process, ctest -j2 on two cores spends most of its time in
// libgomp's spin-waits.)
constexpr int kThreads = 1;

class Metamorphic : public ::testing::TestWithParam<BackendKind> {
 protected:
  BackendKind be() const { return GetParam(); }
  // Inputs [2, 29, 4|2, 32]; q/k/v are slices of a packed qkv buffer, as a model passes them.
  Qkv inputs(DType dt, const std::string& salt, int64_t Hq = kHq, int64_t Hkv = kHkv,
             int64_t T = kT) const {
    Rng rng(seed_of(salt));
    return make_qkv(kB, T, Hq, Hkv, kD, dt, Layout::packed, rng);
  }
  AttnOut run(const Qkv& in, const VariantSpec& v) const {
    AttnOut r = run_attn(be(), in.q, in.k, in.v, v, Layout::contiguous, kThreads);
    EXPECT_TRUE(fully_written(r.out)) << v.describe();
    EXPECT_TRUE(fully_written(r.lse)) << v.describe();
    return r;
  }
  // out and lse of `a` equal those of `b` up to same-backend rounding.
  static void expect_same(const AttnOut& a, const AttnOut& b, const std::string& what) {
    const Bound tol = identity_tolerance(a.out.view.dtype);
    const std::string cat = std::string("identity ") + dtype_tag(a.out.view.dtype);
    expect_close(a.out.view, b.out.view, tol.max_abs, tol.rel_l2, what + " out", cat + " out");
    expect_close(a.lse.view, b.lse.view, identity_lse_tolerance(a.out.view.dtype), 1.0,
                 what + " lse", cat + " lse");
  }
  // Row t of (out, lse) of `a` equals row u of `b`.
  static void expect_same_row(const AttnOut& a, int64_t t, const AttnOut& b, int64_t u,
                              const std::string& what) {
    const Bound tol = identity_tolerance(a.out.view.dtype);
    const std::string cat = std::string("identity ") + dtype_tag(a.out.view.dtype);
    expect_close(a.out.view.slice(1, t, 1), b.out.view.slice(1, u, 1), tol.max_abs, tol.rel_l2,
                 what + " out row " + std::to_string(t), cat + " out");
    expect_close(a.lse.view.slice(2, t, 1), b.lse.view.slice(2, u, 1),
                 identity_lse_tolerance(a.out.view.dtype), 1.0,
                 what + " lse row " + std::to_string(t), cat + " lse");
  }
};

// ---- float64 computations from the contract ---------------------------------------------------
double contract_scale(const VariantSpec& v, int64_t D) {
  return std::isnan(v.scale) ? 1.0 / std::sqrt(double(D)) : v.scale;
}

// Core tokens [B, m, Hc, D] (flat, row-major) of groups 0..m-1, pooled in float64.
struct HandCore {
  std::vector<double> k, v;
  int64_t m, Hc;
};
HandCore hand_pool(const TensorView& q, const TensorView& k, const TensorView& v,
                   const VariantSpec& var, int64_t m) {
  const int64_t B = q.shape[0], Hq = q.shape[2], Hkv = k.shape[2], D = q.shape[3];
  const int64_t r = Hq / Hkv, g = var.group;
  const bool per_query = var.pool_heads == PoolHeads::query;
  const int64_t Hc = per_query ? Hq : Hkv;
  const double scale = contract_scale(var, D);
  HandCore c{std::vector<double>(size_t(B * m * Hc * D)),
             std::vector<double>(size_t(B * m * Hc * D)), m, Hc};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t hc = 0; hc < Hc; ++hc) {
        const int64_t kvh = per_query ? hc / r : hc, last = (i + 1) * g - 1;
        // weights w[n] over the group's keys: softmax of each pooling head's last query, averaged
        std::vector<double> w(size_t(g), var.pool == PoolMode::mean ? 1.0 / double(g) : 0.0);
        if (var.pool == PoolMode::cca) {
          std::vector<int64_t> heads;
          if (per_query)
            heads = {hc};
          else
            for (int64_t h = hc * r; h < (hc + 1) * r; ++h) heads.push_back(h);
          for (int64_t h : heads) {
            std::vector<double> logit(static_cast<size_t>(g));
            double mx = -INFINITY, sum = 0;
            for (int64_t n = 0; n < g; ++n) {
              double s = 0;
              for (int64_t d = 0; d < D; ++d)
                s += double(q.load(q.offset(b, last, h, d))) *
                     k.load(k.offset(b, i * g + n, kvh, d));
              logit[size_t(n)] = scale * s;
              mx = std::max(mx, logit[size_t(n)]);
            }
            for (double& l : logit) sum += (l = std::exp(l - mx));
            for (int64_t n = 0; n < g; ++n)
              w[size_t(n)] += logit[size_t(n)] / sum / double(heads.size());
          }
        }
        for (int64_t d = 0; d < D; ++d) {
          double sk = 0, sv = 0, mk = -INFINITY, mv = -INFINITY;
          for (int64_t n = 0; n < g; ++n) {
            const double kk = k.load(k.offset(b, i * g + n, kvh, d));
            const double vv = v.load(v.offset(b, i * g + n, kvh, d));
            sk += w[size_t(n)] * kk, sv += w[size_t(n)] * vv;
            mk = std::max(mk, kk), mv = std::max(mv, vv);
          }
          const size_t o = size_t(((b * m + i) * Hc + hc) * D + d);
          c.k[o] = var.pool == PoolMode::max ? mk : sk;
          c.v[o] = var.pool == PoolMode::max ? mv : sv;
        }
      }
  return c;
}

// Raw key p visible to query t under a baseline variant (the contract's masks).
bool hand_raw_visible(const VariantSpec& v, int64_t t, int64_t p) {
  switch (v.kind) {
    case VariantKind::full:
      return p <= t;
    case VariantKind::sliding:
      return p <= t && p > t - v.window;
    case VariantKind::streaming:
    case VariantKind::lminfinite:
      return p <= t && (p < v.sinks || p > t - v.window);
    case VariantKind::cca:
      break;
  }
  return false;
}

// Number of core tokens query t sees: max(0, floor((t + 1 - s) / g)).
int64_t hand_core_visible(int64_t g, int64_t s, int64_t t) {
  return t + 1 - s > 0 ? (t + 1 - s) / g : 0;
}

// out [B, T, Hq, D] and lse [B, Hq, T], flat row-major, in float64.
struct HandAttn {
  std::vector<double> out, lse;
};
HandAttn hand_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                        const VariantSpec& var) {
  const int64_t B = q.shape[0], T = q.shape[1], Hq = q.shape[2], Hkv = k.shape[2], D = q.shape[3];
  const int64_t r = Hq / Hkv;
  const double scale = contract_scale(var, D);
  const bool cca = var.kind == VariantKind::cca;
  const HandCore core = cca ? hand_pool(q, k, v, var, T / var.group) : HandCore{{}, {}, 0, 0};
  HandAttn res{std::vector<double>(size_t(B * T * Hq * D)),
               std::vector<double>(size_t(B * Hq * T))};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < Hq; ++h) {
        std::vector<const double*> kc, vc;  // visible core tokens
        std::vector<int64_t> raw;           // visible raw positions
        int64_t j = 0;
        if (cca) {
          j = hand_core_visible(var.group, var.window, t);
          const int64_t hc = var.pool_heads == PoolHeads::query ? h : h / r;
          for (int64_t c = 0; c < j; ++c) {
            kc.push_back(&core.k[size_t(((b * core.m + c) * core.Hc + hc) * D)]);
            vc.push_back(&core.v[size_t(((b * core.m + c) * core.Hc + hc) * D)]);
          }
          for (int64_t p = j * var.group; p <= t; ++p) raw.push_back(p);
        } else {
          for (int64_t p = 0; p <= t; ++p)
            if (hand_raw_visible(var, t, p)) raw.push_back(p);
        }
        std::vector<double> logit;
        for (size_t c = 0; c < kc.size(); ++c) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += double(q.load(q.offset(b, t, h, d))) * kc[c][d];
          logit.push_back(scale * s);
        }
        for (int64_t p : raw) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d)
            s += double(q.load(q.offset(b, t, h, d))) * k.load(k.offset(b, p, h / r, d));
          logit.push_back(scale * s);
        }
        const double mx = *std::max_element(logit.begin(), logit.end());
        double sum = 0;
        for (double& l : logit) sum += (l = std::exp(l - mx));
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (size_t c = 0; c < kc.size(); ++c) acc += logit[c] * vc[c][d];
          for (size_t x = 0; x < raw.size(); ++x)
            acc += logit[kc.size() + x] * v.load(v.offset(b, raw[x], h / r, d));
          res.out[size_t(((b * T + t) * Hq + h) * D + d)] = acc / sum;
        }
        res.lse[size_t((b * Hq + h) * T + t)] = mx + std::log(sum);
      }
  return res;
}

void expect_near_hand(const TensorView& got, const std::vector<double>& want, Bound tol,
                      const std::string& what) {
  const std::vector<double> g = to_f64(got);
  const Diff d = diff(g, want);
  ErrorLog::add("float64 in the test, f32 " + what.substr(0, what.find(' ')), d, tol.max_abs);
  EXPECT_EQ(d.nonfinite, 0) << what;
  EXPECT_LE(d.max_abs, tol.max_abs)
      << what << ": worst at " << index_string(got, d.worst) << " got " << g[size_t(d.worst)]
      << " want " << want[size_t(d.worst)];
  EXPECT_LE(d.rel_l2, tol.rel_l2) << what;
}

// ---- anchors: the library against float64 written from the contract ---------------------------

// Every variant (g not dividing s, GQA, a non-default scale too) against hand attention.
TEST_P(Metamorphic, EveryVariantMatchesHandFloat64) {
  const Qkv in = inputs(DType::f32, "hand");
  std::vector<VariantSpec> variants = all_variants(4, 6);
  VariantSpec scaled = VariantSpec::cca(3, 5);
  scaled.scale = 0.37;
  variants.push_back(scaled);
  for (const VariantSpec& var : variants) {
    SCOPED_TRACE(var.describe());
    const AttnOut got = run(in, var);
    const HandAttn want = hand_attention(in.q.view, in.k.view, in.v.view, var);
    expect_near_hand(got.out.view, want.out, kHandF32, "out");
    expect_near_hand(got.lse.view, want.lse, {kHandLseF32, 1.0}, "lse");
  }
}

// cca_pool for every pool and pool_heads, GQA with r = 3, default and explicit scale, all groups
// and a prefix of them (m < T/g).
TEST_P(Metamorphic, PoolMatchesHandFloat64) {
  const Qkv in = inputs(DType::f32, "pool", 6, 2);
  for (double scale : {double(NAN), 0.7})
    for (PoolMode pool : {PoolMode::cca, PoolMode::mean, PoolMode::max})
      for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query})
        for (int64_t m : {kT / 4, int64_t(3)}) {
          VariantSpec var = VariantSpec::cca(4, 8, pool, heads);
          var.scale = scale;
          SCOPED_TRACE(var.describe() + " m=" + std::to_string(m));
          const PoolOut got = run_pool(be(), in.q, in.k, in.v, var, m, kThreads);
          EXPECT_TRUE(fully_written(got.k_core));
          EXPECT_TRUE(fully_written(got.v_core));
          const HandCore want = hand_pool(in.q.view, in.k.view, in.v.view, var, m);
          expect_near_hand(got.k_core.view, want.k, kHandF32, "k_core");
          expect_near_hand(got.v_core.view, want.v, kHandF32, "v_core");
        }
}

// ---- windows that cover everything equal full attention ---------------------------------------

TEST_P(Metamorphic, CcaWithWindowCoveringTEqualsFull) {
  for (DType dt : {DType::f32, DType::bf16}) {
    const Qkv in = inputs(dt, "wide");
    const AttnOut full = run(in, VariantSpec::full());
    for (int64_t g : {1, 3, 4, 7, 29, 40})
      for (int64_t s : {kT, kT + 5})
        for (PoolMode pool : {PoolMode::cca, PoolMode::mean, PoolMode::max})
          for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query}) {
            const VariantSpec var = VariantSpec::cca(g, s, pool, heads);
            SCOPED_TRACE(var.describe() + " " + dtype_name(dt));
            expect_same(run(in, var), full, "cca vs full");
          }
  }
}

// A core token of a group of one key is that key, so g = 1 equals full attention for every s
// (the contract states it for s >= T; it holds for any s).
TEST_P(Metamorphic, CcaWithGroupOneEqualsFull) {
  for (DType dt : {DType::f32, DType::bf16}) {
    const Qkv in = inputs(dt, "g1");
    const AttnOut full = run(in, VariantSpec::full());
    for (int64_t s : {int64_t(1), int64_t(2), int64_t(5), int64_t(17), kT})
      for (PoolMode pool : {PoolMode::cca, PoolMode::mean, PoolMode::max})
        for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query}) {
          const VariantSpec var = VariantSpec::cca(1, s, pool, heads);
          SCOPED_TRACE(var.describe() + " " + dtype_name(dt));
          expect_same(run(in, var), full, "cca g=1 vs full");
        }
  }
}

TEST_P(Metamorphic, SlidingWithWindowCoveringTEqualsFull) {
  const Qkv in = inputs(DType::f32, "sliding-wide");
  const AttnOut full = run(in, VariantSpec::full());
  for (int64_t w : {kT, kT + 3, int64_t(1000)}) {
    SCOPED_TRACE("window " + std::to_string(w));
    expect_same(run(in, VariantSpec::sliding(w)), full, "sliding vs full");
  }
}

TEST_P(Metamorphic, StreamingWithoutSinksEqualsSliding) {
  const Qkv in = inputs(DType::f32, "nosinks");
  for (int64_t w : {1, 4, 9}) {
    SCOPED_TRACE("window " + std::to_string(w));
    expect_same(run(in, VariantSpec::streaming(0, w)), run(in, VariantSpec::sliding(w)),
                "streaming(0, w) vs sliding(w)");
  }
}

TEST_P(Metamorphic, StreamingCoveringTEqualsFull) {
  const Qkv in = inputs(DType::f32, "streaming-wide");
  const AttnOut full = run(in, VariantSpec::full());
  for (auto [sinks, w] :
       {std::pair<int64_t, int64_t>{3, kT - 3}, {kT, 1}, {0, kT}, {kT + 2, 5}, {10, 19}}) {
    SCOPED_TRACE("sinks " + std::to_string(sinks) + " window " + std::to_string(w));
    expect_same(run(in, VariantSpec::streaming(sinks, w)), full, "streaming vs full");
  }
}

TEST_P(Metamorphic, LmInfiniteEqualsStreaming) {
  const Qkv in = inputs(DType::f32, "lminf");
  for (auto [sinks, w] : {std::pair<int64_t, int64_t>{2, 5}, {0, 3}, {4, 1}, {1, 1}, {3, 40}}) {
    SCOPED_TRACE("sinks " + std::to_string(sinks) + " window " + std::to_string(w));
    expect_same(run(in, VariantSpec::lminfinite(sinks, w)),
                run(in, VariantSpec::streaming(sinks, w)), "lminfinite vs streaming");
  }
}

// ---- a windowed row is full attention over its own keys ----------------------------------------

// Sliding row t equals row t-lo of full attention over the slices [lo, t] of q, k, v
// (views into the same buffer, no copies).
TEST_P(Metamorphic, SlidingRowEqualsFullOverSlicedKeys) {
  const Qkv in = inputs(DType::f32, "slice");
  for (int64_t w : {1, 7}) {
    const AttnOut sliding = run(in, VariantSpec::sliding(w));
    for (int64_t t = 0; t < kT; ++t) {
      const int64_t lo = std::max<int64_t>(0, t - w + 1), n = t - lo + 1;
      Qkv sub{with_view(in.q, in.q.view.slice(1, lo, n)),
              with_view(in.k, in.k.view.slice(1, lo, n)),
              with_view(in.v, in.v.view.slice(1, lo, n))};
      expect_same_row(sliding, t, run(sub, VariantSpec::full()), n - 1,
                      "sliding(" + std::to_string(w) + ")");
    }
    if (w == 1) {  // one key: the output row is that key's value
      const Tensor v_rep = gather_rows(in.v.view, range(0, kT), kHq / kHkv);
      expect_close(sliding.out.view, v_rep.view, 1e-6, 1e-6, "sliding(1) vs v");
    }
  }
}

// Streaming row t equals the last row of full attention over its gathered sinks and window keys.
TEST_P(Metamorphic, StreamingRowEqualsFullOverGatheredKeys) {
  const Qkv in = inputs(DType::f32, "gather");
  const int64_t sinks = 3, w = 5;
  const AttnOut streaming = run(in, VariantSpec::streaming(sinks, w));
  for (int64_t t = 0; t < kT; ++t) {
    std::vector<int64_t> keys;
    for (int64_t p = 0; p < std::min(sinks, t + 1); ++p) keys.push_back(p);
    for (int64_t p = std::max(sinks, t - w + 1); p <= t; ++p) keys.push_back(p);
    const std::vector<int64_t> queries(keys.size(), t);  // only the last row is compared
    Qkv sub{gather_rows(in.q.view, queries), gather_rows(in.k.view, keys),
            gather_rows(in.v.view, keys)};
    expect_same_row(streaming, t, run(sub, VariantSpec::full()), int64_t(keys.size()) - 1,
                    "streaming");
  }
}

// CCA row t equals the last row of full attention over [its j(t) core tokens from cca_pool;
// raw keys j(t)*g .. t]. With pool_heads = query the raw keys are repeated to every query head,
// so the core and raw keys have Hq heads.
TEST_P(Metamorphic, CcaRowEqualsFullOverCoreAndLocalKeys) {
  const int64_t g = 4, s = 6;
  for (DType dt : {DType::f32, DType::bf16}) {
    const Qkv in = inputs(dt, "decompose");
    for (PoolMode pool : {PoolMode::cca, PoolMode::mean, PoolMode::max})
      for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query}) {
        const VariantSpec var = VariantSpec::cca(g, s, pool, heads);
        SCOPED_TRACE(var.describe() + " " + dtype_name(dt));
        const AttnOut cca = run(in, var);
        const PoolOut core = run_pool(be(), in.q, in.k, in.v, var, kT / g, kThreads);
        const int64_t rep = heads == PoolHeads::query ? kHq / kHkv : 1;
        for (int64_t t = 0; t < kT; ++t) {
          const int64_t j = hand_core_visible(g, s, t);
          std::vector<RowRef> keys, values;
          for (int64_t c = 0; c < j; ++c) {
            keys.push_back({&core.k_core.view, c});
            values.push_back({&core.v_core.view, c});
          }
          for (int64_t p = j * g; p <= t; ++p) {
            keys.push_back({&in.k.view, p, rep});
            values.push_back({&in.v.view, p, rep});
          }
          const std::vector<int64_t> queries(keys.size(), t);
          Qkv sub{gather_rows(in.q.view, queries), stack_rows(keys), stack_rows(values)};
          expect_same_row(cca, t, run(sub, VariantSpec::full()), int64_t(keys.size()) - 1, "cca");
        }
      }
  }
}

// ---- pooling -----------------------------------------------------------------------------------

// With Hq == Hkv, pool_heads = query and kv are the same function (pooling and attention).
TEST_P(Metamorphic, PoolHeadsQueryEqualsKvWhenHqEqualsHkv) {
  const Qkv in = inputs(DType::f32, "mha", 3, 3);
  for (PoolMode pool : {PoolMode::cca, PoolMode::mean, PoolMode::max}) {
    const VariantSpec kv = VariantSpec::cca(3, 5, pool, PoolHeads::kv);
    const VariantSpec query = VariantSpec::cca(3, 5, pool, PoolHeads::query);
    SCOPED_TRACE(kv.describe());
    expect_same(run(in, query), run(in, kv), "pool_heads query vs kv");
    const PoolOut a = run_pool(be(), in.q, in.k, in.v, query, kT / 3, kThreads);
    const PoolOut b = run_pool(be(), in.q, in.k, in.v, kv, kT / 3, kThreads);
    expect_close(a.k_core.view, b.k_core.view, 1e-6, 1e-6, "k_core");
    expect_close(a.v_core.view, b.v_core.view, 1e-6, 1e-6, "v_core");
  }
}

// GQA equals MHA with each KV head repeated to its query heads, for every variant whose
// function does not average over query heads (all but cca pooling with pool_heads = kv; for
// pool mean/max the weights ignore the queries, so kv pooling qualifies too).
TEST_P(Metamorphic, GqaEqualsMhaWithRepeatedKv) {
  const Qkv in = inputs(DType::f32, "gqa", 8, 2);
  const Qkv mha{in.q, gather_rows(in.k.view, range(0, kT), 4),
                gather_rows(in.v.view, range(0, kT), 4)};
  for (const VariantSpec& var : all_variants(4, 6)) {
    if (var.has_core() && var.pool == PoolMode::cca && var.pool_heads == PoolHeads::kv) continue;
    SCOPED_TRACE(var.describe());
    expect_same(run(in, var), run(mha, var), "GQA vs repeated-KV MHA");
  }
}

// ---- softmax algebra ---------------------------------------------------------------------------

// Full attention of row t over keys [0, t] equals the LSE-weighted merge of attention over
// [0, p) and over [p, t]: o = sum_i exp(lse_i - lse) o_i with lse = log sum_i exp(lse_i).
TEST_P(Metamorphic, LseMergeOfKeySplitsEqualsFull) {
  const Qkv in = inputs(DType::f32, "merge");
  const AttnOut full = run(in, VariantSpec::full());
  for (int64_t t : {int64_t(1), int64_t(9), int64_t(20), kT - 1})
    for (int64_t p : {int64_t(1), t / 2 + 1, t}) {
      SCOPED_TRACE("t " + std::to_string(t) + " split " + std::to_string(p));
      AttnOut part[2];
      const std::vector<int64_t> key_sets[2] = {range(0, p), range(p, t + 1)};
      for (int i = 0; i < 2; ++i) {
        const std::vector<int64_t> queries(key_sets[i].size(), t);
        part[i] = run({gather_rows(in.q.view, queries), gather_rows(in.k.view, key_sets[i]),
                       gather_rows(in.v.view, key_sets[i])},
                      VariantSpec::full());
      }
      std::vector<double> out, lse;
      for (int64_t b = 0; b < kB; ++b)
        for (int64_t h = 0; h < kHq; ++h) {
          double l[2], o_scale[2];
          for (int i = 0; i < 2; ++i)
            l[i] = part[i].lse.view.load(
                part[i].lse.view.offset(b, h, int64_t(key_sets[i].size()) - 1));
          const double mx = std::max(l[0], l[1]);
          const double total = mx + std::log(std::exp(l[0] - mx) + std::exp(l[1] - mx));
          for (int i = 0; i < 2; ++i) o_scale[i] = std::exp(l[i] - total);
          lse.push_back(total);
          for (int64_t d = 0; d < kD; ++d) {
            double o = 0;
            for (int i = 0; i < 2; ++i)
              o += o_scale[i] * part[i].out.view.load(part[i].out.view.offset(
                                    b, int64_t(key_sets[i].size()) - 1, h, d));
            out.push_back(o);
          }
        }
      expect_near_hand(full.out.view.slice(1, t, 1), out, identity_tolerance(DType::f32), "out");
      expect_near_hand(full.lse.view.slice(2, t, 1), lse, {identity_lse_tolerance(DType::f32), 1.0},
                       "lse");
    }
}

// Multiplying q by 2 and halving the scale changes no logit (both exact in binary floating
// point), so nothing changes -- unless some step (e.g. pooling) ignores the variant's scale.
TEST_P(Metamorphic, ScaleFoldsIntoQueries) {
  const Qkv in = inputs(DType::f32, "scale");
  const Tensor q2 = convert(in.q.view, DType::f32);
  for_each(q2.view, [&](int64_t, int64_t, int64_t, int64_t, int64_t off) {
    q2.view.store(off, 2.f * q2.view.load(off));
  });
  for (VariantSpec var : all_variants(3, 5)) {
    SCOPED_TRACE(var.describe());
    const AttnOut base = run(in, var);
    var.scale = 0.5 / std::sqrt(double(kD));
    expect_same(run({q2, in.k, in.v}, var), base, "2q with scale/2");
  }
}

// ---- independence ------------------------------------------------------------------------------

// Rows 0..T'-1 of a prefill do not depend on later tokens: a prefill of the first T' tokens
// gives the same rows (for cca it pools fewer core tokens).
TEST_P(Metamorphic, PrefixPrefillGivesSameRows) {
  const Qkv in = inputs(DType::f32, "prefix");
  for (const VariantSpec& var : all_variants(4, 6)) {
    SCOPED_TRACE(var.describe());
    const AttnOut whole = run(in, var);
    for (int64_t n : {1, 9, 14, 22}) {
      Qkv prefix{with_view(in.q, in.q.view.slice(1, 0, n)),
                 with_view(in.k, in.k.view.slice(1, 0, n)),
                 with_view(in.v, in.v.view.slice(1, 0, n))};
      const AttnOut part = run(prefix, var);
      AttnOut whole_rows{with_view(whole.out, whole.out.view.slice(1, 0, n)),
                         with_view(whole.lse, whole.lse.view.slice(2, 0, n))};
      expect_same(part, whole_rows, "prefix of " + std::to_string(n));
    }
  }
}

// Each sequence of a batch is computed alone: batch row b equals a run on sequence b only.
TEST_P(Metamorphic, BatchRowsAreIndependent) {
  const Qkv in = inputs(DType::f32, "batch");
  for (const VariantSpec& var : all_variants(3, 5)) {
    SCOPED_TRACE(var.describe());
    const AttnOut both = run(in, var);
    for (int64_t b = 0; b < kB; ++b) {
      Qkv one{with_view(in.q, in.q.view.slice(0, b, 1)), with_view(in.k, in.k.view.slice(0, b, 1)),
              with_view(in.v, in.v.view.slice(0, b, 1))};
      AttnOut row{with_view(both.out, both.out.view.slice(0, b, 1)),
                  with_view(both.lse, both.lse.view.slice(0, b, 1))};
      expect_same(run(one, var), row, "batch " + std::to_string(b));
    }
  }
}

// Host backends: these checks run in float32 at D = 32, which the cuda backend does not take
// (it is checked against ref by the consistency grid and by test_cuda.cpp).
std::vector<BackendKind> host_backends() {
  std::vector<BackendKind> r;
  for (BackendKind b : available_backends())
    if (device_of(b) == Device::cpu) r.push_back(b);
  return r;
}

INSTANTIATE_TEST_SUITE_P(Backends, Metamorphic, ::testing::ValuesIn(host_backends()),
                         [](const ::testing::TestParamInfo<BackendKind>& info) {
                           return std::string(backend_name(info.param));
                         });

}  // namespace
}  // namespace cca::test

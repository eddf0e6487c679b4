// The backward (attn_bwd): the float64 reference against central finite differences of the
// reference forward computed in float64 end to end (the oracle of every other backward), the
// pooling backward's tie rule, identities between variants, and the CPU backward's determinism.
// The CPU backward against the reference over the consistency grid: test_consistency.cpp.
#include <cstring>

#include "backend.hpp"
#include "ref/ref_math.hpp"
#include "test_util.hpp"
#include "tolerance.hpp"

namespace cca::test {
namespace {

using ref::F64Array;
using ref::F64View;

F64Array to_array(const TensorView& t) {
  F64Array a(t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
  for_each(t, [&](int64_t i, int64_t j, int64_t k, int64_t l, int64_t off) {
    a.view.store(a.view.offset(i, j, k, l), t.load(off));
  });
  return a;
}

// L = sum(dout * out) with out the forward of the contract in float64 end to end: pool, then
// attend over [core; sinks; local], the reference's math on float64 views.
double loss_f64(const F64Array& q, const F64Array& k, const F64Array& v, const F64Array& dout,
                const VariantSpec& var) {
  const int64_t B = q.view.shape[0], T = q.view.shape[1], Hq = q.view.shape[2];
  const int64_t D = q.view.shape[3], Hc = var.core_heads(Hq, k.view.shape[2]);
  const int64_t m = core_tokens_needed(var, T);
  const double scale = var.scale_for(D);
  const ref::Segment<F64View> raw{k.view, v.view, 0};
  F64Array kc(B, m, Hc, D), vc(B, m, Hc, D), out(B, T, Hq, D);
  if (m > 0) ref::pool(q.view, 0, raw, 0, m, kc.view, vc.view, var, scale);
  const ref::Segment<F64View> core{m > 0 ? kc.view : F64View{}, vc.view, 0};
  ref::attend(q.view, 0, core, raw, raw, out.view, F64View{}, var, scale);
  double l = 0;
  for (size_t i = 0; i < out.values.size(); ++i) l += out.values[i] * dout.values[i];
  return l;
}

struct FdCase {
  std::string name;
  VariantSpec variant;
  int64_t B, T, Hq, Hkv, D;
};

void PrintTo(const FdCase& c, std::ostream* os) { *os << c.name; }

std::vector<FdCase> fd_cases() {
  std::vector<FdCase> r;
  // Every variant and pool: g = 3 does not divide s = 4, T = 13 is not a multiple of g and
  // gives 3 core tokens, GQA 2, batch 2.
  for (const VariantSpec& v : all_variants(3, 4)) r.push_back({variant_tag(v), v, 2, 13, 4, 2, 4});
  VariantSpec scaled = VariantSpec::cca(3, 4);
  scaled.scale = 0.3;
  r.push_back({"cca_scaled_ratio4", scaled, 1, 14, 4, 1, 5});
  // T below s: plain causal attention, no core tokens.
  r.push_back({"cca_T_below_s", VariantSpec::cca(2, 8), 2, 7, 2, 1, 4});
  // g divides s and T; more core tokens than raw keys.
  r.push_back({"cca_g4_s4_T16_query", VariantSpec::cca(4, 4, PoolMode::cca, PoolHeads::query), 1,
               16, 2, 1, 4});
  return r;
}

// Smallest gap between the largest and second largest value over the groups of a max-pooled
// view [B, T, H, D]; finite differences need it well above their step.
double max_pool_gap(const TensorView& t, int64_t g, int64_t groups) {
  double gap = INFINITY;
  for (int64_t b = 0; b < t.shape[0]; ++b)
    for (int64_t i = 0; i < groups; ++i)
      for (int64_t h = 0; h < t.shape[2]; ++h)
        for (int64_t d = 0; d < t.shape[3]; ++d) {
          double a = -INFINITY, c = -INFINITY;
          for (int64_t x = 0; x < g; ++x) {
            const double e = t.load(t.offset(b, i * g + x, h, d));
            if (e > a)
              c = a, a = e;
            else if (e > c)
              c = e;
          }
          gap = std::min(gap, a - c);
        }
  return gap;
}

class BackwardFd : public ::testing::TestWithParam<FdCase> {};

// Every gradient element of ref's attn_bwd against (L(x + h) - L(x - h)) / 2h in float64.
TEST_P(BackwardFd, RefMatchesFiniteDifferences) {
  const FdCase& c = GetParam();
  Rng rng(seed_of(c.name));
  const Qkv in = make_qkv(c.B, c.T, c.Hq, c.Hkv, c.D, DType::f32, Layout::contiguous, rng);
  Tensor dout = alloc(DType::f32, {c.B, c.T, c.Hq, c.D});
  fill_normal(dout.view, rng);
  constexpr double kStep = 1e-4;
  const int64_t m = core_tokens_needed(c.variant, c.T);
  if (c.variant.has_core() && c.variant.pool == PoolMode::max && m > 0) {
    ASSERT_GT(max_pool_gap(in.k.view, c.variant.group, m), 10 * kStep) << "near tie: re-seed";
    ASSERT_GT(max_pool_gap(in.v.view, c.variant.group, m), 10 * kStep) << "near tie: re-seed";
  }

  const AttnOut fwd = run_attn(BackendKind::ref, in.q, in.k, in.v, c.variant);
  const Qkv grads = run_attn_bwd(BackendKind::ref, in, fwd, dout, c.variant, DType::f32);
  ASSERT_TRUE(fully_written(grads.q));
  ASSERT_TRUE(fully_written(grads.k));
  ASSERT_TRUE(fully_written(grads.v));

  F64Array x[3] = {to_array(in.q.view), to_array(in.k.view), to_array(in.v.view)};
  const F64Array g = to_array(dout.view);
  const char* names[3] = {"dq", "dk", "dv"};
  const Tensor* got[3] = {&grads.q, &grads.k, &grads.v};
  for (int which = 0; which < 3; ++which) {
    std::vector<double>& vals = x[which].values;
    std::vector<double> fd(vals.size());
    for (size_t e = 0; e < vals.size(); ++e) {
      const double saved = vals[e];
      vals[e] = saved + kStep;
      const double up = loss_f64(x[0], x[1], x[2], g, c.variant);
      vals[e] = saved - kStep;
      const double down = loss_f64(x[0], x[1], x[2], g, c.variant);
      vals[e] = saved;
      fd[e] = (up - down) / (2 * kStep);
    }
    const std::vector<double> want = fd, have = to_f64(got[which]->view);
    const Diff d = diff(have, want);
    double scale = 0;
    for (double f : fd) scale = std::max(scale, std::abs(f));
    ErrorLog::add(std::string("ref backward vs finite differences"), d, kFdGrad.max_abs);
    EXPECT_GT(scale, 1e-3) << names[which] << ": gradient is (nearly) zero, the test sees nothing";
    EXPECT_LE(d.max_abs, kFdGrad.max_abs * std::max(1.0, scale))
        << names[which] << ": worst at " << index_string(got[which]->view, d.worst) << " got "
        << have[size_t(d.worst)] << " finite differences " << want[size_t(d.worst)];
    EXPECT_LE(d.rel_l2, kFdGrad.rel_l2) << names[which];
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, BackwardFd, ::testing::ValuesIn(fd_cases()),
                         [](const ::testing::TestParamInfo<FdCase>& info) {
                           return info.param.name;
                         });

// pool = max sends each element's gradient to the first position of the group holding the
// maximum (docs/semantics.md), on every backend, through the backend interface directly.
TEST(Backward, MaxPoolTiesGoToTheFirstPosition) {
  constexpr int64_t B = 1, T = 8, Hq = 2, Hkv = 1, D = 3, g = 4, m = 2;
  for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query})
    for (BackendKind be : {BackendKind::ref, BackendKind::cpu}) {
      SCOPED_TRACE(std::string(backend_name(be)) + " pool_heads " + pool_heads_name(heads));
      const VariantSpec var = VariantSpec::cca(g, 4, PoolMode::max, heads);
      const int64_t Hc = var.core_heads(Hq, Hkv);
      Rng rng(5);
      Qkv in = make_qkv(B, T, Hq, Hkv, D, DType::f32, Layout::contiguous, rng);
      // Group 0, element 0: keys at positions 1 and 3 tie at the maximum; element 1: values at
      // positions 0 and 2.
      for (int64_t pos : {1, 3}) in.k.view.store(in.k.view.offset(0, pos, 0, 0), 7.f);
      for (int64_t pos : {0, 2}) in.v.view.store(in.v.view.offset(0, pos, 0, 1), 7.f);
      Tensor dkc = alloc(DType::f32, {B, m, Hc, D}), dvc = alloc(DType::f32, {B, m, Hc, D});
      fill_normal(dkc.view, rng);
      fill_normal(dvc.view, rng);
      Qkv grad = alloc_qkv(B, T, Hq, Hkv, D, DType::f32, Layout::contiguous);
      for (const Tensor* t : {&grad.q, &grad.k, &grad.v})
        for_each(t->view,
                 [&](int64_t, int64_t, int64_t, int64_t, int64_t o) { t->view.store(o, 0.f); });
      PoolBwdProblem p;
      p.q = in.q.view;
      p.k = in.k.view;
      p.v = in.v.view;
      p.dk_core = dkc.view;
      p.dv_core = dvc.view;
      p.dq = grad.q.view;
      p.dk = grad.k.view;
      p.dv = grad.v.view;
      p.variant = var;
      p.scale = var.scale_for(D);
      get_backend(be, Device::cpu).pool_bwd(p);
      auto core_sum = [&](const Tensor& t, int64_t i, int64_t d) {
        double s = 0;
        for (int64_t c = 0; c < Hc; ++c) s += t.view.load(t.view.offset(0, i, c, d));
        return s;
      };
      const TensorView &dk = grad.k.view, &dv = grad.v.view;
      EXPECT_NEAR(dk.load(dk.offset(0, 1, 0, 0)), core_sum(dkc, 0, 0), 1e-6);
      EXPECT_EQ(dk.load(dk.offset(0, 3, 0, 0)), 0.f);
      EXPECT_NEAR(dv.load(dv.offset(0, 0, 0, 1)), core_sum(dvc, 0, 1), 1e-6);
      EXPECT_EQ(dv.load(dv.offset(0, 2, 0, 1)), 0.f);
      // Every (group, element) passes its whole gradient to exactly one position.
      for (int64_t i = 0; i < m; ++i)
        for (int64_t d = 0; d < D; ++d) {
          int nonzero_k = 0, nonzero_v = 0;
          double sk = 0, sv = 0;
          for (int64_t x = 0; x < g; ++x) {
            const float ek = dk.load(dk.offset(0, i * g + x, 0, d));
            const float ev = dv.load(dv.offset(0, i * g + x, 0, d));
            nonzero_k += ek != 0.f, nonzero_v += ev != 0.f, sk += ek, sv += ev;
          }
          EXPECT_EQ(nonzero_k, 1);
          EXPECT_EQ(nonzero_v, 1);
          EXPECT_NEAR(sk, core_sum(dkc, i, d), 1e-6);
          EXPECT_NEAR(sv, core_sum(dvc, i, d), 1e-6);
        }
      for_each(grad.q.view, [&](int64_t, int64_t, int64_t, int64_t, int64_t o) {
        EXPECT_EQ(grad.q.view.load(o), 0.f) << "max pooling has no query gradient";
      });
    }
}

// Gradients of two variants that compute the same function agree: cca with a window covering
// T, and cca with g = 1 (a group of one key pools to that key; the gradient flows through the
// pooling backward), equal full attention, for every pool and pool_heads.
TEST(Backward, CcaIdentitiesWithFull) {
  constexpr int64_t B = 2, T = 150, Hq = 4, Hkv = 2, D = 16;
  Rng rng(11);
  const Qkv in = make_qkv(B, T, Hq, Hkv, D, DType::f32, Layout::contiguous, rng);
  Tensor dout = alloc(DType::f32, {B, T, Hq, D});
  fill_normal(dout.view, rng);
  for (BackendKind be : {BackendKind::cpu, BackendKind::ref}) {
    const AttnOut full_fwd = run_attn(be, in.q, in.k, in.v, VariantSpec::full());
    const Qkv full = run_attn_bwd(be, in, full_fwd, dout, VariantSpec::full(), DType::f32);
    const Bound tol = identity_tolerance(DType::f32);
    for (PoolMode pool : {PoolMode::cca, PoolMode::mean, PoolMode::max})
      for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query})
        for (const VariantSpec& var :
             {VariantSpec::cca(4, T, pool, heads), VariantSpec::cca(1, 5, pool, heads)}) {
          if (be == BackendKind::ref && var.group == 4) continue;  // keep the reference cheap
          SCOPED_TRACE(std::string(backend_name(be)) + " " + variant_tag(var));
          const AttnOut fwd = run_attn(be, in.q, in.k, in.v, var);
          const Qkv got = run_attn_bwd(be, in, fwd, dout, var, DType::f32);
          expect_close(got.q.view, full.q.view, tol.max_abs, tol.rel_l2, "dq");
          expect_close(got.k.view, full.k.view, tol.max_abs, tol.rel_l2, "dk");
          expect_close(got.v.view, full.v.view, tol.max_abs, tol.rel_l2, "dv");
        }
  }
}

// Gradients may have any dtype, each its own: float32 inputs give float16 dq, bfloat16 dk and
// float32 dv equal to the float32 gradients rounded once, on every backend.
TEST(Backward, GradientDtypesAreIndependentOfTheInputs) {
  Rng rng(13);
  const Qkv in = make_qkv(2, 41, 4, 2, 16, DType::f32, Layout::transposed, rng);
  Tensor dout = alloc(DType::f32, {2, 41, 4, 16});
  fill_normal(dout.view, rng);
  const VariantSpec var = VariantSpec::cca(4, 9, PoolMode::cca, PoolHeads::query);
  for (BackendKind be : {BackendKind::ref, BackendKind::cpu}) {
    SCOPED_TRACE(backend_name(be));
    const AttnOut fwd = run_attn(be, in.q, in.k, in.v, var);
    const Qkv want = run_attn_bwd(be, in, fwd, dout, var, DType::f32);
    Qkv got = alloc_qkv(2, 41, 4, 2, 16, DType::f32, Layout::padded);
    got.q = alloc(DType::f16, {2, 41, 4, 16}, Layout::padded);
    got.k = alloc(DType::bf16, {2, 41, 2, 16}, Layout::transposed);
    AttnBwdParams p;
    p.q = in.q.view;
    p.k = in.k.view;
    p.v = in.v.view;
    p.out = fwd.out.view;
    p.lse = fwd.lse.view;
    p.dout = dout.view;
    p.dq = got.q.view;
    p.dk = got.k.view;
    p.dv = got.v.view;
    p.variant = var;
    p.run.backend = be;
    attn_bwd(p);
    for (const Tensor* t : {&got.q, &got.k, &got.v}) EXPECT_TRUE(fully_written(*t));
    // One rounding of each float32 gradient: half an ulp relative, or half the smallest
    // subnormal (float16: 2^-24; rows that see one key have gradients of ~1e-10).
    auto rounded = [](const TensorView& got, const TensorView& want, double ulp, double tiny,
                      const char* what) {
      const std::vector<double> g = to_f64(got), w = to_f64(want);
      for (size_t i = 0; i < g.size(); ++i)
        ASSERT_LE(std::abs(g[i] - w[i]), 0.5 * std::max(ulp * std::abs(w[i]), tiny))
            << what << " " << i;
    };
    rounded(got.q.view, want.q.view, 0x1.0p-10, 0x1.0p-24, "dq float16");
    rounded(got.k.view, want.k.view, 0x1.0p-7, 0x1.0p-133, "dk bfloat16");
    rounded(got.v.view, want.v.view, 0, 0, "dv float32");
  }
}

// The CPU backward is deterministic by construction: any thread count gives the same bits.
TEST(Backward, CpuIsBitIdenticalAcrossThreadCounts) {
  Rng rng(3);
  const Qkv in = make_qkv(2, 333, 4, 2, 32, DType::bf16, Layout::padded, rng);
  Tensor dout = alloc(DType::bf16, {2, 333, 4, 32});
  fill_normal(dout.view, rng);
  for (const VariantSpec& var : {VariantSpec::cca(4, 40), VariantSpec::streaming(3, 50)}) {
    SCOPED_TRACE(variant_tag(var));
    const AttnOut fwd = run_attn(BackendKind::cpu, in.q, in.k, in.v, var);
    const Qkv one =
        run_attn_bwd(BackendKind::cpu, in, fwd, dout, var, DType::f32, Layout::contiguous, 1);
    const Qkv three = run_attn_bwd(BackendKind::cpu, in, fwd, dout, var, DType::f32,
                                   Layout::contiguous, 3, /*deterministic=*/true);
    for (auto [a, b] : {std::pair{&one.q, &three.q}, {&one.k, &three.k}, {&one.v, &three.v}})
      EXPECT_EQ(std::memcmp(a->mem->data(), b->mem->data(), a->mem->size() * 4), 0);
  }
}

}  // namespace
}  // namespace cca::test

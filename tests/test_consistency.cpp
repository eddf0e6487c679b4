// Backend consistency: every compiled backend other than `ref` against the float64 reference,
// over a covering grid of variants, pools, lengths, GQA ratios, head dims, dtypes and layouts.
// The tolerance rule is in tolerance.hpp; running the binary directly prints the worst errors
// seen (docs/numerics.md records them).
#include <cstdio>
#include <map>

#include "backend.hpp"
#include "consistency.hpp"
#include "test_util.hpp"
#include "tolerance.hpp"

namespace cca::test {
namespace {

// Worst errors over the run, for the summary printed at the end of the suite.
struct Worst {
  double max_abs = 0, rel_l2 = 0, lse_abs = 0, ratio = 0;  // ratio: worst error / its bound
  int cases = 0;
};
std::map<std::string, Worst>& worst_table() {
  static std::map<std::string, Worst> w;
  return w;
}
void record(const std::string& key, const Diff& out, const Diff& lse, double ratio) {
  Worst& w = worst_table()[key];
  w.max_abs = std::max(w.max_abs, out.max_abs);
  w.rel_l2 = std::max(w.rel_l2, out.rel_l2);
  w.lse_abs = std::max(w.lse_abs, lse.max_abs);
  w.ratio = std::max(w.ratio, ratio);
  ++w.cases;
}

}  // namespace

std::string case_name(const Case& c) {
  std::ostringstream name;
  name << variant_tag(c.variant) << "_B" << c.B << "_T" << c.T << "_Hq" << c.Hq << "_Hkv" << c.Hkv
       << "_D" << c.D << "_" << dtype_tag(c.dtype) << "_" << layout_name(c.layout) << "_thr"
       << c.threads;
  return name.str();
}

// The grid, in three parts.
// 1. Short: the risky axes (variant incl. pool/pool_heads, T, dtype) crossed in full for two
//    (g, s) settings, one with g not dividing s; T in {1, below s, not a multiple of g, several
//    windows}. The other axes (D, heads, B, layout, threads, scale) cycle so that every value of
//    each meets every variant, every T and every dtype (pairwise coverage).
// 2. Long: T past the CPU tiles (64 queries x 128 keys), so that query tiles, several key blocks
//    per segment (window 140 > 128, more than 128 core tokens) and block-skipping are exercised.
// 3. Head dims that are not a multiple of the SIMD width (24, 80).
std::vector<Case> make_grid() {
  struct Setting {
    int64_t g, s;
    std::vector<int64_t> T;
    std::vector<int64_t> dims;
  };
  const Setting settings[3] = {{4, 8, {1, 7, 23, 64}, {32, 64, 128}},
                               {3, 5, {1, 4, 17, 61}, {32, 64, 128}},
                               {4, 140, {130, 333, 700}, {32, 64}}};
  const int64_t heads[4][2] = {{3, 3}, {4, 2}, {8, 2}, {4, 1}};  // Hq/Hkv = 1, 2, 4, 4
  const DType dtypes[3] = {DType::f32, DType::f16, DType::bf16};
  const Layout layouts[4] = {Layout::contiguous, Layout::packed, Layout::padded,
                             Layout::transposed};
  const int threads[3] = {0, 1, 3};
  std::vector<Case> grid;
  for (int gi = 0; gi < 3; ++gi) {
    const Setting& st = settings[gi];
    const bool long_t = gi == 2;
    const std::vector<VariantSpec> variants = all_variants(st.g, st.s);
    for (int vi = 0; vi < int(variants.size()); ++vi)
      for (int ti = 0; ti < int(st.T.size()); ++ti)
        for (int di = 0; di < 3; ++di) {
          Case c;
          c.variant = variants[size_t(vi)];
          if ((vi + ti + di + gi) % 7 == 3) c.variant.scale = 0.3;  // a non-default scale
          c.T = st.T[size_t(ti)];
          c.dtype = dtypes[di];
          c.D = st.dims[size_t(vi + ti + di) % st.dims.size()];
          // long cases keep Hq <= 4 so that the float64 reference stays fast
          const int long_heads[3] = {0, 1, 3};
          const int hi = long_t ? long_heads[(vi + ti + di) % 3] : (vi + 2 * ti + di + gi) % 4;
          c.Hq = heads[hi][0];
          c.Hkv = heads[hi][1];
          c.B = long_t ? 1 : 1 + (ti + di + gi) % 2;
          c.layout = layouts[(vi + ti + 2 * di) % 4];
          c.threads = threads[(vi + di + gi) % 3];
          c.name = case_name(c);
          grid.push_back(c);
        }
  }
  const std::vector<VariantSpec> variants = all_variants(4, 8);
  for (int vi = 0; vi < int(variants.size()); ++vi)
    for (int64_t D : {24, 80}) {
      Case c{variants[size_t(vi)], 2, 23, 4, 2, D, dtypes[(vi + D) % 3], layouts[vi % 4], 0, ""};
      c.name = case_name(c);
      grid.push_back(c);
    }
  return grid;
}

namespace {

// Why backend `be` does not run this case ("" if it does), asked through the backend interface
// with the inputs where that backend wants them.
std::string unsupported(BackendKind be, const Qkv& in, const VariantSpec& variant) {
  const Device dev = device_of(be);
  const OnDevice q(in.q, dev), k(in.k, dev), v(in.v, dev);
  AttendProblem a;
  a.q = q.view();
  a.sink = a.local = KvSegment{k.view(), v.view(), 0};
  a.variant = variant;
  a.scale = variant.scale_for(in.q.view.shape[3]);
  return get_backend(be, dev).unsupported(a);
}

// The same for the backward: the inputs' dtype, shapes and device, the variant and scale.
std::string unsupported_bwd(BackendKind be, const Qkv& in, const Tensor& dout,
                            const VariantSpec& variant) {
  const Device dev = device_of(be);
  const OnDevice q(in.q, dev), k(in.k, dev), v(in.v, dev), g(dout, dev);
  AttendBwdProblem a;
  a.q = q.view();
  a.k = k.view();
  a.v = v.view();
  a.out = a.dout = g.view();
  a.variant = variant;
  a.scale = variant.scale_for(in.q.view.shape[3]);
  return get_backend(be, dev).unsupported_bwd(a);
}

}  // namespace

// Runs case `c` on every backend in `backends` and checks each against the reference; counts
// the backends that ran it in `ran`.
void check_case(const Case& c, const std::vector<BackendKind>& backends, int& ran) {
  Rng rng(seed_of(c.name));
  const Qkv in = make_qkv(c.B, c.T, c.Hq, c.Hkv, c.D, c.dtype, c.layout, rng);

  // Oracle: ref on float32 copies of the (already rounded) inputs.
  const Tensor q32 = convert(in.q.view, DType::f32), k32 = convert(in.k.view, DType::f32),
               v32 = convert(in.v.view, DType::f32);
  const AttnOut oracle = run_attn(BackendKind::ref, q32, k32, v32, c.variant);
  ASSERT_TRUE(fully_written(oracle.out)) << "ref out";
  ASSERT_TRUE(fully_written(oracle.lse)) << "ref lse";

  // Naive: ref with dtype storage; its error sets the scale of the bound.
  const ConsistencyTolerance tol = consistency_tolerance(c.dtype);
  Diff naive_out, naive_lse;
  if (c.dtype != DType::f32) {
    const AttnOut naive = run_attn(BackendKind::ref, in.q, in.k, in.v, c.variant);
    ASSERT_TRUE(fully_written(naive.out)) << "ref out (" << dtype_name(c.dtype) << ")";
    naive_out = diff(naive.out.view, oracle.out.view);
    naive_lse = diff(naive.lse.view, oracle.lse.view);
    EXPECT_LE(naive_out.max_abs, tol.naive_cap.max_abs) << "ref in " << dtype_name(c.dtype);
    EXPECT_LE(naive_out.rel_l2, tol.naive_cap.rel_l2) << "ref in " << dtype_name(c.dtype);
    record(std::string("ref(naive)/") + dtype_tag(c.dtype), naive_out, naive_lse, 0);
  }
  const Bound bound = {kNaiveFactor * naive_out.max_abs + tol.floor.max_abs,
                       kNaiveFactor * naive_out.rel_l2 + tol.floor.rel_l2};
  const double lse_bound = kNaiveFactor * naive_lse.max_abs + tol.lse_floor;

  const Layout out_layout = c.layout == Layout::packed ? Layout::contiguous : c.layout;
  for (BackendKind be : backends) {
    if (be == BackendKind::ref) continue;
    SCOPED_TRACE(std::string("backend ") + backend_name(be));
    const std::string why = unsupported(be, in, c.variant);
    if (!why.empty()) {
      std::printf("[ note     ] %s: %s does not run this case: %s\n", c.name.c_str(),
                  backend_name(be), why.c_str());
      continue;
    }
    const AttnOut got = run_attn(be, in.q, in.k, in.v, c.variant, out_layout, c.threads);
    ++ran;
    EXPECT_TRUE(fully_written(got.out)) << "out";
    EXPECT_TRUE(fully_written(got.lse)) << "lse";
    expect_close(got.out.view, oracle.out.view, bound.max_abs, bound.rel_l2, "out");
    expect_close(got.lse.view, oracle.lse.view, lse_bound, 1.0, "lse");
    const Diff d_out = diff(got.out.view, oracle.out.view);
    const Diff d_lse = diff(got.lse.view, oracle.lse.view);
    const double ratio = std::max(
        {d_out.max_abs / bound.max_abs, d_out.rel_l2 / bound.rel_l2, d_lse.max_abs / lse_bound});
    record(std::string(backend_name(be)) + "/" + dtype_tag(c.dtype), d_out, d_lse, ratio);
  }
}

namespace {

class Consistency : public ::testing::TestWithParam<Case> {
 public:
  static void TearDownTestSuite() {
    std::printf("\nWorst errors against the float64 reference (oracle: ref, float32 storage):\n");
    std::printf("%-20s %6s %12s %12s %12s %10s\n", "backend/dtype", "cases", "max_abs", "rel_l2",
                "lse_abs", "err/bound");
    for (const auto& [key, w] : worst_table())
      std::printf("%-20s %6d %12.3e %12.3e %12.3e %10.3f\n", key.c_str(), w.cases, w.max_abs,
                  w.rel_l2, w.lse_abs, w.ratio);
  }
};

TEST_P(Consistency, MatchesRef) {
  int ran = 0;
  check_case(GetParam(), available_backends(), ran);
}

INSTANTIATE_TEST_SUITE_P(Grid, Consistency, ::testing::ValuesIn(make_grid()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

}  // namespace

// ---- grad mode: attn_bwd against the reference's ---------------------------------------------
// Oracle: ref forward and backward on float32 copies of the rounded inputs and output gradient
// (float64 math, float32 gradients). Naive: ref forward and backward at the test dtype (inputs,
// out, core tokens and gradients stored in the dtype). Each backend runs its own forward for out
// and lse, then its backward into gradients of the test dtype and layout; the rule is the
// forward's, err(backend) <= 2 err(naive) + floor, for dq, dk and dv separately.
void check_grad_case(const Case& c, const std::vector<BackendKind>& backends, int& ran) {
  Rng rng(seed_of("grad_" + c.name));
  const Qkv in = make_qkv(c.B, c.T, c.Hq, c.Hkv, c.D, c.dtype, c.layout, rng);
  const Layout out_layout = c.layout == Layout::packed ? Layout::contiguous : c.layout;
  Tensor dout = alloc(c.dtype, {c.B, c.T, c.Hq, c.D}, out_layout);
  fill_normal(dout.view, rng);

  const Qkv in32{convert(in.q.view, DType::f32), convert(in.k.view, DType::f32),
                 convert(in.v.view, DType::f32)};
  const Tensor dout32 = convert(dout.view, DType::f32);
  const AttnOut oracle_fwd = run_attn(BackendKind::ref, in32.q, in32.k, in32.v, c.variant);
  const Qkv oracle =
      run_attn_bwd(BackendKind::ref, in32, oracle_fwd, dout32, c.variant, DType::f32);
  const Tensor* want[3] = {&oracle.q, &oracle.k, &oracle.v};
  const char* names[3] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(fully_written(*want[i])) << "ref " << names[i];

  // With T = 1 each query sees only itself: a softmax over one key has zero derivative, so dq
  // and dk are 0 up to rounding noise and only their max_abs is checked.
  const ConsistencyTolerance tol = grad_tolerance(c.dtype);
  Bound bound[3], cap[3];
  for (int i = 0; i < 3; ++i) {
    const double no_rel = c.T == 1 && i < 2 ? INFINITY : 0;
    bound[i] = {tol.floor.max_abs, std::max(tol.floor.rel_l2, no_rel)};
    cap[i] = {tol.naive_cap.max_abs, std::max(tol.naive_cap.rel_l2, no_rel)};
  }
  if (c.dtype != DType::f32) {
    const AttnOut fwd = run_attn(BackendKind::ref, in.q, in.k, in.v, c.variant);
    const Qkv naive = run_attn_bwd(BackendKind::ref, in, fwd, dout, c.variant, c.dtype);
    const Tensor* got[3] = {&naive.q, &naive.k, &naive.v};
    for (int i = 0; i < 3; ++i) {
      const Diff d = diff(got[i]->view, want[i]->view);
      EXPECT_LE(d.max_abs, cap[i].max_abs) << "ref " << names[i] << " in " << dtype_name(c.dtype);
      EXPECT_LE(d.rel_l2, cap[i].rel_l2) << "ref " << names[i] << " in " << dtype_name(c.dtype);
      bound[i] = {kNaiveFactor * d.max_abs + bound[i].max_abs,
                  kNaiveFactor * d.rel_l2 + bound[i].rel_l2};
      if (c.T > 1) record(std::string("grad ref(naive)/") + dtype_tag(c.dtype), d, Diff{}, 0);
    }
  }

  for (BackendKind be : backends) {
    if (be == BackendKind::ref) continue;
    SCOPED_TRACE(std::string("backend ") + backend_name(be));
    const std::string why = unsupported_bwd(be, in, dout, c.variant);
    if (!why.empty()) {
      std::printf("[ note     ] %s: %s does not run this case: %s\n", c.name.c_str(),
                  backend_name(be), why.c_str());
      continue;
    }
    const AttnOut fwd = run_attn(be, in.q, in.k, in.v, c.variant, out_layout, c.threads);
    const Qkv grads = run_attn_bwd(be, in, fwd, dout, c.variant, c.dtype, c.layout, c.threads);
    ++ran;
    const Tensor* got[3] = {&grads.q, &grads.k, &grads.v};
    for (int i = 0; i < 3; ++i) {
      EXPECT_TRUE(fully_written(*got[i])) << names[i];
      expect_close(got[i]->view, want[i]->view, bound[i].max_abs, bound[i].rel_l2, names[i]);
      const Diff d = diff(got[i]->view, want[i]->view);
      if (c.T > 1)
        record(std::string("grad ") + backend_name(be) + "/" + dtype_tag(c.dtype), d, Diff{},
               std::max(d.max_abs / bound[i].max_abs, d.rel_l2 / bound[i].rel_l2));
    }
  }
}

namespace {

// The forward's grid (every variant, pool and pool_heads, odd T, T below s, g not dividing s,
// GQA, batch 2, every dtype and layout), one test per variant configuration (30) rather than per
// case: each test is a process under ctest, and the cases are small.
struct GradGroup {
  std::string name;
  std::vector<Case> cases;
};
void PrintTo(const GradGroup& g, std::ostream* os) { *os << g.name; }

std::vector<GradGroup> make_grad_groups() {
  std::vector<GradGroup> groups;
  for (const Case& c : make_grid()) {
    VariantSpec unscaled = c.variant;
    unscaled.scale = NAN;
    const std::string key = variant_tag(unscaled);
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const GradGroup& g) { return g.name == key; });
    if (it == groups.end()) it = groups.insert(groups.end(), GradGroup{key, {}});
    it->cases.push_back(c);
  }
  return groups;
}

class ConsistencyGrad : public ::testing::TestWithParam<GradGroup> {
 public:
  static void TearDownTestSuite() { Consistency::TearDownTestSuite(); }
};

TEST_P(ConsistencyGrad, MatchesRef) {
  for (const Case& c : GetParam().cases) {
    SCOPED_TRACE(c.name);
    int ran = 0;
    check_grad_case(c, available_backends(), ran);
    EXPECT_GT(ran, 0) << "no backend other than ref ran the backward";
  }
}

INSTANTIATE_TEST_SUITE_P(Grid, ConsistencyGrad, ::testing::ValuesIn(make_grad_groups()),
                         [](const ::testing::TestParamInfo<GradGroup>& info) {
                           return info.param.name;
                         });

// The grid covers every value of every axis, with all variants crossed with all T and dtypes.
TEST(ConsistencyGrid, CoversEveryAxis) {
  const std::vector<Case> grid = make_grid();
  std::map<std::string, int> seen;
  for (const Case& c : grid) {
    seen[std::string("dtype ") + dtype_tag(c.dtype)]++;
    seen["D " + std::to_string(c.D)]++;
    if (c.D % 16 != 0) seen["D not a multiple of 16"]++;
    seen["ratio " + std::to_string(c.Hq / c.Hkv)]++;
    seen["B " + std::to_string(c.B)]++;
    seen[std::string("layout ") + layout_name(c.layout)]++;
    seen["variant " + std::string(variant_name(c.variant.kind))]++;
    if (c.variant.has_core()) {
      seen[std::string("pool ") + pool_name(c.variant.pool)]++;
      seen[std::string("pool_heads ") + pool_heads_name(c.variant.pool_heads)]++;
      seen["g divides s " + std::to_string(c.variant.window % c.variant.group == 0)]++;
    }
    if (c.T == 1) seen["T 1"]++;
    if (c.T > 1 && c.T < c.variant.window) seen["T below s"]++;
    if (c.variant.has_core() && c.T % c.variant.group != 0 && c.T > c.variant.window)
      seen["T not a multiple of g"]++;
    if (c.T >= 7 * c.variant.window) seen["T several windows"]++;
    if (c.T > 128) seen["T over a CPU tile"]++;
  }
  for (const char* key : {"dtype f32",
                          "dtype f16",
                          "dtype bf16",
                          "D 32",
                          "D 64",
                          "D 128",
                          "D not a multiple of 16",
                          "ratio 1",
                          "ratio 2",
                          "ratio 4",
                          "B 1",
                          "B 2",
                          "layout contig",
                          "layout packed",
                          "layout padded",
                          "layout bhtd",
                          "variant full",
                          "variant sliding",
                          "variant streaming",
                          "variant lminfinite",
                          "variant cca",
                          "pool cca",
                          "pool mean",
                          "pool max",
                          "pool_heads kv",
                          "pool_heads query",
                          "g divides s 0",
                          "g divides s 1",
                          "T 1",
                          "T below s",
                          "T not a multiple of g",
                          "T several windows"})
    EXPECT_GT(seen[key], 0) << key;
}

// The backend list agrees with the availability reasons: ref and cpu always, cuda iff usable.
TEST(ConsistencyBackends, ListMatchesReasons) {
  const std::vector<BackendKind> list = available_backends();
  auto has = [&](BackendKind b) { return std::find(list.begin(), list.end(), b) != list.end(); };
  EXPECT_TRUE(has(BackendKind::ref));
  EXPECT_TRUE(has(BackendKind::cpu));
  EXPECT_EQ(backend_unavailable_reason(BackendKind::ref), "");
  EXPECT_EQ(backend_unavailable_reason(BackendKind::cpu), "");
  EXPECT_EQ(has(BackendKind::cuda), backend_unavailable_reason(BackendKind::cuda).empty());
}

// A visible skip where no GPU is usable; where one is, every 5th grid case on cuda alone (the
// grid also runs cuda through available_backends()), forward (`check_case`) or backward
// (`check_grad_case`), and cuda must run at least the cases of its documented support
// (float16/bfloat16, D 64 or 128; docs/cuda.md).
template <typename Check>
void cuda_matches_ref(Check check, const char* what) {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  if (!why.empty()) GTEST_SKIP() << "no CUDA GPU: " << why;
  const std::vector<Case> grid = make_grid();
  int ran = 0, documented = 0;
  for (size_t i = 0; i < grid.size(); i += 5) {
    SCOPED_TRACE(grid[i].name);
    check(grid[i], {BackendKind::cuda}, ran);
    documented += grid[i].dtype != DType::f32 && (grid[i].D == 64 || grid[i].D == 128);
  }
  EXPECT_GE(ran, documented) << "cuda declined " << what << " cases it documents as supported";
  EXPECT_GT(ran, 0);
}

TEST(ConsistencyCuda, MatchesRef) { cuda_matches_ref(check_case, "forward"); }
TEST(ConsistencyCuda, GradMatchesRef) { cuda_matches_ref(check_grad_case, "backward"); }

}  // namespace
}  // namespace cca::test

// GPU tests of the cuda backward (issue 10): attn_bwd against the float64 reference on shapes
// larger than the consistency grid (many key and query tiles, long core segments, GQA, pool
// modes and pool_heads, batch 2, D 64/128, both dtypes, float32 and 16-bit gradients, strided
// layouts) under the grad rule of tolerance.hpp; a long cca case; bit-identical gradients on
// two runs; the pooling backward's max tie rule; the Hopper wgmma dK/dV path against the
// mma.sync one (CCA_CUDA_BWD=mma); the error paths. The consistency driver
// (test_consistency.cpp, grad mode) runs cuda on its whole grid too. Every test skips, saying
// why, where no CUDA GPU is usable.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "backend.hpp"
#include "consistency.hpp"
#include "test_util.hpp"
#include "tolerance.hpp"

#ifdef CCA_WITH_CUDA
#include "cuda/kernels.hpp"
#endif

namespace cca::test {
namespace {

#define CCA_REQUIRE_GPU()                                                  \
  do {                                                                     \
    const std::string why = backend_unavailable_reason(BackendKind::cuda); \
    if (!why.empty()) GTEST_SKIP() << "no CUDA GPU: " << why;              \
  } while (0)

Case gpu_case(VariantSpec v, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, DType dt,
              Layout layout = Layout::contiguous) {
  Case c{v, B, T, Hq, Hkv, D, dt, layout, 0, ""};
  c.name = case_name(c);
  return c;
}

// Past the kernels' tiles (64 keys, 32-64 queries): several key tiles per window, windows that
// start mid-tile, more than 64 core tokens, query tiles that see a key tile only through sinks.
std::vector<Case> gpu_cases() {
  const DType bf16 = DType::bf16, f16 = DType::f16;
  return {
      gpu_case(VariantSpec::cca(16, 200), 1, 1500, 4, 4, 128, bf16),
      gpu_case(VariantSpec::cca(8, 100), 2, 777, 8, 2, 64, f16, Layout::padded),
      gpu_case(VariantSpec::cca(5, 77, PoolMode::cca, PoolHeads::query), 1, 1029, 8, 2, 128, f16),
      gpu_case(VariantSpec::cca(16, 130, PoolMode::mean), 1, 900, 4, 1, 64, bf16,
               Layout::transposed),
      gpu_case(VariantSpec::cca(7, 64, PoolMode::max, PoolHeads::query), 1, 640, 4, 2, 128, bf16),
      gpu_case(VariantSpec::cca(3, 50, PoolMode::max), 2, 333, 2, 1, 64, f16, Layout::packed),
      gpu_case(VariantSpec::full(), 2, 600, 4, 2, 128, bf16),
      gpu_case(VariantSpec::sliding(150), 1, 1000, 4, 4, 64, f16),
      gpu_case(VariantSpec::streaming(4, 100), 1, 1000, 4, 2, 128, bf16, Layout::padded),
      gpu_case(VariantSpec::lminfinite(70, 65), 1, 333, 2, 1, 64, f16),
      // large groups: the pooling backward loops over 448 rows
      gpu_case(VariantSpec::cca(448, 300), 1, 2000, 2, 1, 128, bf16),
  };
}

class CudaBwd : public ::testing::TestWithParam<Case> {};

TEST_P(CudaBwd, MatchesRef) {
  CCA_REQUIRE_GPU();
  int ran = 0;
  check_grad_case(GetParam(), {BackendKind::cuda}, ran);
  EXPECT_EQ(ran, 1) << "the cuda backend declined the case";
}

INSTANTIATE_TEST_SUITE_P(Gpu, CudaBwd, ::testing::ValuesIn(gpu_cases()),
                         [](const auto& info) { return info.param.name; });

// A training-sized cca layer: T = 4096, g = 16, s = 1024 (the benchmark's parameters), GQA.
TEST(CudaBwdLong, CcaT4096MatchesRef) {
  CCA_REQUIRE_GPU();
  int ran = 0;
  check_grad_case(gpu_case(VariantSpec::cca(16, 1024), 1, 4096, 2, 1, 128, DType::bf16),
                  {BackendKind::cuda}, ran);
  EXPECT_EQ(ran, 1);
}

// Float32 gradients (written by the kernels themselves, in a padded layout whose rows are only
// 4-byte aligned) equal the 16-bit ones rounded once; the 16-bit ones come from the float32
// accumulators rounded by copy_tensor.
TEST(CudaBwd, Float32GradientsRoundToThe16BitOnes) {
  CCA_REQUIRE_GPU();
  Rng rng(21);
  const VariantSpec var = VariantSpec::cca(4, 40, PoolMode::cca, PoolHeads::query);
  const Qkv in = make_qkv(2, 301, 4, 2, 64, DType::bf16, Layout::contiguous, rng);
  Tensor dout = alloc(DType::bf16, {2, 301, 4, 64});
  fill_normal(dout.view, rng);
  const AttnOut fwd = run_attn(BackendKind::cuda, in.q, in.k, in.v, var);
  const Qkv g32 = run_attn_bwd(BackendKind::cuda, in, fwd, dout, var, DType::f32, Layout::padded);
  const Qkv g16 = run_attn_bwd(BackendKind::cuda, in, fwd, dout, var, DType::bf16);
  for (auto [a, b] : {std::pair{&g32.q, &g16.q}, {&g32.k, &g16.k}, {&g32.v, &g16.v}}) {
    EXPECT_TRUE(fully_written(*a));
    const Tensor rounded = convert(a->view, DType::bf16);
    EXPECT_EQ(diff(rounded.view, b->view).max_abs, 0.0);
  }
}

// The backward has no atomics: two runs give the same bits (deterministic = true, and also
// without the flag, which the cuda backend does not need).
TEST(CudaBwd, BitIdenticalAcrossRuns) {
  CCA_REQUIRE_GPU();
  Rng rng(3);
  const Qkv in = make_qkv(2, 1333, 8, 2, 128, DType::bf16, Layout::contiguous, rng);
  Tensor dout = alloc(DType::bf16, {2, 1333, 8, 128});
  fill_normal(dout.view, rng);
  for (const VariantSpec& var : {VariantSpec::cca(16, 256), VariantSpec::streaming(3, 200)}) {
    SCOPED_TRACE(variant_tag(var));
    const AttnOut fwd = run_attn(BackendKind::cuda, in.q, in.k, in.v, var);
    const Qkv one = run_attn_bwd(BackendKind::cuda, in, fwd, dout, var, DType::f32,
                                 Layout::contiguous, 0, /*deterministic=*/true);
    const Qkv two = run_attn_bwd(BackendKind::cuda, in, fwd, dout, var, DType::f32,
                                 Layout::contiguous, 0, /*deterministic=*/true);
    const Qkv three = run_attn_bwd(BackendKind::cuda, in, fwd, dout, var, DType::f32);
    for (const Qkv* other : {&two, &three})
      for (auto [a, b] : {std::pair{&one.q, &other->q}, {&one.k, &other->k}, {&one.v, &other->v}})
        EXPECT_EQ(std::memcmp(a->mem->data(), b->mem->data(), a->mem->size() * 4), 0);
  }
}

// pool = max on the GPU: each element's gradient goes to the first position holding the
// group's maximum (ties included), as on the reference; pool = cca and mean match it too.
// Through the backend interface, from the same float32 core gradients.
TEST(CudaBwd, PoolBackwardMatchesRef) {
  CCA_REQUIRE_GPU();
  constexpr int64_t B = 2, T = 37, Hq = 4, Hkv = 2, D = 64, g = 4, m = 9;
  for (PoolMode mode : {PoolMode::max, PoolMode::cca, PoolMode::mean})
    for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query}) {
      const VariantSpec var = VariantSpec::cca(g, 4, mode, heads);
      SCOPED_TRACE(variant_tag(var));
      const int64_t Hc = var.core_heads(Hq, Hkv);
      Rng rng(seed_of(variant_tag(var)));
      Qkv in = make_qkv(B, T, Hq, Hkv, D, DType::bf16, Layout::contiguous, rng);
      // Ties at the maximum: group 0, element 0 of the keys at positions 1 and 3; element 1 of
      // the values at positions 0 and 2 (both batches and heads).
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hkv; ++h) {
          for (int64_t pos : {1, 3}) in.k.view.store(in.k.view.offset(b, pos, h, 0), 7.f);
          for (int64_t pos : {0, 2}) in.v.view.store(in.v.view.offset(b, pos, h, 1), 7.f);
        }
      Tensor dkc = alloc(DType::f32, {B, m, Hc, D}), dvc = alloc(DType::f32, {B, m, Hc, D});
      fill_normal(dkc.view, rng);
      fill_normal(dvc.view, rng);
      Qkv init = alloc_qkv(B, T, Hq, Hkv, D, DType::f32, Layout::contiguous);
      for (const Tensor* t : {&init.q, &init.k, &init.v}) fill_normal(t->view, rng);

      Qkv got[2];  // [0] cuda, [1] ref
      for (int i = 0; i < 2; ++i) {
        const BackendKind be = i == 0 ? BackendKind::cuda : BackendKind::ref;
        const Device dev = device_of(be);
        const Qkv src = i == 0 ? in
                               : Qkv{convert(in.q.view, DType::f32), convert(in.k.view, DType::f32),
                                     convert(in.v.view, DType::f32)};
        got[i] = Qkv{convert(init.q.view, DType::f32), convert(init.k.view, DType::f32),
                     convert(init.v.view, DType::f32)};
        const OnDevice q(src.q, dev), k(src.k, dev), v(src.v, dev), gkc(dkc, dev), gvc(dvc, dev),
            dq(got[i].q, dev), dk(got[i].k, dev), dv(got[i].v, dev);
        PoolBwdProblem p;
        p.q = q.view();
        p.k = k.view();
        p.v = v.view();
        p.dk_core = gkc.view();
        p.dv_core = gvc.view();
        p.dq = dq.view();
        p.dk = dk.view();
        p.dv = dv.view();
        p.variant = var;
        p.scale = var.scale_for(D);
        get_backend(be, dev).pool_bwd(p);
        dq.download();
        dk.download();
        dv.download();
      }
      // Float32 arithmetic on values of size ~3 (the initial gradients plus a few terms).
      expect_close(got[0].q.view, got[1].q.view, 2e-5, 1e-5, "dq");
      expect_close(got[0].k.view, got[1].k.view, 2e-5, 1e-5, "dk");
      expect_close(got[0].v.view, got[1].v.view, 2e-5, 1e-5, "dv");
      if (mode == PoolMode::max) {  // the tie went to the first position, exactly
        const TensorView &dk = got[0].k.view, &dk0 = init.k.view;
        EXPECT_EQ(dk.load(dk.offset(0, 3, 0, 0)), dk0.load(dk0.offset(0, 3, 0, 0)));
        EXPECT_NE(dk.load(dk.offset(0, 1, 0, 0)), dk0.load(dk0.offset(0, 1, 0, 0)));
      }
    }
}

#ifdef CCA_WITH_CUDA
// Sets an environment variable for the scope, restoring the old value (or its absence) after.
struct ScopedEnv {
  std::string name, old;
  bool had;
  ScopedEnv(const char* n, const char* value) : name(n) {
    const char* o = std::getenv(n);
    had = o != nullptr;
    if (had) old = o;
    if (value)
      setenv(n, value, 1);
    else
      unsetenv(n);
  }
  ~ScopedEnv() {
    if (had)
      setenv(name.c_str(), old.c_str(), 1);
    else
      unsetenv(name.c_str());
  }
};

// The Hopper dK/dV kernel (attend_bwd_wgmma.cu, 128-key tiles, 64-query steps) against the
// mma.sync one (CCA_CUDA_BWD=mma) through attn_bwd: every variant, pool and pool_heads, GQA,
// batch 2, D 64/128, both dtypes, partial last key and query tiles, no core tokens (T < s),
// strided layouts. Both round P and dS to the dtype at their own points (as two forward kernels
// do), so they differ by a few roundings: the bound is the naive dtype error's cap, relative to
// the largest gradient. Skips where the wgmma path does not apply (not sm_90a code on a 9.0 GPU).
TEST(CudaBwd, WgmmaAgreesWithMma) {
  CCA_REQUIRE_GPU();
  struct C {
    VariantSpec v;
    int64_t B, T, Hq, Hkv, D;
    DType dt;
    Layout layout;
  };
  const DType bf16 = DType::bf16, f16 = DType::f16;
  const C cases[] = {
      {VariantSpec::cca(16, 200), 1, 1500, 8, 2, 128, bf16, Layout::contiguous},
      {VariantSpec::cca(5, 77, PoolMode::cca, PoolHeads::query), 2, 1029, 4, 2, 64, f16,
       Layout::padded},
      {VariantSpec::cca(7, 64, PoolMode::max, PoolHeads::query), 1, 640, 4, 2, 128, f16,
       Layout::contiguous},
      {VariantSpec::cca(16, 130, PoolMode::mean), 1, 900, 4, 1, 64, bf16, Layout::transposed},
      {VariantSpec::cca(16, 1024), 1, 700, 4, 4, 128, bf16, Layout::contiguous},  // no core
      {VariantSpec::full(), 2, 600, 4, 2, 128, bf16, Layout::contiguous},
      {VariantSpec::sliding(150), 1, 1000, 4, 4, 64, f16, Layout::contiguous},
      {VariantSpec::streaming(4, 100), 1, 1000, 4, 2, 128, bf16, Layout::padded},
      {VariantSpec::lminfinite(70, 65), 1, 333, 2, 1, 64, f16, Layout::contiguous},
  };
  // CCA_CUDA_BWD=dkdv or dq in the environment: only that kernel on wgmma (bisecting).
  const char* outer_env = std::getenv("CCA_CUDA_BWD");
  const std::string outer = outer_env && std::string(outer_env) != "mma" ? outer_env : "";
  bool ran = false;
  for (const C& c : cases) {
    SCOPED_TRACE(variant_tag(c.v) + "_T" + std::to_string(c.T) + "_D" + std::to_string(c.D) +
                 "_" + dtype_name(c.dt));
    Rng rng(seed_of(variant_tag(c.v)) + uint64_t(c.T));
    const Qkv in = make_qkv(c.B, c.T, c.Hq, c.Hkv, c.D, c.dt, c.layout, rng);
    Tensor dout = alloc(c.dt, {c.B, c.T, c.Hq, c.D});
    fill_normal(dout.view, rng);
    const AttnOut fwd = run_attn(BackendKind::cuda, in.q, in.k, in.v, c.v);
    Qkv mma, wg;
    int64_t before = 0, after = 0;
    {
      ScopedEnv env("CCA_CUDA_BWD", "mma");
      before = cuda::attend_bwd_wgmma_launches();
      mma = run_attn_bwd(BackendKind::cuda, in, fwd, dout, c.v, DType::f32, Layout::padded);
      EXPECT_EQ(cuda::attend_bwd_wgmma_launches(), before) << "CCA_CUDA_BWD=mma ran wgmma";
    }
    {
      ScopedEnv env("CCA_CUDA_BWD", outer.empty() ? nullptr : outer.c_str());
      before = cuda::attend_bwd_wgmma_launches();
      wg = run_attn_bwd(BackendKind::cuda, in, fwd, dout, c.v, DType::f32, Layout::padded);
      after = cuda::attend_bwd_wgmma_launches();
    }
    if (after == before) continue;  // the wgmma path does not apply here
    ran = true;
    const Bound cap = grad_tolerance(c.dt).naive_cap;
    for (auto [got, want, name] : {std::tuple{&wg.q, &mma.q, "dq"},
                                   {&wg.k, &mma.k, "dk"},
                                   {&wg.v, &mma.v, "dv"}}) {
      EXPECT_TRUE(fully_written(*got)) << name;
      double scale = 1;
      for (double x : to_f64(want->view)) scale = std::max(scale, std::abs(x));
      expect_close(got->view, want->view, cap.max_abs * scale, cap.rel_l2, name);
    }
  }
  if (!ran)
    GTEST_SKIP() << "the wgmma backward does not apply here (needs sm_90a code on a 9.0 GPU)";
}
#endif  // CCA_WITH_CUDA

// What the cuda backward cannot run is refused with an error that names the reason.
TEST(CudaBwd, RefusesWhatItCannotRun) {
  CCA_REQUIRE_GPU();
  Rng rng(8);
  struct Bad {
    DType dtype;
    int64_t T, D;
    VariantSpec var;
    std::vector<std::string> words;
  };
  const std::vector<Bad> cases = {
      {DType::f32, 16, 64, VariantSpec::cca(4, 4), {"float32"}},
      {DType::bf16, 16, 96, VariantSpec::cca(4, 4), {"D = 96"}},
      // One group of 20000 keys: its pooling weights do not fit in shared memory.
      {DType::bf16, 20010, 64, VariantSpec::cca(20000, 4), {"20000", "shared memory"}},
  };
  for (const Bad& c : cases) {
    SCOPED_TRACE(std::string(dtype_name(c.dtype)) + " D " + std::to_string(c.D));
    const Qkv in = make_qkv(1, c.T, 2, 2, c.D, c.dtype, Layout::contiguous, rng);
    AttnOut fwd;
    fwd.out = alloc(c.dtype, {1, c.T, 2, c.D});
    fwd.lse = alloc(DType::f32, {1, 2, c.T});
    fill_normal(fwd.out.view, rng);
    fill_normal(fwd.lse.view, rng);
    Tensor dout = alloc(c.dtype, {1, c.T, 2, c.D});
    fill_normal(dout.view, rng);
    try {
      run_attn_bwd(BackendKind::cuda, in, fwd, dout, c.var, DType::f32);
      ADD_FAILURE() << "attn_bwd on the cuda backend ran";
    } catch (const Error& e) {
      for (const std::string& w : c.words)
        EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace cca::test

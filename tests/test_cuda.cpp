// GPU-only tests of the cuda backend (issue 3): larger shapes than the consistency grid (many
// query tiles, long core segments, D 64/128, GQA, batch 2) against the float64 reference; the
// split-KV decode kernel against the tile kernel; the GPU KV cache (decode and chunked prefill
// equal one-shot prefill); pooling; the device helpers. Each test skips, saying why, where no
// CUDA GPU is usable; the device-helper error paths run everywhere.
#include <gtest/gtest.h>

#include <functional>
#include <vector>

#include "cca/device.hpp"
#include "test_util.hpp"
#include "tolerance.hpp"

#ifdef CCA_WITH_CUDA
#include <cuda_runtime.h>

#include "backend.hpp"
#include "cuda/kernels.hpp"
#endif

namespace cca::test {
namespace {

#define CCA_REQUIRE_GPU()                                                  \
  do {                                                                     \
    const std::string why = backend_unavailable_reason(BackendKind::cuda); \
    if (!why.empty()) GTEST_SKIP() << "no CUDA GPU: " << why;              \
  } while (0)

// Output and LSE bounds of a 16-bit backend against the float64 reference on the same rounded
// inputs (the core tokens are also rounded to the dtype on the GPU, the reference keeps float32).
struct GpuTol {
  double max_abs, rel_l2, lse;
};
GpuTol gpu_tol(DType dt) {
  return dt == DType::bf16 ? GpuTol{4e-2, 1e-2, 2e-2} : GpuTol{6e-3, 2e-3, 4e-3};
}

struct GpuCase {
  std::string name;
  int64_t B, T, Hq, Hkv, D;
  DType dtype;
  VariantSpec variant;
};

std::vector<GpuCase> gpu_cases() {
  std::vector<GpuCase> r;
  auto add = [&](int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, DType dt,
                 VariantSpec v) {
    std::string n = variant_tag(v) + "_B" + std::to_string(B) + "_T" + std::to_string(T) + "_H" +
                    std::to_string(Hq) + "x" + std::to_string(Hkv) + "_D" + std::to_string(D) +
                    "_" + dtype_tag(dt);
    r.push_back({n, B, T, Hq, Hkv, D, dt, v});
  };
  // Long enough for many 64-row tiles, core segments over several 64-key blocks, and windows
  // that start mid-block.
  add(1, 1500, 4, 4, 128, DType::bf16, VariantSpec::cca(16, 200));
  add(2, 777, 8, 2, 64, DType::f16, VariantSpec::cca(8, 100));
  add(1, 1029, 8, 2, 128, DType::f16, VariantSpec::cca(5, 77, PoolMode::cca, PoolHeads::query));
  add(1, 900, 4, 1, 64, DType::bf16, VariantSpec::cca(16, 130, PoolMode::mean));
  add(1, 640, 2, 2, 128, DType::bf16, VariantSpec::cca(7, 64, PoolMode::max));
  add(2, 1100, 4, 2, 128, DType::bf16, VariantSpec::full());
  add(1, 1000, 4, 4, 64, DType::f16, VariantSpec::sliding(150));
  add(1, 1000, 4, 2, 128, DType::bf16, VariantSpec::streaming(4, 100));
  add(1, 333, 2, 1, 64, DType::f16, VariantSpec::lminfinite(10, 65));
  add(1, 5, 4, 1, 128, DType::bf16, VariantSpec::cca(2, 2));  // decode kernel via attn_fwd
  return r;
}

class CudaAttn : public ::testing::TestWithParam<GpuCase> {};

TEST_P(CudaAttn, MatchesRef) {
  CCA_REQUIRE_GPU();
  const GpuCase& c = GetParam();
  Rng rng(seed_of(c.name));
  Qkv x = make_qkv(c.B, c.T, c.Hq, c.Hkv, c.D, c.dtype, Layout::contiguous, rng);
  AttnOut got = run_attn(BackendKind::cuda, x.q, x.k, x.v, c.variant);
  EXPECT_TRUE(fully_written(got.out));
  EXPECT_TRUE(fully_written(got.lse));
  Tensor q32 = convert(x.q.view, DType::f32), k32 = convert(x.k.view, DType::f32),
         v32 = convert(x.v.view, DType::f32);
  AttnOut want = run_attn(BackendKind::ref, q32, k32, v32, c.variant);
  const GpuTol tol = gpu_tol(c.dtype);
  expect_close(got.out.view, want.out.view, tol.max_abs, tol.rel_l2, "out");
  const Diff dl = diff(got.lse.view, want.lse.view);
  EXPECT_EQ(dl.nonfinite, 0);
  EXPECT_LE(dl.max_abs, tol.lse) << "lse worst at " << index_string(got.lse.view, dl.worst);
}

INSTANTIATE_TEST_SUITE_P(Gpu, CudaAttn, ::testing::ValuesIn(gpu_cases()),
                         [](const auto& info) { return info.param.name; });

TEST(CudaPool, EveryModeMatchesRef) {
  CCA_REQUIRE_GPU();
  for (PoolMode mode : {PoolMode::cca, PoolMode::mean, PoolMode::max})
    for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query})
      for (int64_t D : {64, 128}) {
        const VariantSpec v = VariantSpec::cca(16, 32, mode, heads);
        SCOPED_TRACE(variant_tag(v) + "_D" + std::to_string(D));
        Rng rng(seed_of(variant_tag(v)) + uint64_t(D));
        Qkv x = make_qkv(2, 16 * 37 + 5, 8, 2, D, DType::bf16, Layout::contiguous, rng);
        PoolOut got = run_pool(BackendKind::cuda, x.q, x.k, x.v, v, 37);
        EXPECT_TRUE(fully_written(got.k_core));
        EXPECT_TRUE(fully_written(got.v_core));
        Tensor q32 = convert(x.q.view, DType::f32), k32 = convert(x.k.view, DType::f32),
               v32 = convert(x.v.view, DType::f32);
        PoolOut want = run_pool(BackendKind::ref, q32, k32, v32, v, 37);
        // One bfloat16 rounding of each pooled value (|value| < 4): 2^-8 relative.
        expect_close(got.k_core.view, want.k_core.view, 2e-2, 5e-3, "k_core");
        expect_close(got.v_core.view, want.v_core.view, 2e-2, 5e-3, "v_core");
      }
}

// Runs the cache over a sequence in chunks of the given sizes on the GPU; returns out [B,T,Hq,D].
Tensor run_cache(const Qkv& x, const VariantSpec& v, const std::vector<int64_t>& chunks) {
  const TensorView& q = x.q.view;
  const int64_t B = q.shape[0], T = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = x.k.view.shape[2];
  Tensor out = alloc(q.dtype, {B, T, Hq, D});
  OnDevice dq(x.q, Device::cuda), dk(x.k, Device::cuda), dv(x.v, Device::cuda),
      dout(out, Device::cuda);
  RunOptions run;
  run.backend = BackendKind::cuda;
  KvCache cache(v, B, Hq, Hkv, D, q.dtype, run);
  int64_t t = 0;
  for (size_t i = 0; t < T; ++i) {
    const int64_t n = std::min(chunks[i % chunks.size()], T - t);
    cache.append(dq.view().slice(1, t, n), dk.view().slice(1, t, n), dv.view().slice(1, t, n),
                 dout.view().slice(1, t, n));
    t += n;
  }
  dout.download();
  return out;
}

TEST(CudaKvCache, DecodeAndChunksEqualPrefill) {
  CCA_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f16})
    for (const VariantSpec& v :
         {VariantSpec::cca(8, 24), VariantSpec::cca(5, 16, PoolMode::cca, PoolHeads::query),
          VariantSpec::streaming(3, 20)}) {
      SCOPED_TRACE(variant_tag(v) + "_" + dtype_tag(dt));
      Rng rng(seed_of(variant_tag(v)));
      Qkv x = make_qkv(2, 203, 8, 2, 128, dt, Layout::contiguous, rng);
      AttnOut prefill = run_attn(BackendKind::cuda, x.q, x.k, x.v, v);
      const Tensor decode = run_cache(x, v, {1});
      const Tensor chunked = run_cache(x, v, {37, 1, 64, 5});
      // The same function summed in a different order; one 16-bit rounding apart.
      const Bound tol = identity_tolerance(dt);
      expect_close(decode.view, prefill.out.view, 2 * tol.max_abs, 2 * tol.rel_l2, "decode");
      expect_close(chunked.view, prefill.out.view, 2 * tol.max_abs, 2 * tol.rel_l2, "chunked");
    }
}

TEST(CudaBackend, RejectsWhatItCannotRun) {
  CCA_REQUIRE_GPU();
  Rng rng(7);
  Qkv f32 = make_qkv(1, 8, 2, 2, 64, DType::f32, Layout::contiguous, rng);
  try {
    run_attn(BackendKind::cuda, f32.q, f32.k, f32.v, VariantSpec::full());
    ADD_FAILURE() << "float32 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("float32"), std::string::npos) << e.what();
  }
  Qkv d96 = make_qkv(1, 8, 2, 2, 96, DType::bf16, Layout::contiguous, rng);
  try {
    run_attn(BackendKind::cuda, d96.q, d96.k, d96.v, VariantSpec::full());
    ADD_FAILURE() << "D = 96 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("96"), std::string::npos) << e.what();
  }
}

TEST(CudaDevice, HelpersRoundTripOrExplain) {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  if (!why.empty()) {  // the helpers must say why they cannot run
    EXPECT_THROW(device_alloc(16), Error);
    EXPECT_THROW(device_synchronize(), Error);
    GTEST_SKIP() << "no CUDA GPU: " << why;
  }
  std::vector<uint16_t> a(1000), b(1000, 0);
  for (size_t i = 0; i < a.size(); ++i) a[i] = uint16_t(i * 7 + 3);
  void* d = device_alloc(2000);
  copy_to_device(d, a.data(), 2000);
  copy_to_host(b.data(), d, 2000);
  device_synchronize();
  device_free(d);
  EXPECT_EQ(a, b);
}

#ifdef CCA_WITH_CUDA
// The split-KV decode kernel (any split count) and the tile kernel compute the same rows.
TEST(CudaDecode, SplitsAgreeWithTiles) {
  CCA_REQUIRE_GPU();
  const int64_t B = 2, T = 3000, Hq = 8, Hkv = 2, D = 128;
  for (const VariantSpec& v :
       {VariantSpec::cca(16, 300), VariantSpec::streaming(4, 500), VariantSpec::full()})
    for (int64_t n : {1, 2, 4}) {  // n * Hq/Hkv <= 16 query rows per KV head
      SCOPED_TRACE(variant_tag(v) + "_n" + std::to_string(n));
      Rng rng(seed_of(variant_tag(v)) + uint64_t(n));
      Qkv x = make_qkv(B, T, Hq, Hkv, D, DType::bf16, Layout::contiguous, rng);
      const int64_t m = core_tokens_needed(v, T);
      const int64_t Hc = v.core_heads(Hq, Hkv);
      Tensor kc = alloc(DType::bf16, {B, std::max<int64_t>(m, 1), Hc, D});
      Tensor vc = alloc(DType::bf16, {B, std::max<int64_t>(m, 1), Hc, D});
      fill_normal(kc.view, rng);
      fill_normal(vc.view, rng);
      OnDevice dq(x.q, Device::cuda), dk(x.k, Device::cuda), dv(x.v, Device::cuda),
          dkc(kc, Device::cuda), dvc(vc, Device::cuda);
      AttendProblem p;
      p.q = dq.view().slice(1, T - n, n);
      p.q_pos0 = T - n;
      if (m > 0) p.core = KvSegment{dkc.view().slice(1, 0, m), dvc.view().slice(1, 0, m), 0};
      p.sink = p.local = KvSegment{dk.view(), dv.view(), 0};
      p.variant = v;
      p.scale = v.scale_for(D);
      std::vector<Tensor> outs;
      // Tiles, then 1, 7 and 12 slices and the automatic count.
      const std::vector<int> modes = {1, 7, 12, 0};
      for (size_t mode = 0; mode <= modes.size(); ++mode) {
        Tensor out = alloc(DType::bf16, {B, n, Hq, D}), lse = alloc(DType::f32, {B, Hq, n});
        OnDevice dout(out, Device::cuda), dlse(lse, Device::cuda);
        p.out = dout.view();
        p.lse = dlse.view();
        if (mode == 0)
          cuda::launch_attend_tiles(p, nullptr);
        else
          cuda::launch_attend_decode({p}, nullptr, modes[mode - 1]);
        dout.download();
        dlse.download();
        EXPECT_TRUE(fully_written(out));
        EXPECT_TRUE(fully_written(lse));
        outs.push_back(out);
        outs.push_back(lse);
      }
      for (size_t i = 2; i < outs.size(); i += 2) {
        expect_close(outs[i].view, outs[0].view, 1.6e-2, 4e-3, "decode out");
        expect_close(outs[i + 1].view, outs[1].view, 1e-4, 1e-5, "decode lse");
      }
    }
}

// A ragged decode batch (sequences of 1 to 9000 tokens, each with its own tensors and position)
// in one split-KV launch: every sequence's rows equal the float64 reference and the tile kernel
// on that sequence alone, with automatic slices (more for the longer sequences), 5 and 12
// slices each (more slices than keys for the shortest).
TEST(CudaDecode, RaggedBatchMatchesEachSequence) {
  CCA_REQUIRE_GPU();
  const std::vector<int64_t> lengths = {1, 37, 700, 3000, 9000};
  const int64_t Hq = 8, Hkv = 2;
  struct Case {
    VariantSpec v;
    int64_t n, D;
    DType dt;
  };
  for (const Case& c : {Case{VariantSpec::cca(16, 300), 1, 128, DType::bf16},
                        Case{VariantSpec::cca(8, 200, PoolMode::cca, PoolHeads::query), 1, 64,
                             DType::f16},
                        Case{VariantSpec::streaming(4, 500), 2, 128, DType::bf16},
                        Case{VariantSpec::full(), 1, 64, DType::f16}}) {
    SCOPED_TRACE(variant_tag(c.v) + "_n" + std::to_string(c.n) + "_D" + std::to_string(c.D));
    Rng rng(seed_of(variant_tag(c.v)) + uint64_t(c.D));
    const int64_t S = int64_t(lengths.size()), Hc = c.v.core_heads(Hq, Hkv);
    std::vector<Tensor> host;               // keeps every input alive
    std::vector<OnDevice> dev;              // their GPU copies
    std::vector<AttendProblem> gpu, cpu64;  // per sequence: the GPU problem, the reference's
    std::vector<Tensor> want_out, want_lse;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t L = std::max(lengths[size_t(s)], c.n), m = core_tokens_needed(c.v, L);
      Qkv x = make_qkv(1, L, Hq, Hkv, c.D, c.dt, Layout::contiguous, rng);
      Tensor kc = alloc(c.dt, {1, std::max<int64_t>(m, 1), Hc, c.D});
      Tensor vc = alloc(c.dt, {1, std::max<int64_t>(m, 1), Hc, c.D});
      fill_normal(kc.view, rng);
      fill_normal(vc.view, rng);
      AttendProblem p;
      p.q_pos0 = L - c.n;
      p.variant = c.v;
      p.scale = c.v.scale_for(c.D);
      // The reference: float64 math on float32 copies of the same rounded inputs.
      AttendProblem r = p;
      const Tensor q32 = convert(x.q.view, DType::f32), k32 = convert(x.k.view, DType::f32),
                   v32 = convert(x.v.view, DType::f32), kc32 = convert(kc.view, DType::f32),
                   vc32 = convert(vc.view, DType::f32);
      want_out.push_back(alloc(DType::f32, {1, c.n, Hq, c.D}));
      want_lse.push_back(alloc(DType::f32, {1, Hq, c.n}));
      r.q = q32.view.slice(1, L - c.n, c.n);
      if (m > 0) r.core = KvSegment{kc32.view.slice(1, 0, m), vc32.view.slice(1, 0, m), 0};
      r.sink = r.local = KvSegment{k32.view, v32.view, 0};
      r.out = want_out.back().view;
      r.lse = want_lse.back().view;
      ref::backend().attend(r);
      for (const Tensor* t : {&x.q, &x.k, &x.v, &kc, &vc}) {
        host.push_back(*t);
        dev.emplace_back(*t, Device::cuda);
      }
      const size_t i = dev.size() - 5;
      p.q = dev[i].view().slice(1, L - c.n, c.n);
      if (m > 0)
        p.core = KvSegment{dev[i + 3].view().slice(1, 0, m), dev[i + 4].view().slice(1, 0, m), 0};
      p.sink = p.local = KvSegment{dev[i + 1].view(), dev[i + 2].view(), 0};
      gpu.push_back(p);
    }
    const GpuTol tol = gpu_tol(c.dt);
    const Bound cross = cross_kernel_tolerance(c.dt);
    // Runs every sequence through `run` into fresh outputs; returns [out_s, lse_s] per sequence.
    auto run = [&](const std::function<void(std::vector<AttendProblem>&)>& f) {
      std::vector<Tensor> outs;
      std::vector<OnDevice> douts;
      std::vector<AttendProblem> ps = gpu;
      for (AttendProblem& p : ps) {
        outs.push_back(alloc(c.dt, {1, c.n, Hq, c.D}));
        outs.push_back(alloc(DType::f32, {1, Hq, c.n}));
        douts.emplace_back(outs[outs.size() - 2], Device::cuda);
        douts.emplace_back(outs.back(), Device::cuda);
        p.out = douts[douts.size() - 2].view();
        p.lse = douts.back().view();
      }
      f(ps);
      for (const OnDevice& d : douts) d.download();
      for (const Tensor& t : outs) EXPECT_TRUE(fully_written(t));
      return outs;
    };
    const std::vector<Tensor> tiles = run([](std::vector<AttendProblem>& ps) {
      for (const AttendProblem& p : ps) cuda::launch_attend_tiles(p, nullptr);
    });
    const std::vector<std::vector<Tensor>> fused = {
        run([](std::vector<AttendProblem>& ps) {
          get_backend(BackendKind::cuda, Device::cuda).attend_batch(ps);
        }),
        run([](std::vector<AttendProblem>& ps) { cuda::launch_attend_decode(ps, nullptr, 5); }),
        run([](std::vector<AttendProblem>& ps) { cuda::launch_attend_decode(ps, nullptr, 12); })};
    for (int64_t s = 0; s < S; ++s) {
      SCOPED_TRACE("sequence of " + std::to_string(lengths[size_t(s)]) + " tokens");
      const Tensor& out = fused[0][size_t(2 * s)];
      const Tensor& lse = fused[0][size_t(2 * s + 1)];
      expect_close(out.view, want_out[size_t(s)].view, tol.max_abs, tol.rel_l2, "out vs ref");
      const Diff dl = diff(lse.view, want_lse[size_t(s)].view);
      EXPECT_EQ(dl.nonfinite, 0);
      EXPECT_LE(dl.max_abs, tol.lse) << "lse vs ref";
      for (const std::vector<Tensor>& f : fused) {
        expect_close(f[size_t(2 * s)].view, tiles[size_t(2 * s)].view, cross.max_abs,
                     cross.rel_l2, "out vs tiles");
        expect_close(f[size_t(2 * s + 1)].view, tiles[size_t(2 * s + 1)].view, 1e-4, 1e-5,
                     "lse vs tiles");
      }
    }
  }
}

// The Hopper wgmma/TMA path and the portable tile kernel compute the same rows (prefill and a
// chunk at an offset, every segment kind, GQA, D 64/128, both dtypes, tails of odd length).
// Skips, saying so, where the wgmma path does not apply (not an sm_90a build on a 9.0 GPU).
TEST(CudaAttend, WgmmaAgreesWithTiles) {
  CCA_REQUIRE_GPU();
  struct Case {
    int64_t B, T, n, Hq, Hkv, D;
    DType dt;
    VariantSpec v;
  };
  const Case cases[] = {
      {2, 1000, 1000, 8, 2, 128, DType::bf16, VariantSpec::cca(16, 300)},
      {1, 1537, 401, 4, 4, 128, DType::f16,
       VariantSpec::cca(5, 77, PoolMode::cca, PoolHeads::query)},
      {1, 777, 777, 4, 1, 64, DType::f16, VariantSpec::streaming(4, 100)},
      {1, 333, 333, 2, 2, 128, DType::bf16, VariantSpec::full()},
      {2, 600, 130, 4, 2, 64, DType::bf16, VariantSpec::sliding(150)},
  };
  bool ran = false;
  for (const Case& c : cases) {
    SCOPED_TRACE(variant_tag(c.v) + "_T" + std::to_string(c.T) + "_n" + std::to_string(c.n) +
                 "_D" + std::to_string(c.D));
    Rng rng(seed_of(variant_tag(c.v)) + uint64_t(c.T));
    Qkv x = make_qkv(c.B, c.T, c.Hq, c.Hkv, c.D, c.dt, Layout::contiguous, rng);
    const int64_t m = core_tokens_needed(c.v, c.T);
    const int64_t Hc = c.v.core_heads(c.Hq, c.Hkv);
    Tensor kc = alloc(c.dt, {c.B, std::max<int64_t>(m, 1), Hc, c.D});
    Tensor vc = alloc(c.dt, {c.B, std::max<int64_t>(m, 1), Hc, c.D});
    fill_normal(kc.view, rng);
    fill_normal(vc.view, rng);
    OnDevice dq(x.q, Device::cuda), dk(x.k, Device::cuda), dv(x.v, Device::cuda),
        dkc(kc, Device::cuda), dvc(vc, Device::cuda);
    AttendProblem p;
    p.q = dq.view().slice(1, c.T - c.n, c.n);
    p.q_pos0 = c.T - c.n;
    if (m > 0) p.core = KvSegment{dkc.view().slice(1, 0, m), dvc.view().slice(1, 0, m), 0};
    p.sink = p.local = KvSegment{dk.view(), dv.view(), 0};
    p.variant = c.v;
    p.scale = c.v.scale_for(c.D);
    std::vector<Tensor> outs;
    for (int mode = 0; mode < 2; ++mode) {
      Tensor out = alloc(c.dt, {c.B, c.n, c.Hq, c.D}), lse = alloc(DType::f32, {c.B, c.Hq, c.n});
      OnDevice dout(out, Device::cuda), dlse(lse, Device::cuda);
      p.out = dout.view();
      p.lse = dlse.view();
      if (mode == 0) {
        cuda::launch_attend_tiles(p, nullptr);
      } else if (!cuda::launch_attend_wgmma(p, nullptr)) {
        break;
      }
      dout.download();
      dlse.download();
      EXPECT_TRUE(fully_written(out));
      EXPECT_TRUE(fully_written(lse));
      outs.push_back(out);
      outs.push_back(lse);
    }
    if (outs.size() < 4) continue;
    ran = true;
    expect_close(outs[2].view, outs[0].view, 1.6e-2, 4e-3, "wgmma out");
    expect_close(outs[3].view, outs[1].view, 1e-4, 1e-5, "wgmma lse");
  }
  if (!ran) GTEST_SKIP() << "the wgmma path does not apply here (needs sm_90a code on a 9.0 GPU)";
}

// copy_tensor between strided device views (the KV cache's ring appends).
TEST(CudaDecode, CopyTensorStrided) {
  CCA_REQUIRE_GPU();
  Rng rng(11);
  Tensor src = alloc(DType::f16, {2, 9, 3, 64}, Layout::padded);
  Tensor dst = alloc(DType::f16, {2, 9, 3, 64}, Layout::transposed);
  fill_normal(src.view, rng);
  OnDevice ds(src, Device::cuda), dd(dst, Device::cuda);
  get_backend(BackendKind::cuda, Device::cuda).copy_tensor(dd.view(), ds.view(), nullptr);
  dd.download();
  EXPECT_TRUE(fully_written(dst));
  expect_close(dst.view, src.view, 0, 0, "copy");
}
#endif

}  // namespace
}  // namespace cca::test

// Every SIMD target compiled into this build (cpu_simd.hpp), each forced in turn: the CPU backend
// against the float64 reference over the consistency grid (forward, and every third case's
// backward), decode through the KV cache against the prefill, the vector dtype conversions
// against the scalar ones bit for bit, and the CPU ops' vector rows against float64 loops.
// Targets this CPU cannot run skip, naming the ones it can.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "consistency.hpp"
#include "cpu/cpu_simd.hpp"
#include "ops/ops.hpp"
#include "test_util.hpp"
#include "tolerance.hpp"

namespace cca::test {
namespace {

std::vector<std::string> compiled_targets() {
  std::vector<std::string> names;
  for (const cpu::SimdTarget& t : cpu::simd_targets()) names.push_back(t.name);
  return names;
}

// Runs each test on its target; restores the default choice afterwards.
class CpuTarget : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string runs;
    bool supported = false;
    for (const cpu::SimdTarget& t : cpu::simd_targets()) {
      if (t.supported) runs += (runs.empty() ? "" : ", ") + t.name;
      if (t.name == GetParam()) supported = t.supported;
    }
    if (!supported)
      GTEST_SKIP() << "this CPU cannot run " << GetParam() << " (it runs " << runs << ")";
    cpu::select_simd_target(GetParam());
    ASSERT_EQ(cpu::simd_target(), GetParam());
  }
  void TearDown() override { cpu::select_simd_target(""); }
};

TEST_P(CpuTarget, ConsistencyMatchesRef) {
  for (const Case& c : make_grid()) {
    SCOPED_TRACE(c.name);
    int ran = 0;
    check_case(c, {BackendKind::cpu}, ran);
    ASSERT_EQ(ran, 1);
    if (HasFailure()) return;
  }
}

TEST_P(CpuTarget, ConsistencyGradMatchesRef) {
  const std::vector<Case> grid = make_grid();
  for (size_t i = 0; i < grid.size(); i += 3) {
    SCOPED_TRACE(grid[i].name);
    int ran = 0;
    check_grad_case(grid[i], {BackendKind::cpu}, ran);
    ASSERT_EQ(ran, 1);
    if (HasFailure()) return;
  }
}

// Token-by-token decode (the decode path: few rows per KV head) and chunks (the tile path) give
// the prefill's rows, past a CPU key block (window 140) and query tile.
TEST_P(CpuTarget, DecodeAndChunksEqualPrefill) {
  const int64_t T = 300, Hq = 4, Hkv = 2, D = 40;
  for (DType dt : {DType::f32, DType::f16, DType::bf16})
    for (const VariantSpec& var :
         {VariantSpec::cca(4, 140), VariantSpec::cca(3, 20, PoolMode::max, PoolHeads::query),
          VariantSpec::full()}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " " + var.describe());
      Rng rng(seed_of("targets") + uint64_t(dt));
      const Qkv in = make_qkv(1, T, Hq, Hkv, D, dt, Layout::packed, rng);
      const AttnOut prefill = run_attn(BackendKind::cpu, in.q, in.k, in.v, var);
      RunOptions run;
      run.backend = BackendKind::cpu;
      run.threads = 1;
      KvCache cache(var, 1, Hq, Hkv, D, dt, run);
      const Bound tol = identity_tolerance(dt);
      const int64_t sizes[] = {1, 70, 1, 1, 129};
      for (int64_t pos = 0, i = 0; pos < T; ++i) {
        const int64_t n = std::min(sizes[i % 5], T - pos);
        AttnOut got{alloc(dt, {1, n, Hq, D}), alloc(DType::f32, {1, Hq, n})};
        cache.append(in.q.view.slice(1, pos, n), in.k.view.slice(1, pos, n),
                     in.v.view.slice(1, pos, n), got.out.view, got.lse.view);
        expect_close(got.out.view, prefill.out.view.slice(1, pos, n), tol.max_abs, tol.rel_l2,
                     "out rows from " + std::to_string(pos));
        expect_close(got.lse.view, prefill.lse.view.slice(2, pos, n), identity_lse_tolerance(dt),
                     1.0, "lse rows from " + std::to_string(pos));
        pos += n;
        if (HasFailure()) return;
      }
    }
}

// The vector conversions give the scalar ones' bits: every float16 and bfloat16 pattern to
// float32, and float32 patterns (a sweep of every exponent with many mantissas, the float16
// subnormal and rounding boundaries, infinities, NaNs) to both.
TEST_P(CpuTarget, RowConversionsMatchScalar) {
  std::vector<uint16_t> h(65536);
  for (size_t i = 0; i < h.size(); ++i) h[i] = uint16_t(i);
  std::vector<float> f(h.size());
  for (DType dt : {DType::f16, DType::bf16}) {
    cpu::row_to_float(h.data() + 3, dt, int64_t(h.size()) - 3, f.data() + 3);  // odd start
    for (size_t i = 3; i < h.size(); ++i) {
      const float want = dt == DType::f16 ? f16_to_float(h[i]) : bf16_to_float(h[i]);
      uint32_t a, b;
      std::memcpy(&a, &f[i], 4);
      std::memcpy(&b, &want, 4);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(f[i])) << dtype_name(dt) << " 0x" << std::hex << h[i];
      } else {
        ASSERT_EQ(a, b) << dtype_name(dt) << " 0x" << std::hex << h[i];
      }
    }
  }
  std::vector<uint32_t> bits;
  for (uint32_t e = 0; e < 256; ++e)
    for (uint32_t m = 0; m < (1u << 23); m += 4093) {
      bits.push_back(e << 23 | m);
      bits.push_back(0x80000000u | e << 23 | m);
    }
  for (uint32_t b = 0x33000000u - 4; b < 0x33000000u + 4; ++b) bits.push_back(b);  // to 0
  for (uint32_t b = 0x387fc000u; b < 0x38800000u + 0x2000u; b += 0x7) bits.push_back(b);
  for (uint32_t b = 0x477fe000u; b < 0x47800000u + 4; b += 0x3) bits.push_back(b);  // overflow
  for (uint32_t b : {0x7f800000u, 0xff800000u, 0x7f800001u, 0x7fc00000u, 0xffffffffu, 0u})
    bits.push_back(b);
  for (uint32_t m = 0; m < 0x10000u; ++m) bits.push_back(0x3f800000u | m);  // round-to-even ties
  std::vector<float> x(bits.size());
  std::memcpy(x.data(), bits.data(), bits.size() * 4);
  std::vector<uint16_t> got(bits.size());
  for (DType dt : {DType::f16, DType::bf16}) {
    cpu::row_from_float(x.data() + 1, int64_t(x.size()) - 1, got.data() + 1, dt);
    for (size_t i = 1; i < x.size(); ++i) {
      const uint16_t want = dt == DType::f16 ? float_to_f16(x[i]) : float_to_bf16(x[i]);
      ASSERT_EQ(got[i], want) << dtype_name(dt) << " of 0x" << std::hex << bits[i];
    }
  }
}

// rms_norm, rope and swiglu of the cpu ops against float64 loops.
TEST_P(CpuTarget, OpsRowsMatchFloat64) {
  const ops::Context ctx = ops::Context::cpu(1);
  Rng rng(seed_of("ops_rows"));
  const int64_t n = 5, H = 203, heads = 3, half = 20, I = 77;
  std::vector<float> x(size_t(n * H)), out(size_t(n * H));
  auto w = std::vector<float>(size_t(H));
  for (float& v : x) v = float(rng.normal());
  for (float& v : w) v = float(rng.normal());
  ops::rms_norm(ctx, ops::matrix(x.data(), DType::f32, n, H, H, Device::cpu),
                ops::matrix(w.data(), DType::f32, 1, H, H, Device::cpu), 1e-5f,
                ops::matrix(out.data(), DType::f32, n, H, H, Device::cpu));
  for (int64_t r = 0; r < n; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += double(x[size_t(r * H + i)]) * x[size_t(r * H + i)];
    const double inv = 1.0 / std::sqrt(ss / double(H) + 1e-5);
    for (int64_t i = 0; i < H; ++i)
      ASSERT_NEAR(out[size_t(r * H + i)], w[size_t(i)] * x[size_t(r * H + i)] * inv, 1e-5)
          << "rms_norm " << r << " " << i;
  }

  std::vector<float> q(size_t(n * heads * 2 * half));
  auto freq = std::vector<float>(size_t(half));
  for (float& v : q) v = float(rng.normal());
  for (int64_t i = 0; i < half; ++i) freq[size_t(i)] = std::pow(10000.f, -float(i) / float(half));
  const std::vector<float> q0 = q;
  const int32_t positions[n] = {0, 1, 17, 1000, 131071};
  ops::rope(ctx,
            ops::matrix(q.data(), DType::f32, n, heads * 2 * half, heads * 2 * half, Device::cpu),
            heads, positions, ops::matrix(freq.data(), DType::f32, 1, half, half, Device::cpu));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const double angle = double(freq[size_t(i)] * float(positions[r]));
        const size_t o = size_t((r * heads + h) * 2 * half + i);
        const double a = q0[o], b = q0[o + size_t(half)];
        ASSERT_NEAR(q[o], a * std::cos(angle) - b * std::sin(angle), 1e-5) << "rope";
        ASSERT_NEAR(q[o + size_t(half)], b * std::cos(angle) + a * std::sin(angle), 1e-5) << "rope";
      }

  std::vector<float> g(size_t(n * I)), u(size_t(n * I)), o(size_t(n * I));
  for (float& v : g) v = float(8 * rng.normal());
  for (float& v : u) v = float(rng.normal());
  g[0] = -120.f, g[1] = 95.f;  // past exp's float range either way
  ops::swiglu(ctx, ops::matrix(g.data(), DType::f32, n, I, I, Device::cpu),
              ops::matrix(u.data(), DType::f32, n, I, I, Device::cpu),
              ops::matrix(o.data(), DType::f32, n, I, I, Device::cpu));
  for (size_t i = 0; i < g.size(); ++i) {
    const double want = double(g[i]) / (1.0 + std::exp(-double(g[i]))) * u[i];
    ASSERT_NEAR(o[i], want, 2e-6 * std::max(1.0, std::abs(want))) << "swiglu " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Simd, CpuTarget, ::testing::ValuesIn(compiled_targets()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// CCA_CPU_TARGET and select_simd_target() refuse names that are not compiled targets, naming
// the compiled ones; "" restores the best target the CPU runs.
TEST(CpuTargets, SelectionByName) {
  EXPECT_THROW(cpu::select_simd_target("avx9000"), Error);
  try {
    cpu::select_simd_target("avx9000");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(cpu::simd_targets().back().name), std::string::npos)
        << e.what();
  }
  cpu::select_simd_target("");
  std::string best;
  for (const cpu::SimdTarget& t : cpu::simd_targets())
    if (t.supported && best.empty()) best = t.name;
  if (!std::getenv("CCA_CPU_TARGET")) EXPECT_EQ(cpu::simd_target(), best);
}

}  // namespace
}  // namespace cca::test

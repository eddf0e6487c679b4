// The optimised CPU backend's tiling edge cases, against the ref backend through the backend
// interface itself (so queries can start at q_pos0 > 0 and every segment can be its own tensor at
// its own pos0): lengths around the query tile (64) and key block (128) sizes, head dims that are
// not a multiple of the register blocks, GQA, per-query-head core tokens, float16/bfloat16 loads
// with vector bodies and scalar tails, thread-count independence, and rejected problems.
#include <cstring>

#include "backend.hpp"
#include "test_util.hpp"
#include "tolerance.hpp"

namespace cca::test {
namespace {

const Backend& cpu_be() { return get_backend(BackendKind::cpu, Device::cpu); }
const Backend& ref_be() { return get_backend(BackendKind::ref, Device::cpu); }

// Core tokens [B, m, Hc, D] of groups [0, m), pooled by the ref backend.
PoolOut ref_core(const Qkv& x, const VariantSpec& var, int64_t m) {
  const TensorView& q = x.q.view;
  const int64_t Hc = var.core_heads(q.shape[2], x.k.view.shape[2]);
  PoolOut r{alloc(q.dtype, {q.shape[0], std::max<int64_t>(m, 1), Hc, q.shape[3]}),
            alloc(q.dtype, {q.shape[0], std::max<int64_t>(m, 1), Hc, q.shape[3]})};
  if (m == 0) return r;
  PoolProblem p;
  p.q = q;
  p.raw = KvSegment{x.k.view, x.v.view, 0};
  p.group_end = m;
  p.k_core = r.k_core.view;
  p.v_core = r.v_core.view;
  p.variant = var;
  p.scale = var.scale_for(q.shape[3]);
  ref_be().pool(p);
  return r;
}

// Queries [q0, T) of `x` as one chunk: the core segment (ref-pooled), a sink segment holding
// only the sink rows and a local segment holding rows [local_begin(q0), T), each copied into its
// own tensor. Runs `be` and returns out [B, T - q0, Hq, D] and lse [B, Hq, T - q0].
AttnOut run_chunk(const Backend& be, const Qkv& x, const PoolOut& core, const VariantSpec& var,
                  int64_t q0, int threads = 0) {
  const TensorView& q = x.q.view;
  const int64_t B = q.shape[0], T = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t lb = visible_keys(var, q0).local_begin, n = T - q0;
  const int64_t sinks = var.has_sinks() ? std::max<int64_t>(std::min(var.sinks, T), 1) : 1;
  const Tensor qc = gather_rows(q, range(q0, T));
  const Tensor kl = gather_rows(x.k.view, range(lb, T)), vl = gather_rows(x.v.view, range(lb, T));
  const Tensor ks = gather_rows(x.k.view, range(0, sinks)),
               vs = gather_rows(x.v.view, range(0, sinks));
  AttnOut r{alloc(q.dtype, {B, n, Hq, D}), alloc(DType::f32, {B, Hq, n})};
  AttendProblem p;
  p.q = qc.view;
  p.q_pos0 = q0;
  p.core = KvSegment{core.k_core.view, core.v_core.view, 0};
  p.sink = KvSegment{ks.view, vs.view, 0};
  p.local = KvSegment{kl.view, vl.view, lb};
  p.out = r.out.view;
  p.lse = r.lse.view;
  p.variant = var;
  p.scale = var.scale_for(D);
  p.threads = threads;
  be.attend(p);
  return r;
}

void expect_matches_ref(const AttnOut& got, const AttnOut& want, DType dt,
                        const std::string& what) {
  EXPECT_TRUE(fully_written(got.out)) << what;
  EXPECT_TRUE(fully_written(got.lse)) << what;
  const Bound out_bound =
      dt == DType::f32 ? consistency_tolerance(dt).floor : identity_tolerance(dt);
  expect_close(got.out.view, want.out.view, out_bound.max_abs, out_bound.rel_l2, what + " out");
  expect_close(got.lse.view, want.lse.view, 1e-4, 1e-5, what + " lse");
}

std::vector<VariantSpec> tiling_variants() {
  return {VariantSpec::full(),
          VariantSpec::sliding(70),
          VariantSpec::streaming(3, 50),
          VariantSpec::cca(16, 40),
          VariantSpec::cca(5, 33, PoolMode::mean),
          VariantSpec::cca(7, 20, PoolMode::max, PoolHeads::query),
          VariantSpec::cca(8, 30, PoolMode::cca, PoolHeads::query)};
}

// Lengths around the query tile (64) and key block (128) sizes, B = 2, GQA 2, D = 20 (a vector
// plus a tail, and not a multiple of the 6-row register block).
TEST(CpuBackend, TileBoundariesMatchRef) {
  for (const VariantSpec& var : tiling_variants())
    for (int64_t T : {1, 63, 64, 65, 127, 128, 129, 200}) {
      Rng rng(seed_of("tile" + variant_tag(var) + std::to_string(T)));
      const Qkv x = make_qkv(2, T, 4, 2, 20, DType::f32, Layout::padded, rng);
      const std::string what = variant_tag(var) + " T=" + std::to_string(T);
      const AttnOut want = run_attn(BackendKind::ref, x.q, x.k, x.v, var);
      const AttnOut got = run_attn(BackendKind::cpu, x.q, x.k, x.v, var, Layout::padded, 2);
      expect_matches_ref(got, want, DType::f32, what);
    }
}

// A chunk of queries at q_pos0 > 0 (not tile-aligned) over separate core/sink/local tensors
// whose local rows start at pos0 = local_begin(q_pos0) > 0; GQA 4.
TEST(CpuBackend, ChunkAtOffsetMatchesRef) {
  const int64_t T = 300;
  for (const VariantSpec& var : tiling_variants()) {
    Rng rng(seed_of("chunk" + variant_tag(var)));
    const Qkv x = make_qkv(2, T, 4, 1, 32, DType::f32, Layout::contiguous, rng);
    const PoolOut core = ref_core(x, var, core_tokens_needed(var, T));
    for (int64_t q0 : {1, 63, 100, 250, 299}) {
      const std::string what = variant_tag(var) + " q0=" + std::to_string(q0);
      expect_matches_ref(run_chunk(cpu_be(), x, core, var, q0, 2),
                         run_chunk(ref_be(), x, core, var, q0), DType::f32, what);
    }
  }
}

// float16/bfloat16 inputs: converted key/value blocks (D = 40: two vectors and a tail).
TEST(CpuBackend, HalfPrecisionLoadsMatchRef) {
  for (DType dt : {DType::f16, DType::bf16})
    for (const VariantSpec& var : {VariantSpec::full(), VariantSpec::cca(4, 24)}) {
      Rng rng(seed_of(std::string("half") + dtype_tag(dt) + variant_tag(var)));
      const Qkv x = make_qkv(1, 150, 2, 2, 40, dt, Layout::contiguous, rng);
      const std::string what = std::string(dtype_tag(dt)) + " " + variant_tag(var);
      expect_matches_ref(run_attn(BackendKind::cpu, x.q, x.k, x.v, var, Layout::contiguous, 2),
                         run_attn(BackendKind::ref, x.q, x.k, x.v, var), dt, what);
    }
}

// Pooling a group range that starts past 0 from a raw segment and queries that start past 0.
TEST(CpuBackend, PoolGroupRangeMatchesRef) {
  const int64_t T = 100, g = 6, first = 3, m = T / g;
  for (PoolMode pool : {PoolMode::cca, PoolMode::mean, PoolMode::max})
    for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query}) {
      const VariantSpec var = VariantSpec::cca(g, 10, pool, heads);
      Rng rng(seed_of("pool" + variant_tag(var)));
      const Qkv x = make_qkv(2, T, 4, 2, 24, DType::f32, Layout::contiguous, rng);
      const PoolOut want = ref_core(x, var, m);
      const int64_t Hc = var.core_heads(4, 2), off = first * g;
      const Tensor qs = gather_rows(x.q.view, range(off, T));
      const Tensor ks = gather_rows(x.k.view, range(off, T)),
                   vs = gather_rows(x.v.view, range(off, T));
      PoolOut got{alloc(DType::f32, {2, m - first, Hc, 24}),
                  alloc(DType::f32, {2, m - first, Hc, 24})};
      PoolProblem p;
      p.q = qs.view;
      p.q_pos0 = off;
      p.raw = KvSegment{ks.view, vs.view, off};
      p.group_begin = first;
      p.group_end = m;
      p.k_core = got.k_core.view;
      p.v_core = got.v_core.view;
      p.variant = var;
      p.scale = var.scale_for(24);
      p.threads = 2;
      cpu_be().pool(p);
      EXPECT_TRUE(fully_written(got.k_core)) << variant_tag(var);
      EXPECT_TRUE(fully_written(got.v_core)) << variant_tag(var);
      expect_close(got.k_core.view, want.k_core.view.slice(1, first, m - first), kHandF32.max_abs,
                   kHandF32.rel_l2, variant_tag(var) + " k_core");
      expect_close(got.v_core.view, want.v_core.view.slice(1, first, m - first), kHandF32.max_abs,
                   kHandF32.rel_l2, variant_tag(var) + " v_core");
    }
}

// Each tile is computed the same way whichever thread runs it: results are bit-identical.
TEST(CpuBackend, ThreadCountDoesNotChangeBits) {
  Rng rng(seed_of("threads"));
  const Qkv x = make_qkv(2, 333, 4, 2, 64, DType::f32, Layout::contiguous, rng);
  const VariantSpec var = VariantSpec::cca(8, 50);
  const AttnOut one = run_attn(BackendKind::cpu, x.q, x.k, x.v, var, Layout::contiguous, 1);
  const AttnOut three = run_attn(BackendKind::cpu, x.q, x.k, x.v, var, Layout::contiguous, 3);
  EXPECT_EQ(std::memcmp(one.out.mem->data(), three.out.mem->data(), one.out.mem->size() * 4), 0);
  EXPECT_EQ(std::memcmp(one.lse.mem->data(), three.lse.mem->data(), one.lse.mem->size() * 4), 0);
}

// A local segment that misses rows its queries need is rejected before anything is written.
TEST(CpuBackend, MissingRowsRejectedWithoutWriting) {
  Rng rng(seed_of("missing"));
  const Qkv x = make_qkv(1, 80, 2, 2, 16, DType::f32, Layout::contiguous, rng);
  const VariantSpec var = VariantSpec::sliding(30);
  const Tensor kl = gather_rows(x.k.view, range(45, 80)), vl = gather_rows(x.v.view, range(45, 80));
  const Tensor qc = gather_rows(x.q.view, range(60, 80));
  const Tensor out = alloc(DType::f32, {1, 20, 2, 16});
  AttendProblem p;
  p.q = qc.view;
  p.q_pos0 = 60;  // query 60 sees keys 31..60, the segment starts at 45
  p.local = p.sink = KvSegment{kl.view, vl.view, 45};
  p.out = out.view;
  p.variant = var;
  p.scale = var.scale_for(16);
  try {
    cpu_be().attend(p);
    ADD_FAILURE() << "expected cca::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("local segment holds rows [45, 80)"), std::string::npos)
        << e.what();
  }
  EXPECT_TRUE(untouched(out));
}

}  // namespace
}  // namespace cca::test

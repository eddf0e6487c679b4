// The decode cache: contract equivalences 1-3 for every variant (token-by-token decode and
// ragged chunked prefill give the one-shot prefill rows, out and LSE), GQA, both pool_heads,
// every pool, B = 2, float32 and bfloat16; the memory the cache holds after every append; and
// rejected appends that leave the cache unchanged and usable.
#include "test_util.hpp"
#include "tolerance.hpp"

namespace cca::test {
namespace {

constexpr int64_t kB = 2, kT = 45;

struct KvCase {
  VariantSpec variant;
  int64_t Hq, Hkv, D;
  DType dtype;
  BackendKind backend;
  int threads;  // 1 mostly: these problems are tiny (see test_metamorphic.cpp, kThreads)
  std::string name;
};

std::vector<KvCase> make_cases() {
  std::vector<KvCase> cases;
  const int64_t heads[2][2] = {{4, 2}, {8, 2}};
  for (BackendKind be : available_backends())
    for (int hi = 0; hi < 2; ++hi)
      for (DType dt : {DType::f32, DType::bf16}) {
        if (be == BackendKind::cuda && dt == DType::f32) continue;  // cuda: 16-bit inputs only
        // g divides s with Hq/Hkv = 2, not with 4
        const int64_t g = hi == 0 ? 4 : 3, s = hi == 0 ? 8 : 5, D = dt == DType::f32 ? 32 : 64;
        for (const VariantSpec& var : all_variants(g, s)) {
          const int threads = hi == 1 && dt == DType::f32 ? 2 : 1;
          KvCase c{var, heads[hi][0], heads[hi][1], D, dt, be, threads, ""};
          c.name = std::string(backend_name(be)) + "_" + variant_tag(var) + "_Hq" +
                   std::to_string(c.Hq) + "_Hkv" + std::to_string(c.Hkv) + "_D" +
                   std::to_string(D) + "_" + dtype_tag(dt) + "_thr" + std::to_string(threads);
          cases.push_back(c);
        }
      }
  return cases;
}

// j(t) of the contract for cca, 0 otherwise.
int64_t core_visible(const VariantSpec& v, int64_t t) {
  return v.has_core() && t + 1 - v.window > 0 ? (t + 1 - v.window) / v.group : 0;
}

// Raw tokens the contract lets a cache hold after n tokens: the positions the next queries can
// still see raw -- for cca those from j(n-1)*g on, for the windows the sinks plus the last
// `window` positions, for full everything.
int64_t expected_raw(const VariantSpec& v, int64_t n) {
  switch (v.kind) {
    case VariantKind::full:
      return n;
    case VariantKind::sliding:
      return std::min(n, v.window);
    case VariantKind::streaming:
    case VariantKind::lminfinite: {
      const int64_t sinks = std::min(n, v.sinks);
      return sinks + (n - std::max(sinks, n - v.window));
    }
    case VariantKind::cca:
      return n - core_visible(v, n - 1) * v.group;
  }
  return -1;
}

// Checks the cache's size accounting after n tokens.
void expect_memory(const KvCache& cache, const KvCase& c, int64_t n) {
  const VariantSpec& v = c.variant;
  EXPECT_EQ(cache.length(), n);
  const int64_t core = v.has_core() ? n / v.group : 0;
  EXPECT_EQ(cache.core_tokens(), core) << "after " << n << " tokens";
  EXPECT_EQ(cache.raw_tokens(), expected_raw(v, n)) << "after " << n << " tokens";
  switch (v.kind) {  // the contract's bounds, stated separately from the exact count above
    case VariantKind::full:
      break;
    case VariantKind::sliding:
      EXPECT_LE(cache.raw_tokens(), v.window);
      break;
    case VariantKind::streaming:
    case VariantKind::lminfinite:
      EXPECT_LE(cache.raw_tokens(), v.sinks + v.window);
      break;
    case VariantKind::cca:
      EXPECT_LE(cache.raw_tokens(), v.window + v.group - 1);
      break;
  }
  const int64_t Hc = v.core_heads(c.Hq, c.Hkv), row = 2 * kB * c.D * dtype_size(c.dtype);
  EXPECT_EQ(cache.memory_bytes(), row * (core * Hc + expected_raw(v, n) * c.Hkv));
  EXPECT_EQ(cache.full_cache_bytes(), row * n * c.Hkv);
}

// Appends q/k/v rows [pos, pos+n) to the cache; returns the chunk's (out, lse).
AttnOut append(KvCache& cache, BackendKind be, const Qkv& in, int64_t pos, int64_t n,
               Layout out_layout) {
  const TensorView& q = in.q.view;
  AttnOut r{alloc(q.dtype, {q.shape[0], n, q.shape[2], q.shape[3]}, out_layout),
            alloc(DType::f32, {q.shape[0], q.shape[2], n}, out_layout)};
  const Device dev = device_of(be);
  OnDevice dq(with_view(in.q, q.slice(1, pos, n)), dev),
      dk(with_view(in.k, in.k.view.slice(1, pos, n)), dev),
      dv(with_view(in.v, in.v.view.slice(1, pos, n)), dev), dout(r.out, dev), dlse(r.lse, dev);
  cache.append(dq.view(), dk.view(), dv.view(), dout.view(), dlse.view());
  dout.download();
  dlse.download();
  return r;
}

class KvCacheEquivalence : public ::testing::TestWithParam<KvCase> {};

// Feeds the whole sequence through a fresh cache in chunks of the given sizes (cycled), checking
// every chunk's rows against the one-shot prefill and the memory after every append.
void check_schedule(const KvCase& c, const Qkv& in, const AttnOut& prefill,
                    const std::vector<int64_t>& sizes) {
  RunOptions run;
  run.backend = c.backend;
  run.threads = c.threads;
  KvCache cache(c.variant, kB, c.Hq, c.Hkv, c.D, c.dtype, run);
  expect_memory(cache, c, 0);
  const Bound tol = c.backend == BackendKind::cuda ? cross_kernel_tolerance(c.dtype)
                                                   : identity_tolerance(c.dtype);
  int64_t pos = 0;
  for (size_t i = 0; pos < kT; ++i) {
    const int64_t n = std::min(sizes[i % sizes.size()], kT - pos);
    SCOPED_TRACE("chunk [" + std::to_string(pos) + ", " + std::to_string(pos + n) + ")");
    const AttnOut got =
        append(cache, c.backend, in, pos, n, i % 2 ? Layout::padded : Layout::contiguous);
    ASSERT_TRUE(fully_written(got.out));
    ASSERT_TRUE(fully_written(got.lse));
    const std::string cat =
        std::string("cache vs prefill ") + backend_name(c.backend) + " " + dtype_tag(c.dtype);
    expect_close(got.out.view, prefill.out.view.slice(1, pos, n), tol.max_abs, tol.rel_l2, "out",
                 cat + " out");
    expect_close(got.lse.view, prefill.lse.view.slice(2, pos, n), identity_lse_tolerance(c.dtype),
                 1.0, "lse", cat + " lse");
    pos += n;
    expect_memory(cache, c, pos);
    if (::testing::Test::HasFailure()) return;  // one failing chunk says enough
  }
}

// Equivalence 1: token-by-token decode gives row t of the prefill at every step.
TEST_P(KvCacheEquivalence, DecodeEqualsPrefill) {
  const KvCase& c = GetParam();
  Rng rng(seed_of(c.name));
  const Qkv in = make_qkv(kB, kT, c.Hq, c.Hkv, c.D, c.dtype, Layout::packed, rng);
  const AttnOut prefill =
      run_attn(c.backend, in.q, in.k, in.v, c.variant, Layout::contiguous, c.threads);
  check_schedule(c, in, prefill, {1});
}

// Equivalence 2: ragged chunks (small, larger than g, larger than s + g) give the prefill.
TEST_P(KvCacheEquivalence, ChunkedEqualsPrefill) {
  const KvCase& c = GetParam();
  Rng rng(seed_of(c.name));
  const Qkv in = make_qkv(kB, kT, c.Hq, c.Hkv, c.D, c.dtype, Layout::packed, rng);
  const AttnOut prefill =
      run_attn(c.backend, in.q, in.k, in.v, c.variant, Layout::contiguous, c.threads);
  for (const std::vector<int64_t>& sizes :
       {std::vector<int64_t>{1, 3, 7, 2, 11, 5}, {13, 1, 1, 20}, {kT}}) {
    SCOPED_TRACE("chunk sizes starting " + std::to_string(sizes[0]));
    check_schedule(c, in, prefill, sizes);
  }
}

INSTANTIATE_TEST_SUITE_P(Grid, KvCacheEquivalence, ::testing::ValuesIn(make_cases()),
                         [](const ::testing::TestParamInfo<KvCase>& info) {
                           return info.param.name;
                         });

// Long sequences: windows longer than a CPU key block (128), more than 128 core tokens, query
// chunks spanning several CPU query tiles (64), so decode and chunks split keys into blocks
// differently from the prefill.
TEST(KvCache, LongSequenceDecodeAndChunksEqualPrefill) {
  const int64_t T = 700, Hq = 4, Hkv = 2, D = 32;
  const std::vector<VariantSpec> variants = {
      VariantSpec::cca(4, 140), VariantSpec::cca(3, 150, PoolMode::mean, PoolHeads::query),
      VariantSpec::streaming(3, 200), VariantSpec::full()};
  for (BackendKind be : {BackendKind::ref, BackendKind::cpu})
    for (DType dt : {DType::f32, DType::bf16}) {
      if (be == BackendKind::ref && dt == DType::bf16) continue;  // ref: covered by f32
      Rng rng(seed_of("long") + uint64_t(dt));
      const Qkv in = make_qkv(1, T, Hq, Hkv, D, dt, Layout::packed, rng);
      for (const VariantSpec& var : variants)
      for (const bool fixed : {false, true}) {  // growing stores; one fixed allocation
        SCOPED_TRACE(std::string(backend_name(be)) + " " + dtype_name(dt) + " " + var.describe() +
                     (fixed ? " fixed capacity" : ""));
        const AttnOut prefill = run_attn(be, in.q, in.k, in.v, var, Layout::contiguous, 1);
        RunOptions run;
        run.backend = be;
        run.threads = 1;
        KvCache cache(var, 1, Hq, Hkv, D, dt, run,
                      fixed ? KvCacheCapacity{T, 200} : KvCacheCapacity{});
        const Bound tol = identity_tolerance(dt);
        // chunks of 1, 37, 129, 3, 64, 200, ... then token by token
        const int64_t sizes[] = {1, 37, 129, 3, 64, 200, 66, 1, 1, 1};
        int64_t pos = 0;
        for (size_t i = 0; pos < T; ++i) {
          const int64_t n = std::min(i < std::size(sizes) ? sizes[i] : 1, T - pos);
          const AttnOut got = append(cache, be, in, pos, n, Layout::contiguous);
          const std::string cat =
              std::string("cache vs prefill ") + backend_name(be) + " " + dtype_tag(dt);
          expect_close(got.out.view, prefill.out.view.slice(1, pos, n), tol.max_abs, tol.rel_l2,
                       "out rows from " + std::to_string(pos), cat + " out");
          expect_close(got.lse.view, prefill.lse.view.slice(2, pos, n), identity_lse_tolerance(dt),
                       1.0, "lse rows from " + std::to_string(pos), cat + " lse");
          pos += n;
          if (::testing::Test::HasFailure()) return;
        }
        EXPECT_EQ(cache.core_tokens(), var.has_core() ? T / var.group : 0);
      }
    }
}

// Equivalence 3 through the cache: with g = 1 (any s) or s >= T, a cca cache decodes full
// attention.
TEST(KvCache, CcaDegenerateParametersDecodeFullAttention) {
  const int64_t Hq = 4, Hkv = 2, D = 32;
  Rng rng(7);
  const Qkv in = make_qkv(kB, kT, Hq, Hkv, D, DType::f32, Layout::packed, rng);
  for (BackendKind be : {BackendKind::ref, BackendKind::cpu}) {
    const AttnOut full = run_attn(be, in.q, in.k, in.v, VariantSpec::full(), Layout::contiguous, 1);
    for (VariantSpec var : {VariantSpec::cca(1, 3), VariantSpec::cca(5, kT),
                            VariantSpec::cca(4, kT + 2, PoolMode::max, PoolHeads::query)}) {
      SCOPED_TRACE(std::string(backend_name(be)) + " " + var.describe());
      RunOptions run;
      run.backend = be;
      run.threads = 1;
      KvCache cache(var, kB, Hq, Hkv, D, DType::f32, run);
      const Bound tol = identity_tolerance(DType::f32);
      for (int64_t t = 0; t < kT; ++t) {
        const AttnOut got = append(cache, be, in, t, 1, Layout::contiguous);
        expect_close(got.out.view, full.out.view.slice(1, t, 1), tol.max_abs, tol.rel_l2,
                     "out row " + std::to_string(t));
      }
    }
  }
}

// A rejected append throws cca::Error, writes nothing, leaves the cache as it was, and the
// next good append still gives the prefill rows.
TEST(KvCache, RejectedAppendLeavesCacheUnchanged) {
  const int64_t Hq = 4, Hkv = 2, D = 32;
  const VariantSpec var = VariantSpec::cca(4, 8);
  Rng rng(11);
  const Qkv in = make_qkv(kB, kT, Hq, Hkv, D, DType::f32, Layout::contiguous, rng);
  for (BackendKind be : {BackendKind::ref, BackendKind::cpu}) {
    SCOPED_TRACE(backend_name(be));
    const AttnOut prefill = run_attn(be, in.q, in.k, in.v, var, Layout::contiguous, 1);
    RunOptions run;
    run.backend = be;
    run.threads = 1;
    KvCache cache(var, kB, Hq, Hkv, D, DType::f32, run);
    append(cache, be, in, 0, 17, Layout::contiguous);
    const int64_t len = cache.length(), core = cache.core_tokens(), raw = cache.raw_tokens(),
                  bytes = cache.memory_bytes();

    Rng rng2(12);
    const Qkv bf = make_qkv(kB, 3, Hq, Hkv, D, DType::bf16, Layout::contiguous, rng2);
    const Qkv hkv1 = make_qkv(kB, 3, Hq, 1, D, DType::f32, Layout::contiguous, rng2);
    const Qkv d64 = make_qkv(kB, 3, Hq, Hkv, 64, DType::f32, Layout::contiguous, rng2);
    const Qkv b1 = make_qkv(1, 3, Hq, Hkv, D, DType::f32, Layout::contiguous, rng2);
    const Qkv good = {with_view(in.q, in.q.view.slice(1, 17, 3)),
                      with_view(in.k, in.k.view.slice(1, 17, 3)),
                      with_view(in.v, in.v.view.slice(1, 17, 3))};
    const Qkv short_k = {good.q, with_view(in.k, in.k.view.slice(1, 17, 2)), good.v};
    struct Bad {
      const char* what;
      const Qkv* in;
      std::vector<int64_t> out_shape, lse_shape;
      DType out_dtype;
      const char* message;  // a word the error must contain
    };
    const std::vector<Bad> bad = {
        {"bfloat16 into a float32 cache", &bf, {kB, 3, Hq, D}, {kB, Hq, 3}, DType::bf16, "float32"},
        {"Hkv 1 into an Hkv 2 cache", &hkv1, {kB, 3, Hq, D}, {kB, Hq, 3}, DType::f32, "Hkv"},
        {"D 64 into a D 32 cache", &d64, {kB, 3, Hq, 64}, {kB, Hq, 3}, DType::f32, "D"},
        {"B 1 into a B 2 cache", &b1, {1, 3, Hq, D}, {1, Hq, 3}, DType::f32, "B"},
        {"k with fewer tokens than q", &short_k, {kB, 3, Hq, D}, {kB, Hq, 3}, DType::f32, "T"},
        {"out with the wrong token count", &good, {kB, 2, Hq, D}, {kB, Hq, 3}, DType::f32, "out"},
        {"lse with the wrong shape", &good, {kB, 3, Hq, D}, {kB, 3, Hq}, DType::f32, "lse"},
        {"out in another dtype", &good, {kB, 3, Hq, D}, {kB, Hq, 3}, DType::bf16, "dtype"},
    };
    for (const Bad& b : bad) {
      SCOPED_TRACE(b.what);
      const Tensor out = alloc(b.out_dtype, b.out_shape), lse = alloc(DType::f32, b.lse_shape);
      try {
        cache.append(b.in->q.view, b.in->k.view, b.in->v.view, out.view, lse.view);
        ADD_FAILURE() << "no error";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(b.message), std::string::npos)
            << "message '" << e.what() << "' does not name '" << b.message << "'";
      }
      EXPECT_TRUE(untouched(out)) << "out was written";
      EXPECT_TRUE(untouched(lse)) << "lse was written";
      EXPECT_EQ(cache.length(), len);
      EXPECT_EQ(cache.core_tokens(), core);
      EXPECT_EQ(cache.raw_tokens(), raw);
      EXPECT_EQ(cache.memory_bytes(), bytes);
    }
    // Still usable: the rest of the sequence gives the prefill rows.
    const Bound tol = identity_tolerance(DType::f32);
    for (int64_t pos = 17; pos < kT; pos += 4) {
      const int64_t n = std::min<int64_t>(4, kT - pos);
      const AttnOut got = append(cache, be, in, pos, n, Layout::contiguous);
      expect_close(got.out.view, prefill.out.view.slice(1, pos, n), tol.max_abs, tol.rel_l2,
                   "out after the rejected appends");
    }
  }
}

// kv_cache_capacity_bytes is what a fixed-capacity cache allocates (its stores in one
// allocation); with an allocator's granularity, that allocation rounds up to it (the engine's
// memory check and the server's budget).
TEST(KvCache, CapacityBytesAreWhatTheCacheAllocates) {
  RunOptions run;
  run.backend = BackendKind::cpu;
  const KvCacheCapacity cap{1000, 128};
  const int64_t G = int64_t(1) << 16;
  for (const VariantSpec& v : {VariantSpec::cca(16, 64), VariantSpec::full(),
                               VariantSpec::streaming(4, 40), VariantSpec::sliding(40),
                               VariantSpec::cca(16, 64, PoolMode::cca, PoolHeads::query)}) {
    SCOPED_TRACE(v.describe());
    KvCache c(v, 2, 8, 2, 32, DType::f32, run, cap);
    const int64_t exact = kv_cache_capacity_bytes(v, 2, 8, 2, 32, DType::f32, cap);
    EXPECT_EQ(c.allocated_bytes(), exact);
    const int64_t rounded = kv_cache_capacity_bytes(v, 2, 8, 2, 32, DType::f32, cap, G);
    EXPECT_EQ(rounded % G, 0);
    EXPECT_GE(rounded, exact);
    EXPECT_LT(rounded, exact + G);  // one allocation
  }
  // By hand, cca g=16 s=64: rows of 2 x 32 floats (256 bytes) per head; core 1000 / 16 = 62
  // rows x 2 heads, raw 2 (64 + 16 + 128) = 416 rows x 2 heads; keys and values.
  const VariantSpec v = VariantSpec::cca(16, 64);
  EXPECT_EQ(kv_cache_capacity_bytes(v, 2, 8, 2, 32, DType::f32, cap), 2 * (62 + 416) * 2 * 256);
  EXPECT_EQ(kv_cache_capacity_bytes(v, 2, 8, 2, 32, DType::f32, cap, G), 8 * G);
  // Each store starts at a 256-byte boundary: one head of 4 floats, 62 core rows = 992 bytes.
  EXPECT_EQ(kv_cache_capacity_bytes(v, 1, 2, 1, 4, DType::f32, cap), 2 * (1024 + 416 * 16));
}

TEST(KvCache, ConstructorRejectsBadParameters) {
  struct Bad {
    VariantSpec variant;
    int64_t batch, hq, hkv, d;
    const char* message;
  };
  const std::vector<Bad> bad = {
      {VariantSpec::cca(0, 8), 1, 4, 2, 32, "group"},
      {VariantSpec::cca(4, 0), 1, 4, 2, 32, "window"},
      {VariantSpec::sliding(0), 1, 4, 2, 32, "window"},
      {VariantSpec::streaming(-1, 4), 1, 4, 2, 32, "sinks"},
      {VariantSpec::full(), 0, 4, 2, 32, "batch"},
      {VariantSpec::full(), 1, 6, 4, 32, "Hq"},
      {VariantSpec::full(), 1, 4, 2, 0, "D"},
      {VariantSpec::full(), 1, 4, 0, 32, "Hkv"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.message);
    try {
      KvCache cache(b.variant, b.batch, b.hq, b.hkv, b.d, DType::f32);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(b.message), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace cca::test

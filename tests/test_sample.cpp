// ops::sample_rows: greedy, top-k, top-p, temperature and seeds on the CPU (the oracle), the
// frequencies of its draws against softmax, and the GPU op against the CPU op on the same logits
// and counters (same thresholds, same uniform draw).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cca/attention.hpp"
#include "cca/error.hpp"
#include "model/sampler.hpp"
#include "ops/ops.hpp"

namespace cca {
namespace {

// Draws from `logits` (host) with `p` on a context, counters 0..n-1, one row repeated n times.
std::vector<int32_t> draws(const ops::Context& ctx, const std::vector<float>& logits,
                           const ops::SampleParams& p, int n) {
  const int64_t V = int64_t(logits.size());
  std::vector<float> rows;
  for (int i = 0; i < n; ++i) rows.insert(rows.end(), logits.begin(), logits.end());
  std::vector<ops::SampleParams> params(size_t(n), p);
  std::vector<int32_t> counters(static_cast<size_t>(n)), out(static_cast<size_t>(n), -1);
  for (int i = 0; i < n; ++i) counters[size_t(i)] = i;
  void* dl = ctx.alloc(int64_t(rows.size()) * 4, "t");
  void* dp = ctx.alloc(n * int64_t(sizeof(ops::SampleParams)), "t");
  void* dc = ctx.alloc(n * 4, "t");
  void* dout = ctx.alloc(n * 4, "t");
  ctx.upload(dl, rows.data(), int64_t(rows.size()) * 4);
  ctx.upload(dp, params.data(), n * int64_t(sizeof(ops::SampleParams)));
  ctx.upload(dc, counters.data(), n * 4);
  ops::sample_rows(ctx, ops::matrix(dl, DType::f32, n, V, V, ctx.device()),
                   static_cast<const ops::SampleParams*>(dp), static_cast<const int32_t*>(dc),
                   static_cast<int32_t*>(dout));
  ctx.download(out.data(), dout, n * 4);
  for (void* x : {dl, dp, dc, dout}) ctx.free(x);
  return out;
}

ops::SampleParams params(float t, int k, float p, uint64_t seed) {
  ops::SampleParams s;
  s.temperature = t;
  s.top_k = k;
  s.top_p = p;
  s.seed = seed;
  return s;
}

TEST(Sample, GreedyTopKTopPAndSeeds) {
  const ops::Context cpu = ops::Context::cpu(1);
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f, 0.5f};
  for (int32_t x : draws(cpu, logits, params(1, 1, 1, 3), 50)) EXPECT_EQ(x, 1);  // greedy
  for (int32_t x : draws(cpu, logits, params(1, 0, 0.01f, 3), 50)) EXPECT_EQ(x, 1);
  for (int32_t x : draws(cpu, logits, params(1, 2, 1, 3), 400)) EXPECT_TRUE(x == 1 || x == 3);
  // top-p 0.75 keeps 1 and 3 (their mass 0.39 + 0.35 < 0.75, then 4 joins)
  for (int32_t x : draws(cpu, logits, params(1, 0, 0.7f, 3), 400))
    EXPECT_TRUE(x == 1 || x == 3 || x == 4) << x;
  // Same seed and counters, same draws; another seed, other draws.
  EXPECT_EQ(draws(cpu, logits, params(1, 0, 1, 5), 200), draws(cpu, logits, params(1, 0, 1, 5), 200));
  EXPECT_NE(draws(cpu, logits, params(1, 0, 1, 5), 200), draws(cpu, logits, params(1, 0, 1, 6), 200));
  // The frequencies follow softmax(logits / T): p = 1/4, 3/4 at T = 0.5.
  const std::vector<float> two_way = {0.f, float(0.5 * std::log(3.0))};
  const int n = 20000;
  int ones = 0;
  for (int32_t x : draws(cpu, two_way, params(0.5f, 0, 1, 9), n)) ones += x;
  EXPECT_NEAR(double(ones) / n, 0.75, 0.015);
  // The user-facing parameters and their checks.
  model::SamplingParams sp;
  EXPECT_EQ(sp.op_params().top_k, 1);  // greedy
  sp.greedy = false;
  sp.temperature = 0;
  EXPECT_THROW(sp.validate(), Error);
  sp.temperature = 1;
  sp.top_p = 1.5;
  EXPECT_THROW(sp.validate(), Error);
}

// The GPU op draws what the CPU op draws from the same logits and counters (the thresholds are
// exact; only float-against-double sums can move a draw that falls within rounding of a boundary).
TEST(Sample, GpuMatchesCpu) {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  if (!why.empty()) GTEST_SKIP() << "no CUDA GPU: " << why;
  const ops::Context cpu = ops::Context::cpu(1), gpu = ops::Context::cuda();
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.f, 3.f);
  for (int V : {7, 1000, 128256}) {
    std::vector<float> logits(static_cast<size_t>(V));
    for (float& x : logits) x = normal(rng);
    for (const ops::SampleParams& p :
         {params(1, 1, 1, 1), params(0.7f, 0, 1, 2), params(1, 40, 1, 3), params(0.8f, 0, 0.9f, 4),
          params(1.2f, 50, 0.95f, 5)}) {
      const int n = V > 10000 ? 64 : 400;
      const auto a = draws(gpu, logits, p, n), b = draws(cpu, logits, p, n);
      int equal = 0;
      for (int i = 0; i < n; ++i) equal += a[size_t(i)] == b[size_t(i)];
      EXPECT_GE(equal, n - 2) << "V " << V << " top_k " << p.top_k << " top_p " << p.top_p;
      for (int32_t x : a) EXPECT_TRUE(x >= 0 && x < V) << x;
    }
  }
}

}  // namespace
}  // namespace cca

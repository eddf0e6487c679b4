// Batched decode over caches of different lengths (kv_cache_append_batch): each sequence's rows
// equal its own one-shot prefill, on every backend, and bad batches are rejected untouched.
#include "test_util.hpp"
#include "tolerance.hpp"

namespace cca::test {
namespace {

// Row `row` of each sequence's [1, T_s, H, D] view stacked along the batch: [S, 1, H, D].
Tensor stack_sequences(const std::vector<const TensorView*>& seqs, const std::vector<int64_t>& rows) {
  const TensorView& s0 = *seqs.at(0);
  const int64_t S = int64_t(seqs.size()), H = s0.shape[2], D = s0.shape[3];
  Tensor t = alloc(s0.dtype, {S, 1, H, D});
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(t.view.ptr(t.view.offset(s, 0, h)),
                  seqs[size_t(s)]->ptr(seqs[size_t(s)]->offset(0, rows[size_t(s)], h)),
                  size_t(D * dtype_size(s0.dtype)));
  return t;
}

struct BatchCase {
  BackendKind backend;
  DType dtype;
  VariantSpec variant;
  std::string name;
};

std::vector<BatchCase> batch_cases() {
  std::vector<BatchCase> cases;
  for (BackendKind be : available_backends())
    for (DType dt : {DType::f32, DType::bf16}) {
      if (be == BackendKind::cuda && dt == DType::f32) continue;  // cuda: 16-bit inputs only
      for (const VariantSpec& v : {VariantSpec::cca(4, 8), VariantSpec::cca(3, 5, PoolMode::cca,
                                                                            PoolHeads::query),
                                   VariantSpec::streaming(2, 6), VariantSpec::full()})
        cases.push_back({be, dt, v,
                         std::string(backend_name(be)) + "_" + dtype_tag(dt) + "_" + variant_tag(v)});
    }
  return cases;
}

class KvCacheBatch : public ::testing::TestWithParam<BatchCase> {};

// Sequences prefilled to lengths 1, 9, 30 and 57, then decoded together for 6 steps: every
// step's row s equals row (length_s + step) of sequence s's one-shot prefill. With
// device_positions, fixed-capacity caches decode through kv_cache_decode_step (the positions
// read on the device, the appends and pools of all sequences in one launch each: CUDA graphs).
void check_ragged_decode(const BatchCase& c, bool device_positions) {
  const int64_t Hq = 4, Hkv = 2, D = c.backend == BackendKind::cuda ? 64 : 32, steps = 6;
  // (Streaming's two sinks must be full for a device-positioned step.)
  const std::vector<int64_t> lengths = {device_positions ? 3 : 1, 9, 30, 57};
  const int64_t S = int64_t(lengths.size());
  Rng rng(seed_of(c.name));
  const Device dev = device_of(c.backend);
  RunOptions run;
  run.backend = c.backend;
  run.threads = 1;

  std::vector<Qkv> seqs;
  std::vector<AttnOut> prefills;
  std::vector<std::unique_ptr<KvCache>> caches;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t L = lengths[size_t(s)];
    seqs.push_back(make_qkv(1, L + steps, Hq, Hkv, D, c.dtype, Layout::contiguous, rng));
    const Qkv& in = seqs.back();
    prefills.push_back(run_attn(c.backend, in.q, in.k, in.v, c.variant, Layout::contiguous, 1));
    const KvCacheCapacity capacity{device_positions ? 128 : 0, device_positions ? 64 : 0};
    caches.push_back(
        std::make_unique<KvCache>(c.variant, 1, Hq, Hkv, D, c.dtype, run, capacity));
    Tensor out = alloc(c.dtype, {1, L, Hq, D});
    OnDevice dq(with_view(in.q, in.q.view.slice(1, 0, L)), dev),
        dk(with_view(in.k, in.k.view.slice(1, 0, L)), dev),
        dv(with_view(in.v, in.v.view.slice(1, 0, L)), dev), dout(out, dev);
    caches.back()->append(dq.view(), dk.view(), dv.view(), dout.view());
  }
  std::vector<KvCache*> ptrs;
  for (auto& cache : caches) ptrs.push_back(cache.get());
  const Bound tol = c.backend == BackendKind::cuda ? cross_kernel_tolerance(c.dtype)
                                                   : identity_tolerance(c.dtype);
  for (int64_t step = 0; step < steps; ++step) {
    std::vector<int64_t> rows;
    std::vector<const TensorView*> qs, ks, vs;
    for (int64_t s = 0; s < S; ++s) {
      rows.push_back(lengths[size_t(s)] + step);
      qs.push_back(&seqs[size_t(s)].q.view);
      ks.push_back(&seqs[size_t(s)].k.view);
      vs.push_back(&seqs[size_t(s)].v.view);
    }
    const Tensor q = stack_sequences(qs, rows), k = stack_sequences(ks, rows),
                 v = stack_sequences(vs, rows);
    Tensor out = alloc(c.dtype, {S, 1, Hq, D}), lse = alloc(DType::f32, {S, Hq, 1});
    OnDevice dq(q, dev), dk(k, dev), dv(v, dev), dout(out, dev), dlse(lse, dev);
    if (device_positions) {
      for (const KvCache* cache : ptrs) ASSERT_TRUE(cache->next_step_replayable());
      std::vector<int32_t> pos(rows.begin(), rows.end());
      const std::shared_ptr<void> dpos(device_alloc(int64_t(pos.size()) * 4),
                                       [](void* p) { device_free(p); });
      copy_to_device(dpos.get(), pos.data(), int64_t(pos.size()) * 4);
      kv_cache_decode_step(ptrs, dq.view(), dk.view(), dv.view(), dout.view(),
                           static_cast<const int32_t*>(dpos.get()));
      device_synchronize();
    } else {
      kv_cache_append_batch(ptrs, dq.view(), dk.view(), dv.view(), dout.view(), dlse.view());
      dlse.download();
      ASSERT_TRUE(fully_written(lse));
    }
    dout.download();
    ASSERT_TRUE(fully_written(out));
    for (int64_t s = 0; s < S; ++s) {
      SCOPED_TRACE("step " + std::to_string(step) + ", sequence " + std::to_string(s));
      const int64_t t = rows[size_t(s)];
      expect_close(out.view.slice(0, s, 1), prefills[size_t(s)].out.view.slice(1, t, 1),
                   tol.max_abs, tol.rel_l2, "out", "batched decode vs prefill");
      if (!device_positions)
        expect_close(lse.view.slice(0, s, 1), prefills[size_t(s)].lse.view.slice(2, t, 1),
                     identity_lse_tolerance(c.dtype), 1.0, "lse", "batched decode vs prefill");
      EXPECT_EQ(caches[size_t(s)]->length(), t + 1);
    }
    if (::testing::Test::HasFailure()) return;
  }
}

TEST_P(KvCacheBatch, RaggedDecodeEqualsEachPrefill) { check_ragged_decode(GetParam(), false); }

TEST_P(KvCacheBatch, DeviceHeldPositionsEqualEachPrefill) {
  if (GetParam().backend != BackendKind::cuda) GTEST_SKIP() << "device-held positions: cuda only";
  check_ragged_decode(GetParam(), true);
}

INSTANTIATE_TEST_SUITE_P(Grid, KvCacheBatch, ::testing::ValuesIn(batch_cases()),
                         [](const ::testing::TestParamInfo<BatchCase>& info) {
                           return info.param.name;
                         });

// A batch the caches cannot take is rejected before any cache changes.
TEST(KvCacheBatchErrors, RejectedBatchLeavesCachesUnchanged) {
  const int64_t Hq = 4, Hkv = 2, D = 16;
  RunOptions run;
  run.backend = BackendKind::cpu;
  run.threads = 1;
  KvCache a(VariantSpec::cca(4, 8), 1, Hq, Hkv, D, DType::f32, run);
  KvCache b(VariantSpec::cca(4, 8), 1, Hq, Hkv, D, DType::f32, run);
  KvCache other(VariantSpec::cca(4, 16), 1, Hq, Hkv, D, DType::f32, run);
  KvCache wide(VariantSpec::cca(4, 8), 2, Hq, Hkv, D, DType::f32, run);
  Rng rng(7);
  const Qkv in = make_qkv(2, 1, Hq, Hkv, D, DType::f32, Layout::contiguous, rng);
  const Qkv in3 = make_qkv(3, 1, Hq, Hkv, D, DType::f32, Layout::contiguous, rng);
  auto expect_rejected = [&](std::vector<KvCache*> caches, const Qkv& x, const std::string& says) {
    SCOPED_TRACE(says);
    Tensor out = alloc(DType::f32, {x.q.view.shape[0], 1, Hq, D});
    try {
      kv_cache_append_batch(caches, x.q.view, x.k.view, x.v.view, out.view);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
    EXPECT_TRUE(untouched(out));
    EXPECT_EQ(a.length(), 0);
    EXPECT_EQ(b.length(), 0);
  };
  expect_rejected({}, in, "no caches");
  expect_rejected({&a, &a}, in, "appears twice");
  expect_rejected({&a, &other}, in, "differs from cache 0");
  expect_rejected({&a, &wide}, in, "batch 2");
  expect_rejected({&a, nullptr}, in, "null");
  expect_rejected({&a, &b}, in3, "3 rows for 2 caches");
  // And the caches still work afterwards.
  Tensor out = alloc(DType::f32, {2, 1, Hq, D});
  kv_cache_append_batch({&a, &b}, in.q.view, in.k.view, in.v.view, out.view);
  EXPECT_EQ(a.length(), 1);
  EXPECT_EQ(b.length(), 1);
}

}  // namespace
}  // namespace cca::test

// Bad input through the public API: every rejected call throws cca::Error whose message names
// the parameter (and its value where it has one), and leaves every output buffer untouched.
#include <functional>

#include "test_util.hpp"

namespace cca::test {
namespace {

constexpr int64_t kB = 2, kT = 9, kHq = 4, kHkv = 2, kD = 32;

// A valid attn_fwd problem plus spare tensors to swap in; every output-like tensor is poisoned
// before each call and must still be poison after a rejected one.
struct Fixture {
  Rng rng{99};
  Qkv in = make_qkv(kB, kT, kHq, kHkv, kD, DType::f32, Layout::contiguous, rng);
  Tensor out = alloc(DType::f32, {kB, kT, kHq, kD});
  Tensor lse = alloc(DType::f32, {kB, kHq, kT});
  std::vector<Tensor> outputs{out, lse};

  AttnFwdParams params(const VariantSpec& v = VariantSpec::cca(4, 4)) const {
    AttnFwdParams p;
    p.q = in.q.view;
    p.k = in.k.view;
    p.v = in.v.view;
    p.out = out.view;
    p.lse = lse.view;
    p.variant = v;
    p.run.backend = BackendKind::cpu;
    return p;
  }
  // A random input tensor of another shape/dtype.
  TensorView input(DType dt, std::vector<int64_t> shape) {
    Tensor t = alloc(dt, std::move(shape));
    fill_normal(t.view, rng);
    keep.push_back(t);
    return t.view;
  }
  // A poisoned output tensor of another shape/dtype.
  TensorView output(DType dt, std::vector<int64_t> shape) {
    Tensor t = alloc(dt, std::move(shape));
    outputs.push_back(t);
    return t.view;
  }
  std::vector<Tensor> keep;
};

// Expects f() to throw cca::Error mentioning every word of `words`, with no output written.
void expect_rejected(const std::function<void()>& f, const std::vector<Tensor>& outputs,
                     const std::vector<std::string>& words) {
  for (const Tensor& t : outputs) t.poison();
  try {
    f();
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    for (const std::string& w : words)
      EXPECT_NE(std::string(e.what()).find(w), std::string::npos)
          << "message '" << e.what() << "' does not contain '" << w << "'";
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-cca error: " << e.what();
  }
  for (size_t i = 0; i < outputs.size(); ++i)
    EXPECT_TRUE(untouched(outputs[i])) << "output tensor " << i << " was written";
}

struct BadFwd {
  const char* name;
  std::function<void(Fixture&, AttnFwdParams&)> mutate;
  std::vector<std::string> words;
};

TEST(ApiErrors, AttnFwdRejectsBadInput) {
  auto variant = [](VariantSpec v) { return [v](Fixture&, AttnFwdParams& p) { p.variant = v; }; };
  auto scaled = [](double s) { return [s](Fixture&, AttnFwdParams& p) { p.variant.scale = s; }; };
  const std::vector<BadFwd> cases = {
      {"g = 0", variant(VariantSpec::cca(0, 4)), {"group", "0"}},
      {"g = -3", variant(VariantSpec::cca(-3, 4)), {"group", "-3"}},
      {"s = 0", variant(VariantSpec::cca(4, 0)), {"window", "0"}},
      {"sliding window 0", variant(VariantSpec::sliding(0)), {"window", "0"}},
      {"streaming window -2", variant(VariantSpec::streaming(2, -2)), {"window", "-2"}},
      {"streaming sinks -1", variant(VariantSpec::streaming(-1, 4)), {"sinks", "-1"}},
      {"lminfinite sinks -5", variant(VariantSpec::lminfinite(-5, 4)), {"sinks", "-5"}},
      {"scale inf", scaled(INFINITY), {"scale", "inf"}},
      {"scale -1", scaled(-1.0), {"scale", "-1"}},
      {"scale 0", scaled(0.0), {"scale"}},
      {"Hq 3 over Hkv 2",
       [](Fixture& f, AttnFwdParams& p) {
         p.q = f.input(DType::f32, {kB, kT, 3, kD});
         p.out = f.output(DType::f32, {kB, kT, 3, kD});
         p.lse = f.output(DType::f32, {kB, 3, kT});
       },
       {"Hq", "3", "Hkv"}},
      {"k batch 1",
       [](Fixture& f, AttnFwdParams& p) {
         p.k = f.input(DType::f32, {1, kT, kHkv, kD});
       },
       {"batch"}},
      {"v tokens 8",
       [](Fixture& f, AttnFwdParams& p) {
         p.v = f.input(DType::f32, {kB, kT - 1, kHkv, kD});
       },
       {"token count"}},
      {"k head dim 64",
       [](Fixture& f, AttnFwdParams& p) {
         p.k = f.input(DType::f32, {kB, kT, kHkv, 64});
       },
       {"head dim"}},
      {"v heads 1",
       [](Fixture& f, AttnFwdParams& p) {
         p.v = f.input(DType::f32, {kB, kT, 1, kD});
       },
       {"head counts"}},
      {"k bfloat16",
       [](Fixture& f, AttnFwdParams& p) {
         p.k = f.input(DType::bf16, {kB, kT, kHkv, kD});
       },
       {"dtype", "bfloat16"}},
      {"T = 0",
       [](Fixture&, AttnFwdParams& p) {
         for (TensorView* t : {&p.q, &p.k, &p.v, &p.out}) t->shape[1] = 0;
         p.lse.shape[2] = 0;
       },
       {"empty"}},
      {"q 3-d",
       [](Fixture& f, AttnFwdParams& p) {
         p.q = f.input(DType::f32, {kB, kT, kHq * kD});
       },
       {"4 dimensions"}},
      {"q null", [](Fixture&, AttnFwdParams& p) { p.q.data = nullptr; }, {"q", "missing"}},
      {"k last dim strided",
       [](Fixture& f, AttnFwdParams& p) {
         TensorView k = f.input(DType::f32, {kB, kT, kHkv, 2 * kD});
         k.shape[3] = kD;
         k.stride[3] = 2;
         p.k = k;
       },
       {"contiguous"}},
      {"out shape",
       [](Fixture& f, AttnFwdParams& p) {
         p.out = f.output(DType::f32, {kB, kT, kHq, 16});
       },
       {"out"}},
      {"out dtype",
       [](Fixture& f, AttnFwdParams& p) {
         p.out = f.output(DType::f16, {kB, kT, kHq, kD});
       },
       {"out", "dtype"}},
      {"lse shape [B, T, Hq]",
       [](Fixture& f, AttnFwdParams& p) {
         p.lse = f.output(DType::f32, {kB, kT, kHq});
       },
       {"lse"}},
      {"lse dtype",
       [](Fixture& f, AttnFwdParams& p) {
         p.lse = f.output(DType::bf16, {kB, kHq, kT});
       },
       {"lse", "float32"}},
  };
  Fixture f;
  // The unmodified problem is valid (so each rejection below is due to its one change).
  ASSERT_NO_THROW(attn_fwd(f.params()));
  ASSERT_TRUE(fully_written(f.out));
  for (const BadFwd& c : cases) {
    SCOPED_TRACE(c.name);
    AttnFwdParams p = f.params();
    c.mutate(f, p);
    for (BackendKind be : {BackendKind::ref, BackendKind::cpu}) {
      p.run.backend = be;
      expect_rejected([&] { attn_fwd(p); }, f.outputs, c.words);
    }
  }
}

// Asking for the CUDA backend where it cannot run is an error naming it, not a crash.
TEST(ApiErrors, UnavailableCudaBackendIsAnError) {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  if (why.empty()) GTEST_SKIP() << "a CUDA GPU is usable here";
  Fixture f;
  AttnFwdParams p = f.params();
  p.run.backend = BackendKind::cuda;
  expect_rejected([&] { attn_fwd(p); }, f.outputs, {"cuda"});
  RunOptions run;
  run.backend = BackendKind::cuda;
  expect_rejected([&] { KvCache cache(VariantSpec::full(), 1, 4, 2, 32, DType::f32, run); }, {},
                  {"cuda"});
}

// Host tensors given to a device backend, or device tensors to a host backend, are rejected.
TEST(ApiErrors, TensorsOnTheWrongDeviceAreAnError) {
  Fixture f;
  AttnFwdParams p = f.params();
  for (TensorView* t : {&p.q, &p.k, &p.v, &p.out, &p.lse}) t->device = Device::cuda;
  p.run.backend = BackendKind::cpu;
  expect_rejected([&] { attn_fwd(p); }, f.outputs, {"host"});
}

struct BadPool {
  const char* name;
  std::function<void(Fixture&, PoolParams&)> mutate;
  std::vector<std::string> words;
};

TEST(ApiErrors, CcaPoolRejectsBadInput) {
  Fixture f;
  const int64_t m = kT / 4;
  const Tensor k_core = alloc(DType::f32, {kB, m, kHkv, kD});
  const Tensor v_core = alloc(DType::f32, {kB, m, kHkv, kD});
  f.outputs = {k_core, v_core};
  auto params = [&] {
    PoolParams p;
    p.q = f.in.q.view;
    p.k = f.in.k.view;
    p.v = f.in.v.view;
    p.k_core = k_core.view;
    p.v_core = v_core.view;
    p.variant = VariantSpec::cca(4, 4);
    p.run.backend = BackendKind::cpu;
    return p;
  };
  const std::vector<BadPool> cases = {
      {"variant full",
       [](Fixture&, PoolParams& p) { p.variant = VariantSpec::full(); },
       {"cca", "full"}},
      {"g = 0", [](Fixture&, PoolParams& p) { p.variant.group = 0; }, {"group", "0"}},
      {"scale -2", [](Fixture&, PoolParams& p) { p.variant.scale = -2; }, {"scale", "-2"}},
      {"more groups than T / g",
       [](Fixture& f, PoolParams& p) {
         p.k_core = f.output(DType::f32, {kB, kT / 4 + 1, kHkv, kD});
         p.v_core = f.output(DType::f32, {kB, kT / 4 + 1, kHkv, kD});
       },
       {"core"}},
      {"pool_heads query with Hkv core heads",
       [](Fixture&, PoolParams& p) { p.variant.pool_heads = PoolHeads::query; },
       {"core"}},
      {"core dtype",
       [](Fixture& f, PoolParams& p) {
         p.k_core = f.output(DType::bf16, {kB, 2, kHkv, kD});
       },
       {"dtype"}},
      {"q head dim",
       [](Fixture& f, PoolParams& p) {
         p.q = f.input(DType::f32, {kB, kT, kHq, 64});
       },
       {"head dim"}},
      {"Hq 3 over Hkv 2",
       [](Fixture& f, PoolParams& p) {
         p.q = f.input(DType::f32, {kB, kT, 3, kD});
       },
       {"Hq", "3"}},
      {"k_core 3-d",
       [](Fixture& f, PoolParams& p) {
         p.k_core = f.output(DType::f32, {kB, 2, kHkv * kD});
       },
       {"k_core"}},
  };
  ASSERT_NO_THROW(cca_pool(params()));
  ASSERT_TRUE(fully_written(k_core));
  for (const BadPool& c : cases) {
    SCOPED_TRACE(c.name);
    PoolParams p = params();
    c.mutate(f, p);
    for (BackendKind be : {BackendKind::ref, BackendKind::cpu}) {
      p.run.backend = be;
      expect_rejected([&] { cca_pool(p); }, f.outputs, c.words);
    }
  }
}

struct BadBwd {
  const char* name;
  std::function<void(Fixture&, AttnBwdParams&)> mutate;
  std::vector<std::string> words;
};

// attn_bwd: the forward's out and lse are inputs; dq, dk, dv are the outputs that must stay
// untouched.
TEST(ApiErrors, AttnBwdRejectsBadInput) {
  Fixture f;
  const VariantSpec var = VariantSpec::cca(2, 4);
  ASSERT_NO_THROW(attn_fwd(f.params(var)));
  Tensor dout = alloc(DType::f32, {kB, kT, kHq, kD});
  fill_normal(dout.view, f.rng);
  const Qkv grads = alloc_qkv(kB, kT, kHq, kHkv, kD, DType::f32, Layout::contiguous);
  const std::vector<Tensor> outputs = {grads.q, grads.k, grads.v};
  auto params = [&] {
    AttnBwdParams p;
    p.q = f.in.q.view;
    p.k = f.in.k.view;
    p.v = f.in.v.view;
    p.out = f.out.view;
    p.lse = f.lse.view;
    p.dout = dout.view;
    p.dq = grads.q.view;
    p.dk = grads.k.view;
    p.dv = grads.v.view;
    p.variant = var;
    return p;
  };
  const std::vector<BadBwd> cases = {
      {"g = 0", [](Fixture&, AttnBwdParams& p) { p.variant.group = 0; }, {"group", "0"}},
      {"lse missing", [](Fixture&, AttnBwdParams& p) { p.lse = {}; }, {"lse", "missing"}},
      {"lse [B, T, Hq]",
       [](Fixture& f, AttnBwdParams& p) { p.lse = f.input(DType::f32, {kB, kT, kHq}); },
       {"lse", "shape"}},
      {"lse bfloat16",
       [](Fixture& f, AttnBwdParams& p) { p.lse = f.input(DType::bf16, {kB, kHq, kT}); },
       {"lse", "float32"}},
      {"out missing", [](Fixture&, AttnBwdParams& p) { p.out = {}; }, {"out", "missing"}},
      {"out float16",
       [](Fixture& f, AttnBwdParams& p) { p.out = f.input(DType::f16, {kB, kT, kHq, kD}); },
       {"out", "dtype"}},
      {"dout missing", [](Fixture&, AttnBwdParams& p) { p.dout = {}; }, {"dout", "missing"}},
      {"dout T + 1",
       [](Fixture& f, AttnBwdParams& p) { p.dout = f.input(DType::f32, {kB, kT + 1, kHq, kD}); },
       {"dout", "shape"}},
      {"dout bfloat16",
       [](Fixture& f, AttnBwdParams& p) { p.dout = f.input(DType::bf16, {kB, kT, kHq, kD}); },
       {"dout", "dtype", "bfloat16"}},
      {"dq with Hkv heads",
       [](Fixture& f, AttnBwdParams& p) { p.dq = f.output(DType::f32, {kB, kT, kHkv, kD}); },
       {"dq", "shape"}},
      {"dk with Hq heads",
       [](Fixture& f, AttnBwdParams& p) { p.dk = f.output(DType::f32, {kB, kT, kHq, kD}); },
       {"dk", "shape"}},
      {"dv missing", [](Fixture&, AttnBwdParams& p) { p.dv = {}; }, {"dv", "missing"}},
      {"dv 3-d",
       [](Fixture& f, AttnBwdParams& p) { p.dv = f.output(DType::f32, {kB, kT, kHkv * kD}); },
       {"dv", "4 dimensions"}},
      {"dq on the GPU", [](Fixture&, AttnBwdParams& p) { p.dq.device = Device::cuda; },
       {"dq", "device"}},
      {"k bfloat16",
       [](Fixture& f, AttnBwdParams& p) { p.k = f.input(DType::bf16, {kB, kT, kHkv, kD}); },
       {"dtype", "bfloat16"}},
  };
  ASSERT_NO_THROW(attn_bwd(params()));
  for (const Tensor& g : outputs) ASSERT_TRUE(fully_written(g));
  for (const BadBwd& c : cases) {
    SCOPED_TRACE(c.name);
    AttnBwdParams p = params();
    c.mutate(f, p);
    std::vector<Tensor> watched = outputs;
    watched.insert(watched.end(), f.outputs.begin() + 2, f.outputs.end());  // f.output() spares
    for (BackendKind be : {BackendKind::ref, BackendKind::cpu}) {
      p.run.backend = be;
      expect_rejected([&] { attn_bwd(p); }, watched, c.words);
    }
  }
  // Host tensors with the cuda backend: unavailable here, or (with a GPU) in the wrong memory.
  AttnBwdParams p = params();
  p.run.backend = BackendKind::cuda;
  expect_rejected([&] { attn_bwd(p); }, outputs, {"cuda"});
}

TEST(ApiErrors, ParsersNameTheChoices) {
  expect_rejected([] { parse_variant("ccaa"); }, {}, {"ccaa", "sliding", "cca"});
  expect_rejected([] { parse_pool("avg"); }, {}, {"avg", "mean", "max"});
  expect_rejected([] { parse_pool_heads("heads"); }, {}, {"heads", "kv", "query"});
  expect_rejected([] { parse_backend("gpu"); }, {}, {"gpu", "cpu", "cuda"});
  EXPECT_EQ(parse_variant("lminfinite"), VariantKind::lminfinite);
  EXPECT_EQ(parse_pool("max"), PoolMode::max);
  EXPECT_EQ(parse_pool_heads("query"), PoolHeads::query);
  EXPECT_EQ(parse_backend("ref"), BackendKind::ref);
}

}  // namespace
}  // namespace cca::test

// The engine on every device present (the CPU always, a CUDA GPU where one is usable): decode
// token by token and chunked prefill equal a one-shot prefill row by row; a batch of sequences
// of different lengths gives each sequence its single-sequence logits; the GPU model against the
// CPU model (the oracle) on random bfloat16 checkpoints with the head shapes the kernels take
// (Llama with GQA, Mistral, Qwen2 with q/k/v bias and tied embeddings), full and cca; the
// memory check and the no-GPU error.
//
// Tolerances (max |a - b| / max |b| over all logits): on the CPU the paths differ only in
// float32 summation order: 1e-4. On the GPU, activations are bfloat16 (relative rounding
// u = 2^-9 each) and the CPU oracle keeps them in float32: a layer rounds about six activation
// tensors, and on a 2-layer model with random weights the logits' error grows like
// sqrt(rounds) * u * (the logit's scale / its largest value) ~ 3.5 * 2e-3 ~ 0.7%; we allow 3%.
// Between two GPU paths (prefill kernel vs decode kernel, batch vs single GEMM shapes) the
// same bound holds: each is within it of the exact value.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "cca/error.hpp"
#include "model/random_model.hpp"
#include "temp_dir.hpp"
#include "test_model_util.hpp"

namespace cca {
namespace {

using engine::DeviceChoice;

const char* device_name(DeviceChoice d) { return d == DeviceChoice::cuda ? "cuda" : "cpu"; }

std::vector<DeviceChoice> devices() {
  std::vector<DeviceChoice> r = {DeviceChoice::cpu};
  if (backend_unavailable_reason(BackendKind::cuda).empty()) r.push_back(DeviceChoice::cuda);
  return r;
}

double tolerance(DeviceChoice d) { return d == DeviceChoice::cuda ? 3e-2 : 1e-4; }

// Random bfloat16 checkpoints with D = 64, written once per test binary.
const std::string& random_model(const std::string& arch) {
  static test::TempDir dir;
  static std::map<std::string, std::string> made;
  auto it = made.find(arch);
  if (it != made.end()) return it->second;
  model::RandomModelSpec spec;
  spec.config = model::small_llama_config(2, 256, 4, 2, 320, 300, 4096);
  spec.dtype = DType::bf16;
  spec.seed = 11;
  if (arch == "mistral") {
    spec.config.arch = model::Arch::mistral;
    spec.config.num_kv_heads = 1;
    spec.config.rope.type = model::RopeType::linear;
    spec.config.rope.factor = 2.0;
  } else if (arch == "qwen2") {
    spec.config.arch = model::Arch::qwen2;
    spec.config.qkv_bias = true;
    spec.config.tie_word_embeddings = true;
    spec.config.num_kv_heads = 4;
  }
  const std::string d = dir.file(arch);
  model::write_random_model(d, spec);
  return made.emplace(arch, d).first->second;
}

engine::EngineOptions options(DeviceChoice d, const VariantSpec& v, int64_t chunk,
                              int64_t batch = 1) {
  engine::EngineOptions o = test::cpu_options(v, chunk);
  o.device = d;
  o.max_batch = batch;
  return o;
}

model::TokenIds prompt(int64_t n, int seed) {
  model::TokenIds ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = int32_t((i * 37 + seed * 101 + 5) % 300);
  return ids;
}

class EngineOnDevice : public ::testing::TestWithParam<DeviceChoice> {};

// Decode (chunk 1) and chunks of 37 equal one step of all 300 tokens, full and cca (s = 64,
// so the core segment and eviction are exercised).
TEST_P(EngineOnDevice, DecodeAndChunksEqualOneShotPrefill) {
  const DeviceChoice d = GetParam();
  const model::TokenIds ids = prompt(300, 1);
  for (const VariantSpec& v : {VariantSpec::full(), VariantSpec::cca(16, 64)}) {
    engine::Engine one(random_model("llama"), options(d, v, 300));
    const auto want = test::run_logits(one, ids);
    for (int64_t chunk : {1, 37}) {
      engine::Engine e(random_model("llama"), options(d, v, chunk));
      const double rel = test::relative_max_diff(test::run_logits(e, ids), want);
      EXPECT_LE(rel, tolerance(d)) << device_name(d) << " " << v.describe() << " chunk " << chunk;
    }
  }
}

// A batch of sequences at different lengths (5, 70 and 200 tokens): each step of the batch
// (decode steps, then steps mixing decode tokens with a prompt chunk) gives every sequence the
// logits it gets alone.
TEST_P(EngineOnDevice, BatchEqualsEachSequenceAlone) {
  const DeviceChoice d = GetParam();
  const VariantSpec v = VariantSpec::cca(16, 64);
  const std::vector<model::TokenIds> prompts = {prompt(5, 2), prompt(70, 3), prompt(200, 4)};
  const int64_t V = 300;
  engine::Engine batch(random_model("llama"), options(d, v, 64, 3));
  std::vector<std::unique_ptr<engine::Sequence>> seqs;
  for (const auto& p : prompts) {
    seqs.push_back(batch.new_sequence(256));
    test::feed(batch, *seqs.back(), p, [](int64_t, int64_t) {});
  }
  engine::Engine single(random_model("llama"), options(d, v, 64));
  std::vector<std::unique_ptr<engine::Sequence>> alone;
  for (const auto& p : prompts) {
    alone.push_back(single.new_sequence(256));
    test::feed(single, *alone.back(), p, [](int64_t, int64_t) {});
  }
  std::vector<float> lb, ls;
  for (int step = 0; step < 4; ++step) {
    std::vector<engine::Sequence*> ss;
    std::vector<model::TokenIds> toks;
    for (size_t i = 0; i < prompts.size(); ++i) {
      ss.push_back(seqs[i].get());
      toks.push_back({int32_t((step * 13 + int(i) * 7) % 300)});
    }
    // Steps 2 and 3 are mixed, as a server's: two decode tokens, then a 5-token chunk of the
    // last sequence.
    if (step >= 2)
      for (int32_t j = 1; j < 5; ++j) toks.back().push_back(int32_t((step * 31 + j * 11) % 300));
    std::vector<const model::TokenIds*> tp;
    for (const auto& t : toks) tp.push_back(&t);
    batch.step(ss, tp);
    batch.logits(std::vector<int32_t>{0, 1, int32_t(1 + toks.back().size())}, lb);
    for (size_t i = 0; i < prompts.size(); ++i) {
      engine::Sequence* s = alone[i].get();
      const model::TokenIds* t = &toks[i];
      single.step(std::span(&s, 1), std::span(&t, 1));
      single.logits(std::vector<int32_t>{int32_t(t->size() - 1)}, ls);
      const std::vector<float> row(lb.begin() + int64_t(i) * V, lb.begin() + int64_t(i + 1) * V);
      EXPECT_LE(test::relative_max_diff(row, ls), tolerance(d))
          << device_name(d) << " sequence " << i << " step " << step;
      EXPECT_EQ(seqs[i]->length(), alone[i]->length());
    }
  }
}

// generate() of a batch returns, for each prompt, what it returns for that prompt alone
// (greedy; on the CPU exactly).
TEST_P(EngineOnDevice, GenerateBatchMatchesSingles) {
  const DeviceChoice d = GetParam();
  if (d == DeviceChoice::cuda) GTEST_SKIP() << "bf16 GEMMs of different batch sizes may round "
                                               "differently: covered by the logits test";
  const VariantSpec v = VariantSpec::cca(16, 64);
  std::vector<engine::GenerateRequest> reqs(3);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = prompt(int64_t(10 + 60 * i), int(i));
    reqs[i].max_new_tokens = 6 + int64_t(i);
  }
  engine::Engine batch(random_model("qwen2"), options(d, v, 64, 3));
  const auto together = batch.generate(reqs, 0);
  engine::Engine single(random_model("qwen2"), options(d, v, 64));
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto alone = single.generate(std::span(&reqs[i], 1), 0).front();
    EXPECT_EQ(together[i].tokens, alone.tokens) << "sequence " << i;
    EXPECT_EQ(int64_t(together[i].tokens.size()), reqs[i].max_new_tokens);
  }
}

// chosen_logprobs after a choice: the log-softmax of that row's logits at the chosen id, and the
// most likely tokens in order; after decode() the rows are the sequences.
TEST_P(EngineOnDevice, ChosenLogprobsAreTheLogSoftmaxOfTheRow) {
  const DeviceChoice d = GetParam();
  engine::Engine e(random_model("llama"), options(d, VariantSpec::cca(16, 64), 64, 2));
  std::vector<std::unique_ptr<engine::Sequence>> seqs;
  std::vector<engine::Sequence*> ss;
  for (int i = 0; i < 2; ++i) {
    seqs.push_back(e.new_sequence(64));
    test::feed(e, *seqs.back(), prompt(20 + 7 * i, i), [](int64_t, int64_t) {});
    ss.push_back(seqs.back().get());
  }
  const std::vector<model::SamplingParams> greedy(2);
  const std::vector<int32_t> next = e.decode(ss, std::vector<int32_t>{3, 4}, greedy);
  const std::vector<int32_t> rows = {0, 1};
  const auto lp = e.chosen_logprobs(rows, next, 3);
  std::vector<float> lg;
  e.logits(rows, lg);
  const int64_t V = e.config().vocab_size;
  for (int64_t r = 0; r < 2; ++r) {
    const float* row = lg.data() + r * V;
    const double mx = *std::max_element(row, row + V);
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(double(row[v]) - mx);
    const double want = double(row[next[size_t(r)]]) - mx - std::log(z);
    EXPECT_NEAR(lp[size_t(r)].logprob, want, 1e-4) << "row " << r;
    ASSERT_EQ(lp[size_t(r)].top.size(), 3u);
    EXPECT_EQ(lp[size_t(r)].top[0].first, next[size_t(r)]);  // greedy: the argmax
    EXPECT_GE(lp[size_t(r)].top[0].second, lp[size_t(r)].top[1].second);
    EXPECT_GE(lp[size_t(r)].top[1].second, lp[size_t(r)].top[2].second);
  }
  EXPECT_THROW(e.chosen_logprobs(std::vector<int32_t>{2}, std::vector<int32_t>{0}), Error);
}

// The stop rules of generate() and the server.
TEST(EngineStopRules, StopIdsMaxTokensAndTheContext) {
  const engine::StopRules r{{7, 9}, 3, 10};
  EXPECT_STREQ(r.after_token(9, 1), "stop token");
  EXPECT_EQ(r.after_token(5, 2), nullptr);
  EXPECT_STREQ(r.after_token(5, 3), "max new tokens");
  EXPECT_EQ(r.before_step(9), nullptr);
  EXPECT_STREQ(r.before_step(10), "max context");
  EXPECT_EQ(r.capacity(4), 7);    // prompt + max_new_tokens
  EXPECT_EQ(r.capacity(9), 10);   // within the context
  EXPECT_EQ(r.capacity(12), 12);  // a prompt beyond it still fits
  EXPECT_EQ((engine::StopRules{{}, 0, 0}).capacity(5), 6);  // room for one token at least
}

INSTANTIATE_TEST_SUITE_P(Devices, EngineOnDevice, ::testing::ValuesIn(devices()),
                         [](const auto& i) { return std::string(device_name(i.param)); });

// The GPU model against the CPU model on the same bfloat16 weights, every architecture and
// variant.
TEST(EngineGpu, LogitsMatchTheCpuModel) {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  if (!why.empty()) GTEST_SKIP() << "no CUDA GPU: " << why;
  const model::TokenIds ids = prompt(300, 5);
  for (const char* arch : {"llama", "mistral", "qwen2"}) {
    for (const VariantSpec& v :
         {VariantSpec::full(), VariantSpec::cca(16, 64), VariantSpec::sliding(50),
          VariantSpec::streaming(4, 50), VariantSpec::lminfinite(4, 50),
          VariantSpec::cca(8, 40, PoolMode::mean), VariantSpec::cca(8, 40, PoolMode::max),
          VariantSpec::cca(16, 48, PoolMode::cca, PoolHeads::query)}) {
      engine::Engine cpu(random_model(arch), options(DeviceChoice::cpu, v, 128));
      engine::Engine gpu(random_model(arch), options(DeviceChoice::cuda, v, 128));
      const double rel = test::relative_max_diff(test::run_logits(gpu, ids),
                                                 test::run_logits(cpu, ids));
      RecordProperty(std::string(arch) + "_" + variant_name(v.kind), std::to_string(rel));
      EXPECT_LE(rel, tolerance(DeviceChoice::cuda)) << arch << " " << v.describe();
    }
  }
}

// Decode steps replayed from a captured CUDA graph give the logits of eager steps, for every
// cache kind (cca's window slides and moves every few steps with chunk 16, forcing re-captures;
// streaming's sinks fill first), batches of 1 and 3 sequences; greedy and sampled choices made
// inside the graph equal the eager ones.
TEST(EngineGpu, GraphReplayedDecodeMatchesEagerDecode) {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  if (!why.empty()) GTEST_SKIP() << "no CUDA GPU: " << why;
  const std::vector<model::TokenIds> prompts = {prompt(5, 2), prompt(70, 3), prompt(200, 4)};
  for (const VariantSpec& v : {VariantSpec::cca(16, 64), VariantSpec::full(),
                               VariantSpec::streaming(4, 40), VariantSpec::sliding(40)}) {
    for (size_t S : {size_t(1), size_t(3)}) {
      engine::EngineOptions o = options(DeviceChoice::cuda, v, 16, int64_t(S));
      engine::Engine graphs(random_model("llama"), o);
      o.cuda_graphs = false;
      engine::Engine eager(random_model("llama"), o);
      std::vector<std::unique_ptr<engine::Sequence>> sa, sb;
      std::vector<engine::Sequence*> pa, pb;
      for (size_t i = 0; i < S; ++i) {
        sa.push_back(graphs.new_sequence(400));
        sb.push_back(eager.new_sequence(400));
        test::feed(graphs, *sa.back(), prompts[i], [](int64_t, int64_t) {});
        test::feed(eager, *sb.back(), prompts[i], [](int64_t, int64_t) {});
        pa.push_back(sa.back().get());
        pb.push_back(sb.back().get());
      }
      std::vector<float> la, lb;
      std::vector<int32_t> rows;
      for (size_t i = 0; i < S; ++i) rows.push_back(int32_t(i));
      const std::vector<model::SamplingParams> greedy(S);
      std::vector<model::SamplingParams> sampled(S);
      for (size_t i = 0; i < S; ++i) {
        sampled[i].greedy = false;
        sampled[i].temperature = 0.8;
        sampled[i].top_k = 40;
        sampled[i].top_p = 0.9;
        sampled[i].seed = 7 + i;
      }
      int greedy_equal = 0, sampled_equal = 0;
      for (int step = 0; step < 80; ++step) {
        std::vector<int32_t> toks;
        for (size_t i = 0; i < S; ++i) toks.push_back(int32_t((step * 13 + int(i) * 7) % 300));
        const auto& sp = step < 60 ? greedy : sampled;
        const std::vector<int32_t> ia = graphs.decode(pa, toks, sp), ib = eager.decode(pb, toks, sp);
        if (step < 50) {  // the logits of the step, recomputed from its hidden states
          graphs.logits(rows, la);
          eager.logits(rows, lb);
          EXPECT_LE(test::relative_max_diff(la, lb), tolerance(DeviceChoice::cuda))
              << v.describe() << " S " << S << " step " << step;
        } else {
          (step < 60 ? greedy_equal : sampled_equal) += ia == ib;
        }
      }
      for (size_t i = 0; i < S; ++i) EXPECT_EQ(sa[i]->length(), sb[i]->length());
      // Both engines choose on the device from logits within the tolerance: the same tokens
      // but where two candidates are nearly tied.
      EXPECT_GE(greedy_equal, 8) << v.describe() << " S " << S;
      EXPECT_GE(sampled_equal, 16) << v.describe() << " S " << S;
      EXPECT_GT(graphs.graph_replays(), 40) << v.describe() << " S " << S;
      EXPECT_EQ(eager.graph_replays(), 0);
      // One capture for greedy steps, one for sampled ones; window moves add more.
      EXPECT_GE(graphs.graph_captures(), 2) << v.describe() << " S " << S;
      RecordProperty(std::string("captures_") + variant_name(v.kind) + std::to_string(S),
                     std::to_string(graphs.graph_captures()));
    }
  }
}

// --device cuda where no GPU is usable: a clear error before anything loads.
TEST(EngineErrors, NoGpuIsAClearError) {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  if (why.empty()) GTEST_SKIP() << "a GPU is present";
  try {
    engine::Engine e(random_model("llama"), options(DeviceChoice::cuda, VariantSpec::full(), 8));
    ADD_FAILURE() << "ran without a GPU";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("no usable CUDA GPU"), std::string::npos)
        << err.what();
  }
  // auto falls back to the CPU.
  engine::Engine e(random_model("llama"),
                   options(DeviceChoice::automatic, VariantSpec::full(), 8));
  EXPECT_EQ(e.device(), Device::cpu);
}

// A run that cannot fit says so, with the numbers, before loading a weight; a sequence past its
// capacity is refused.
TEST(EngineErrors, MemoryAndCapacityChecks) {
  for (DeviceChoice d : devices()) {
    engine::EngineOptions o = options(d, VariantSpec::full(), 64);
    o.plan_tokens = int64_t(1) << 40;  // a full cache of 10^12 tokens fits nowhere
    try {
      engine::Engine e(random_model("llama"), o);
      ADD_FAILURE() << "a 2^40-token full cache fit on " << device_name(d);
    } catch (const Error& err) {
      const std::string m = err.what();
      EXPECT_NE(m.find("not enough"), std::string::npos) << m;
      EXPECT_NE(m.find("GiB"), std::string::npos) << m;
      EXPECT_NE(m.find("free"), std::string::npos) << m;
    }
    engine::Engine e(random_model("llama"), options(d, VariantSpec::cca(16, 64), 64));
    auto s = e.new_sequence(10);
    if (d == DeviceChoice::cuda) {
      EXPECT_THROW(test::feed(e, *s, prompt(11, 1), [](int64_t, int64_t) {}), Error);
    }
    EXPECT_THROW(e.new_sequence(0), Error);
  }
}

// Issue 13: --chunk 1000000 for a 10-token prompt allocated 2.27 GB. A step never needs more rows
// than the tokens planned: the chunk is cut to the plan, and the buffers with it.
TEST(EngineErrors, HugeChunkIsBoundedByThePlannedTokens) {
  for (DeviceChoice d : devices()) {
    engine::EngineOptions huge = options(d, VariantSpec::full(), 1000000), small = huge;
    huge.plan_tokens = small.plan_tokens = small.chunk = 10;
    engine::Engine e(random_model("llama"), huge), ref(random_model("llama"), small);
    EXPECT_EQ(e.chunk(), 10) << device_name(d);
    EXPECT_EQ(e.memory_plan().activations, ref.memory_plan().activations) << device_name(d);
    EXPECT_EQ(e.memory_plan().caches, ref.memory_plan().caches) << device_name(d);
    auto s = e.new_sequence(10);
    EXPECT_NO_THROW(test::feed(e, *s, prompt(10, 1), [](int64_t, int64_t) {}));
  }
}

// Issue 13: NaN weights gave `nan` perplexity and exit status 0. Non-finite logits are an error.
TEST(EngineErrors, NonFiniteLogitsGiveNoPerplexity) {
  test::TempDir dir;
  model::RandomModelSpec spec;
  spec.config = model::small_llama_config(1, 32, 2, 2, 40, 50, 512);
  spec.weight_std = std::nan("");  // every matrix NaN
  model::write_random_model(dir.file("nan"), spec);
  engine::Engine e(dir.file("nan"), options(DeviceChoice::cpu, VariantSpec::full(), 8));
  try {
    e.perplexity({1, 2, 3, 4, 5, 6}, 0);
    ADD_FAILURE() << "a perplexity from NaN weights";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("the logits at position 0 are not finite"),
              std::string::npos)
        << err.what();
  }
}

}  // namespace
}  // namespace cca

// The model runtime against Hugging Face: float32 logits of the fixture checkpoints (Llama with GQA
// and llama3 rope, Mistral with head_dim != hidden/heads and linear rope, Qwen2 with q/k/v bias
// and tied embeddings; bf16 sharded, f32, f16) for full attention and CCA, greedy continuations,
// perplexity; config parsing; the cache-memory rule; the sampler.
// Parity measure: max |ours - HF| / max |HF| over all logits <= 1e-4.
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <memory>

#include "cca/error.hpp"
#include "model/random_model.hpp"
#include "model/rope.hpp"
#include "model/sampler.hpp"
#include "temp_dir.hpp"
#include "test_model_util.hpp"

namespace cca {
namespace {

using test::ModelFixture;

constexpr double kLogitTolerance = 1e-4;  // relative to the largest |logit|
const char* const kModels[] = {"llama", "mistral", "qwen2"};

// A CPU engine over a fixture (the fixtures are tiny: loading them is cheap).
std::unique_ptr<engine::Engine> fixture_engine(const std::string& name, const VariantSpec& v,
                                               int64_t chunk, int threads = 1) {
  return std::make_unique<engine::Engine>(test::model_fixture_dir(name),
                                          test::cpu_options(v, chunk, threads));
}

// ---- config.json -------------------------------------------------------------------------------

TEST(ModelConfig, ParsesTheFixtureConfigs) {
  const model::ModelConfig l = model::load_model_config(test::model_fixture_dir("llama"));
  EXPECT_EQ(l.arch, model::Arch::llama);
  EXPECT_EQ(l.num_heads, 4);
  EXPECT_EQ(l.num_kv_heads, 2);
  EXPECT_EQ(l.head_dim, 16);
  EXPECT_EQ(l.rope.type, model::RopeType::llama3);
  EXPECT_EQ(l.rope.factor, 8.0);
  EXPECT_EQ(l.rope.original_max_positions, 64);
  EXPECT_FALSE(l.tie_word_embeddings);
  EXPECT_FALSE(l.qkv_bias);
  EXPECT_EQ(l.max_position_embeddings, 256);

  const model::ModelConfig m = model::load_model_config(test::model_fixture_dir("mistral"));
  EXPECT_EQ(m.arch, model::Arch::mistral);
  EXPECT_EQ(m.head_dim, 32);  // explicit, not hidden / heads = 16
  EXPECT_EQ(m.num_kv_heads, 1);
  EXPECT_EQ(m.rope.type, model::RopeType::linear);
  EXPECT_EQ(m.rope.factor, 2.0);
  EXPECT_EQ(m.sliding_window, 0);

  const model::ModelConfig q = model::load_model_config(test::model_fixture_dir("qwen2"));
  EXPECT_EQ(q.arch, model::Arch::qwen2);
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  EXPECT_TRUE(q.tie_word_embeddings);
  EXPECT_EQ(q.rope.type, model::RopeType::standard);
  EXPECT_EQ(q.rope.theta, 1e6);
  EXPECT_DOUBLE_EQ(q.rms_norm_eps, 1e-6);
}

// transformers 4 spelling: rope_theta at the top, rope_scaling with "type" or "rope_type".
TEST(ModelConfig, ParsesLegacyRopeKeys) {
  const std::string base = R"("architectures": ["LlamaForCausalLM"], "vocab_size": 100,
      "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
      "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096,
      "rope_theta": 500000.0, "eos_token_id": [5, 6])";
  auto c = model::parse_model_config(
      "{" + base + R"(, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}})",
      "cfg");
  EXPECT_EQ(c.rope.type, model::RopeType::llama3);
  EXPECT_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.rope.original_max_positions, 8192);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{5, 6}));
  c = model::parse_model_config(
      "{" + base + R"(, "rope_scaling": {"type": "linear", "factor": 4}})", "cfg");
  EXPECT_EQ(c.rope.type, model::RopeType::linear);
  EXPECT_EQ(c.rope.factor, 4.0);
  c = model::parse_model_config("{" + base + R"(, "rope_scaling": null, "attention_bias": true})",
                                "cfg");
  EXPECT_EQ(c.rope.type, model::RopeType::standard);
  EXPECT_TRUE(c.qkv_bias && c.o_bias);
}

void expect_config_error(const std::string& json, const std::string& needle) {
  try {
    model::parse_model_config(json, "config.json");
    ADD_FAILURE() << "accepted: " << json;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not name '" << needle << "'";
  }
}

TEST(ModelConfig, RejectsBadConfigsByName) {
  const std::string sizes = R"("vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
      "num_hidden_layers": 1, "num_attention_heads": 4)";
  expect_config_error(R"({"architectures": ["GPT2LMHeadModel"], )" + sizes + "}",
                      "GPT2LMHeadModel");
  expect_config_error(R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100})",
                      "hidden_size");
  expect_config_error(
      R"({"architectures": ["LlamaForCausalLM"], )" + sizes + R"(, "num_key_value_heads": 3})",
      "num_key_value_heads");
  expect_config_error(R"({"architectures": ["LlamaForCausalLM"], )" + sizes +
                          R"(, "rope_scaling": {"rope_type": "yarn", "factor": 4}})",
                      "yarn");
  expect_config_error(
      R"({"architectures": ["LlamaForCausalLM"], )" + sizes + R"(, "hidden_act": "gelu"})", "gelu");
  expect_config_error(
      R"({"architectures": ["LlamaForCausalLM"], )" + sizes + R"(, "hidden_size": "64"})",
      "hidden_size");
  expect_config_error(R"({"architectures": ["LlamaForCausalLM"], )" + sizes +
                          R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8}})",
                      "low_freq_factor");
  expect_config_error("{not json", "not valid JSON");
}

// python -m cca.finetune records the attention a model was trained with as a "cca" entry.
TEST(ModelConfig, CcaEntryGivesTheAttentionDefaults) {
  const std::string base = R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100,
      "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
      "num_attention_heads": 4)";
  const model::ModelConfig plain = model::parse_model_config(base + "}", "config.json");
  EXPECT_TRUE(plain.attention.empty());
  const model::ModelConfig tuned = model::parse_model_config(
      base + R"(, "cca": {"variant": "cca", "group": 8, "window": 64, "pool": "mean",
      "pool_heads": "query"}})",
      "config.json");
  ASSERT_FALSE(tuned.attention.empty());
  EXPECT_EQ(*tuned.attention.variant, "cca");
  EXPECT_EQ(*tuned.attention.group, 8);
  EXPECT_EQ(*tuned.attention.window, 64);
  EXPECT_FALSE(tuned.attention.sinks.has_value());
  EXPECT_EQ(tuned.attention.describe(),
            "variant=cca group=8 window=64 pool=mean pool_heads=query");
  expect_config_error(base + R"(, "cca": {"group": 8, "windw": 64}})", "windw");
  expect_config_error(base + R"(, "cca": {"variant": "ccaa"}})", "ccaa");
  expect_config_error(base + R"(, "cca": {"pool": "median"}})", "median");
  expect_config_error(base + R"(, "cca": {"group": "8"}})", "group");
  expect_config_error(base + R"(, "cca": [16, 1024]})", "cca");
}

TEST(ModelConfig, GenerationConfigEosIntOrList) {
  auto g = model::parse_generation_config(R"({"eos_token_id": 7, "do_sample": true, "top_p": 0.9})",
                                          "g");
  EXPECT_EQ(g.eos_token_ids, (std::vector<int64_t>{7}));
  EXPECT_TRUE(g.do_sample);
  EXPECT_DOUBLE_EQ(g.top_p, 0.9);
  g = model::parse_generation_config(R"({"eos_token_id": [128001, 128008, 128009]})", "g");
  EXPECT_EQ(g.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_THROW(model::parse_generation_config(R"({"eos_token_id": "x"})", "g"), Error);
  const auto fixture = model::load_generation_config(
      test::model_fixture_dir("qwen2"), model::load_model_config(test::model_fixture_dir("qwen2")));
  EXPECT_EQ(fixture.eos_token_ids, (std::vector<int64_t>{7, 8}));
  EXPECT_EQ(fixture.top_k, 20);
}

// ---- rotary frequencies ------------------------------------------------------------------------

TEST(ModelRope, InverseFrequenciesMatchHuggingFace) {
  for (const char* name : kModels) {
    const model::ModelConfig cfg = model::load_model_config(test::model_fixture_dir(name));
    const model::Rope rope(cfg.rope, cfg.head_dim);
    NpyArray ref = read_npy(test::model_fixture_dir(name) + "/inv_freq.npy");
    ASSERT_EQ(ref.numel(), cfg.head_dim / 2) << name;
    const TensorView v = ref.view();
    for (int64_t i = 0; i < ref.numel(); ++i)
      EXPECT_NEAR(rope.inv_freq()[size_t(i)], v.load(i), 1e-6 * std::fabs(v.load(i)))
          << name << " frequency " << i;
  }
}

// ---- parity with Hugging Face ------------------------------------------------------------------

struct ParityCase {
  const char* model;
  bool cca;
  int64_t chunk;    // 1: token-by-token decode through the caches
  int threads = 1;  // 2: products split by rows (chunks >= 32) or by columns
};

class ModelParity : public ::testing::TestWithParam<ParityCase> {};

TEST_P(ModelParity, LogitsMatchHuggingFace) {
  const ParityCase c = GetParam();
  const ModelFixture f = test::load_model_fixture(c.model);
  auto e = fixture_engine(c.model, c.cca ? f.cca : VariantSpec::full(), c.chunk, c.threads);
  int64_t T = 0, V = 0;
  const std::vector<float> ref =
      test::read_logits(f.dir + (c.cca ? "/logits_cca.npy" : "/logits_full.npy"), &T, &V);
  ASSERT_EQ(T, int64_t(f.prompt.size()));
  ASSERT_EQ(V, e->config().vocab_size);
  const std::vector<float> ours = test::run_logits(*e, f.prompt);
  const double rel = test::relative_max_diff(ours, ref);
  char shown[32];
  std::snprintf(shown, sizeof shown, "%.3g", rel);
  RecordProperty("relative_max_diff", shown);  // in --gtest_output=xml
  EXPECT_LE(rel, kLogitTolerance) << c.model << (c.cca ? " cca" : " full") << " chunk " << c.chunk;
}

std::string parity_name(const ::testing::TestParamInfo<ParityCase>& i) {
  return std::string(i.param.model) + (i.param.cca ? "_cca" : "_full") + "_chunk" +
         std::to_string(i.param.chunk) + "_threads" + std::to_string(i.param.threads);
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, ModelParity,
    ::testing::Values(ParityCase{"llama", false, 256}, ParityCase{"llama", true, 256},
                      ParityCase{"llama", false, 7}, ParityCase{"llama", true, 7},
                      ParityCase{"llama", true, 1}, ParityCase{"mistral", false, 256},
                      ParityCase{"mistral", true, 256}, ParityCase{"mistral", true, 5},
                      ParityCase{"qwen2", false, 256}, ParityCase{"qwen2", true, 256},
                      ParityCase{"qwen2", true, 3}, ParityCase{"llama", true, 40, 2},
                      ParityCase{"mistral", false, 7, 2}),
    parity_name);

// CCA really differs from full attention on these prompts (else the cca parity proves little).
TEST(ModelParityFixtures, CcaDiffersFromFull) {
  for (const char* name : kModels) {
    const std::string dir = test::model_fixture_dir(name);
    int64_t T = 0, V = 0;
    const auto full = test::read_logits(dir + "/logits_full.npy", &T, &V);
    const auto cca = test::read_logits(dir + "/logits_cca.npy", &T, &V);
    EXPECT_GT(test::relative_max_diff(cca, full), 100 * kLogitTolerance) << name;
  }
}

class ModelGreedy : public ::testing::TestWithParam<const char*> {};

TEST_P(ModelGreedy, ContinuationsMatchHuggingFace) {
  const ModelFixture f = test::load_model_fixture(GetParam());
  for (bool cca : {false, true}) {
    auto e = fixture_engine(GetParam(), cca ? f.cca : VariantSpec::full(), 16);
    engine::GenerateRequest req;
    req.prompt = f.prompt;
    req.max_new_tokens = int64_t(f.greedy_full.size());
    const engine::GenerateResult r = e->generate(std::span(&req, 1), 0).front();
    EXPECT_EQ(r.tokens, cca ? f.greedy_cca : f.greedy_full)
        << GetParam() << (cca ? " cca" : " full");
    EXPECT_EQ(r.stop_reason, "max new tokens");
    EXPECT_EQ(r.decode_steps, int64_t(f.greedy_full.size()) - 1);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelGreedy, ::testing::ValuesIn(kModels));

TEST(ModelPerplexity, EqualsTheNllOfTheFixtureLogits) {
  for (const char* name : kModels) {
    const ModelFixture f = test::load_model_fixture(name);
    for (bool cca : {false, true}) {
      int64_t T = 0, V = 0;
      const auto logits =
          test::read_logits(f.dir + (cca ? "/logits_cca.npy" : "/logits_full.npy"), &T, &V);
      const double want = test::mean_nll_from_logits(logits, V, f.prompt);
      const engine::NllResult r =
          fixture_engine(name, cca ? f.cca : VariantSpec::full(), 9)->perplexity(f.prompt, 0);
      EXPECT_EQ(r.tokens, T - 1);
      EXPECT_NEAR(r.mean_nll(), want, 1e-4) << name << (cca ? " cca" : " full");
      EXPECT_NEAR(r.ppl(), std::exp(want), 1e-4 * std::exp(want));
      // The script's own value, computed in PyTorch.
      const double script = f.ref[cca ? "nll_cca" : "nll_full"]["mean_nll"].get<double>();
      EXPECT_NEAR(r.mean_nll(), script, 1e-4) << name;
    }
  }
}

// Windows of --ctx tokens: each runs from empty caches; full attention is causal, so the first
// window's NLL is the fixture's first rows.
TEST(ModelPerplexity, WindowsRestartTheContext) {
  const ModelFixture f = test::load_model_fixture("llama");
  auto e = fixture_engine("llama", VariantSpec::full(), 256);
  const engine::NllResult r = e->perplexity(f.prompt, 16);
  EXPECT_EQ(r.tokens, 15 + 15 + 7);  // windows of 16, 16 and 8 tokens
  const model::TokenIds first(f.prompt.begin(), f.prompt.begin() + 16);
  int64_t T = 0, V = 0;
  const auto logits = test::read_logits(f.dir + "/logits_full.npy", &T, &V);
  const engine::NllResult w = e->perplexity(first, 0);
  EXPECT_NEAR(w.mean_nll(), test::mean_nll_from_logits(logits, V, first), 1e-4);
  EXPECT_THROW(e->perplexity({5}, 0), Error);
}

// ---- cache memory ------------------------------------------------------------------------------

// kv_cache_bytes (what `cca info` prints) agrees with what the caches actually hold.
TEST(ModelKvMemory, FormulaMatchesTheCaches) {
  test::TempDir dir;
  model::RandomModelSpec spec;
  spec.config = model::small_llama_config(2, 32, 4, 2, 48, 64, 4096);
  model::write_random_model(dir.path().string(), spec);
  const VariantSpec variants[] = {
      VariantSpec::full(),           VariantSpec::sliding(10),
      VariantSpec::streaming(3, 10), VariantSpec::lminfinite(4, 9),
      VariantSpec::cca(4, 8),        VariantSpec::cca(5, 3, PoolMode::cca, PoolHeads::query)};
  model::TokenIds ids(157);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t((i * 37) % 64);
  for (const VariantSpec& v : variants) {
    engine::Engine e(dir.path().string(), test::cpu_options(v, 64));
    auto s = e.new_sequence(int64_t(ids.size()));
    int64_t done = 0;
    for (int64_t n : {1, 6, 25, 64, 61}) {
      const model::TokenIds part(ids.begin() + done, ids.begin() + done + n);
      test::feed(e, *s, part, [](int64_t, int64_t) {});
      done += n;
      EXPECT_EQ(s->length(), done);
      EXPECT_EQ(s->kv_bytes(), engine::kv_cache_bytes(e.config(), v, done, 4))
          << v.describe() << " after " << done << " tokens";
    }
  }
  const model::ModelConfig cfg = model::load_model_config(dir.path().string());
  // The cca rule at 128K, g = 16, s = 1024: floor(n/g) + s tokens per kv head.
  const int64_t n = 131072, per_token = 2 * 2 * 2 * 8 * 4;  // layers, k+v, Hkv, D, bytes
  EXPECT_EQ(engine::kv_cache_bytes(cfg, VariantSpec::cca(16, 1024), n, 4),
            (n / 16 + 1024) * per_token);
  EXPECT_EQ(engine::kv_cache_bytes(cfg, VariantSpec::full(), n, 4), n * per_token);
}

// ---- sampling ----------------------------------------------------------------------------------

TEST(ModelRunner, PromptLimitAndTokenIds) {
  const model::ModelConfig cfg = model::load_model_config(test::model_fixture_dir("llama"));
  EXPECT_NO_THROW(engine::check_prompt_length(256, 256, cfg));
  EXPECT_NO_THROW(engine::check_prompt_length(100000, 0, cfg));
  try {
    engine::check_prompt_length(300, 256, cfg);
    ADD_FAILURE();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("300"), std::string::npos) << m;
    EXPECT_NE(m.find("max_position_embeddings"), std::string::npos) << m;
    EXPECT_NE(m.find("--allow-long-prompt"), std::string::npos) << m;
  }
  EXPECT_EQ(engine::parse_token_ids(" 1 2\n30\t4 ", "x", 31), (model::TokenIds{1, 2, 30, 4}));
  EXPECT_THROW(engine::parse_token_ids("1 2 x3", "x", 31), Error);
  EXPECT_THROW(engine::parse_token_ids("1 -2", "x", 31), Error);
  EXPECT_THROW(engine::parse_token_ids("  \n", "x", 31), Error);
  // Ids outside the vocabulary are refused before any weight is read, naming the id.
  try {
    engine::parse_token_ids("1 2 31", "ids.txt", 31);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(),
                 "ids.txt: token 3 is 31, outside the model's vocabulary (vocab_size 31)");
  }
  // A bad token is quoted short, however long it is.
  try {
    engine::parse_token_ids("1 " + std::string(100000, '7') + "x", "ids.txt", 31);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_LT(std::string(e.what()).size(), 200u) << e.what();
  }
  // An id outside the vocabulary is an error, not a read past the embedding.
  auto e = fixture_engine("llama", VariantSpec::full(), 8);
  auto s = e->new_sequence(8);
  const model::TokenIds bad = {3, 512};
  EXPECT_THROW(test::feed(*e, *s, bad, [](int64_t, int64_t) {}), Error);
}

// A random bf16 checkpoint written by the C++ writer loads (converted to float32), and an f32 one
// is used in place from the mapping; both give the same logits up to bf16 rounding of weights.
TEST(ModelWeights, ConvertsOrMapsByDtype) {
  test::TempDir dir;
  model::RandomModelSpec spec;
  spec.config = model::small_llama_config(1, 32, 2, 1, 40, 50, 512);
  spec.config.tie_word_embeddings = true;
  spec.dtype = DType::bf16;
  model::write_random_model(dir.file("bf16"), spec);
  spec.dtype = DType::f32;
  model::write_random_model(dir.file("f32"), spec);
  engine::Engine ea(dir.file("bf16"), test::cpu_options(VariantSpec::full(), 4)),
      eb(dir.file("f32"), test::cpu_options(VariantSpec::full(), 4));
  const model::Model &a = ea.model(), &b = eb.model();
  EXPECT_GT(a.weights().converted_bytes(), 0);
  EXPECT_EQ(a.weights().mapped_bytes(), 0);
  EXPECT_EQ(b.weights().converted_bytes(), 0);
  EXPECT_EQ(b.weights().mapped_bytes(), a.weights().converted_bytes());
  EXPECT_EQ(a.weights().parameter_count(),  // embed, 2 norms, q k v o, mlp, final norm (tied head)
            50 * 32 + 2 * 32 + (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32) + 3 * 40 * 32 + 32);
  const model::TokenIds ids = {1, 7, 9, 44, 3, 2};
  const auto la = test::run_logits(ea, ids);
  const auto lb = test::run_logits(eb, ids);
  EXPECT_LT(test::relative_max_diff(la, lb), 0.05);
  EXPECT_GT(test::relative_max_diff(la, lb), 0.0);  // bf16 rounding did change the weights
}

}  // namespace
}  // namespace cca

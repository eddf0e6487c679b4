// `cca generate`, `cca perplexity` and `cca info` end to end on the fixture models, and their
// error exits (missing files, unsupported architecture, prompt over the position limit,
// truncated checkpoint, unsupported dtype, no tokenizer).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>

#include "model/safetensors.hpp"
#include "temp_dir.hpp"
#include "test_model_util.hpp"
#include "tokenizer/tokenizer.hpp"

namespace cca {
namespace {

namespace fs = std::filesystem;

struct CliRun {
  int status;       // exit status, -1 if it did not exit normally
  std::string out;  // stdout
  std::string err;  // stderr
};

class ModelCli : public ::testing::Test {
 protected:
  CliRun cca(const std::string& args) {
    const std::string err_path = dir_.file("stderr.txt");
    // One thread: ctest runs tests side by side on few cores.
    const std::string cmd = std::string("OMP_NUM_THREADS=1 '") + CCA_CLI_PATH + "' " + args +
                            " 2>'" + err_path + "' </dev/null";
    FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return {-1, "", "popen failed"};
    std::string out;
    std::array<char, 4096> buf;
    size_t n;
    while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
    const int st = ::pclose(p);
    return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out, test::read_file(err_path)};
  }
  // A copy of a fixture model directory that a test may damage.
  std::string copy_model(const std::string& name) {
    const std::string d = dir_.file("copy" + std::to_string(++copies_) + "-" + name);
    fs::copy(test::model_fixture_dir(name), d, fs::copy_options::recursive);
    for (const auto& e : fs::directory_iterator(d))
      fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
    return d;
  }
  std::string ids_file(const std::vector<int32_t>& ids, const std::string& name = "ids.txt") {
    const std::string p = dir_.file(name);
    test::write_file(p, test::ids_text(ids) + "\n");
    return p;
  }
  static void expect_failure(const CliRun& r, std::initializer_list<std::string> needles) {
    EXPECT_EQ(r.status, 1) << r.out << r.err;
    for (const std::string& n : needles)
      EXPECT_NE(r.err.find(n), std::string::npos) << "stderr '" << r.err << "' lacks '" << n << "'";
  }
  test::TempDir dir_;
  int copies_ = 0;
};

TEST_F(ModelCli, GenerateGreedyIdsMatchHuggingFace) {
  const test::ModelFixture f = test::load_model_fixture("llama");
  const std::string ids = ids_file(f.prompt);
  CliRun r = cca("generate --model '" + f.dir + "' --ids '" + ids +
                 "' -n 8 --greedy --ignore-eos --variant full --threads 1");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, test::ids_text(f.greedy_full) + "\n");
  r = cca("generate --model '" + f.dir + "' --ids '" + ids +
          "' -n 8 --greedy --ignore-eos --group 4 --window 8 --stats");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, test::ids_text(f.greedy_cca) + "\n");
  const auto stats = nlohmann::json::parse(r.err.substr(r.err.find('{')));
  EXPECT_EQ(stats["prompt_tokens"], 40);
  EXPECT_EQ(stats["generated"], 8);
  EXPECT_EQ(stats["decode_steps"], 7);
  EXPECT_LT(stats["kv_bytes"].get<int64_t>(), stats["full_kv_bytes"].get<int64_t>());
}

// Stop tokens come from generation_config.json (an int or a list) and end generation after
// being emitted; sampling with a seed is reproducible.
TEST_F(ModelCli, GenerateStopsAtEosAndSamplesReproducibly) {
  const test::ModelFixture f = test::load_model_fixture("llama");
  const std::string d = copy_model("llama");
  const std::string ids = ids_file(f.prompt);
  test::write_file(d + "/generation_config.json",
                   "{\"eos_token_id\": [" + std::to_string(f.greedy_full[2]) + ", 9999]}");
  CliRun r = cca("generate --model '" + d + "' --ids '" + ids + "' -n 8 --greedy --variant full");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, test::ids_text({f.greedy_full[0], f.greedy_full[1], f.greedy_full[2]}) + "\n");
  test::write_file(d + "/generation_config.json",
                   "{\"eos_token_id\": " + std::to_string(f.greedy_full[1]) + "}");
  r = cca("generate --model '" + d + "' --ids '" + ids + "' -n 8 --greedy --variant full");
  EXPECT_EQ(r.out, test::ids_text({f.greedy_full[0], f.greedy_full[1]}) + "\n");

  const std::string sample =
      "generate --model '" + f.dir + "' --ids '" + ids +
      "' -n 12 --ignore-eos --temperature 1.5 --top-k 50 --top-p 0.95 --seed ";
  const CliRun a = cca(sample + "11"), b = cca(sample + "11"), c = cca(sample + "12");
  ASSERT_EQ(a.status, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.out, c.out);
}

// Text in, text out through the model's tokenizer.json: the same ids as the --ids path.
TEST_F(ModelCli, GenerateAndPerplexityWithTheTokenizer) {
  const std::string dir = test::model_fixture_dir("llama");
  const auto tok = tok::Tokenizer::from_file(dir + "/tokenizer.json");
  const std::string prompt = "The quick brown fox";
  const std::vector<int32_t> ids = tok.encode(prompt, true);
  ASSERT_GE(ids.size(), 3u);
  const CliRun by_ids = cca("generate --model '" + dir + "' --ids '" + ids_file(ids) +
                            "' -n 6 --greedy --ignore-eos");
  ASSERT_EQ(by_ids.status, 0) << by_ids.err;
  std::vector<int32_t> gen;
  std::istringstream in(by_ids.out);
  for (int32_t x; in >> x;) gen.push_back(x);
  ASSERT_EQ(gen.size(), 6u);
  const CliRun text =
      cca("generate --model '" + dir + "' --prompt '" + prompt + "' -n 6 --greedy --ignore-eos");
  ASSERT_EQ(text.status, 0) << text.err;
  EXPECT_EQ(text.out, tok.decode(gen, true) + "\n");

  test::write_file(dir_.file("text.txt"), prompt);
  const CliRun p1 =
      cca("perplexity --model '" + dir + "' --text-file '" + dir_.file("text.txt") + "' --json");
  const CliRun p2 =
      cca("perplexity --model '" + dir + "' --ids '" + ids_file(ids, "ids2.txt") + "' --json");
  ASSERT_EQ(p1.status, 0) << p1.err;
  EXPECT_EQ(p1.out, p2.out);
}

TEST_F(ModelCli, PerplexityJsonEqualsTheFixtureNll) {
  for (const char* name : {"llama", "qwen2"}) {
    const test::ModelFixture f = test::load_model_fixture(name);
    int64_t T = 0, V = 0;
    const auto logits = test::read_logits(f.dir + "/logits_cca.npy", &T, &V);
    const double want = test::mean_nll_from_logits(logits, V, f.prompt);
    const CliRun r = cca("perplexity --model '" + f.dir + "' --ids '" + ids_file(f.prompt) +
                         "' --json --group 4 --window 8");
    ASSERT_EQ(r.status, 0) << r.err;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["tokens"], T - 1);
    EXPECT_NEAR(j["mean_nll"].get<double>(), want, 1e-4) << name;
    EXPECT_NEAR(j["ppl"].get<double>(), std::exp(want), 1e-4 * std::exp(want));
  }
  const test::ModelFixture f = test::load_model_fixture("mistral");
  const CliRun r = cca("perplexity --model '" + f.dir + "' --ids '" + ids_file(f.prompt) +
                       "' --variant full --ctx 16");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("37 predicted tokens"), std::string::npos) << r.out;
}

TEST_F(ModelCli, InfoReportsParametersAndCacheMemory) {
  const std::string dir = test::model_fixture_dir("llama");
  CliRun r = cca("info --model '" + dir + "' --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
  EXPECT_EQ(j["parameters"], 139584);  // the total the index.json metadata records
  EXPECT_EQ(j["checkpoint_files"], 3);
  // Per layer and kv head, cca keeps floor(n/g) core tokens and s raw tokens at these n;
  // 2 layers x (k, v) x 2 kv heads x head_dim 16 x 4 bytes per token.
  const int64_t per_token = 2 * 2 * 2 * 16 * 4;
  EXPECT_EQ(j["kv_bytes"]["cca"]["32768"], (32768 / 16 + 1024) * per_token);
  EXPECT_EQ(j["kv_bytes"]["cca"]["131072"], (131072 / 16 + 1024) * per_token);
  EXPECT_EQ(j["kv_bytes"]["full"]["131072"], 131072 * per_token);
  EXPECT_EQ(j["kv_bytes"]["streaming"]["32768"], (4 + 1024) * per_token);
  r = cca("info --model '" + dir + "' --group 32 --window 2048");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("cca(g=32, s=2048"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("139584"), std::string::npos) << r.out;
}

// A checkpoint's "cca" entry (python -m cca.finetune) sets the attention flags' defaults; a flag
// given on the command line wins.
TEST_F(ModelCli, FineTunedCheckpointRunsWithItsOwnAttention) {
  const test::ModelFixture f = test::load_model_fixture("llama");
  const std::string dir = copy_model("llama");
  auto cfg = nlohmann::json::parse(test::read_file(dir + "/config.json"));
  cfg["cca"] = {{"variant", "cca"}, {"group", 4}, {"window", 8}};
  test::write_file(dir + "/config.json", cfg.dump());
  const std::string ids = ids_file(f.prompt);  // longer than g + s, so the variants differ
  ASSERT_GT(f.prompt.size(), 12u);
  auto logits = [&](const std::string& model, const std::string& flags, const std::string& out) {
    const std::string path = dir_.file(out);
    CliRun r = cca("logits --model '" + model + "' --ids '" + ids + "' --out '" + path + "' " +
                   flags);
    EXPECT_EQ(r.status, 0) << r.err;
    return std::make_pair(test::read_file(path), r.err);
  };
  const auto [own, own_err] = logits(dir, "", "own.npy");
  EXPECT_NE(own_err.find("variant=cca group=4 window=8"), std::string::npos) << own_err;
  const auto [flags, flags_err] =
      logits(test::model_fixture_dir("llama"), "--variant cca --group 4 --window 8", "flags.npy");
  EXPECT_EQ(own, flags) << "the entry's defaults must equal the same flags given by hand";
  const auto [full, full_err] = logits(dir, "--variant full", "full.npy");
  EXPECT_NE(own, full) << "--variant on the command line must win over the entry";
  const auto [wide, wide_err] = logits(dir, "--window 1024", "wide.npy");
  EXPECT_NE(own, wide);
  CliRun r = cca("info --model '" + dir + "' --json");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["checkpoint_attention"], "variant=cca group=4 window=8");
  r = cca("info --model '" + dir + "'");
  EXPECT_NE(r.out.find("cca(g=4, s=8"), std::string::npos) << r.out;
}

TEST_F(ModelCli, BadInputExitsWithAClearMessage) {
  const test::ModelFixture f = test::load_model_fixture("llama");
  const std::string ids = ids_file(f.prompt);
  expect_failure(cca("generate --model '" + dir_.file("none") + "' --ids '" + ids + "'"),
                 {"model directory not found"});
  expect_failure(cca("generate --model '" + f.dir + "' --ids '" + dir_.file("no.txt") + "'"),
                 {"--ids", "not found"});

  // The llama fixture allows 256 positions.
  std::vector<int32_t> long_prompt(300, 7);
  const std::string long_ids = ids_file(long_prompt, "long.txt");
  expect_failure(cca("generate --model '" + f.dir + "' --ids '" + long_ids + "' -n 1"),
                 {"300 tokens", "max_position_embeddings", "--allow-long-prompt"});
  expect_failure(cca("perplexity --model '" + f.dir + "' --ids '" + long_ids + "'"),
                 {"--allow-long-prompt"});
  CliRun ok = cca("generate --model '" + f.dir + "' --ids '" + long_ids +
                  "' -n 1 --allow-long-prompt --greedy");
  EXPECT_EQ(ok.status, 0) << ok.err;
  ok = cca("perplexity --model '" + f.dir + "' --ids '" + long_ids + "' --ctx 200");
  EXPECT_EQ(ok.status, 0) << ok.err;  // windows of 200 fit the limit
  expect_failure(cca("generate --model '" + f.dir + "' --ids '" + ids + "' --max-context 20"),
                 {"limit of 20"});

  const std::string arch = copy_model("mistral");
  std::string cfg = test::read_file(arch + "/config.json");
  cfg.replace(cfg.find("MistralForCausalLM"), 18, "MambaForCausalLM");
  test::write_file(arch + "/config.json", cfg);
  expect_failure(cca("info --model '" + arch + "'"), {"unsupported architecture MambaForCausalLM"});

  const std::string trunc = copy_model("qwen2");
  fs::resize_file(trunc + "/model.safetensors", fs::file_size(trunc + "/model.safetensors") - 100);
  expect_failure(cca("generate --model '" + trunc + "' --ids '" + ids + "'"), {"truncated"});

  // A float64 tensor where the model needs a float: named with its dtype.
  const std::string f64 = copy_model("qwen2");
  std::vector<double> norm(64, 1.0);
  std::vector<model::TensorBytes> tensors;
  const model::Checkpoint ck = model::Checkpoint::open(test::model_fixture_dir("qwen2"));
  for (const auto& [name, t] : ck.tensors())
    tensors.push_back({name, model::safetensors_dtype_name(t.dtype), t.shape, t.data, t.nbytes});
  for (auto& t : tensors)
    if (t.name == "model.norm.weight") t = {t.name, "F64", {64}, norm.data(), 64 * 8};
  model::write_safetensors(f64 + "/model.safetensors", tensors);
  expect_failure(cca("info --model '" + f64 + "'"), {"model.norm.weight", "unsupported dtype F64"});

  expect_failure(cca("generate --model '" + test::model_fixture_dir("mistral") + "' --prompt hi"),
                 {"tokenizer.json not found"});
  test::write_file(dir_.file("bad.txt"), "1 2 three");
  expect_failure(cca("perplexity --model '" + f.dir + "' --ids '" + dir_.file("bad.txt") + "'"),
                 {"token 3", "three"});
  expect_failure(cca("generate --model '" + f.dir + "' --ids '" + ids + "' --variant banana"),
                 {"banana"});
  expect_failure(cca("generate --model '" + f.dir + "' --ids '" + ids + "' --group 0"), {"group"});
  test::write_file(dir_.file("oov.txt"), "1 2 600");
  expect_failure(cca("generate --model '" + f.dir + "' --ids '" + dir_.file("oov.txt") + "'"),
                 {"token 3 is 600, outside the model's vocabulary", "vocab_size 512"});
}

// --device cuda where no GPU is usable (CI): a clear error and exit 1 from every model command;
// --device auto runs on the CPU.
TEST_F(ModelCli, DeviceCudaWithoutGpuIsAClearError) {
  if (backend_unavailable_reason(BackendKind::cuda).empty()) GTEST_SKIP() << "a GPU is present";
  const test::ModelFixture f = test::load_model_fixture("llama");
  const std::string ids = ids_file(f.prompt);
  const std::vector<std::string> commands = {
      "generate --ids '" + ids + "' -n 2", "perplexity --ids '" + ids + "'", "info",
      "logits --ids '" + ids + "' --out '" + dir_.file("l.npy") + "'"};
  for (const std::string& cmd : commands) {
    const CliRun r = cca(cmd + " --model '" + f.dir + "' --device cuda");
    expect_failure(r, {"--device cuda", "no usable CUDA GPU"});
    EXPECT_EQ(r.out, "") << cmd;
  }
  EXPECT_FALSE(fs::exists(dir_.file("l.npy")));
  const CliRun r = cca("generate --model '" + f.dir + "' --ids '" + ids + "' -n 2 --greedy");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("cca: cpu ("), std::string::npos) << r.err;  // the summary names it
}

// Batched generation: one prompt per line gives each prompt's single-run continuation.
TEST_F(ModelCli, BatchOfPromptsMatchesSingleRuns) {
  const test::ModelFixture f = test::load_model_fixture("llama");
  const model::TokenIds a(f.prompt.begin(), f.prompt.begin() + 7), b = f.prompt;
  test::write_file(dir_.file("batch.txt"), test::ids_text(a) + "\n\n" + test::ids_text(b) + "\n");
  const std::string flags = " --model '" + f.dir + "' -n 5 --greedy --ignore-eos --device cpu";
  const CliRun both = cca("generate --batch --ids '" + dir_.file("batch.txt") + "'" + flags);
  ASSERT_EQ(both.status, 0) << both.err;
  const CliRun ra = cca("generate --ids '" + ids_file(a, "a.txt") + "'" + flags);
  const CliRun rb = cca("generate --ids '" + ids_file(b, "b.txt") + "'" + flags);
  ASSERT_EQ(ra.status, 0) << ra.err;
  EXPECT_EQ(both.out, "[1] " + ra.out + "[2] " + rb.out);
}

}  // namespace
}  // namespace cca

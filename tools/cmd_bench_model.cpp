// `cca bench model`: prefill and generation speed of the model runtime per attention variant,
// each variant in its own child process (`cca generate --stats`) so that its peak memory
// (getrusage ru_maxrss of the child) is its own. Without --model it writes a random Llama
// checkpoint (default 4 layers, hidden 256) to a temporary directory first.
#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cca/attention.hpp"
#include "cca/error.hpp"
#include "commands.hpp"
#include "flag_limits.hpp"
#include "output_path.hpp"
#include "variant_flags.hpp"
#include "model/random_model.hpp"
#include "model_cli.hpp"

extern char** environ;

namespace cca {
namespace {

namespace fs = std::filesystem;

struct BenchModelArgs : VariantFlags {
  std::string model;       // empty: a random model
  std::string save_model;  // where to write (and keep) the random model
  int64_t layers = 4, hidden = 256, heads = 4, kv_heads = 4, intermediate = 688, vocab = 4096;
  int64_t prompt = 16384, gen = 32, chunk = 0;
  std::vector<std::string> variants = {"full", "cca"};
  int threads = 0;
  std::string device = "auto", dtype = "auto", kv_dtype = "auto";
  int64_t repeat = 3;
  bool json = false;
};

struct ChildResult {
  nlohmann::json stats;
  long max_rss_kib = 0;
};

// Runs `cca generate ...` (this executable) and returns its --stats line and peak RSS.
ChildResult run_child(const std::vector<std::string>& args, const std::string& err_path) {
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(self.c_str()));
  for (const std::string& s : args) argv.push_back(const_cast<char*>(s.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, self.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  check(rc == 0, "cannot start " + self + ": " + std::strerror(rc));
  int status = 0;
  struct rusage ru {};
  check(::wait4(pid, &status, 0, &ru) == pid, "wait4 failed for the benchmark child");
  std::ifstream in(err_path);
  std::string line, last_json, all;
  while (std::getline(in, line)) {
    all += line + "\n";
    if (!line.empty() && line[0] == '{') last_json = line;
  }
  check(WIFEXITED(status) && WEXITSTATUS(status) == 0 && !last_json.empty(),
        "benchmark child failed: " + all);
  return ChildResult{nlohmann::json::parse(last_json), ru.ru_maxrss};
}

void run_bench_model(const BenchModelArgs& a) {
  check(a.prompt >= 1 && a.gen >= 1 && a.repeat >= 1, "--prompt, -n and --repeat must be >= 1");
  check_threads_flag(a.threads);
  if (!a.save_model.empty()) check_new_output_dir({"--save-model", a.save_model});
  char tmpl[] = "/tmp/cca-bench-model-XXXXXX";
  check(::mkdtemp(tmpl) != nullptr, "cannot create a temporary directory");
  const fs::path tmp(tmpl);
  struct Cleanup {
    fs::path p;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{tmp};

  std::string model_dir = a.model;
  int64_t vocab = a.vocab;
  if (model_dir.empty()) {
    model::RandomModelSpec spec;
    spec.config = model::small_llama_config(a.layers, a.hidden, a.heads, a.kv_heads, a.intermediate,
                                            a.vocab, std::max<int64_t>(131072, a.prompt + a.gen));
    // A GPU runs 16-bit weights: the random model is written in bfloat16 where one will run it.
    const bool gpu = a.device == "cuda" ||
                     (a.device == "auto" && backend_unavailable_reason(BackendKind::cuda).empty());
    if (gpu) spec.dtype = DType::bf16;
    model_dir = a.save_model.empty() ? (tmp / "model").string() : a.save_model;
    model::write_random_model(model_dir, spec);
  } else {
    vocab = model::load_model_config(model_dir).vocab_size;
  }
  const std::string ids_path = (tmp / "prompt.ids").string();
  {
    std::mt19937_64 rng(7);
    std::uniform_int_distribution<int64_t> pick(3, vocab - 1);
    std::ofstream out(ids_path);
    for (int64_t i = 0; i < a.prompt; ++i) out << pick(rng) << (i % 32 == 31 ? '\n' : ' ');
    check(out.good(), "cannot write " + ids_path);
  }

  for (const std::string& v : a.variants) a.spec_for(parse_variant(v));  // fail before any run
  // Repeats run the variants interleaved, so drift in machine load hits each alike; the row of a
  // variant reports the median prefill and decode times and the largest peak RSS.
  std::vector<std::vector<nlohmann::json>> runs(a.variants.size());
  for (int64_t rep = 0; rep < a.repeat; ++rep) {
    for (size_t i = 0; i < a.variants.size(); ++i) {
      const std::string& v = a.variants[i];
      const std::vector<std::string> args = {"generate",
                                             "--model",
                                             model_dir,
                                             "--ids",
                                             ids_path,
                                             "-n",
                                             std::to_string(a.gen),
                                             "--greedy",
                                             "--ignore-eos",
                                             "--stats",
                                             "--no-progress",
                                             "--allow-long-prompt",
                                             "--variant",
                                             v,
                                             "--group",
                                             std::to_string(a.group),
                                             "--window",
                                             std::to_string(a.window),
                                             "--sinks",
                                             std::to_string(a.sinks),
                                             "--pool",
                                             a.pool,
                                             "--pool-heads",
                                             a.pool_heads,
                                             "--threads",
                                             std::to_string(a.threads),
                                             "--chunk",
                                             std::to_string(a.chunk),
                                             "--device",
                                             a.device,
                                             "--dtype",
                                             a.dtype,
                                             "--kv-dtype",
                                             a.kv_dtype};
      std::fprintf(stderr, "bench model: %s, run %lld of %lld\n", v.c_str(), (long long)rep + 1,
                   (long long)a.repeat);
      ChildResult r = run_child(args, (tmp / ("stderr-" + v + ".txt")).string());
      r.stats["max_rss_bytes"] = int64_t(r.max_rss_kib) * 1024;
      runs[i].push_back(r.stats);
    }
  }
  auto median = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    const size_t n = x.size();
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
  };
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < a.variants.size(); ++i) {
    std::vector<double> prefill, decode;
    int64_t rss = 0, peak = 0;
    for (const auto& r : runs[i]) {
      prefill.push_back(r["prefill_s"].get<double>());
      decode.push_back(r["decode_s"].get<double>());
      rss = std::max(rss, r["max_rss_bytes"].get<int64_t>());
      peak = std::max(peak, r["peak_memory_bytes"].get<int64_t>());
    }
    const nlohmann::json& first = runs[i][0];
    nlohmann::json row;
    row["name"] = a.variants[i];
    row["variant"] = first["variant"];
    row["prompt_tokens"] = first["prompt_tokens"];
    row["decode_steps"] = first["decode_steps"];
    row["prefill_s"] = median(prefill);
    row["prefill_s_min"] = *std::min_element(prefill.begin(), prefill.end());
    row["prefill_s_all"] = prefill;
    row["device"] = first["device"];
    row["kv_dtype"] = first["kv_dtype"];
    row["ttft_s"] = median(prefill);
    row["itl_s"] = median(decode) / std::max<double>(1, first["decode_steps"].get<double>());
    row["prefill_tok_s"] = first["prompt_tokens"].get<double>() / median(prefill);
    row["decode_tok_s"] = first["decode_steps"].get<double>() / median(decode);
    row["kv_bytes"] = first["kv_bytes"];
    row["max_rss_bytes"] = rss;
    row["peak_memory_bytes"] = peak;  // GPU: device memory in use; CPU: the child's peak RSS
    rows.push_back(row);
    if (!a.json) {
      std::printf(
          "%-44s prefill %6lld tok %7.3f s %9.1f tok/s | decode %4lld steps %7.1f tok/s "
          "(%.2f ms/tok) | kv %10s | peak memory %10s\n",
          row["variant"].get<std::string>().c_str(), (long long)row["prompt_tokens"].get<int64_t>(),
          row["prefill_s"].get<double>(), row["prefill_tok_s"].get<double>(),
          (long long)row["decode_steps"].get<int64_t>(), row["decode_tok_s"].get<double>(),
          1e3 * row["itl_s"].get<double>(), format_bytes(row["kv_bytes"].get<double>()).c_str(),
          format_bytes(double(peak)).c_str());
    }
  }
  // Wall-time medians and fastest runs.
  double full[2] = {0, 0}, cca[2] = {0, 0};
  for (const auto& r : rows) {
    double* d = r["name"] == "full" ? full : r["name"] == "cca" ? cca : nullptr;
    if (!d) continue;
    d[0] = r["prefill_s"].get<double>();
    d[1] = r["prefill_s_min"].get<double>();
  }
  if (a.json) {
    std::printf("%s\n", rows.dump().c_str());
  } else {
    std::printf("(median of %lld runs per variant, interleaved)\n", (long long)a.repeat);
    for (const auto& r : rows) {
      std::printf("  %s prefill s per run:", r["name"].get<std::string>().c_str());
      for (const auto& x : r["prefill_s_all"]) std::printf(" %.3f", x.get<double>());
      std::printf("\n");
    }
    if (full[0] > 0 && cca[0] > 0)
      std::printf("cca prefill speedup over full: %.2fx (medians), %.2fx (fastest runs)\n",
                  full[0] / cca[0], full[1] / cca[1]);
  }
}

}  // namespace

void register_bench_model_command(CLI::App& app) {
  // A subcommand of `cca bench` (cmd_bench.cpp), registered after it; standalone if it is absent.
  CLI::App* bench = nullptr;
  try {
    bench = app.get_subcommand("bench");
  } catch (const CLI::OptionNotFound&) {
    bench = app.add_subcommand("bench", "Benchmarks");
    bench->require_subcommand(1);
  }
  auto a = std::make_shared<BenchModelArgs>();
  CLI::App* cmd = bench->add_subcommand(
      "model", "Model runtime prefill/decode speed and peak memory per attention variant");
  cmd->add_option("--model", a->model,
                  "model directory (default: a random Llama of the sizes below)");
  cmd->add_option("--save-model", a->save_model,
                  "write the random model to this directory and keep it")
      ->excludes(cmd->get_option("--model"));
  cmd->add_option("--layers", a->layers, "random model: layers")->capture_default_str();
  cmd->add_option("--hidden", a->hidden, "random model: hidden size")->capture_default_str();
  cmd->add_option("--heads", a->heads, "random model: attention heads")->capture_default_str();
  cmd->add_option("--kv-heads", a->kv_heads, "random model: kv heads")->capture_default_str();
  cmd->add_option("--intermediate", a->intermediate, "random model: MLP size")
      ->capture_default_str();
  cmd->add_option("--vocab", a->vocab, "random model: vocabulary")->capture_default_str();
  cmd->add_option("--prompt", a->prompt, "prompt tokens")->capture_default_str();
  cmd->add_option("-n,--gen", a->gen, "tokens to generate")->capture_default_str();
  cmd->add_option("--chunk", a->chunk, "prefill chunk (0 = the device's default)")
      ->capture_default_str();
  cmd->add_option("--variants", a->variants, "attention variants to run")
      ->delimiter(',')
      ->capture_default_str();
  add_variant_flags(cmd, *a, /*with_variant=*/false);
  cmd->add_option("--threads", a->threads, "CPU threads (0 = all)")->capture_default_str();
  cmd->add_option("--device", a->device, "cpu, cuda, or auto")->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "GPU weights dtype (auto, bfloat16, float16)")
      ->capture_default_str();
  cmd->add_option("--kv-dtype", a->kv_dtype, "KV cache dtype (auto, float32, float16, bfloat16)")
      ->capture_default_str();
  cmd->add_option("--repeat", a->repeat, "runs per variant (median reported)")
      ->capture_default_str();
  cmd->add_flag("--json", a->json, "print the rows as one JSON array");
  cmd->callback([a] { run_bench_model(*a); });
}

}  // namespace cca

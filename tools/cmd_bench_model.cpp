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
  std::vector<int64_t> prompts = {16384};
  int64_t gen = 32, chunk = 0, batch = 1;
  std::vector<std::string> variants = {"full", "cca"};
  int threads = 0;
  std::string device = "auto", dtype = "auto", kv_dtype = "auto";
  int64_t repeat = 3;
  bool json = false, profile = false;
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

// The breakdown of a profiled run: per region, the milliseconds of the prefill (and its share of
// that run's prefill time) and of one decode step.
void print_profile(const nlohmann::json& profile) {
  const double prefill_s = profile["prefill_s"].get<double>();
  std::printf("    %-14s %12s %7s %14s\n", "region", "prefill ms", "share", "decode ms/step");
  const nlohmann::json& pre = profile["prefill"];
  const nlohmann::json& dec = profile["decode"];
  double steps = 0;
  for (const auto& r : dec)
    if (r["region"] == "sample") steps = r["calls"].get<double>();
  auto find = [](const nlohmann::json& rows, const std::string& name) {
    for (const auto& r : rows)
      if (r["region"] == name) return r["ms"].get<double>();
    return 0.0;
  };
  std::vector<std::string> names;
  for (const auto* rows : {&pre, &dec})
    for (const auto& r : *rows)
      if (std::find(names.begin(), names.end(), r["region"].get<std::string>()) == names.end())
        names.push_back(r["region"].get<std::string>());
  for (const std::string& n : names) {
    const double p = find(pre, n), d = find(dec, n);
    std::printf("    %-14s %12.2f %6.1f%% %14.4f\n", n.c_str(), p, 100.0 * p / (1e3 * prefill_s),
                steps > 0 ? d / steps : 0.0);
  }
}

void run_bench_model(const BenchModelArgs& a) {
  check(!a.prompts.empty() && a.gen >= 1 && a.repeat >= 1 && a.batch >= 1,
        "--prompt, -n, --batch and --repeat must be >= 1");
  for (int64_t p : a.prompts) check(p >= 1, "--prompt lengths must be >= 1, got " + std::to_string(p));
  const int64_t longest = *std::max_element(a.prompts.begin(), a.prompts.end());
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
                                            a.vocab, std::max<int64_t>(131072, longest + a.gen));
    // A GPU runs 16-bit weights: the random model is written in bfloat16 where one will run it.
    const bool gpu = a.device == "cuda" ||
                     (a.device == "auto" && backend_unavailable_reason(BackendKind::cuda).empty());
    if (gpu) spec.dtype = DType::bf16;
    model_dir = a.save_model.empty() ? (tmp / "model").string() : a.save_model;
    model::write_random_model(model_dir, spec);
  } else {
    vocab = model::load_model_config(model_dir).vocab_size;
  }
  // One prompt file per length: `batch` lines of random ids (each its own sequence).
  auto write_prompt = [&](int64_t len) {
    const std::string path = (tmp / ("prompt-" + std::to_string(len) + ".ids")).string();
    std::mt19937_64 rng(7);
    std::uniform_int_distribution<int64_t> pick(3, vocab - 1);
    std::ofstream out(path);
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t i = 0; i < len; ++i) out << pick(rng) << (i + 1 == len ? '\n' : ' ');
    check(out.good(), "cannot write " + path);
    return path;
  };

  for (const std::string& v : a.variants) a.spec_for(parse_variant(v));  // fail before any run
  auto median = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    const size_t n = x.size();
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
  };
  nlohmann::json rows = nlohmann::json::array();
  for (int64_t prompt : a.prompts) {
    const std::string ids_path = write_prompt(prompt);
    // Repeats run the variants interleaved, so drift in machine load hits each alike; the row of
    // a variant reports the median prefill and decode times and the largest peak memory.
    auto child_args = [&](const std::string& v, bool profile) {
      std::vector<std::string> args = {
          "generate",   "--model",        model_dir,     "--ids",      ids_path,
          "-n",         std::to_string(a.gen),           "--greedy",   "--ignore-eos",
          "--stats",    "--no-progress",  "--allow-long-prompt",       "--variant",
          v,            "--group",        std::to_string(a.group),     "--window",
          std::to_string(a.window),       "--sinks",     std::to_string(a.sinks),
          "--pool",     a.pool,           "--pool-heads", a.pool_heads, "--threads",
          std::to_string(a.threads),      "--chunk",     std::to_string(a.chunk),
          "--device",   a.device,         "--dtype",     a.dtype,      "--kv-dtype",
          a.kv_dtype};
      if (a.batch > 1) args.push_back("--batch");
      if (profile) args.push_back("--profile");
      return args;
    };
    std::vector<std::vector<nlohmann::json>> runs(a.variants.size());
    for (int64_t rep = 0; rep < a.repeat; ++rep) {
      for (size_t i = 0; i < a.variants.size(); ++i) {
        const std::string& v = a.variants[i];
        std::fprintf(stderr, "bench model: %s, prompt %lld x %lld, run %lld of %lld\n", v.c_str(),
                     (long long)prompt, (long long)a.batch, (long long)rep + 1,
                     (long long)a.repeat);
        ChildResult r = run_child(child_args(v, false), (tmp / ("stderr-" + v + ".txt")).string());
        r.stats["max_rss_bytes"] = int64_t(r.max_rss_kib) * 1024;
        runs[i].push_back(r.stats);
      }
    }
    // The breakdown comes from one more run of each variant with --profile, apart from the timed
    // runs (profiling slows a run down).
    std::vector<nlohmann::json> profiles(a.variants.size());
    if (a.profile)
      for (size_t i = 0; i < a.variants.size(); ++i) {
        std::fprintf(stderr, "bench model: %s, prompt %lld x %lld, profiled run\n",
                     a.variants[i].c_str(), (long long)prompt, (long long)a.batch);
        const ChildResult r = run_child(child_args(a.variants[i], true),
                                        (tmp / ("stderr-" + a.variants[i] + ".txt")).string());
        profiles[i] = r.stats["profile"];
        profiles[i]["prefill_s"] = r.stats["prefill_s"];
        profiles[i]["decode_s"] = r.stats["decode_s"];
      }
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
      const double steps = std::max<double>(1, first["decode_steps"].get<double>());
      nlohmann::json row;
      row["name"] = a.variants[i];
      row["variant"] = first["variant"];
      row["device"] = first["device"];
      row["dtype"] = first["dtype"];
      row["kv_dtype"] = first["kv_dtype"];
      row["batch"] = a.batch;
      row["prompt_tokens"] = prompt;  // per sequence
      row["decode_steps"] = first["decode_steps"];
      row["prefill_s"] = median(prefill);  // all `batch` prompts
      row["prefill_s_min"] = *std::min_element(prefill.begin(), prefill.end());
      row["prefill_s_all"] = prefill;
      row["ttft_s"] = median(prefill);
      row["prefill_tok_s"] = double(prompt * a.batch) / median(prefill);
      row["itl_s"] = median(decode) / steps;  // one step: a token for each sequence
      row["decode_tok_s"] = double(a.batch) * steps / median(decode);
      row["kv_bytes"] = first["kv_bytes"];
      row["full_kv_bytes"] = first["full_kv_bytes"];
      row["graph_replays"] = first["graph_replays"];
      row["max_rss_bytes"] = rss;
      row["peak_memory_bytes"] = peak;  // GPU: device memory in use; CPU: the child's peak RSS
      if (a.profile) row["profile"] = profiles[i];
      rows.push_back(row);
      if (!a.json) {
        std::printf(
            "%-44s prefill %7lld x %lld tok %8.3f s %9.1f tok/s | decode %4lld steps %8.1f tok/s "
            "(%.2f ms/step) | kv %10s | peak memory %10s\n",
            row["variant"].get<std::string>().c_str(), (long long)prompt, (long long)a.batch,
            row["prefill_s"].get<double>(), row["prefill_tok_s"].get<double>(),
            (long long)row["decode_steps"].get<int64_t>(), row["decode_tok_s"].get<double>(),
            1e3 * row["itl_s"].get<double>(),
            format_bytes(row["kv_bytes"].get<double>()).c_str(),
            format_bytes(double(peak)).c_str());
        if (a.profile) print_profile(row["profile"]);
      }
    }
  }
  if (a.json) {
    std::printf("%s\n", rows.dump().c_str());
    return;
  }
  std::printf("(median of %lld runs per variant, interleaved)\n", (long long)a.repeat);
  for (const auto& r : rows) {
    std::printf("  %s %lld: prefill s per run:", r["name"].get<std::string>().c_str(),
                (long long)r["prompt_tokens"].get<int64_t>());
    for (const auto& x : r["prefill_s_all"]) std::printf(" %.3f", x.get<double>());
    std::printf("\n");
  }
  for (int64_t prompt : a.prompts) {
    const nlohmann::json *full = nullptr, *cca = nullptr;
    for (const auto& r : rows) {
      if (r["prompt_tokens"].get<int64_t>() != prompt) continue;
      if (r["name"] == "full") full = &r;
      if (r["name"] == "cca") cca = &r;
    }
    if (full && cca)
      std::printf("cca prefill speedup over full at %lld: %.2fx (medians), %.2fx (fastest runs)\n",
                  (long long)prompt,
                  (*full)["prefill_s"].get<double>() / (*cca)["prefill_s"].get<double>(),
                  (*full)["prefill_s_min"].get<double>() / (*cca)["prefill_s_min"].get<double>());
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
  cmd->add_option("--prompt", a->prompts, "prompt tokens per sequence (a list runs each length)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--batch", a->batch, "sequences prefilled, then decoded together")
      ->capture_default_str();
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
  cmd->add_flag("--profile", a->profile,
                "also time each kind of op in the prefill and decode (generate --profile; a "
                "separate breakdown, slower than the timed runs' figures)");
  cmd->callback([a] { run_bench_model(*a); });
}

}  // namespace cca

// `cca info`: what a model directory holds (architecture, parameters, checkpoint dtypes) and the
// KV cache each attention variant needs at 32K and 128K tokens, computed from the cache rules.
// Reads only the headers of the checkpoint: no weights are converted. `cca info --system`: the
// CPU, the SIMD targets compiled in and the one the CPU code runs, the CUDA backend.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>

#include "cca/attention.hpp"
#include "cca/error.hpp"
#include "commands.hpp"
#include "cpu/cpu_simd.hpp"
#include "engine/engine.hpp"
#include "model/safetensors.hpp"
#include "model/weights.hpp"
#include "model_cli.hpp"

namespace cca {
namespace {

struct InfoArgs {
  ModelRunFlags run;
  bool json = false;
  bool system = false;
};

// The CPU's model name (/proc/cpuinfo's first "model name"), or "unknown".
std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  return "unknown";
}

void run_system(bool json) {
  const std::string target = cpu::simd_target();  // applies CCA_CPU_TARGET (throws if bad)
  const char* env = std::getenv("CCA_CPU_TARGET");
  std::vector<std::string> compiled, supported;
  for (const cpu::SimdTarget& t : cpu::simd_targets()) {
    compiled.push_back(t.name);
    if (t.supported) supported.push_back(t.name);
  }
  const std::string cuda = backend_unavailable_reason(BackendKind::cuda);
  const unsigned cpus = std::thread::hardware_concurrency();
  if (json) {
    nlohmann::json j;
    j["cpu"] = cpu_model();
    j["logical_cpus"] = cpus;
    j["simd_target"] = target;
    j["simd_targets_compiled"] = compiled;
    j["simd_targets_supported"] = supported;
    j["cca_cpu_target"] = env && *env ? nlohmann::json(env) : nlohmann::json();
    j["cuda"] = cuda.empty() ? "available" : cuda;
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
  };
  std::printf("cpu:          %s, %u logical CPUs\n", cpu_model().c_str(), cpus);
  std::printf(
      "simd target:  %s (%s)\n", target.c_str(),
      env && *env ? (std::string("CCA_CPU_TARGET=") + env).c_str() : "the best this CPU runs");
  std::printf("compiled:     %s\n", join(compiled).c_str());
  std::printf("cpu runs:     %s\n", join(supported).c_str());
  std::printf("cuda:         %s\n", cuda.empty() ? "available" : cuda.c_str());
}

constexpr int64_t kLengths[] = {32768, 131072};

void run_info(const InfoArgs& a) {
  if (a.system) return run_system(a.json);
  if (a.run.model.empty()) throw CLI::RequiredError("--model");
  const model::ModelConfig cfg = model::load_model_config(a.run.model);
  const model::Checkpoint ck = model::Checkpoint::open(a.run.model);
  const ModelRunFlags run = a.run.for_model(cfg);
  model::check_tensors(ck, cfg);
  // What a run with these flags would use here (nothing is loaded).
  const engine::DevicePlan plan = engine::plan_device(run.engine_options(0), cfg, ck);
  const char* device = plan.device == Device::cuda ? "cuda" : "cpu";
  const int64_t kCacheElemBytes = dtype_size(plan.kv_dtype);
  const model::GenerationConfig gen = model::load_generation_config(a.run.model, cfg);

  int64_t params = 0;
  for (const auto& e : model::expected_tensors(cfg)) params += ck.find(e.name)->numel();
  std::map<std::string, int64_t> dtype_counts;
  for (const auto& [name, t] : ck.tensors()) ++dtype_counts[dtype_name(t.dtype)];
  std::string dtypes;
  for (const auto& [d, n] : dtype_counts) dtypes += (dtypes.empty() ? "" : ", ") + d;
  std::error_code ec;
  const bool has_tok =
      std::filesystem::is_regular_file(std::filesystem::path(a.run.model) / "tokenizer.json", ec);

  std::vector<VariantSpec> variants;
  for (VariantKind k : {VariantKind::full, VariantKind::sliding, VariantKind::streaming,
                        VariantKind::lminfinite, VariantKind::cca})
    variants.push_back(run.spec_for(k));

  if (a.json) {
    nlohmann::json j;
    j["model"] = a.run.model;
    j["architecture"] = model::arch_name(cfg.arch);
    j["layers"] = cfg.num_layers;
    j["hidden_size"] = cfg.hidden_size;
    j["num_heads"] = cfg.num_heads;
    j["num_kv_heads"] = cfg.num_kv_heads;
    j["head_dim"] = cfg.head_dim;
    j["vocab_size"] = cfg.vocab_size;
    j["max_position_embeddings"] = cfg.max_position_embeddings;
    j["parameters"] = params;
    j["checkpoint_files"] = ck.files().size();
    j["checkpoint_bytes"] = ck.total_bytes();
    j["weights_f32_bytes"] = params * 4;
    j["device"] = device;
    j["dtype"] = dtype_name(plan.dtype);
    j["kv_dtype"] = dtype_name(plan.kv_dtype);
    j["weights_bytes"] = params * dtype_size(plan.dtype);
    j["tokenizer"] = has_tok;
    j["eos_token_ids"] = gen.eos_token_ids;
    j["checkpoint_attention"] = cfg.attention.describe();  // config.json's "cca" entry
    for (const VariantSpec& v : variants)
      for (int64_t n : kLengths)
        j["kv_bytes"][variant_name(v.kind)][std::to_string(n)] =
            engine::kv_cache_bytes(cfg, v, n, kCacheElemBytes);
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("model:        %s\n", a.run.model.c_str());
  std::printf("architecture: %s\n", cfg.describe().c_str());
  const double p = double(params);
  std::printf("parameters:   %lld (%.*f %s)\n", (long long)params, p >= 1e9 ? 2 : 1,
              p >= 1e9   ? p / 1e9
              : p >= 1e6 ? p / 1e6
                         : p / 1e3,
              p >= 1e9   ? "B"
              : p >= 1e6 ? "M"
                         : "K");
  std::printf("checkpoint:   %zu file(s), %zu tensors, %s, %s\n", ck.files().size(),
              ck.tensors().size(), dtypes.c_str(), format_bytes(double(ck.total_bytes())).c_str());
  std::printf("run:          on %s, weights %s (%s), KV cache %s\n", device, dtype_name(plan.dtype),
              format_bytes(double(params * dtype_size(plan.dtype))).c_str(),
              dtype_name(plan.kv_dtype));
  if (!plan.note.empty()) std::printf("              (%s)\n", plan.note.c_str());
  std::printf("tokenizer:    %s\n", has_tok ? "tokenizer.json" : "none (use --ids)");
  if (!cfg.attention.empty())
    std::printf("attention:    fine-tuned with %s (config.json \"cca\"; the flags' defaults)\n",
                cfg.attention.describe().c_str());
  std::string eos;
  for (int64_t id : gen.eos_token_ids) eos += (eos.empty() ? "" : " ") + std::to_string(id);
  std::printf("stop tokens:  %s\n", eos.empty() ? "none" : eos.c_str());
  std::printf("\nKV cache, %s keys and values of all %lld layers:\n", dtype_name(plan.kv_dtype),
              (long long)cfg.num_layers);
  std::printf("  %-44s %14s %14s\n", "variant", "32K tokens", "128K tokens");
  for (const VariantSpec& v : variants) {
    std::string cells;
    for (int64_t n : kLengths) {
      const double b = double(engine::kv_cache_bytes(cfg, v, n, kCacheElemBytes));
      const double full =
          double(engine::kv_cache_bytes(cfg, VariantSpec::full(), n, kCacheElemBytes));
      char cell[64];
      std::snprintf(cell, sizeof cell, " %9s %3.0f%%", format_bytes(b).c_str(), 100.0 * b / full);
      cells += cell;
    }
    std::printf("  %-44s%s\n", v.describe().c_str(), cells.c_str());
  }
}

}  // namespace

void register_info_command(CLI::App& app) {
  auto a = std::make_shared<InfoArgs>();
  CLI::App* cmd = app.add_subcommand(
      "info",
      "Architecture, parameters and per-variant KV cache memory of a model directory; with "
      "--system, the CPU and the SIMD target the CPU code runs");
  add_model_flags(cmd, a->run, false);
  cmd->get_option("--model")->required(false);  // required unless --system (run_info)
  cmd->add_flag("--json", a->json, "print one JSON object");
  cmd->add_flag("--system", a->system,
                "the CPU, the SIMD targets compiled in and the one chosen (CCA_CPU_TARGET "
                "narrows it), the CUDA backend")
      ->excludes("--model");
  cmd->callback([a] { run_info(*a); });
}

}  // namespace cca

#include "model_cli.hpp"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>

#include "cca/error.hpp"
#include "flag_limits.hpp"
#include "tokenizer/tokenizer.hpp"

namespace cca {

std::optional<DType> parse_dtype_flag(const std::string& s, const std::string& flag) {
  if (s == "auto") return std::nullopt;
  for (DType d : {DType::f32, DType::f16, DType::bf16})
    if (s == dtype_name(d)) return d;
  throw Error("invalid " + flag + " '" + s + "' (expected auto, float32, float16 or bfloat16)");
}

engine::EngineOptions ModelRunFlags::engine_options(int64_t plan_tokens, int64_t batch) const {
  check_threads_flag(threads);
  check(chunk >= 0, "invalid --chunk " + std::to_string(chunk) + ": must be >= 1");
  engine::EngineOptions o;
  o.device = engine::parse_device_choice(device);
  o.dtype = parse_dtype_flag(dtype, "--dtype");
  o.kv_dtype = parse_dtype_flag(kv_dtype, "--kv-dtype");
  o.variant = spec();
  o.threads = threads;
  o.chunk = chunk;
  o.max_batch = batch;
  o.plan_tokens = plan_tokens;
  o.cuda_graphs = !no_cuda_graphs;
  o.profile = profile;
  return o;
}

int64_t ModelRunFlags::context_limit(const model::ModelConfig& cfg) const {
  check(max_context >= 0,
        "invalid --max-context " + std::to_string(max_context) + ": must be >= 1");
  if (allow_long_prompt) return 0;
  return max_context > 0 ? max_context : cfg.max_position_embeddings;
}

ModelRunFlags ModelRunFlags::for_model(const model::ModelConfig& cfg) const {
  ModelRunFlags r = *this;
  const model::AttentionDefaults& d = cfg.attention;
  bool changed = false;
  auto adopt = [&](const CLI::Option* opt, auto& field, const auto& value) {
    if (!value || (opt && opt->count() > 0) || field == *value) return;
    field = *value;
    changed = true;
  };
  adopt(variant_opt, r.variant, d.variant);
  adopt(group_opt, r.group, d.group);
  adopt(window_opt, r.window, d.window);
  adopt(sinks_opt, r.sinks, d.sinks);
  adopt(pool_opt, r.pool, d.pool);
  adopt(pool_heads_opt, r.pool_heads, d.pool_heads);
  if (changed)
    std::fprintf(stderr, "cca: attention from the model's config.json (\"cca\": %s)\n",
                 d.describe().c_str());
  return r;
}

void add_model_flags(CLI::App* cmd, ModelRunFlags& f, bool run) {
  cmd->add_option("--model", f.model, "Hugging Face model directory (config.json, *.safetensors)")
      ->required();
  cmd->add_option("--device", f.device, "cpu, cuda, or auto (the GPU when one is usable)")
      ->capture_default_str();
  cmd->add_option("--dtype", f.dtype,
                  "GPU weights and activations: bfloat16, float16, or auto (the checkpoint's; "
                  "a float32 checkpoint needs one named)")
      ->capture_default_str();
  cmd->add_option("--kv-dtype", f.kv_dtype,
                  "KV cache dtype: float32, float16, bfloat16, or auto (the activations')")
      ->capture_default_str();
  add_variant_flags(cmd, f, /*with_variant=*/true);
  if (!run) return;
  cmd->add_option("--threads", f.threads, "CPU threads (0 = OMP_NUM_THREADS, else all cores)")
      ->capture_default_str();
  cmd->add_option("--chunk", f.chunk,
                  "prefill tokens per step (bounds activation memory; 0 = 256 on the CPU, 8192 "
                  "on the GPU)")
      ->capture_default_str();
  cmd->add_flag("--no-progress", f.no_progress, "no progress bar on stderr");
  cmd->add_flag("--no-cuda-graphs", f.no_cuda_graphs,
                "GPU decode steps run eagerly instead of replaying a captured CUDA graph");
  auto* mc = cmd->add_option("--max-context", f.max_context,
                             "context limit in tokens (default: max_position_embeddings)");
  auto* al = cmd->add_flag("--allow-long-prompt", f.allow_long_prompt,
                           "run inputs longer than max_position_embeddings");
  mc->excludes(al);
}

struct TextTokenizer::Impl {
  tok::Tokenizer tok;
};

TextTokenizer::TextTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TextTokenizer::~TextTokenizer() = default;

std::unique_ptr<TextTokenizer> TextTokenizer::load(const std::string& model_dir,
                                                   const std::string& why_needed,
                                                   int64_t model_vocab) {
  const std::string path = (std::filesystem::path(model_dir) / "tokenizer.json").string();
  std::error_code ec;
  check(std::filesystem::exists(path, ec),
        "tokenizer.json not found in " + model_dir + " (" + why_needed + ")");
  tok::Tokenizer t = tok::Tokenizer::from_file(path);
  // Fewer tokens than the model's vocabulary is common (embeddings padded to a multiple of 64);
  // more means the tokenizer belongs to another model.
  check(model_vocab <= 0 || t.vocab_size() <= model_vocab,
        path + " has token ids up to " + std::to_string(t.vocab_size() - 1) +
            " but config.json's vocab_size is " + std::to_string(model_vocab) +
            ": the tokenizer does not belong to this model");
  return std::unique_ptr<TextTokenizer>(new TextTokenizer(std::make_unique<Impl>(Impl{t})));
}

model::TokenIds TextTokenizer::encode(const std::string& text, bool add_special) const {
  return impl_->tok.encode(text, add_special);
}

std::string TextTokenizer::decode(const model::TokenIds& ids, bool skip_special) const {
  return impl_->tok.decode(ids, skip_special);
}

int32_t TextTokenizer::eos_id() const { return impl_->tok.eos_id().value_or(-1); }

bool TextTokenizer::has_token(int32_t id) const { return impl_->tok.has_token(id); }

const tok::Tokenizer& TextTokenizer::tokenizer() const { return impl_->tok; }

std::string read_input_file(const std::string& path, const std::string& flag) {
  std::error_code ec;
  check(std::filesystem::is_regular_file(path, ec), flag + ": file not found: " + path);
  return model::read_text_file(path, flag + " file");
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

}  // namespace cca

#include "model_cli.hpp"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>

#include "cca/error.hpp"
#include "tokenizer/tokenizer.hpp"

namespace cca {

model::SessionOptions ModelRunFlags::session_options() const {
  check(threads >= 0, "invalid --threads " + std::to_string(threads) + ": must be >= 0 (0 = all)");
  check(chunk >= 1, "invalid --chunk " + std::to_string(chunk) + ": must be >= 1");
  model::SessionOptions o;
  o.variant = spec();
  o.threads = threads;
  o.chunk = chunk;
  return o;
}

int64_t ModelRunFlags::context_limit(const model::ModelConfig& cfg) const {
  check(max_context >= 0,
        "invalid --max-context " + std::to_string(max_context) + ": must be >= 1");
  if (allow_long_prompt) return 0;
  return max_context > 0 ? max_context : cfg.max_position_embeddings;
}

void add_model_flags(CLI::App* cmd, ModelRunFlags& f, bool run) {
  cmd->add_option("--model", f.model, "Hugging Face model directory (config.json, *.safetensors)")
      ->required();
  add_variant_flags(cmd, f, /*with_variant=*/run);
  if (!run) return;
  cmd->add_option("--threads", f.threads, "CPU threads (0 = OMP_NUM_THREADS, else all cores)")
      ->capture_default_str();
  cmd->add_option("--chunk", f.chunk, "prefill chunk in tokens (bounds activation memory)")
      ->capture_default_str();
  cmd->add_flag("--no-progress", f.no_progress, "no progress bar on stderr");
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
                                                   const std::string& why_needed) {
  const std::string path = (std::filesystem::path(model_dir) / "tokenizer.json").string();
  std::error_code ec;
  check(std::filesystem::is_regular_file(path, ec),
        "tokenizer.json not found in " + model_dir + " (" + why_needed + ")");
  return std::unique_ptr<TextTokenizer>(
      new TextTokenizer(std::make_unique<Impl>(Impl{tok::Tokenizer::from_file(path)})));
}

model::TokenIds TextTokenizer::encode(const std::string& text, bool add_special) const {
  return impl_->tok.encode(text, add_special);
}

std::string TextTokenizer::decode(const model::TokenIds& ids, bool skip_special) const {
  return impl_->tok.decode(ids, skip_special);
}

int32_t TextTokenizer::eos_id() const { return impl_->tok.eos_id().value_or(-1); }

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

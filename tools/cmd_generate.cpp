// `cca generate`: continue a prompt with a Hugging Face Llama-family model on the CPU, the
// attention variant chosen by flags (default cca g=16 s=1024). Text is streamed to stdout as
// tokens are chosen; with --ids the prompt is token ids and the output is token ids.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "cca/error.hpp"
#include "commands.hpp"
#include "model/runner.hpp"
#include "model_cli.hpp"

namespace cca {
namespace {

struct GenerateArgs {
  ModelRunFlags run;
  std::string prompt, prompt_file, ids_file;
  int64_t max_new = 128;
  std::optional<double> temperature, top_p;
  std::optional<int64_t> top_k;
  uint64_t seed = 0;
  bool greedy = false, ignore_eos = false, stats = false;
};

// Greedy unless sampling is asked for (a sampling flag, or do_sample in generation_config.json);
// sampling values come from the flags, then generation_config.json.
model::SamplingParams sampling_params(const GenerateArgs& a, const model::GenerationConfig& gen) {
  model::SamplingParams p;
  p.seed = a.seed;
  const bool asked = a.temperature || a.top_k || a.top_p;
  p.greedy = a.greedy || !(asked || gen.do_sample) || (a.temperature && *a.temperature == 0.0);
  p.temperature = a.temperature.value_or(gen.present ? gen.temperature : 1.0);
  p.top_k = a.top_k.value_or(gen.present ? gen.top_k : 0);
  p.top_p = a.top_p.value_or(gen.present ? gen.top_p : 1.0);
  p.validate();
  return p;
}

// Streams decoded text: prints the new part of decode(all generated ids) each step, holding back
// trailing U+FFFDs (an incomplete UTF-8 sequence that later byte tokens may complete).
class TextStream {
 public:
  explicit TextStream(const TextTokenizer& tok) : tok_(tok) {}
  void add(int32_t id) {
    ids_.push_back(id);
    emit(false);
  }
  void finish() { emit(true); }

 private:
  void emit(bool final) {
    std::string text = tok_.decode(ids_, true);
    static const std::string kReplacement = "\xEF\xBF\xBD";
    size_t end = text.size();
    while (!final && end >= printed_ + 3 && text.compare(end - 3, 3, kReplacement) == 0) end -= 3;
    if (end > printed_) {
      std::fwrite(text.data() + printed_, 1, end - printed_, stdout);
      std::fflush(stdout);
      printed_ = end;
    }
  }
  const TextTokenizer& tok_;
  model::TokenIds ids_;
  size_t printed_ = 0;
};

void run_generate(const GenerateArgs& a) {
  const int given = !a.prompt.empty() + !a.prompt_file.empty() + !a.ids_file.empty();
  check(given == 1, "give exactly one of --prompt, --prompt-file and --ids");
  check(a.max_new >= 0, "invalid -n " + std::to_string(a.max_new) + ": must be >= 0");
  const model::SessionOptions sopt = a.run.session_options();

  // Everything cheap is checked before the weights load.
  const model::ModelConfig cfg = model::load_model_config(a.run.model);
  const model::GenerationConfig gen = model::load_generation_config(a.run.model, cfg);
  const model::SamplingParams sp = sampling_params(a, gen);
  std::unique_ptr<TextTokenizer> tok;
  model::TokenIds prompt;
  if (!a.ids_file.empty()) {
    prompt = model::parse_token_ids(read_input_file(a.ids_file, "--ids"), a.ids_file);
  } else {
    tok = TextTokenizer::load(a.run.model,
                              "needed for --prompt/--prompt-file; --ids takes token ids");
    const std::string text =
        a.prompt_file.empty() ? a.prompt : read_input_file(a.prompt_file, "--prompt-file");
    prompt = tok->encode(text, true);
    check(!prompt.empty(), "the prompt encodes to no tokens");
  }
  const int64_t limit = a.run.context_limit(cfg);
  model::check_prompt_length(int64_t(prompt.size()), limit, cfg);

  const model::Model m(a.run.model);
  model::Session session(m, sopt);
  model::Sampler sampler(sp);
  model::GenerateOptions go;
  go.max_new_tokens = a.max_new;
  if (!a.ignore_eos) {
    go.stop_ids = gen.eos_token_ids;
    if (go.stop_ids.empty() && tok && tok->eos_id() >= 0) go.stop_ids.push_back(tok->eos_id());
  }
  go.max_context = limit;
  go.progress = !a.run.no_progress;

  std::optional<TextStream> text;
  if (tok) text.emplace(*tok);
  bool first = true;
  const model::GenerateResult r = model::generate(session, prompt, sampler, go, [&](int32_t id) {
    if (text) {
      text->add(id);
    } else {
      std::printf(first ? "%d" : " %d", id);
      std::fflush(stdout);
    }
    first = false;
  });
  if (text) text->finish();
  std::printf("\n");
  std::fflush(stdout);

  if (a.stats) {
    nlohmann::json s;
    s["variant"] = sopt.variant.describe();
    s["prompt_tokens"] = r.prompt_tokens;
    s["generated"] = r.tokens.size();
    s["stop"] = r.stop_reason;
    s["prefill_s"] = r.prefill_s;
    s["prefill_tok_s"] = r.prefill_s > 0 ? double(r.prompt_tokens) / r.prefill_s : 0.0;
    s["prefill_cpu_s"] = r.prefill_cpu_s;
    s["decode_steps"] = r.decode_steps;
    s["decode_s"] = r.decode_s;
    s["decode_tok_s"] = r.decode_s > 0 ? double(r.decode_steps) / r.decode_s : 0.0;
    s["decode_cpu_s"] = r.decode_cpu_s;
    s["kv_bytes"] = r.kv_bytes;
    s["full_kv_bytes"] = r.full_kv_bytes;
    s["threads"] = sopt.threads;
    std::fprintf(stderr, "%s\n", s.dump().c_str());
  }
}

}  // namespace

void register_generate_command(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand(
      "generate", "Continue a prompt with a Hugging Face Llama/Mistral/Qwen2 model on the CPU");
  cmd->add_option("--prompt", a->prompt, "prompt text");
  cmd->add_option("--prompt-file", a->prompt_file, "file holding the prompt text");
  cmd->add_option("--ids", a->ids_file,
                  "file of whitespace-separated prompt token ids (no tokenizer; prints ids)");
  cmd->add_option("-n,--max-new-tokens", a->max_new, "tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", a->temperature, "sampling temperature (0 = greedy)");
  cmd->add_option("--top-k", a->top_k, "sample among the k most likely tokens (0 = off)");
  cmd->add_option("--top-p", a->top_p, "nucleus sampling mass in (0, 1]");
  cmd->add_option("--seed", a->seed, "random seed for sampling")->capture_default_str();
  cmd->add_flag("--greedy", a->greedy, "always take the most likely token");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "do not stop at generation_config's eos tokens");
  cmd->add_flag("--stats", a->stats, "print timing and cache memory as one JSON line on stderr");
  add_model_flags(cmd, a->run, true);
  cmd->callback([a] { run_generate(*a); });
}

}  // namespace cca

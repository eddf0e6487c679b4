// `cca perplexity`: mean next-token negative log-likelihood (and its exp) of a text or of token
// ids under a model, the attention variant chosen by flags. --ctx N splits the input into
// consecutive windows of N tokens, each run from empty caches.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "cca/error.hpp"
#include "commands.hpp"
#include "engine/engine.hpp"
#include "model_cli.hpp"
#include "progress.hpp"

namespace cca {
namespace {

struct PerplexityArgs {
  ModelRunFlags run;
  std::string text_file, ids_file;
  int64_t ctx = 0;
  bool json = false;
};

void run_perplexity(const PerplexityArgs& a) {
  check(a.text_file.empty() != a.ids_file.empty(), "give exactly one of --text-file and --ids");
  check(a.ctx == 0 || a.ctx >= 2, "invalid --ctx " + std::to_string(a.ctx) +
                                      ": must be >= 2 (0 = the whole input in one window)");
  const model::ModelConfig cfg = model::load_model_config(a.run.model);
  model::TokenIds ids;
  if (!a.ids_file.empty()) {
    ids = engine::parse_token_ids(read_input_file(a.ids_file, "--ids"), a.ids_file,
                                  cfg.vocab_size);
  } else {
    auto tok = TextTokenizer::load(a.run.model, "needed for --text-file; --ids takes token ids",
                                   cfg.vocab_size);
    ids = tok->encode(read_input_file(a.text_file, "--text-file"), true);
  }
  check(ids.size() >= 2,
        "perplexity needs at least 2 tokens, the input has " + std::to_string(ids.size()));
  // The longest window is what must fit the context limit.
  const int64_t window =
      a.ctx > 0 ? std::min<int64_t>(a.ctx, int64_t(ids.size())) : int64_t(ids.size());
  engine::check_prompt_length(window, a.run.context_limit(cfg), cfg);

  engine::Engine eng(a.run.model, a.run.for_model(cfg).engine_options(window));
  if (!eng.device_plan().note.empty())
    std::fprintf(stderr, "cca: %s\n", eng.device_plan().note.c_str());
  ProgressBar bar("perplexity", int64_t(ids.size()),
                  !a.run.no_progress && int64_t(ids.size()) > eng.chunk());
  const engine::NllResult r =
      eng.perplexity(ids, a.ctx, [&](int64_t done, int64_t) { bar.update(done); });
  bar.finish();
  if (a.json) {
    nlohmann::json j;
    j["tokens"] = r.tokens;
    j["mean_nll"] = r.mean_nll();
    j["ppl"] = r.ppl();
    j["variant"] = eng.variant().describe();
    j["ctx"] = window;
    j["device"] = eng.context().describe();
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s: %lld predicted tokens, mean NLL %.6f nats, perplexity %.4f\n",
                eng.variant().describe().c_str(), (long long)r.tokens, r.mean_nll(), r.ppl());
  }
}

}  // namespace

void register_perplexity_command(CLI::App& app) {
  auto a = std::make_shared<PerplexityArgs>();
  CLI::App* cmd = app.add_subcommand(
      "perplexity", "Mean next-token NLL and perplexity of a text or token ids under a model");
  cmd->add_option("--text-file", a->text_file, "text to score (needs tokenizer.json)");
  cmd->add_option("--ids", a->ids_file, "file of whitespace-separated token ids");
  cmd->add_option("--ctx", a->ctx, "window length in tokens (0 = the whole input)")
      ->capture_default_str();
  cmd->add_flag("--json", a->json, "print {\"tokens\": N, \"mean_nll\": x, \"ppl\": y}");
  add_model_flags(cmd, a->run, true);
  cmd->callback([a] { run_perplexity(*a); });
}

}  // namespace cca

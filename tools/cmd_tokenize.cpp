// `cca tokenize`: the token ids of a text under a model's tokenizer.json, whitespace-separated
// on stdout: the --ids input of generate, perplexity and logits.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>

#include "cca/error.hpp"
#include "commands.hpp"
#include "model_cli.hpp"

namespace cca {
namespace {

struct TokenizeArgs {
  std::string model, text, text_file;
  bool no_special = false;
};

void run_tokenize(const TokenizeArgs& a) {
  check(a.text.empty() != a.text_file.empty(), "give exactly one of --text and --text-file");
  auto tok = TextTokenizer::load(a.model, "cca tokenize reads the model's tokenizer.json");
  const std::string text = a.text_file.empty() ? a.text : read_input_file(a.text_file, "--text-file");
  const model::TokenIds ids = tok->encode(text, !a.no_special);
  for (size_t i = 0; i < ids.size(); ++i) std::printf(i ? " %d" : "%d", ids[i]);
  std::printf("\n");
}

}  // namespace

void register_tokenize_command(CLI::App& app) {
  auto a = std::make_shared<TokenizeArgs>();
  CLI::App* cmd =
      app.add_subcommand("tokenize", "Print the token ids of a text (the input of --ids)");
  cmd->add_option("--model", a->model, "model directory holding tokenizer.json")->required();
  cmd->add_option("--text", a->text, "text to encode");
  cmd->add_option("--text-file", a->text_file, "file holding the text");
  cmd->add_flag("--no-special", a->no_special, "no BOS or other special tokens added");
  cmd->callback([a] { run_tokenize(*a); });
}

}  // namespace cca

// `cca logits`: the float32 logits of token ids under a model, written as a .npy array [rows, V]
// (the last --rows positions, or all): what parity checks against another implementation read.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cca/error.hpp"
#include "commands.hpp"
#include "engine/engine.hpp"
#include "model_cli.hpp"
#include "npy.hpp"
#include "output_path.hpp"

namespace cca {
namespace {

struct LogitsArgs {
  ModelRunFlags run;
  std::string ids_file, out;
  int64_t rows = 0;
};

void run_logits(const LogitsArgs& a) {
  check(a.rows >= 0, "invalid --rows " + std::to_string(a.rows) + ": must be >= 0 (0 = all)");
  check_outputs({{"--ids", a.ids_file}, {"--model", a.run.model}}, {{"--out", a.out}});
  const model::ModelConfig cfg = model::load_model_config(a.run.model);
  const model::TokenIds ids =
      engine::parse_token_ids(read_input_file(a.ids_file, "--ids"), a.ids_file, cfg.vocab_size);
  engine::check_prompt_length(int64_t(ids.size()), a.run.context_limit(cfg), cfg);
  const int64_t n = int64_t(ids.size()), keep = a.rows > 0 ? std::min(a.rows, n) : n;
  const int64_t V = cfg.vocab_size;
  // The logits of the kept rows must fit in host memory as one array.
  check(keep * V <= (int64_t(1) << 31),
        "the logits of " + std::to_string(keep) + " rows x " + std::to_string(V) +
            " tokens are too large for one array: pass --rows N for the last N positions");

  engine::Engine eng(a.run.model, a.run.for_model(cfg).engine_options(n));
  if (!eng.device_plan().note.empty())
    std::fprintf(stderr, "cca: %s\n", eng.device_plan().note.c_str());
  auto seq = eng.new_sequence(n);
  std::vector<float> out(size_t(keep * V)), block;
  model::TokenIds part;
  engine::Sequence* s = seq.get();
  const int64_t first = n - keep;  // the first position kept
  for (int64_t r0 = 0; r0 < n; r0 += eng.chunk()) {
    const int64_t rows = std::min(eng.chunk(), n - r0);
    part.assign(ids.begin() + r0, ids.begin() + r0 + rows);
    const model::TokenIds* t = &part;
    eng.step(std::span(&s, 1), std::span(&t, 1));
    std::vector<int32_t> want;
    for (int64_t r = std::max<int64_t>(0, first - r0); r < rows; ++r) want.push_back(int32_t(r));
    for (size_t b = 0; b < want.size(); b += 32) {
      const std::vector<int32_t> sel(want.begin() + int64_t(b),
                                     want.begin() + int64_t(std::min(want.size(), b + 32)));
      eng.logits(sel, block);
      std::copy(block.begin(), block.end(), out.begin() + (r0 + sel.front() - first) * V);
    }
  }
  write_npy(a.out, make_view(out.data(), DType::f32, {keep, V}));
}

}  // namespace

void register_logits_command(CLI::App& app) {
  auto a = std::make_shared<LogitsArgs>();
  CLI::App* cmd = app.add_subcommand(
      "logits", "Write the float32 logits of token ids under a model as a .npy array [rows, V]");
  cmd->add_option("--ids", a->ids_file, "file of whitespace-separated token ids")->required();
  cmd->add_option("--out", a->out, "output .npy file")->required();
  cmd->add_option("--rows", a->rows, "keep the last N positions (0 = all)")->capture_default_str();
  add_model_flags(cmd, a->run, true);
  cmd->callback([a] { run_logits(*a); });
}

}  // namespace cca

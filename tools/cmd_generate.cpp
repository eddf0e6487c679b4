// `cca generate`: continue a prompt (or a batch of prompts) with a Hugging Face Llama-family model
// on the GPU or the CPU, the attention variant chosen by flags (default cca g=16 s=1024). Text is streamed to stdout as
// tokens are chosen; with --ids the prompt is token ids and the output is token ids.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <algorithm>
#include <vector>
#include <string>

#include "cca/error.hpp"
#include "commands.hpp"
#include "engine/engine.hpp"
#include "model_cli.hpp"
#include "progress.hpp"
#include "tokenizer/text_stream.hpp"

namespace cca {
namespace {

struct GenerateArgs {
  ModelRunFlags run;
  std::string prompt, prompt_file, ids_file;
  int64_t max_new = 128;
  std::optional<double> temperature, top_p;
  std::optional<int64_t> top_k;
  uint64_t seed = 0;
  bool greedy = false, ignore_eos = false, stats = false, batch = false;
};

model::SamplingParams sampling_params(const GenerateArgs& a, const model::GenerationConfig& gen) {
  return model::resolve_sampling({a.temperature, a.top_p, a.top_k, a.seed, a.greedy}, gen);
}

// Streams decoded text to stdout as it becomes final (tok::TextStream).
class TextStream {
 public:
  explicit TextStream(const TextTokenizer& tok)
      : stream_([&tok](const std::vector<int32_t>& ids) { return tok.decode(ids, true); }) {}
  void add(int32_t id) { print(stream_.add(id)); }
  void finish() { print(stream_.finish()); }

 private:
  static void print(const std::string& text) {
    if (text.empty()) return;
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }
  tok::TextStream stream_;
};

// The prompts of a run: one, or with --batch one per line of the file (a .jsonl file: one
// {"prompt": "..."} object per line).
std::vector<model::TokenIds> read_prompts(const GenerateArgs& a, const TextTokenizer* tok,
                                          int64_t vocab_size) {
  std::vector<std::string> texts;
  const std::string& file = a.ids_file.empty() ? a.prompt_file : a.ids_file;
  const std::string flag = a.ids_file.empty() ? "--prompt-file" : "--ids";
  if (!a.batch) {
    texts.push_back(file.empty() ? a.prompt : read_input_file(file, flag));
  } else {
    check(!file.empty(), "--batch reads its prompts from --prompt-file or --ids, one per line");
    const std::string all = read_input_file(file, flag);
    const bool jsonl = file.size() > 6 && file.compare(file.size() - 6, 6, ".jsonl") == 0;
    size_t start = 0, line_no = 0;
    while (start <= all.size()) {
      size_t end = all.find('\n', start);
      if (end == std::string::npos) end = all.size();
      std::string line = all.substr(start, end - start);
      ++line_no;
      start = end + 1;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      if (jsonl) {
        const std::string where = file + ":" + std::to_string(line_no);
        const nlohmann::json j = model::parse_json(line, where);
        check(j.is_object() && j.contains("prompt") && j["prompt"].is_string(),
              where + ": expected {\"prompt\": \"...\"}, got " + model::json_excerpt(j));
        line = j["prompt"].get<std::string>();
      }
      texts.push_back(line);
    }
    check(!texts.empty(), file + ": no prompts");
  }
  std::vector<model::TokenIds> prompts;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::string where = texts.size() > 1 ? " (prompt " + std::to_string(i + 1) + ")" : "";
    if (!a.ids_file.empty()) {
      prompts.push_back(engine::parse_token_ids(texts[i], a.ids_file + where, vocab_size));
    } else {
      prompts.push_back(tok->encode(texts[i], true));
      check(!prompts.back().empty(), "the prompt encodes to no tokens" + where);
    }
  }
  return prompts;
}

// The rows of a profile as JSON: region, calls, total milliseconds, FLOPs.
nlohmann::json profile_json(const std::vector<ops::Profile::Row>& rows) {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& r : rows)
    j.push_back({{"region", r.name}, {"calls", r.calls}, {"ms", r.ms}, {"flops", r.flops}});
  return j;
}

// A table of where the time of one phase went: each region's total, per layer, its share of the
// phase's wall time, and its rate where it counts FLOPs; the rest of the wall time is time the
// device was not running any region (host work, launch gaps, synchronisation).
void print_breakdown(const char* phase, const std::vector<ops::Profile::Row>& rows,
                     int64_t layers, double wall_s) {
  if (rows.empty()) return;
  std::fprintf(stderr, "profile of the %s (%.3f s wall, %lld layers):\n", phase, wall_s,
               (long long)layers);
  std::fprintf(stderr, "  %-14s %8s %11s %11s %7s %10s\n", "region", "calls", "total ms",
               "ms/layer", "share", "TFLOP/s");
  double sum = 0;
  for (const auto& r : rows) {
    sum += r.ms;
    const double share = wall_s > 0 ? 100.0 * r.ms / (1e3 * wall_s) : 0.0;
    std::fprintf(stderr, "  %-14s %8lld %11.3f %11.4f %6.1f%%", r.name.c_str(),
                 (long long)r.calls, r.ms, r.ms / double(std::max<int64_t>(layers, 1)), share);
    if (r.flops > 0 && r.ms > 0)
      std::fprintf(stderr, " %10.1f", r.flops / (r.ms * 1e-3) / 1e12);
    std::fprintf(stderr, "\n");
  }
  const double rest = 1e3 * wall_s - sum;
  std::fprintf(stderr, "  %-14s %8s %11.3f %11s %6.1f%%\n", "(not in ops)", "", rest, "",
               wall_s > 0 ? 100.0 * rest / (1e3 * wall_s) : 0.0);
}

// Ids the model produced that no token of the tokenizer has (embedding rows past the tokenizer's
// vocabulary) are dropped by decode(): said on stderr rather than lost silently.
void warn_untokenized(const TextTokenizer& tok, const std::vector<engine::GenerateResult>& res) {
  std::string ids;
  int64_t n = 0;
  for (const auto& r : res)
    for (const int32_t id : r.tokens)
      if (!tok.has_token(id) && ++n <= 8) ids += (n > 1 ? ", " : "") + std::to_string(id);
  if (n == 0) return;
  std::fprintf(stderr,
               "cca: warning: %lld generated token id(s) have no token in tokenizer.json and are "
               "missing from the text: %s%s (--ids prints ids)\n",
               (long long)n, ids.c_str(), n > 8 ? ", ..." : "");
}

void run_generate(const GenerateArgs& a) {
  const int given = !a.prompt.empty() + !a.prompt_file.empty() + !a.ids_file.empty();
  check(given == 1, "give exactly one of --prompt, --prompt-file and --ids (--prompt must not be "
                    "empty)");
  check(a.max_new >= 0, "invalid -n " + std::to_string(a.max_new) + ": must be >= 0");

  // Everything cheap is checked before the weights load.
  const model::ModelConfig cfg = model::load_model_config(a.run.model);
  const model::GenerationConfig gen = model::load_generation_config(a.run.model, cfg);
  const model::SamplingParams sp = sampling_params(a, gen);
  std::unique_ptr<TextTokenizer> tok;
  if (a.ids_file.empty())
    tok = TextTokenizer::load(a.run.model,
                              "needed for --prompt/--prompt-file; --ids takes token ids",
                              cfg.vocab_size);
  const std::vector<model::TokenIds> prompts = read_prompts(a, tok.get(), cfg.vocab_size);
  const int64_t limit = a.run.context_limit(cfg);
  int64_t longest = 0, total_prompt = 0;
  for (const auto& p : prompts) {
    engine::check_prompt_length(int64_t(p.size()), limit, cfg);
    longest = std::max(longest, int64_t(p.size()));
    total_prompt += int64_t(p.size());
  }
  int64_t plan = longest + std::max<int64_t>(a.max_new, 1);
  if (limit > 0) plan = std::min(plan, std::max(limit, longest));

  const int64_t batch = int64_t(prompts.size());
  engine::Engine eng(a.run.model, a.run.for_model(cfg).engine_options(plan, batch));
  if (!eng.device_plan().note.empty())
    std::fprintf(stderr, "cca: %s\n", eng.device_plan().note.c_str());
  std::vector<engine::GenerateRequest> reqs(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    reqs[i].prompt = prompts[i];
    reqs[i].sampling = sp;
    reqs[i].sampling.seed = sp.seed + i;  // each sequence its own stream
    reqs[i].max_new_tokens = a.max_new;
    if (!a.ignore_eos) {
      reqs[i].stop_ids = gen.eos_token_ids;
      if (reqs[i].stop_ids.empty() && tok && tok->eos_id() >= 0)
        reqs[i].stop_ids.push_back(tok->eos_id());
    }
  }

  ProgressBar bar("prefill", total_prompt, !a.run.no_progress && total_prompt > eng.chunk());
  engine::RunCallbacks cb;
  cb.prefill_progress = [&](int64_t done, int64_t) { bar.update(done); };
  // One sequence streams as tokens are chosen; a batch prints each sequence when all are done.
  std::optional<TextStream> text;
  if (tok && batch == 1) text.emplace(*tok);
  bool first = true;
  cb.token = [&](int64_t, int32_t id) {
    if (batch > 1) return;
    bar.finish();
    if (text) {
      text->add(id);
    } else {
      std::printf(first ? "%d" : " %d", id);
      std::fflush(stdout);
    }
    first = false;
  };
  const double t0 = monotonic_seconds();
  const std::vector<engine::GenerateResult> res = eng.generate(reqs, limit, cb);
  const double wall = monotonic_seconds() - t0;
  bar.finish();
  if (batch == 1) {
    if (text) text->finish();
    std::printf("\n");
  } else {
    for (size_t i = 0; i < res.size(); ++i) {
      std::printf("[%zu] ", i + 1);
      if (tok) {
        const std::string out = tok->decode(res[i].tokens, true);
        std::fwrite(out.data(), 1, out.size(), stdout);
      } else {
        for (size_t j = 0; j < res[i].tokens.size(); ++j)
          std::printf(j ? " %d" : "%d", res[i].tokens[j]);
      }
      std::printf("\n");
    }
  }
  std::fflush(stdout);
  if (tok) warn_untokenized(*tok, res);

  // The timing summary, one line as llama.cpp prints it.
  int64_t generated = 0, steps = 0, kv = 0, full_kv = 0;
  double ttft = 0, decode_s = 0;
  for (const auto& r : res) {
    generated += int64_t(r.tokens.size());
    steps = std::max(steps, r.decode_steps);
    ttft = std::max(ttft, r.ttft_s);
    decode_s = r.decode_s;
    kv += r.kv_bytes;
    full_kv += r.full_kv_bytes;
  }
  const double prefill_s = std::max(ttft, 1e-9);
  if (a.run.profile) {
    const int64_t layers = eng.config().num_layers;
    print_breakdown("prefill", eng.breakdown().prefill, layers, ttft);
    print_breakdown("decode", eng.breakdown().decode, layers, decode_s);
  }
  const std::string mem_kind = eng.device() == Device::cuda ? "peak GPU memory" : "peak RSS";
  std::fprintf(stderr,
               "cca: %s | %s, %s cache %s (full: %s) | prompt %lld tok, TTFT %.3f s (%.0f tok/s) "
               "| generated %lld tok in %.3f s (%.1f tok/s) | %s %s\n",
               eng.context().describe().c_str(), eng.variant().describe().c_str(),
               dtype_name(eng.kv_dtype()), format_bytes(double(kv)).c_str(),
               format_bytes(double(full_kv)).c_str(), (long long)total_prompt, ttft,
               double(total_prompt) / prefill_s, (long long)generated, decode_s,
               decode_s > 0 ? double(generated - int64_t(res.size())) / decode_s : 0.0,
               mem_kind.c_str(), format_bytes(double(eng.peak_memory_bytes())).c_str());

  if (a.stats) {
    nlohmann::json s;
    s["device"] = eng.context().describe();
    s["dtype"] = dtype_name(eng.dtype());
    s["kv_dtype"] = dtype_name(eng.kv_dtype());
    s["variant"] = eng.variant().describe();
    s["batch"] = batch;
    s["prompt_tokens"] = total_prompt;
    s["generated"] = generated;
    s["stop"] = res.front().stop_reason;
    s["prefill_s"] = ttft;
    s["ttft_s"] = ttft;
    s["prefill_tok_s"] = double(total_prompt) / prefill_s;
    s["decode_steps"] = steps;
    s["decode_s"] = decode_s;
    s["decode_tok_s"] = decode_s > 0 ? double(steps) / decode_s : 0.0;
    s["itl_s"] = steps > 0 ? decode_s / double(steps) : 0.0;
    s["wall_s"] = wall;
    s["kv_bytes"] = kv;
    s["full_kv_bytes"] = full_kv;
    s["peak_memory_bytes"] = eng.peak_memory_bytes();
    s["threads"] = eng.context().threads();
    s["graph_replays"] = eng.graph_replays();
    s["graph_captures"] = eng.graph_captures();
    if (a.run.profile)
      s["profile"] = {{"prefill", profile_json(eng.breakdown().prefill)},
                      {"decode", profile_json(eng.breakdown().decode)}};
    std::fprintf(stderr, "%s\n", s.dump().c_str());
  }
}

}  // namespace

void register_generate_command(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand(
      "generate", "Continue a prompt with a Hugging Face Llama/Mistral/Qwen2 model on the GPU or CPU");
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
  cmd->add_flag("--profile", a->run.profile,
                "time each kind of op (GEMMs, attention, pooling, the rest) in the prefill and "
                "the decode steps and print the breakdown on stderr (decode steps then run "
                "without CUDA graphs; for shares, not headline times)");
  cmd->add_flag("--batch", a->batch,
                "one prompt per line of --prompt-file (a .jsonl file: {\"prompt\": ...} per "
                "line) or of --ids, all run as one batch");
  add_model_flags(cmd, a->run, true);
  cmd->callback([a] { run_generate(*a); });
}

}  // namespace cca

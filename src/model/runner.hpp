// What the CLI runs on a loaded model: generation (chunked prefill with a progress bar, then
// token-by-token decode through the caches), perplexity, and the cache memory a variant needs.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/sampler.hpp"
#include "model/transformer.hpp"

namespace cca::model {

// A progress bar on stderr ("\r" updates; drawn only when stderr is a terminal, or when forced).
class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, bool enabled);
  ~ProgressBar();
  void update(int64_t done);
  void finish();  // ends the line

 private:
  std::string label_;
  int64_t total_;
  bool enabled_, open_ = false;
  double start_s_;
  int last_permille_ = -1;
};

// Throws cca::Error when a prompt of `tokens` exceeds `limit` (> 0), naming the flags that allow
// it: --allow-long-prompt, or --max-context to set another limit.
void check_prompt_length(int64_t tokens, int64_t limit, const ModelConfig& cfg);

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  std::vector<int64_t> stop_ids;  // generation ends after emitting one of these
  int64_t max_context = 0;        // total tokens allowed (prompt + generated); 0 = no limit
  bool progress = true;           // prefill progress bar (long prompts only)
};

struct GenerateResult {
  TokenIds tokens;          // generated ids (the stop token included when one ended it)
  std::string stop_reason;  // "stop token", "max new tokens", "max context"
  int64_t prompt_tokens = 0;
  double prefill_s = 0;      // prompt forward, including the first token's logits (wall)
  double prefill_cpu_s = 0;  // CPU time of all threads of the process over the same span
  int64_t decode_steps = 0;  // single-token forward steps
  double decode_s = 0, decode_cpu_s = 0;
  int64_t kv_bytes = 0, full_kv_bytes = 0;  // at the end
};

// Prefills `prompt` into `session`, then samples up to max_new_tokens; `on_token` sees each new
// id as soon as it is chosen (streaming).
GenerateResult generate(Session& session, const TokenIds& prompt, Sampler& sampler,
                        const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token = {});

struct NllResult {
  int64_t tokens = 0;  // predicted tokens
  double sum_nll = 0;
  double mean_nll() const { return tokens ? sum_nll / double(tokens) : 0.0; }
  double ppl() const;
};

// Mean next-token negative log-likelihood of `ids`: consecutive windows of at most `ctx`
// tokens (0 = one window), each run from empty caches; every token of a window but the first
// is predicted. Needs at least 2 tokens.
NllResult perplexity(const Model& model, const TokenIds& ids, int64_t ctx,
                     const SessionOptions& opt, bool progress);

// Bytes the caches of all layers hold after n tokens (keys and values) under `v`, by the cache
// rules (cca: floor(n/g) core tokens + the raw window; sliding: window; streaming/lminfinite:
// sinks + window; full: n), with elements of `elem_bytes`.
int64_t kv_cache_bytes(const ModelConfig& cfg, const VariantSpec& v, int64_t n, int64_t elem_bytes);

// Whitespace-separated non-negative token ids; `source` names the input in errors.
TokenIds parse_token_ids(const std::string& text, const std::string& source);

}  // namespace cca::model

#include "model/runner.hpp"

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "cca/error.hpp"
#include "policy.hpp"

namespace cca::model {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// CPU time of the whole process: with one thread, a measure of work that other processes on a
// shared machine do not inflate (wall time does).
double cpu_s() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

}  // namespace

ProgressBar::ProgressBar(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled && ::isatty(2)),
      start_s_(now_s()) {}

ProgressBar::~ProgressBar() {
  if (open_) std::fputc('\n', stderr);
}

void ProgressBar::update(int64_t done) {
  if (!enabled_ || total_ <= 0) return;
  const int permille = int(1000 * done / total_);
  if (permille == last_permille_) return;
  last_permille_ = permille;
  constexpr int kWidth = 30;
  const int fill = int(int64_t(kWidth) * done / total_);
  const double rate = done / std::max(1e-9, now_s() - start_s_);
  std::fprintf(stderr, "\r%s [%.*s%*s] %lld/%lld tokens (%d%%) %.0f tok/s", label_.c_str(), fill,
               "==============================", kWidth - fill, "", (long long)done,
               (long long)total_, permille / 10, rate);
  std::fflush(stderr);
  open_ = true;
}

void ProgressBar::finish() {
  if (open_) std::fputc('\n', stderr);
  open_ = false;
}

void check_prompt_length(int64_t tokens, int64_t limit, const ModelConfig& cfg) {
  if (limit <= 0 || tokens <= limit) return;
  std::ostringstream o;
  o << "the prompt has " << tokens << " tokens, more than the limit of " << limit;
  if (limit == cfg.max_position_embeddings) o << " (the model's max_position_embeddings)";
  o << "; pass --allow-long-prompt to run it anyway (positions past max_position_embeddings = "
    << cfg.max_position_embeddings << " were not trained), or --max-context N to set the limit";
  throw Error(o.str());
}

GenerateResult generate(Session& session, const TokenIds& prompt, Sampler& sampler,
                        const GenerateOptions& opt, const std::function<void(int32_t)>& on_token) {
  check(!prompt.empty(), "the prompt is empty: nothing to continue");
  check(opt.max_new_tokens >= 0, "max new tokens must be >= 0");
  GenerateResult res;
  res.prompt_tokens = int64_t(prompt.size());
  const int64_t n = res.prompt_tokens;

  double t0 = now_s(), c0 = cpu_s();
  ProgressBar bar("prefill", n, opt.progress && n > session.options().chunk);
  std::vector<float> logits =
      session.forward_last(prompt.data(), n, [&](int64_t done) { bar.update(done); });
  bar.finish();
  res.prefill_s = now_s() - t0;
  res.prefill_cpu_s = cpu_s() - c0;

  res.stop_reason = "max new tokens";
  t0 = now_s();
  c0 = cpu_s();
  for (int64_t i = 0; i < opt.max_new_tokens; ++i) {
    if (opt.max_context > 0 && session.length() >= opt.max_context) {
      res.stop_reason = "max context";
      break;
    }
    const int32_t id = sampler.next(logits);
    res.tokens.push_back(id);
    if (on_token) on_token(id);
    if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), int64_t(id)) != opt.stop_ids.end()) {
      res.stop_reason = "stop token";
      break;
    }
    if (i + 1 == opt.max_new_tokens) break;  // the last token needs no forward step
    logits = session.forward_last(&id, 1);
    ++res.decode_steps;
  }
  res.decode_s = now_s() - t0;
  res.decode_cpu_s = cpu_s() - c0;
  res.kv_bytes = session.kv_bytes();
  res.full_kv_bytes = session.full_kv_bytes();
  return res;
}

double NllResult::ppl() const { return std::exp(mean_nll()); }

NllResult perplexity(const Model& model, const TokenIds& ids, int64_t ctx,
                     const SessionOptions& opt, bool progress) {
  const int64_t n = int64_t(ids.size());
  check(n >= 2, "perplexity needs at least 2 tokens, got " + std::to_string(n));
  check(ctx == 0 || ctx >= 2,
        "--ctx must be >= 2 (0 = the whole input), got " + std::to_string(ctx));
  const int64_t window = ctx > 0 ? ctx : n;
  const int64_t V = model.config().vocab_size, H = model.config().hidden_size;
  constexpr int64_t kRows = 32;  // lm_head rows at a time: bounds the logits buffer
  std::vector<float> logits(size_t(kRows * V));
  NllResult res;
  ProgressBar bar("perplexity", n, progress && n > opt.chunk);

  for (int64_t w0 = 0; w0 < n; w0 += window) {
    const int64_t len = std::min(window, n - w0);
    if (len < 2) break;  // a lone trailing token predicts nothing
    Session session(model, opt);
    const int32_t* wid = ids.data() + w0;
    session.forward(wid, len, [&](int64_t row0, int64_t rows, const float* hidden) {
      for (int64_t b = 0; b < rows; b += kRows) {
        const int64_t m = std::min(kRows, rows - b);
        session.logits(hidden + b * H, m, logits.data());
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = row0 + b + r;  // position in the window
          if (i + 1 >= len) continue;
          const float* lr = logits.data() + r * V;
          const float mx = *std::max_element(lr, lr + V);
          double sum = 0;
          for (int64_t v = 0; v < V; ++v) sum += std::exp(double(lr[v]) - mx);
          res.sum_nll += std::log(sum) + mx - double(lr[wid[i + 1]]);
          ++res.tokens;
        }
      }
      bar.update(w0 + row0 + rows);
    });
  }
  bar.finish();
  return res;
}

int64_t kv_cache_bytes(const ModelConfig& cfg, const VariantSpec& v, int64_t n,
                       int64_t elem_bytes) {
  if (n <= 0) return 0;
  const Visible last = visible_keys(v, n - 1);  // what the cache keeps after n tokens
  const int64_t core = v.has_core() ? n / v.group : 0;
  const int64_t sinks = v.has_sinks() ? std::min(v.sinks, n) : 0;
  const int64_t raw = n - last.local_begin;
  const int64_t per_layer =
      core * v.core_heads(cfg.num_heads, cfg.num_kv_heads) + (raw + sinks) * cfg.num_kv_heads;
  return 2 * cfg.num_layers * cfg.head_dim * elem_bytes * per_layer;
}

TokenIds parse_token_ids(const std::string& text, const std::string& source) {
  TokenIds ids;
  std::istringstream in(text);
  std::string tok;
  while (in >> tok) {
    int64_t v = -1;
    auto [p, ec] = std::from_chars(tok.data(), tok.data() + tok.size(), v);
    check(
        ec == std::errc() && p == tok.data() + tok.size() && v >= 0 && v <= INT32_MAX,
        source + ": token " + std::to_string(ids.size() + 1) + " is not a token id: '" + tok + "'");
    ids.push_back(int32_t(v));
  }
  check(!ids.empty(), source + ": no token ids (expected whitespace-separated integers)");
  return ids;
}

}  // namespace cca::model

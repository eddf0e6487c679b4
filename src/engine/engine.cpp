#include "engine/engine.hpp"

#include <sys/resource.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <sstream>

#include "cca/error.hpp"
#include "model/safetensors.hpp"
#include "model/untrusted.hpp"
#include "policy.hpp"

namespace cca::engine {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string gib(int64_t bytes) {
  std::ostringstream o;
  o.precision(2);
  o << std::fixed << double(bytes) / double(int64_t(1) << 30) << " GiB";
  return o.str();
}

}  // namespace

const char* device_choice_name(DeviceChoice d) {
  switch (d) {
    case DeviceChoice::automatic: return "auto";
    case DeviceChoice::cpu: return "cpu";
    case DeviceChoice::cuda: return "cuda";
  }
  return "?";
}

DeviceChoice parse_device_choice(const std::string& s) {
  for (auto d : {DeviceChoice::automatic, DeviceChoice::cpu, DeviceChoice::cuda})
    if (s == device_choice_name(d)) return d;
  throw Error("unknown device '" + s + "' (expected cpu, cuda or auto)");
}

int64_t Sequence::kv_bytes() const {
  int64_t b = 0;
  for (const KvCache& c : caches_) b += c.memory_bytes();
  return b;
}
int64_t Sequence::full_kv_bytes() const {
  int64_t b = 0;
  for (const KvCache& c : caches_) b += c.full_cache_bytes();
  return b;
}
int64_t Sequence::allocated_bytes() const {
  int64_t b = 0;
  for (const KvCache& c : caches_) b += c.allocated_bytes();
  return b;
}

double NllResult::ppl() const { return std::exp(mean_nll()); }

DevicePlan plan_device(const EngineOptions& opt, const model::ModelConfig& cfg,
                       const model::Checkpoint& ck) {
  const model::TensorInfo* t = ck.find("model.embed_tokens.weight");
  const DType stored = t ? t->dtype : DType::f32;
  // Why this model cannot run on the GPU as asked ("" when it can).
  std::string why_not = backend_unavailable_reason(BackendKind::cuda);
  if (!why_not.empty()) why_not = "no usable CUDA GPU: " + why_not;
  if (why_not.empty() && cfg.head_dim != 64 && cfg.head_dim != 128)
    why_not = "the GPU attention kernels take head_dim 64 or 128, this model has " +
              std::to_string(cfg.head_dim) + " (--device cpu runs it)";
  const std::optional<DType> want = opt.dtype;
  if (why_not.empty() && want && *want == DType::f32)
    why_not = "the GPU runs bfloat16 or float16 weights, not float32";
  if (why_not.empty() && !want && stored == DType::f32)
    why_not = "this checkpoint is float32; pass --dtype bfloat16 (or float16) to convert it "
              "for the GPU at load";
  if (why_not.empty() && opt.kv_dtype && *opt.kv_dtype == DType::f32)
    why_not = "the GPU attention kernels take bfloat16 or float16 caches, not float32";

  DevicePlan p;
  if (opt.device == DeviceChoice::cuda) check(why_not.empty(), "--device cuda: " + why_not);
  if (opt.device != DeviceChoice::cpu && why_not.empty()) {
    p.device = Device::cuda;
    p.dtype = want.value_or(stored);
    p.kv_dtype = opt.kv_dtype.value_or(p.dtype);
    return p;
  }
  // A machine without a GPU needs no explanation; one whose GPU this model cannot use does.
  if (opt.device == DeviceChoice::automatic && backend_unavailable_reason(BackendKind::cuda).empty())
    p.note = "running on the CPU: " + why_not;
  check(opt.device != DeviceChoice::cpu || !want || *want == DType::f32,
        std::string("the CPU runs float32 weights; --dtype ") + dtype_name(*want) +
            " is for --device cuda");
  p.device = Device::cpu;
  p.dtype = DType::f32;
  p.kv_dtype = opt.kv_dtype.value_or(DType::f32);
  return p;
}

Engine::Engine(const std::string& model_dir, const EngineOptions& opt) : opt_(opt) {
  opt_.variant.validate();
  check(opt_.chunk >= 0, "chunk size must be >= 1, got " + std::to_string(opt_.chunk));
  check(opt_.max_batch >= 1, "batch size must be >= 1, got " + std::to_string(opt_.max_batch));
  check(opt_.plan_tokens >= 0, "planned tokens must be >= 0");
  const model::ModelConfig cfg = model::load_model_config(model_dir);
  const model::Checkpoint ck = model::Checkpoint::open(model_dir);
  model::check_tensors(ck, cfg);
  device_plan_ = plan_device(opt_, cfg, ck);
  ctx_ = std::make_unique<ops::Context>(device_plan_.device == Device::cuda
                                            ? ops::Context::cuda()
                                            : ops::Context::cpu(opt_.threads));
  ctx_->profile().set_enabled(opt_.profile);
  const Device dev = ctx_->device();
  const DType dt = device_plan_.dtype;
  kv_dtype_ = device_plan_.kv_dtype;
  if (opt_.chunk == 0) opt_.chunk = dev == Device::cuda ? 8192 : 256;
  // A step never needs more rows than the tokens planned: a 10-token prompt with --chunk 1000000
  // sizes its buffers (and the GPU caches' chunk workspace) for 10 rows.
  if (opt_.plan_tokens > 0) opt_.chunk = std::min(opt_.chunk, opt_.plan_tokens);
  const int64_t rows = std::max(opt_.max_batch, opt_.chunk);
  const int64_t logit_rows = std::max<int64_t>(opt_.max_batch, 32);

  // Everything this run allocates, checked against free memory before any weight is read.
  const int64_t elem = dtype_size(kv_dtype_);
  if (dev == Device::cuda) {
    plan_.weights = model::weights_bytes(cfg, dt);
    if (opt_.plan_tokens > 0)
      plan_.caches = opt_.max_batch * cfg.num_layers *
                     kv_cache_capacity_bytes(opt_.variant, 1, cfg.num_heads, cfg.num_kv_heads,
                                             cfg.head_dim, kv_dtype_,
                                             {opt_.plan_tokens, opt_.chunk},
                                             kCudaAllocGranularity);
  } else {
    const model::TensorInfo* t = ck.find("model.embed_tokens.weight");
    if (t && t->dtype != DType::f32) plan_.weights = model::weights_bytes(cfg, DType::f32);
    plan_.caches = opt_.max_batch * kv_cache_bytes(cfg, opt_.variant, opt_.plan_tokens, elem);
  }
  plan_.activations = model::Activations::bytes(cfg, dt, rows, logit_rows, kv_dtype_);
  int64_t free_b = 0, total_b = 0;
  ctx_->memory_info(&free_b, &total_b);
  const int64_t margin = dev == Device::cuda ? (int64_t(1) << 30) : 0;  // kernels' scratch, cuBLAS
  if (plan_.total() + margin > free_b) {
    std::ostringstream o;
    o << "not enough " << (dev == Device::cuda ? "GPU" : "host") << " memory on "
      << ctx_->describe() << ": this run needs " << gib(plan_.total() + margin)
      << " (weights " << gib(plan_.weights) << " in " << dtype_name(dt) << ", caches "
      << gib(plan_.caches) << " for " << opt_.max_batch << " x " << opt_.plan_tokens << " tokens of "
      << opt_.variant.describe() << " in " << dtype_name(kv_dtype_) << ", activations "
      << gib(plan_.activations) << " for " << rows << "-token steps";
    if (margin) o << ", " << gib(margin) << " for kernels";
    o << ") and " << gib(free_b) << " of " << gib(total_b) << " is free";
    if (opt_.variant.kind == VariantKind::full) o << "; the cca variant's cache is much smaller";
    o << "; a smaller --chunk or context, or --device cpu, may fit";
    throw Error(o.str());
  }
  model_ = std::make_unique<model::Model>(model_dir, *ctx_, dt);
  acts_ = std::make_unique<model::Activations>(*model_, rows, logit_rows, kv_dtype_);
  if (ctx_->device() == Device::cuda) model::warm_up(*acts_);
}

Engine::~Engine() {
  drop_graph();
  acts_.reset();
  model_.reset();
}

void Engine::drop_graph() {
  if (graph_.exec) ops::Context::destroy_graph(graph_.exec);
  graph_ = DecodeGraph{};
}

void Engine::note_peak_memory() {
  if (device() != Device::cuda) return;
  int64_t free_b = 0, total_b = 0;
  ctx_->memory_info(&free_b, &total_b);
  peak_device_ = std::max(peak_device_, total_b - free_b);
}

int64_t Engine::peak_memory_bytes() const {
  if (device() == Device::cuda) return peak_device_;
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return int64_t(u.ru_maxrss) * 1024;
}

int64_t Engine::sequence_cache_bytes(int64_t max_tokens) const {
  const model::ModelConfig& c = config();
  if (device() != Device::cuda) return kv_cache_bytes(c, opt_.variant, max_tokens, dtype_size(kv_dtype_));
  return c.num_layers * kv_cache_capacity_bytes(opt_.variant, 1, c.num_heads, c.num_kv_heads,
                                                c.head_dim, kv_dtype_, {max_tokens, opt_.chunk},
                                                kCudaAllocGranularity);
}

std::unique_ptr<Sequence> Engine::new_sequence(int64_t max_tokens) {
  check(max_tokens >= 1, "a sequence needs room for at least one token");
  auto s = std::make_unique<Sequence>();
  s->serial_ = ++next_serial_;
  const bool fixed = device() == Device::cuda;
  s->capacity_ = fixed ? max_tokens : 0;
  if (fixed) {
    const int64_t need = sequence_cache_bytes(max_tokens);
    int64_t free_b = 0, total_b = 0;
    ctx_->memory_info(&free_b, &total_b);
    check(need <= free_b, "not enough GPU memory for the caches of a " +
                              std::to_string(max_tokens) + "-token sequence (" +
                              opt_.variant.describe() + ", " + dtype_name(kv_dtype_) + "): " +
                              gib(need) + " needed, " + gib(free_b) + " free");
  }
  s->caches_ = model::make_caches(*model_, opt_.variant, kv_dtype_, fixed ? max_tokens : 0,
                                  fixed ? opt_.chunk : 0, acts_->attn_workspace,
                                  acts_->attn_workspace_bytes);
  return s;
}

void Engine::step(std::span<Sequence* const> seqs, std::span<const TokenIds* const> tokens) {
  last_decode_.clear();
  chosen_rows_ = 0;
  run_step(seqs, tokens, false);
  note_peak_memory();
}

void Engine::run_step(std::span<Sequence* const> seqs, std::span<const TokenIds* const> tokens,
                      bool device_positions) {
  check(!seqs.empty() && seqs.size() == tokens.size(), "a step needs one token list per sequence");
  check(int64_t(seqs.size()) <= opt_.max_batch,
        "a step of " + std::to_string(seqs.size()) + " sequences exceeds the engine's batch of " +
            std::to_string(opt_.max_batch));
  ids_.clear();
  pos_.clear();
  slices_.clear();
  for (size_t i = 0; i < seqs.size(); ++i) {
    Sequence& s = *seqs[i];
    const TokenIds& t = *tokens[i];
    check(!t.empty(), "a step gives each sequence at least one token");
    check(s.capacity_ == 0 || s.length_ + int64_t(t.size()) <= s.capacity_,
          "the sequence is full: " + std::to_string(s.length_ + int64_t(t.size())) +
              " tokens exceed its capacity of " + std::to_string(s.capacity_));
    slices_.push_back({&s.caches_, int64_t(ids_.size()), int64_t(t.size())});
    for (size_t j = 0; j < t.size(); ++j) {
      ids_.push_back(t[j]);
      pos_.push_back(int32_t(s.length_ + int64_t(j)));
    }
  }
  const int64_t n = int64_t(ids_.size());
  check(n <= acts_->rows(), "a step of " + std::to_string(n) + " tokens exceeds the " +
                                std::to_string(acts_->rows()) + "-token step size");
  acts_->set_tokens(ids_.data(), pos_.data(), n);
  model::forward(*acts_, slices_, n, device_positions);
  for (size_t i = 0; i < seqs.size(); ++i) seqs[i]->length_ += int64_t(tokens[i]->size());
  step_rows_ = n;
}

namespace {
bool all_greedy(std::span<const model::SamplingParams> sp) {
  return std::all_of(sp.begin(), sp.end(), [](const model::SamplingParams& p) { return p.greedy; });
}
}  // namespace

void Engine::queue_choice(int64_t m, std::span<const model::SamplingParams> sp,
                          const int32_t* counters_device) {
  const TensorView lg = acts_->logits.slice(0, 0, m);
  const ops::Timed t(ctx_->profile(), "sample");
  if (all_greedy(sp)) {
    ops::argmax_rows(*ctx_, lg, acts_->sel);
  } else {
    for (int64_t r = 0; r < m; ++r) acts_->host_params[r] = sp[size_t(r)].op_params();
    ctx_->upload(acts_->sample_params, acts_->host_params,
                 m * int64_t(sizeof(ops::SampleParams)));
    ops::sample_rows(*ctx_, lg, acts_->sample_params, counters_device, acts_->sel);
  }
  ctx_->download_async(acts_->host_next, acts_->sel, m * 4);
}

std::vector<int32_t> Engine::choose(std::span<const int32_t> rows,
                                    std::span<const model::SamplingParams> sp,
                                    std::span<const int32_t> counters) {
  const int64_t m = int64_t(rows.size());
  check(sp.size() == rows.size() && counters.size() == rows.size(),
        "choose: one sampling setting and counter per row");
  for (int32_t r : rows) check(r >= 0 && r < step_rows_, "a row the step did not run");
  acts_->set_logit_rows(rows.data(), m);
  model::compute_logits(*acts_, m);
  std::copy(counters.begin(), counters.end(), acts_->host_counters);
  ctx_->upload(acts_->sample_counters, acts_->host_counters, m * 4);
  queue_choice(m, sp, acts_->sample_counters);
  ctx_->synchronize();
  chosen_rows_ = m;
  return std::vector<int32_t>(acts_->host_next, acts_->host_next + m);
}

std::vector<Engine::TokenLogprob> Engine::chosen_logprobs(std::span<const int32_t> choice_rows,
                                                          std::span<const int32_t> ids, int top) {
  check(choice_rows.size() == ids.size(), "chosen_logprobs: one id per row");
  const int64_t V = config().vocab_size;
  std::vector<float> row(static_cast<size_t>(V));
  std::vector<TokenLogprob> out;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t r = choice_rows[i];
    check(r >= 0 && r < chosen_rows_, "chosen_logprobs: a row the last choice did not have");
    check(ids[i] >= 0 && ids[i] < V, "chosen_logprobs: an id outside the vocabulary");
    ctx_->download(row.data(), static_cast<const float*>(acts_->logits.data) + int64_t(r) * V,
                   V * 4);
    const float mx = *std::max_element(row.begin(), row.end());
    double sum = 0;
    for (const float x : row) sum += std::exp(double(x) - double(mx));
    const double lse = double(mx) + std::log(sum);
    TokenLogprob t;
    t.logprob = float(double(row[size_t(ids[i])]) - lse);
    const int64_t k = std::clamp<int64_t>(top, 0, V);
    if (k > 0) {
      std::vector<int32_t> order(static_cast<size_t>(V));
      for (int64_t v = 0; v < V; ++v) order[size_t(v)] = int32_t(v);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
        return row[size_t(a)] > row[size_t(b)] || (row[size_t(a)] == row[size_t(b)] && a < b);
      });
      for (int64_t j = 0; j < k; ++j)
        t.top.emplace_back(order[size_t(j)], float(double(row[size_t(order[size_t(j)])]) - lse));
    }
    out.push_back(std::move(t));
  }
  return out;
}

std::vector<int32_t> Engine::decode(std::span<Sequence* const> seqs,
                                    std::span<const int32_t> tokens,
                                    std::span<const model::SamplingParams> sampling) {
  check(seqs.size() == tokens.size() && seqs.size() == sampling.size() && !seqs.empty(),
        "decode: one token and one sampling setting per sequence");
  const int64_t S = int64_t(seqs.size());
  std::vector<int32_t> rows(static_cast<size_t>(S)), pos(static_cast<size_t>(S));
  for (int64_t i = 0; i < S; ++i) {
    rows[size_t(i)] = int32_t(i);
    pos[size_t(i)] = int32_t(seqs[size_t(i)]->length_);
  }
  bool replayable = device() == Device::cuda && opt_.cuda_graphs && !opt_.profile;
  for (Sequence* s : seqs)
    for (const KvCache& c : s->caches_) replayable = replayable && c.next_step_replayable();
  std::vector<uint64_t> batch;
  for (const Sequence* s : seqs) batch.push_back(s->serial_);
  const bool greedy = all_greedy(sampling);
  std::vector<TokenIds> tok(static_cast<size_t>(S));
  std::vector<const TokenIds*> tp;
  for (int64_t i = 0; i < S; ++i) {
    tok[size_t(i)] = {tokens[size_t(i)]};
    tp.push_back(&tok[size_t(i)]);
  }

  if (!replayable) {  // eager; each row's draw is counted by the position of its token
    drop_graph();
    step(seqs, tp);
    return choose(rows, sampling, pos);
  }
  if (graph_.exec && graph_.seqs == batch && graph_.greedy == greedy) {
    // Replay: new ids, positions and sampling settings into the pinned staging the graph's
    // copies read.
    acts_->stage_tokens(tokens.data(), pos.data(), S);
    if (!greedy)
      for (int64_t r = 0; r < S; ++r) acts_->host_params[r] = sampling[size_t(r)].op_params();
    ctx_->launch_graph(graph_.exec);
    for (Sequence* s : seqs) {
      for (KvCache& c : s->caches_) c.advance_replayed();
      ++s->length_;
    }
    step_rows_ = S;
    chosen_rows_ = S;
    ++graph_replays_;
  } else {
    drop_graph();
    // A batch is captured the second time in a row it decodes: the first step runs eagerly
    // and so warms every lazily initialised kernel attribute and GEMM plan of its shapes.
    const bool capture = last_decode_ == batch;
    if (capture) ctx_->begin_capture();
    try {
      run_step(seqs, tp, /*device_positions=*/true);
      acts_->set_logit_rows(rows.data(), S);
      model::compute_logits(*acts_, S);
      queue_choice(S, sampling, acts_->positions);  // the counters: each row's position
    } catch (...) {
      // A failed capture leaves the caches' bookkeeping a step ahead of their contents.
      if (capture) ctx_->abort_capture();
      throw;
    }
    if (capture) {
      graph_ = DecodeGraph{batch, greedy, ctx_->end_capture()};
      ctx_->launch_graph(graph_.exec);
      ++graph_captures_;
    }
    last_decode_ = batch;
    chosen_rows_ = S;
  }
  ctx_->synchronize();
  note_peak_memory();
  return std::vector<int32_t>(acts_->host_next, acts_->host_next + S);
}

void Engine::logits(std::span<const int32_t> rows, std::vector<float>& out) {
  const int64_t m = int64_t(rows.size()), V = config().vocab_size;
  for (int32_t r : rows) check(r >= 0 && r < step_rows_, "logits of a row the step did not run");
  acts_->set_logit_rows(rows.data(), m);
  model::compute_logits(*acts_, m);
  out.resize(size_t(m * V));
  ctx_->download(out.data(), acts_->logits.data, m * V * 4);
}

int32_t Engine::prefill(Sequence& seq, const TokenIds& ids, const model::SamplingParams& sampling,
                        const std::function<void(int64_t)>& progress) {
  check(!ids.empty(), "the prompt is empty: nothing to continue");
  const int64_t n = int64_t(ids.size());
  TokenIds part;
  Sequence* s = &seq;
  for (int64_t r0 = 0; r0 < n; r0 += opt_.chunk) {
    const int64_t rows = std::min(opt_.chunk, n - r0);
    part.assign(ids.begin() + r0, ids.begin() + r0 + rows);
    const TokenIds* t = &part;
    step(std::span(&s, 1), std::span(&t, 1));
    if (progress) progress(r0 + rows);
  }
  const int32_t last = int32_t(step_rows_ - 1), counter = int32_t(seq.length_ - 1);
  return choose(std::span(&last, 1), std::span(&sampling, 1), std::span(&counter, 1)).front();
}

std::vector<GenerateResult> Engine::generate(std::span<const GenerateRequest> requests,
                                             int64_t max_context, const RunCallbacks& cb) {
  check(!requests.empty(), "no prompts to generate from");
  const double t0 = now_s();
  ctx_->profile().reset();
  breakdown_ = {};
  const size_t S = requests.size();
  std::vector<GenerateResult> res(S);
  std::vector<std::unique_ptr<Sequence>> seqs(S);
  int64_t total_prompt = 0, done_prompt = 0;
  for (const GenerateRequest& r : requests) {
    check(!r.prompt.empty(), "the prompt is empty: nothing to continue");
    check(r.max_new_tokens >= 0, "max new tokens must be >= 0");
    r.sampling.validate();
    total_prompt += int64_t(r.prompt.size());
  }

  std::vector<bool> active(S, false);
  std::vector<int32_t> last(S, 0);
  std::vector<StopRules> rules(S);
  for (size_t i = 0; i < S; ++i)
    rules[i] = {requests[i].stop_ids, requests[i].max_new_tokens, max_context};
  // Takes `id` as sequence i's next token; false when the sequence stops with it.
  auto emit = [&](size_t i, int32_t id) {
    res[i].tokens.push_back(id);
    if (cb.token) cb.token(int64_t(i), id);
    if (const char* why = rules[i].after_token(id, int64_t(res[i].tokens.size()))) {
      res[i].stop_reason = why;
      return false;
    }
    return true;
  };
  // True when sequence i may take another token (the context limit).
  auto room = [&](size_t i) {
    if (const char* why = rules[i].before_step(seqs[i]->length())) {
      res[i].stop_reason = why;
      return false;
    }
    return true;
  };

  for (size_t i = 0; i < S; ++i) {
    const GenerateRequest& r = requests[i];
    res[i].prompt_tokens = int64_t(r.prompt.size());
    res[i].stop_reason = "max new tokens";
    seqs[i] = new_sequence(rules[i].capacity(res[i].prompt_tokens));
    const int32_t first = prefill(*seqs[i], r.prompt, r.sampling, [&](int64_t d) {
      if (cb.prefill_progress) cb.prefill_progress(done_prompt + d, total_prompt);
    });
    done_prompt += res[i].prompt_tokens;
    if (r.max_new_tokens == 0 || !room(i)) continue;
    last[i] = first;
    res[i].ttft_s = now_s() - t0;
    active[i] = emit(i, first);
  }

  ops::Profile& prof = ctx_->profile();
  if (prof.enabled()) {
    breakdown_.prefill = prof.report();
    prof.reset();
  }
  const double d0 = now_s();
  std::vector<Sequence*> batch;
  std::vector<int32_t> step_ids;
  std::vector<model::SamplingParams> step_sampling;
  std::vector<size_t> who;
  while (true) {
    who.clear();
    for (size_t i = 0; i < S; ++i)
      if (active[i] && room(i)) who.push_back(i);
      else active[i] = false;
    if (who.empty()) break;
    for (size_t b0 = 0; b0 < who.size(); b0 += size_t(opt_.max_batch)) {
      const size_t nb = std::min(who.size() - b0, size_t(opt_.max_batch));
      batch.clear();
      step_ids.clear();
      step_sampling.clear();
      for (size_t j = 0; j < nb; ++j) {
        const size_t i = who[b0 + j];
        batch.push_back(seqs[i].get());
        step_ids.push_back(last[i]);
        step_sampling.push_back(requests[i].sampling);
      }
      const std::vector<int32_t> next = decode(batch, step_ids, step_sampling);
      for (size_t j = 0; j < nb; ++j) {
        const size_t i = who[b0 + j];
        ++res[i].decode_steps;
        last[i] = next[j];
        active[i] = emit(i, next[j]);
      }
    }
  }
  const double decode_s = now_s() - d0;
  if (prof.enabled()) {
    breakdown_.decode = prof.report();
    prof.reset();
  }
  for (size_t i = 0; i < S; ++i) {
    res[i].decode_s = decode_s;
    res[i].kv_bytes = seqs[i]->kv_bytes();
    res[i].full_kv_bytes = seqs[i]->full_kv_bytes();
  }
  return res;
}

NllResult Engine::perplexity(const TokenIds& ids, int64_t ctx,
                             const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t n = int64_t(ids.size());
  check(n >= 2, "perplexity needs at least 2 tokens, got " + std::to_string(n));
  check(ctx == 0 || ctx >= 2,
        "--ctx must be >= 2 (0 = the whole input), got " + std::to_string(ctx));
  const int64_t window = ctx > 0 ? ctx : n, V = config().vocab_size;
  const int64_t block = acts_->logit_rows();  // logits rows at a time: bounds the buffer
  std::vector<float> lg;
  std::vector<int32_t> rows;
  NllResult res;
  TokenIds part;
  for (int64_t w0 = 0; w0 < n; w0 += window) {
    const int64_t len = std::min(window, n - w0);
    if (len < 2) break;  // a lone trailing token predicts nothing
    auto seq = new_sequence(len);
    Sequence* s = seq.get();
    const int32_t* wid = ids.data() + w0;
    for (int64_t r0 = 0; r0 < len; r0 += opt_.chunk) {
      const int64_t chunk_rows = std::min(opt_.chunk, len - r0);
      part.assign(wid + r0, wid + r0 + chunk_rows);
      const TokenIds* t = &part;
      step(std::span(&s, 1), std::span(&t, 1));
      for (int64_t b = 0; b < chunk_rows; b += block) {
        const int64_t m = std::min(block, chunk_rows - b);
        rows.resize(size_t(m));
        for (int64_t r = 0; r < m; ++r) rows[size_t(r)] = int32_t(b + r);
        logits(rows, lg);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = r0 + b + r;  // position in the window
          if (i + 1 >= len) continue;
          const float* lr = lg.data() + r * V;
          const float mx = *std::max_element(lr, lr + V);
          double sum = 0;
          for (int64_t v = 0; v < V; ++v) sum += std::exp(double(lr[v]) - mx);
          const double nll = std::log(sum) + mx - double(lr[wid[i + 1]]);
          // NaN or infinite logits (broken weights, an overflow) give no perplexity at all.
          check(std::isfinite(nll), "the logits at position " + std::to_string(w0 + i) +
                                        " are not finite (NaN or infinity): the model's weights "
                                        "or its numerics are broken; no perplexity");
          res.sum_nll += nll;
          ++res.tokens;
        }
      }
      if (progress) progress(w0 + r0 + chunk_rows, n);
    }
  }
  return res;
}

const char* StopRules::after_token(int32_t id, int64_t generated) const {
  if (std::find(stop_ids.begin(), stop_ids.end(), int64_t(id)) != stop_ids.end())
    return "stop token";
  if (generated >= max_new_tokens) return "max new tokens";
  return nullptr;
}

const char* StopRules::before_step(int64_t length) const {
  return max_context > 0 && length >= max_context ? "max context" : nullptr;
}

int64_t StopRules::capacity(int64_t prompt_tokens) const {
  int64_t cap = prompt_tokens + std::max<int64_t>(max_new_tokens, 1);
  if (max_context > 0) cap = std::min(cap, std::max(max_context, prompt_tokens));
  return cap;
}

void check_prompt_length(int64_t tokens, int64_t limit, const model::ModelConfig& cfg) {
  if (limit <= 0 || tokens <= limit) return;
  std::ostringstream o;
  o << "the prompt has " << tokens << " tokens, more than the limit of " << limit;
  if (limit == cfg.max_position_embeddings) o << " (the model's max_position_embeddings)";
  o << "; pass --allow-long-prompt to run it anyway (positions past max_position_embeddings = "
    << cfg.max_position_embeddings << " were not trained), or --max-context N to set the limit";
  throw Error(o.str());
}

int64_t kv_cache_bytes(const model::ModelConfig& cfg, const VariantSpec& v, int64_t n,
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

TokenIds parse_token_ids(const std::string& text, const std::string& source, int64_t vocab_size) {
  TokenIds ids;
  std::istringstream in(text);
  std::string tok;
  while (in >> tok) {
    int64_t v = -1;
    auto [p, ec] = std::from_chars(tok.data(), tok.data() + tok.size(), v);
    const std::string which = source + ": token " + std::to_string(ids.size() + 1);
    check(ec == std::errc() && p == tok.data() + tok.size() && v >= 0,
          which + " is not a token id: '" + model::excerpt(tok) + "'");
    // Checked here, before any weight is read, not when the embedding row is looked up.
    check(v < vocab_size, which + " is " + std::to_string(v) +
                              ", outside the model's vocabulary (vocab_size " +
                              std::to_string(vocab_size) + ")");
    ids.push_back(int32_t(v));
  }
  check(!ids.empty(), source + ": no token ids (expected whitespace-separated integers)");
  return ids;
}

}  // namespace cca::engine

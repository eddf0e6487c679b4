// The engine: a loaded model on one device, sequences with their caches, steps that run a batch
// of sequences together (prefill chunks, decode steps), and the generate and perplexity loops.
// Frontends (the CLI, later the server and Python) only call this layer; it never prints and
// never names a command-line flag: progress and tokens are reported through callbacks.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "model/model.hpp"
#include "model/safetensors.hpp"
#include "model/sampler.hpp"
#include "ops/ops.hpp"

namespace cca::engine {

using model::TokenIds;

enum class DeviceChoice : uint8_t { automatic, cpu, cuda };
const char* device_choice_name(DeviceChoice d);
DeviceChoice parse_device_choice(const std::string& s);  // "auto", "cpu", "cuda"

struct EngineOptions {
  DeviceChoice device = DeviceChoice::automatic;  // automatic: the GPU when one is usable
  int threads = 0;                                // cpu ops and attention; 0 = all cores
  // Weights and activations: cpu float32; cuda bfloat16/float16, by default the checkpoint's
  // (a float32 checkpoint needs one to be named: it is converted at load).
  std::optional<DType> dtype;
  std::optional<DType> kv_dtype;  // the caches' dtype; default: the activations'
  VariantSpec variant;
  int64_t chunk = 0;        // prefill tokens per step; 0: 256 on the cpu, 8192 on the GPU
  int64_t max_batch = 1;    // sequences stepped together
  int64_t plan_tokens = 0;  // tokens per sequence the caller will run (memory check); 0: none
  bool cuda_graphs = true;  // GPU decode steps replayed from a captured CUDA graph
  // Time the named regions of each step (ops::Profile): Engine::breakdown(). Decode steps then
  // run eagerly, and every region costs an event pair: slower, for shares only.
  bool profile = false;
};

// Where and in what precision a run of a model goes, decided before anything loads.
struct DevicePlan {
  Device device = Device::cpu;
  DType dtype = DType::f32;     // weights and activations
  DType kv_dtype = DType::f32;  // the caches
  std::string note;  // why --device auto chose the CPU over a usable GPU ("" otherwise)
};

// The rules: --device cpu runs float32 (caches in kv_dtype, default float32). --device cuda
// needs a usable GPU, a head dim its kernels take (64 or 128) and 16-bit weights (the
// checkpoint's, or --dtype's: a float32 checkpoint is converted only when asked); the caches are
// 16-bit there. --device auto takes the GPU when all of that holds, else the CPU, saying why in
// `note`. Throws cca::Error naming the problem for an explicit choice that cannot run.
DevicePlan plan_device(const EngineOptions& opt, const model::ModelConfig& cfg,
                       const model::Checkpoint& ck);

// What one sequence's caches hold, and their fixed capacity.
class Sequence {
 public:
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }  // tokens; 0 = growing (cpu)
  int64_t kv_bytes() const;                       // bytes of keys and values held
  int64_t full_kv_bytes() const;                  // a full cache's bytes for the same tokens
  int64_t allocated_bytes() const;

 private:
  friend class Engine;
  std::vector<KvCache> caches_;
  int64_t length_ = 0, capacity_ = 0;
  // Unique per engine: a captured decode graph names its batch by serials, not addresses (a
  // sequence freed mid-run may leave its address to a new one with other cache buffers).
  uint64_t serial_ = 0;
};

struct GenerateRequest {
  TokenIds prompt;
  model::SamplingParams sampling;
  int64_t max_new_tokens = 128;
  std::vector<int64_t> stop_ids;  // generation ends after emitting one of these
};

// The stop rules of one generation, shared by generate() and the server's scheduler: a stop id
// ends it after that token, max_new_tokens after that many tokens, and the context limit
// (max_context > 0) before a step would take the caches past it.
struct StopRules {
  std::vector<int64_t> stop_ids;
  int64_t max_new_tokens = 128;
  int64_t max_context = 0;
  // After the sequence took its `generated`-th new token `id`: why it stops ("stop token",
  // "max new tokens"), or nullptr when it goes on.
  const char* after_token(int32_t id, int64_t generated) const;
  // Before a step feeds the sequence's last token, with `length` tokens in its caches: "max
  // context" when the limit is reached, else nullptr.
  const char* before_step(int64_t length) const;
  // Tokens the caches of a sequence with this prompt can ever hold under these rules (its
  // capacity: the prompt plus max_new_tokens, at least one, within the context limit).
  int64_t capacity(int64_t prompt_tokens) const;
};

struct GenerateResult {
  TokenIds tokens;          // generated ids (the stop token included when one ended it)
  std::string stop_reason;  // "stop token", "max new tokens", "max context"
  int64_t prompt_tokens = 0;
  double ttft_s = 0;           // from the start of the run to this sequence's first token
  int64_t decode_steps = 0;    // single-token steps this sequence took part in
  double decode_s = 0;         // wall time of the decode loop
  int64_t kv_bytes = 0, full_kv_bytes = 0;  // at the end
};

struct RunCallbacks {
  std::function<void(int64_t done, int64_t total)> prefill_progress;  // tokens of the prompt(s)
  std::function<void(int64_t seq, int32_t id)> token;                 // each new id as chosen
};

// Bytes the caches of all layers hold after n tokens (keys and values) under `v`, by the cache
// rules (cca: floor(n/g) core tokens + the raw window; sliding: window; streaming/lminfinite:
// sinks + window; full: n), with elements of `elem_bytes`.
int64_t kv_cache_bytes(const model::ModelConfig& cfg, const VariantSpec& v, int64_t n,
                       int64_t elem_bytes);

// Throws cca::Error when a prompt of `tokens` exceeds `limit` (> 0), saying how to allow it.
void check_prompt_length(int64_t tokens, int64_t limit, const model::ModelConfig& cfg);

// Whitespace-separated token ids, each in [0, vocab_size); `source` names the input in errors.
TokenIds parse_token_ids(const std::string& text, const std::string& source, int64_t vocab_size);

struct NllResult {
  int64_t tokens = 0;  // predicted tokens
  double sum_nll = 0;
  double mean_nll() const { return tokens ? sum_nll / double(tokens) : 0.0; }
  double ppl() const;
};

// The memory a run needs on the engine's device, by part.
struct MemoryPlan {
  int64_t weights = 0, caches = 0, activations = 0;
  int64_t total() const { return weights + caches + activations; }
};

class Engine {
 public:
  // Resolves the device, checks that weights, caches (max_batch sequences of plan_tokens) and
  // activations fit its free memory (cca::Error with the numbers otherwise) before reading any
  // weight, then loads the model.
  Engine(const std::string& model_dir, const EngineOptions& opt);
  ~Engine();

  const model::ModelConfig& config() const { return model_->config(); }
  const model::Model& model() const { return *model_; }
  const ops::Context& context() const { return *ctx_; }
  Device device() const { return ctx_->device(); }
  DType dtype() const { return model_->dtype(); }
  DType kv_dtype() const { return kv_dtype_; }
  const VariantSpec& variant() const { return opt_.variant; }
  int64_t chunk() const { return opt_.chunk; }
  int64_t max_batch() const { return opt_.max_batch; }
  const MemoryPlan& memory_plan() const { return plan_; }
  const DevicePlan& device_plan() const { return device_plan_; }
  // Peak device memory in use (cuda: sampled after each step; cpu: the process's peak RSS).
  int64_t peak_memory_bytes() const;

  // A sequence whose caches hold up to `max_tokens` (GPU: allocated now, at that fixed capacity;
  // cpu: the caches grow). cca::Error naming the bytes when they do not fit.
  std::unique_ptr<Sequence> new_sequence(int64_t max_tokens);
  // The cache bytes a sequence of up to `max_tokens` takes: on the GPU what new_sequence
  // allocates (every layer at fixed capacity); on the CPU what its caches hold at max_tokens
  // (kv_cache_bytes), as the memory check counts them.
  int64_t sequence_cache_bytes(int64_t max_tokens) const;

  // One step: sequence seqs[i] receives tokens[i] (together at most chunk() tokens, at most
  // max_batch() sequences). Sequences given one token each attend in one batched call.
  void step(std::span<Sequence* const> seqs, std::span<const TokenIds* const> tokens);
  // After a step: float32 logits [rows.size(), V] of step rows `rows`, to the host.
  void logits(std::span<const int32_t> rows, std::vector<float>& out);
  // After a step: the next token of each of step rows `rows`, chosen on the device (argmax, or
  // ops::sample_rows with `sampling` and draw counters `counters`: the rows' positions).
  std::vector<int32_t> choose(std::span<const int32_t> rows,
                              std::span<const model::SamplingParams> sampling,
                              std::span<const int32_t> counters);

  // After choose() or decode(): the log-probability of ids[i] under row choice_rows[i] of that
  // choice (its i-th row: choose()'s rows, decode()'s sequences), from the log-softmax of the
  // raw logits (before temperature, top-k or top-p), with the `top` most likely tokens of each
  // row and theirs (most likely first, the lower id first among equals).
  struct TokenLogprob {
    float logprob = 0;
    std::vector<std::pair<int32_t, float>> top;
  };
  std::vector<TokenLogprob> chosen_logprobs(std::span<const int32_t> choice_rows,
                                            std::span<const int32_t> ids, int top = 0);

  // One decode step: seqs[i] takes tokens[i]; returns the next token of each, chosen with
  // sampling[i] (the draw counted by the token's position). On the GPU (cuda_graphs) the whole
  // step — every layer, the logits and the choice — is captured in a CUDA graph the second time
  // in a row a batch decodes, and replayed while the batch (and whether it is all greedy) stays
  // the same and no cache's window moves; otherwise it runs as step() then choose().
  std::vector<int32_t> decode(std::span<Sequence* const> seqs, std::span<const int32_t> tokens,
                              std::span<const model::SamplingParams> sampling);
  // With EngineOptions::profile: where the time of the last generate() went, its prefills and
  // its decode steps apart.
  struct Breakdown {
    std::vector<ops::Profile::Row> prefill, decode;
  };
  const Breakdown& breakdown() const { return breakdown_; }
  int64_t graph_replays() const { return graph_replays_; }  // decode steps run from a graph
  int64_t graph_captures() const { return graph_captures_; }

  // Runs `ids` into `seq` in chunks and returns the token chosen after the last one.
  int32_t prefill(Sequence& seq, const TokenIds& ids, const model::SamplingParams& sampling,
                  const std::function<void(int64_t)>& progress = {});

  // Prefills each request's prompt, then decodes all of them together, one token per sequence
  // per step, until each stops (its stop ids, its max_new_tokens, or `max_context` tokens in
  // all, when > 0).
  std::vector<GenerateResult> generate(std::span<const GenerateRequest> requests,
                                       int64_t max_context, const RunCallbacks& cb = {});

  // Mean next-token negative log-likelihood of `ids`: consecutive windows of at most `ctx`
  // tokens (0 = one window), each from empty caches; every token of a window but the first is
  // predicted. Needs at least 2 tokens.
  NllResult perplexity(const TokenIds& ids, int64_t ctx,
                       const std::function<void(int64_t, int64_t)>& progress = {});

 private:
  EngineOptions opt_;
  std::unique_ptr<ops::Context> ctx_;
  std::unique_ptr<model::Model> model_;
  std::unique_ptr<model::Activations> acts_;
  DType kv_dtype_ = DType::f32;
  DevicePlan device_plan_;
  MemoryPlan plan_;
  int64_t step_rows_ = 0;  // rows of the last step
  int64_t chosen_rows_ = 0;  // logits rows of the last choose() or decode()
  uint64_t next_serial_ = 0;
  int64_t peak_device_ = 0;
  // The captured decode step: its sequences (in order) and whether it ends in the argmax.
  struct DecodeGraph {
    std::vector<uint64_t> seqs;  // serials
    bool greedy = true;
    void* exec = nullptr;
  };
  DecodeGraph graph_;
  std::vector<uint64_t> last_decode_;  // the batch (serials) of the last eager decode step
  int64_t graph_replays_ = 0, graph_captures_ = 0;
  Breakdown breakdown_;
  void drop_graph();
  void note_peak_memory();
  void run_step(std::span<Sequence* const> seqs, std::span<const TokenIds* const> tokens,
                bool device_positions);
  // Queues the choice for logits rows [0, m) into acts_->sel and its download to host_next.
  void queue_choice(int64_t m, std::span<const model::SamplingParams> sampling,
                    const int32_t* counters_device);
  std::vector<int32_t> ids_, pos_;
  std::vector<model::StepSlice> slices_;
};

}  // namespace cca::engine

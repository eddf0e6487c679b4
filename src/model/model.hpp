// A Llama-family decoder (Llama, Mistral, Qwen2) written once over the ops (ops/ops.hpp) and the
// attention library: RMSNorm, rotary embedding, grouped-query attention through one cca::KvCache
// per layer (any variant), SwiGLU MLP. The same code runs on the CPU (float32) and on the GPU
// (bfloat16/float16 weights and activations, a float32 residual stream).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "cca/kv_cache.hpp"
#include "model/config.hpp"
#include "model/rope.hpp"
#include "model/weights.hpp"
#include "ops/ops.hpp"

namespace cca::model {

using TokenIds = std::vector<int32_t>;

class Model {
 public:
  // Reads config.json and the safetensors checkpoint of `dir` (every tensor checked) into
  // weights of `dtype` on the context's device (float32 on the cpu; bfloat16/float16 on cuda).
  Model(const std::string& dir, const ops::Context& ctx, DType dtype);
  ~Model();

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return cfg_; }
  const Weights& weights() const { return *weights_; }
  const ops::Context& context() const { return *ctx_; }
  DType dtype() const { return weights_->dtype(); }  // weights and activations
  TensorView inv_freq() const { return inv_freq_; }   // rotary frequencies [D/2], on the device

 private:
  std::string dir_;
  ModelConfig cfg_;
  const ops::Context* ctx_;
  std::unique_ptr<Weights> weights_;
  void* inv_freq_mem_ = nullptr;
  TensorView inv_freq_;
};

// The buffers of one forward step of at most `rows` tokens and `logit_rows` logits rows, on the
// model's device: allocated once, reused by every step.
class Activations {
 public:
  // `kv_dtype`: the caches' dtype; where it differs from the model's, q/k/v and the attention
  // output pass through buffers of that dtype (ops::convert).
  Activations(const Model& m, int64_t rows, int64_t logit_rows, DType kv_dtype);
  ~Activations();
  Activations(const Activations&) = delete;
  Activations& operator=(const Activations&) = delete;

  // Bytes an Activations of this size allocates (for the memory check before loading).
  static int64_t bytes(const ModelConfig& cfg, DType dtype, int64_t rows, int64_t logit_rows,
                       DType kv_dtype);

  int64_t rows() const { return rows_; }
  int64_t logit_rows() const { return logit_rows_; }
  // Token ids and their positions for the next forward, `n` rows: checked, staged in the host
  // buffers, and copied to the device (set_tokens) or only staged (stage_tokens: a replayed
  // CUDA graph copies them).
  void set_tokens(const int32_t* ids, const int32_t* positions, int64_t n);
  void stage_tokens(const int32_t* ids, const int32_t* positions, int64_t n);
  void upload_tokens(int64_t n);
  // Rows of the last forward to take logits of (copied to the device).
  void set_logit_rows(const int32_t* rows, int64_t m);

  const Model& model() const { return *m_; }
  TensorView x, h, qkv, att, gate_up;  // residual (float32), normed, q|k|v, attention, gate|up
  TensorView sel_x, sel_h, logits;     // the logits path: gathered rows, normed, float32 logits
  TensorView kv_qkv, kv_att;           // q|k|v and attention in the caches' dtype (or empty)
  int32_t *ids = nullptr, *positions = nullptr, *sel = nullptr;  // device int32 arrays
  void* attn_workspace = nullptr;  // the decode kernel's scratch (RunOptions::workspace)
  int64_t attn_workspace_bytes = 0;
  // Host staging, pinned on the GPU (fixed addresses that a CUDA graph's copies use): ids and
  // positions [rows], logits rows [logit_rows], and where results land: next ids [logit_rows],
  // logits [logit_rows, V].
  int32_t *host_ids = nullptr, *host_pos = nullptr, *host_sel = nullptr, *host_next = nullptr;
  float* host_logits = nullptr;
  // Sampling of the logits rows: per-row parameters and draw counters, on the device and staged.
  ops::SampleParams* sample_params = nullptr;
  int32_t* sample_counters = nullptr;
  ops::SampleParams* host_params = nullptr;
  int32_t* host_counters = nullptr;

 private:
  const Model* m_;
  int64_t rows_, logit_rows_;
  std::vector<void*> mem_, host_mem_;
};

// A run of consecutive rows of a step that belong to one sequence, whose per-layer caches
// receive their keys and values (positions continue each cache's length).
struct StepSlice {
  std::vector<KvCache>* caches = nullptr;
  int64_t row0 = 0, rows = 0;
};

// The forward of `n` rows (ids and positions set in `a`) through every layer; the slices cover
// rows [0, n) in order. The slices of one row each at the front (a decode step of several
// sequences, or the decode tokens of a step that also feeds prompt chunks) attend in one batched
// call per layer, the others one by one; with `device_positions` (such a step, every cache
// next_step_replayable()) through kv_cache_decode_step, whose launches a CUDA graph can replay.
// Leaves the final residual in a.x.
void forward(Activations& a, std::span<const StepSlice> slices, int64_t n,
             bool device_positions = false);

// Tunes the GEMMs of a full-size step (all of a's rows; ops::tune_linear) before any request, so
// that prefill chunks run the fastest algorithms and no prompt pays for the timing. Runs one
// layer's projections on whatever a's buffers hold (a.x is rewritten by the next forward) and
// waits for them.
void warm_up(Activations& a);

// a.logits rows [0, m) = lm_head(final_norm(a.x rows set by set_logit_rows)), float32.
void compute_logits(Activations& a, int64_t m);

// Per-layer caches for one sequence of at most `max_tokens` tokens (0: growing stores) in chunks
// of at most `max_chunk`, on the model's device, in `kv_dtype`.
std::vector<KvCache> make_caches(const Model& m, const VariantSpec& v, DType kv_dtype,
                                 int64_t max_tokens, int64_t max_chunk, void* workspace = nullptr,
                                 int64_t workspace_bytes = 0);

}  // namespace cca::model

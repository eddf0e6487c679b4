// A Llama-family decoder on the CPU in float32: RMSNorm, rotary embedding, grouped-query
// attention through the attention library (one cca::KvCache per layer, any variant), SwiGLU MLP.
// Matrix products go through OpenBLAS (cblas_sgemm, multi-threaded).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cca/kv_cache.hpp"
#include "model/config.hpp"
#include "model/rope.hpp"
#include "model/weights.hpp"

namespace cca::model {

using TokenIds = std::vector<int32_t>;

class Model {
 public:
  // Reads config.json and the safetensors checkpoint of `dir`; checks every tensor.
  explicit Model(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return cfg_; }
  const Weights& weights() const { return *weights_; }
  const Rope& rope() const { return rope_; }

 private:
  std::string dir_;
  ModelConfig cfg_;
  std::unique_ptr<Weights> weights_;
  Rope rope_;
};

// Threads for the matrix products, the other loops and the attention backend (all OpenMP);
// 0 = OpenMP's default (OMP_NUM_THREADS, else all cores).
void set_compute_threads(int threads);

struct SessionOptions {
  VariantSpec variant;  // default: cca g=16 s=1024
  int threads = 0;      // 0 = OMP_NUM_THREADS, else all cores
  int64_t chunk = 256;  // tokens per forward step: bounds activation memory of long prompts
};

// One sequence being run: its position and the per-layer caches.
class Session {
 public:
  Session(const Model& model, const SessionOptions& opt);
  ~Session();

  int64_t length() const { return pos_; }
  const Model& model() const { return *model_; }
  const SessionOptions& options() const { return opt_; }

  // Called after each chunk with the final-normed hidden states [rows, H] of ids
  // [row0, row0 + rows) (row0 counted from the start of this forward call).
  using HiddenFn = std::function<void(int64_t row0, int64_t rows, const float* hidden)>;

  // Runs n tokens at positions length() .. length()+n-1, in chunks of at most opt.chunk.
  void forward(const int32_t* ids, int64_t n, const HiddenFn& on_hidden);

  // logits [rows, V] = hidden [rows, H] x lm_head^T.
  void logits(const float* hidden, int64_t rows, float* out) const;

  // Runs n tokens and returns the logits [V] of the last one; `on_chunk(done)` after each chunk.
  std::vector<float> forward_last(const int32_t* ids, int64_t n,
                                  const std::function<void(int64_t)>& on_chunk = {});

  int64_t kv_bytes() const;       // bytes held by the caches
  int64_t full_kv_bytes() const;  // bytes a full cache would hold for the same tokens

 private:
  void run_chunk(const int32_t* ids, int64_t n);

  const Model* model_;
  SessionOptions opt_;
  std::vector<KvCache> caches_;
  int64_t pos_ = 0;
  // Activations of one chunk: x residual, h normed, q/k/v, attention output, MLP.
  std::vector<float> x_, h_, q_, k_, v_, att_, gate_, up_, cos_, sin_;
};

}  // namespace cca::model

// The tensors a Llama-family checkpoint must hold, their checks, and the float32 weights the
// forward pass reads. Memory: float32 tensors stored 4-byte aligned are used in place from the
// mapping (no copy); float16/bfloat16 tensors are converted once at load into owned float32
// (4 bytes per parameter, twice the checkpoint's size).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "model/safetensors.hpp"

namespace cca::model {

struct ExpectedTensor {
  std::string name;
  std::vector<int64_t> shape;
};

// Hugging Face names and shapes for `cfg` (lm_head.weight only when embeddings are untied).
std::vector<ExpectedTensor> expected_tensors(const ModelConfig& cfg);

// Throws cca::Error listing missing, mis-shaped and unexpected tensors by name. With tied
// embeddings a stored lm_head.weight is allowed (and ignored); rotary_emb.inv_freq buffers that
// old exports carry are ignored.
void check_tensors(const Checkpoint& ck, const ModelConfig& cfg);

// y[n, out] = x[n, in] W^T (+ b): W is [out, in] row-major as stored by Hugging Face.
struct Linear {
  const float* w = nullptr;
  const float* b = nullptr;  // nullptr: no bias
  int64_t out = 0, in = 0;
};

struct LayerWeights {
  const float* attn_norm = nullptr;  // [H]
  Linear q, k, v, o;
  const float* mlp_norm = nullptr;  // [H]
  Linear gate, up, down;
};

class Weights {
 public:
  // Checks every tensor (check_tensors) and makes float32 weights; keeps `ck` mapped.
  Weights(Checkpoint ck, const ModelConfig& cfg);

  const float* embed = nullptr;  // [V, H]
  std::vector<LayerWeights> layers;
  const float* final_norm = nullptr;  // [H]
  const float* lm_head = nullptr;     // [V, H]; the embedding when tied

  int64_t parameter_count() const { return params_; }
  int64_t converted_bytes() const { return converted_bytes_; }  // owned float32 copies
  int64_t mapped_bytes() const { return mapped_bytes_; }        // used in place from the files
  const Checkpoint& checkpoint() const { return ck_; }

 private:
  const float* get(const std::string& name);
  Checkpoint ck_;
  std::vector<std::unique_ptr<float[]>> owned_;
  int64_t params_ = 0, converted_bytes_ = 0, mapped_bytes_ = 0;
};

}  // namespace cca::model

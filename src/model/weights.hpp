// The tensors a Llama-family checkpoint must hold, their checks, and the weights the forward
// pass reads, on the host (float32) or on the GPU (bfloat16/float16).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "model/safetensors.hpp"
#include "ops/ops.hpp"

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

struct LayerWeights {
  TensorView attn_norm, mlp_norm;  // [H]
  // The products of a layer, each a list of parts whose outputs sit side by side: q, k, v in
  // `qkv` and gate, up in `gate_up` (one fused part each on the GPU).
  std::vector<ops::LinearPart> qkv, o, gate_up, down;
};

// Bytes the weights of `cfg` take on a device in `dtype` (what a GPU load allocates).
int64_t weights_bytes(const ModelConfig& cfg, DType dtype);

class Weights {
 public:
  // Checks every tensor (check_tensors), then makes the weights the context's ops read:
  //  cpu: float32; float32 tensors stored 4-byte aligned are used in place from the mapping,
  //       16-bit ones are converted once (owned, 4 bytes per parameter);
  //  cuda: `dtype` (bfloat16 or float16) in one device allocation, q/k/v and gate/up fused,
  //       streamed tensor by tensor from the mapping (a 16-bit checkpoint of the same dtype is
  //       copied as stored; others are converted through one host buffer of the largest tensor).
  // Keeps `ck` mapped.
  Weights(Checkpoint ck, const ModelConfig& cfg, const ops::Context& ctx, DType dtype);
  ~Weights();
  Weights(const Weights&) = delete;
  Weights& operator=(const Weights&) = delete;

  TensorView embed;  // [V, H]
  std::vector<LayerWeights> layers;
  TensorView final_norm;  // [H]
  TensorView lm_head;     // [V, H]; the embedding when tied
  DType dtype() const { return dtype_; }

  int64_t parameter_count() const { return params_; }
  int64_t converted_bytes() const { return converted_bytes_; }  // host: owned float32 copies
  int64_t mapped_bytes() const { return mapped_bytes_; }        // host: used in place
  int64_t device_bytes() const { return device_bytes_; }        // GPU: the one allocation
  const Checkpoint& checkpoint() const { return ck_; }

 private:
  void load_host(const ModelConfig& cfg);
  void load_device(const ModelConfig& cfg);
  // Host: the float32 weight of `name`.
  TensorView host_tensor(const std::string& name);
  // Device: tensors `names` stacked along rows at the arena's next offset, as one view.
  TensorView device_tensor(const std::vector<std::string>& names);

  Checkpoint ck_;
  const ops::Context* ctx_;
  DType dtype_;
  std::vector<std::unique_ptr<float[]>> owned_;
  void* arena_ = nullptr;  // device
  int64_t arena_used_ = 0;
  std::vector<unsigned char> staging_;
  int64_t params_ = 0, converted_bytes_ = 0, mapped_bytes_ = 0, device_bytes_ = 0;
};

}  // namespace cca::model

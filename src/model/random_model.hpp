// A random checkpoint in Hugging Face layout (config.json, generation_config.json,
// model.safetensors), for benchmarks and tests that need a model without Python.
#pragma once
#include <cstdint>
#include <string>

#include "cca/tensor.hpp"
#include "model/config.hpp"

namespace cca::model {

struct RandomModelSpec {
  ModelConfig config;        // arch, sizes, rope, ties and biases
  DType dtype = DType::f32;  // storage dtype of every tensor
  uint64_t seed = 1;
  double weight_std = 0.05;  // matrices; norms are 1 + small noise, embeddings std 1
};

// A Llama config with the given sizes (rope theta 10000, eps 1e-5, untied).
ModelConfig small_llama_config(int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads,
                               int64_t intermediate, int64_t vocab, int64_t max_positions);

// Writes the three files into `dir`, which must not exist or be an empty directory (its parent
// must exist). The files are written to a temporary directory renamed to `dir` when complete.
void write_random_model(const std::string& dir, const RandomModelSpec& spec);

// config.json text for `cfg`, as Hugging Face spells it.
std::string model_config_json(const ModelConfig& cfg);

}  // namespace cca::model

#include "model/random_model.hpp"

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "cca/error.hpp"
#include "model/output_file.hpp"
#include "model/safetensors.hpp"
#include "model/weights.hpp"

namespace cca::model {
namespace {

void write_text(const std::string& path, const std::string& text) {
  PendingFile out(path);
  out.write(text);
  out.commit();
}

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

}  // namespace

ModelConfig small_llama_config(int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads,
                               int64_t intermediate, int64_t vocab, int64_t max_positions) {
  ModelConfig c;
  c.arch = Arch::llama;
  c.num_layers = layers;
  c.hidden_size = hidden;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.intermediate_size = intermediate;
  c.vocab_size = vocab;
  c.max_position_embeddings = max_positions;
  c.rms_norm_eps = 1e-5;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.validate();
  return c;
}

std::string model_config_json(const ModelConfig& c) {
  nlohmann::json j;
  j["architectures"] = {arch_name(c.arch)};
  j["model_type"] = c.arch == Arch::llama ? "llama" : c.arch == Arch::mistral ? "mistral" : "qwen2";
  j["hidden_act"] = "silu";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope.theta;
  if (c.rope.type == RopeType::linear) {
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope.factor}};
  } else if (c.rope.type == RopeType::llama3) {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope.factor},
                         {"low_freq_factor", c.rope.low_freq_factor},
                         {"high_freq_factor", c.rope.high_freq_factor},
                         {"original_max_position_embeddings", c.rope.original_max_positions}};
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  if (c.arch == Arch::llama) {
    j["attention_bias"] = c.qkv_bias;
    j["mlp_bias"] = c.mlp_bias;
  }
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1)
    j["eos_token_id"] = c.eos_token_ids[0];
  else if (!c.eos_token_ids.empty())
    j["eos_token_id"] = c.eos_token_ids;
  return j.dump(2) + "\n";
}

void write_random_model(const std::string& dir, const RandomModelSpec& spec) {
  const ModelConfig& c = spec.config;
  c.validate();
  PendingDir staging(dir);  // a failure leaves nothing behind

  std::mt19937_64 rng(spec.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<std::vector<unsigned char>> storage;
  std::vector<TensorBytes> tensors;
  for (const ExpectedTensor& e : expected_tensors(c)) {
    int64_t n = 1;
    for (int64_t d : e.shape) n *= d;
    const bool norm = ends_with(e.name, "norm.weight"), bias = ends_with(e.name, ".bias");
    const bool embed = e.name == "model.embed_tokens.weight";
    std::vector<unsigned char> bytes(size_t(n * dtype_size(spec.dtype)));
    for (int64_t i = 0; i < n; ++i) {
      const float z = normal(rng);
      const float x = norm ? 1.f + 0.1f * z : embed ? z : float(spec.weight_std) * z;
      const float val = bias ? 0.1f * z : x;
      if (spec.dtype == DType::f32) {
        std::memcpy(&bytes[size_t(4 * i)], &val, 4);
      } else {
        const uint16_t h = spec.dtype == DType::f16 ? float_to_f16(val) : float_to_bf16(val);
        std::memcpy(&bytes[size_t(2 * i)], &h, 2);
      }
    }
    storage.push_back(std::move(bytes));
    tensors.push_back(TensorBytes{e.name, safetensors_dtype_name(spec.dtype), e.shape,
                                  storage.back().data(), int64_t(storage.back().size())});
  }
  const std::filesystem::path d(staging.staging());
  write_safetensors((d / "model.safetensors").string(), tensors);
  write_text((d / "config.json").string(), model_config_json(c));
  nlohmann::json g;
  if (c.bos_token_id >= 0) g["bos_token_id"] = c.bos_token_id;
  g["eos_token_id"] = c.eos_token_ids;
  write_text((d / "generation_config.json").string(), g.dump(2) + "\n");
  staging.commit();
}

}  // namespace cca::model

// Model configuration: the subset of a Hugging Face config.json (and generation_config.json) that
// a Llama-family decoder needs. LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/untrusted.hpp"  // read_text_file

namespace cca::model {

enum class Arch : uint8_t { llama, mistral, qwen2 };
const char* arch_name(Arch a);  // the config.json "architectures" spelling

enum class RopeType : uint8_t { standard, linear, llama3 };  // "default", "linear", "llama3"

struct RopeConfig {
  RopeType type = RopeType::standard;
  double theta = 10000.0;
  double factor = 1.0;                    // linear, llama3
  double low_freq_factor = 1.0;           // llama3
  double high_freq_factor = 4.0;          // llama3
  int64_t original_max_positions = 8192;  // llama3
  std::string describe() const;
};

// The attention a checkpoint was fine-tuned with: config.json's "cca" entry (written by
// `python -m cca.finetune`), any of variant, group, window, sinks, pool, pool_heads. The model
// commands take it as the defaults of their attention flags (a flag given on the command line
// wins). Names are checked when parsed; values when the variant is built.
struct AttentionDefaults {
  std::optional<std::string> variant, pool, pool_heads;
  std::optional<int64_t> group, window, sinks;
  bool empty() const;
  std::string describe() const;  // the fields set, e.g. "variant=cca group=16 window=64"
};

struct ModelConfig {
  Arch arch = Arch::llama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;     // Hq
  int64_t num_kv_heads = 0;  // Hkv
  int64_t head_dim = 0;      // D
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;               // Qwen2 always; Llama with attention_bias
  bool o_bias = false;                 // Llama with attention_bias
  bool mlp_bias = false;               // Llama with mlp_bias
  int64_t sliding_window = 0;          // Mistral/Qwen2 checkpoint's own sliding window; 0 = none
  std::vector<int64_t> eos_token_ids;  // from config.json (generation_config.json overrides)
  int64_t bos_token_id = -1;
  AttentionDefaults attention;  // empty without a "cca" entry

  // Throws cca::Error naming the first inconsistent field or a size beyond its limit (the
  // limits, far above any real model's, bound what is allocated before the checkpoint is
  // checked against the config).
  void validate() const;
  std::string describe() const;
};

// Sampling defaults and stop tokens from generation_config.json.
struct GenerationConfig {
  std::vector<int64_t> eos_token_ids;
  int64_t bos_token_id = -1;
  bool do_sample = false;
  double temperature = 1.0;
  int64_t top_k = 50;
  double top_p = 1.0;
  bool present = false;  // the file existed
};

// Parse config.json text; `source` names the file in error messages.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);
ModelConfig load_model_config(const std::string& model_dir);
// Parse generation_config.json text. Values are checked here, naming the file: temperature
// >= 0, top_k >= 0, top_p in [0, 1]; with do_sample true (they are then used by default)
// temperature and top_p must be > 0.
GenerationConfig parse_generation_config(const std::string& json_text, const std::string& source);
// generation_config.json of the directory; defaults (with config.json's eos/bos) if absent.
GenerationConfig load_generation_config(const std::string& model_dir, const ModelConfig& cfg);

}  // namespace cca::model

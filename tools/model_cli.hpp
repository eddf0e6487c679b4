// Flags and helpers shared by the model subcommands (generate, perplexity, info, bench model):
// the attention variant, threads and chunking, the context limit, the tokenizer of a model dir.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cca/variant.hpp"
#include "variant_flags.hpp"
#include "engine/engine.hpp"
#include "model/config.hpp"

namespace CLI {
class App;
}

namespace cca {
namespace tok {
class Tokenizer;
}

struct ModelRunFlags : VariantFlags {
  std::string model;
  std::string device = "auto";
  std::string dtype = "auto";     // weights and activations on the GPU
  std::string kv_dtype = "auto";  // the caches
  int threads = 0;
  int64_t chunk = 0;        // 0: the device's default
  int64_t max_context = 0;  // 0: the model's max_position_embeddings
  bool allow_long_prompt = false;
  bool no_progress = false;
  bool no_cuda_graphs = false;
  bool profile = false;

  // The engine's options for runs of at most `plan_tokens` tokens per sequence, `batch`
  // sequences at a time (checks every flag's value).
  engine::EngineOptions engine_options(int64_t plan_tokens, int64_t batch = 1) const;
  // The context limit in tokens (0 = none): --allow-long-prompt, else --max-context, else the
  // model's max_position_embeddings.
  int64_t context_limit(const model::ModelConfig& cfg) const;
  // These flags for the model of `cfg`: each attention flag not given on the command line takes
  // the value of the checkpoint's "cca" entry (cfg.attention), where it has one. Says so on
  // stderr once when it changes anything.
  ModelRunFlags for_model(const model::ModelConfig& cfg) const;
};

// --model (required), --device, --dtype, --kv-dtype and the variant parameters (--group --window
// --sinks --pool --pool-heads); with `run` also --variant, --threads, --chunk, --no-progress and
// the context limit flags.
void add_model_flags(CLI::App* cmd, ModelRunFlags& f, bool run);

// The model directory's tokenizer.json, loaded by the tokenizer library.
class TextTokenizer {
 public:
  // Throws cca::Error when the directory has no tokenizer.json, naming `why_needed`, or when
  // the tokenizer has ids at or above `model_vocab` (the model's vocab_size; 0: not checked):
  // such a tokenizer belongs to another model, and its ids would index past the embeddings.
  static std::unique_ptr<TextTokenizer> load(const std::string& model_dir,
                                             const std::string& why_needed,
                                             int64_t model_vocab = 0);
  ~TextTokenizer();
  model::TokenIds encode(const std::string& text, bool add_special) const;
  std::string decode(const model::TokenIds& ids, bool skip_special) const;
  int32_t eos_id() const;  // -1 when the tokenizer names none
  bool has_token(int32_t id) const;  // false for ids decode() drops (none of its tokens)
  const tok::Tokenizer& tokenizer() const;

 private:
  struct Impl;
  explicit TextTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Reads a whole text file (cca::Error naming `flag` and the path when it cannot).
std::string read_input_file(const std::string& path, const std::string& flag);

// "auto" -> nullopt, else the dtype ("float32", "float16", "bfloat16"); `flag` names errors.
std::optional<DType> parse_dtype_flag(const std::string& s, const std::string& flag);

// Formats bytes as "12.3 MiB".
std::string format_bytes(double bytes);

}  // namespace cca

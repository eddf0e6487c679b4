// Next-token choice: greedy (argmax), or sampling with temperature, top-k and top-p (nucleus), in
// that order, as Hugging Face's generate applies them, seeded for reproducibility. The draw itself
// is the op ops::sample_rows (on the model's device); this header holds the user-facing
// parameters and their translation.
#pragma once
#include <cstdint>
#include <optional>
#include <span>

#include "ops/sample_math.hpp"

namespace cca::model {

struct SamplingParams {
  bool greedy = true;
  double temperature = 1.0;  // > 0; applied before top-k/top-p
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // in (0, 1]; 1 = off
  uint64_t seed = 0;
  void validate() const;  // cca::Error naming a bad value
  // The op's per-row parameters (greedy: top_k = 1).
  ops::SampleParams op_params() const;
};

struct GenerationConfig;

// What a caller asked for (flags of cca generate, fields of a server request); what it leaves
// unset comes from generation_config.json.
struct SamplingRequest {
  std::optional<double> temperature, top_p;
  std::optional<int64_t> top_k;
  uint64_t seed = 0;
  bool greedy = false;
};

// Greedy unless sampling is asked for (a temperature, top-k or top-p, or do_sample in
// generation_config.json); a temperature of 0 is greedy. Values come from the request, then
// generation_config.json. Checked (validate()).
SamplingParams resolve_sampling(const SamplingRequest& asked, const GenerationConfig& gen);

// Index of the largest logit (the lowest index among equals, as torch.argmax).
int32_t argmax(std::span<const float> logits);

}  // namespace cca::model

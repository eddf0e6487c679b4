// Next-token choice: greedy (argmax), or sampling with temperature, top-k and top-p (nucleus), in
// that order, as Hugging Face's generate applies them, seeded for reproducibility. The draw itself
// is the op ops::sample_rows (on the model's device); this header holds the user-facing
// parameters and their translation.
#pragma once
#include <cstdint>
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

// Index of the largest logit (the lowest index among equals, as torch.argmax).
int32_t argmax(std::span<const float> logits);

}  // namespace cca::model

// Next-token choice from logits: greedy (argmax), or sampling with temperature, top-k and top-p
// (nucleus), in that order, as Hugging Face's generate applies them; seeded for reproducibility.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace cca::model {

struct SamplingParams {
  bool greedy = true;
  double temperature = 1.0;  // > 0; applied before top-k/top-p
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // in (0, 1]; 1 = off
  uint64_t seed = 0;
  void validate() const;  // cca::Error naming a bad value
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int32_t next(std::span<const float> logits);
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

// Index of the largest logit (the lowest index among equals, as torch.argmax).
int32_t argmax(std::span<const float> logits);

}  // namespace cca::model

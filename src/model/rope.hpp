// Rotary position embedding as Hugging Face's Llama computes it: inverse frequencies in float32
// (with linear or llama3 scaling), angle = position * inv_freq in float32, and the "rotate half"
// pairing (element i rotates with element i + D/2).
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.hpp"

namespace cca::model {

class Rope {
 public:
  Rope(const RopeConfig& cfg, int64_t head_dim);

  const std::vector<float>& inv_freq() const { return inv_freq_; }  // [D/2]
  int64_t head_dim() const { return D_; }

 private:
  int64_t D_;
  std::vector<float> inv_freq_;
};

}  // namespace cca::model

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

  // cos/sin tables [n, D/2] for positions pos0 .. pos0+n-1.
  void tables(int64_t pos0, int64_t n, float* cos, float* sin) const;

  // x [n, H, D] (rows of `row_stride` floats, heads contiguous) rotated in place: row r at the
  // position of table row r.
  void apply(float* x, int64_t n, int64_t heads, int64_t row_stride, const float* cos,
             const float* sin) const;

 private:
  int64_t D_;
  std::vector<float> inv_freq_;
};

}  // namespace cca::model

// The element-wise rows of the cpu ops on the current SIMD target (cpu_rows.cpp).
#pragma once
#include <cstdint>

namespace cca::ops::cpu {

struct RowFns {
  // o[0..H) = w * (x / sqrt(mean(x^2) + eps)), the mean in float64.
  void (*rms_norm)(const float* x, const float* w, int64_t H, float eps, float* o);
  // `heads` vectors of 2 half floats at x rotated in place ("rotate half" pairing).
  void (*rope)(float* x, int64_t heads, int64_t half, const float* cos, const float* sin);
  // o[0..n) = g / (1 + e^-g) * u.
  void (*swiglu)(const float* g, const float* u, float* o, int64_t n);
};

// The functions of the target the CPU code runs now (cca::cpu::simd_target()).
RowFns row_fns();

}  // namespace cca::ops::cpu

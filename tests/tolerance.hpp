// Every tolerance of the test suite, in one place. docs/numerics.md explains each number and
// records the worst errors measured against it.
#pragma once
#include "cca/tensor.hpp"

namespace cca::test {

struct Bound {
  double max_abs;  // max |got - want| over all elements
  double rel_l2;   // ||got - want||_2 / ||want||_2
};

// ---- backend consistency (test_consistency.cpp) ------------------------------------------------
// Oracle: the `ref` backend (float64 math) on the same rounded inputs, stored in float32, so its
// only error is one float32 rounding of each output.
// Naive: the `ref` backend at the test dtype: exact math, but inputs, core tokens and outputs
// stored in the dtype -- the rounding no same-precision implementation can avoid.
// Rule (flash-attention's, with this naive): for out,
//     err(backend, oracle) <= kNaiveFactor * err(naive, oracle) + floor,
// separately for max_abs and rel_l2; the LSE (float32 in every dtype) gets
//     max|lse - lse_oracle| <= kNaiveFactor * max|lse_naive - lse_oracle| + lse_floor.
// For float32 the naive is the oracle, so the floor alone is the bound. naive_cap bounds the
// naive error itself, so that a broken low-precision reference cannot loosen the rule.
constexpr double kNaiveFactor = 2.0;

struct ConsistencyTolerance {
  Bound floor;
  double lse_floor;
  Bound naive_cap;
};

inline ConsistencyTolerance consistency_tolerance(DType dt) {
  switch (dt) {
    case DType::f32:
      return {{2e-5, 4e-6}, 3e-5, {0, 0}};
    case DType::f16:
      return {{5e-4, 2e-4}, 2e-4, {4e-3, 1e-3}};
    case DType::bf16:
      return {{4e-3, 1.6e-3}, 2e-4, {3.2e-2, 8e-3}};
  }
  return {};
}

// Backward (grad mode, the same rule for dq, dk and dv). A key's gradient sums over every query
// that sees it (up to ~700 here), so errors are larger than the output's. Measured worst errors
// (docs/numerics.md): cpu float32 1.4e-5 / 1.2e-6 (floor 5x that), naive float16 5.5e-3 /
// 4.9e-4 and naive bfloat16 3.3e-2 / 4.1e-3 (caps 2x that). The LSE field is unused.
inline ConsistencyTolerance grad_tolerance(DType dt) {
  switch (dt) {
    case DType::f32:
      return {{7e-5, 6e-6}, 0, {0, 0}};
    case DType::f16:
      return {{2e-3, 4e-4}, 0, {1.1e-2, 1e-3}};
    case DType::bf16:
      return {{1.6e-2, 3.2e-3}, 0, {6.4e-2, 8e-3}};
  }
  return {};
}

// ---- same-backend identities (test_kv_cache.cpp, test_metamorphic.cpp) -------------------------
// Two computations of the same function on one backend that differ only in summation order or
// tiling (decode vs prefill, chunked vs one-shot, a wide window vs full): float32 accumulation
// differences, plus, in 16-bit dtypes, a one-unit flip of the final output rounding (and of a
// stored core token).
inline Bound identity_tolerance(DType dt) {
  switch (dt) {
    case DType::f32:
      return {2e-5, 4e-6};
    case DType::f16:
      return {2e-3, 5e-4};
    case DType::bf16:
      return {1.6e-2, 4e-3};
  }
  return {};
}
inline double identity_lse_tolerance(DType) { return 2e-5; }

// Decode or chunks against prefill on the cuda backend: two different kernels (split-KV decode,
// tile prefill), each rounding the probabilities p to the 16-bit dtype for its tensor-core
// product at its own points, so besides the final-rounding flip the float32 results differ by
// up to a p rounding (2^-9 relative for bfloat16): twice the identity bound.
inline Bound cross_kernel_tolerance(DType dt) {
  const Bound b = identity_tolerance(dt);
  return dt == DType::f32 ? b : Bound{2 * b.max_abs, 2 * b.rel_l2};
}

// ---- backward: ref against central finite differences of the float64 forward -------------------
// Step h = 1e-4: truncation error ~h^2/6 |L'''| ~ 1e-9, cancellation ~1e-16 |L| / h ~ 1e-12; the
// gradients themselves are float32, computed from the float32 out and LSE (relative ~1e-7).
// max_abs is relative to the largest gradient element (at least 1).
constexpr Bound kFdGrad = {1e-5, 1e-5};

// ---- library (float32 storage) against a float64 computation written in the test --------------
// Float32 inputs are exact in float64; the library's results are float32, rounded once after
// float32 (cpu) or float64 (ref) accumulation over at most a few hundred terms.
constexpr Bound kHandF32 = {2e-5, 4e-6};
constexpr double kHandLseF32 = 2e-5;

}  // namespace cca::test

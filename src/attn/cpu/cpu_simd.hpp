// What the CPU backend's vector code shares across SIMD targets: the tile width, aligned scratch,
// and the run-time choice of target (cpu_simd.cpp). The vector code itself is simd-inl.h,
// compiled once per target with Google Highway.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "cca/tensor.hpp"

namespace cca::cpu {

// Columns of every tile product: the queries of one tile. 64 = four AVX-512 vectors (eight AVX2
// ones); simd-inl.h register-blocks the product for each target's vector width.
constexpr int kBlockM = 64;

// Float buffer aligned to a cache line (vector loads of tile rows never split lines).
class AlignedFloats {
 public:
  AlignedFloats() = default;
  explicit AlignedFloats(int64_t n) { reset(n); }
  ~AlignedFloats() { std::free(p_); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  void reset(int64_t n) {
    std::free(p_);
    size_t bytes = (size_t(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64;
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p_) throw std::bad_alloc();
  }
  float* data() const { return p_; }

 private:
  float* p_ = nullptr;
};

// ---- SIMD targets (cpu_simd.cpp) ----------------------------------------------------------------
// The vector code is compiled for several targets (x86: AVX3 = AVX-512 F/BW/DQ/VL, AVX2 (with
// FMA and F16C), SSE4, SCALAR; Arm: SVE2, SVE, NEON, SCALAR; see CMakeLists.txt) and each call
// runs the best one this CPU supports, or the best at or below the one named by the environment
// variable CCA_CPU_TARGET (read once, at the first kernel call).

struct SimdTarget {
  std::string name;  // Highway's name: "AVX3", "AVX2", "SSE4", "NEON", "SVE", "SCALAR", ...
  bool supported;    // this CPU can run it
};

// The targets compiled into this binary, best first.
std::vector<SimdTarget> simd_targets();
// The name of the target the kernels run now.
std::string simd_target();
// Runs the best supported target at or below `name` (case-insensitive; "avx512" = "AVX3"); ""
// restores the default (CCA_CPU_TARGET, else the best). Throws cca::Error naming the compiled
// targets if `name` is none of them, or if this CPU cannot run it. Not thread-safe: call it
// while no kernel runs (tests, start-up).
void select_simd_target(const std::string& name);
// Applies CCA_CPU_TARGET once; every entry point of the vector code calls it first.
void init_simd_target();

// dst[0..n) (dtype `dt`) = src[0..n) (float32), rounded to nearest even exactly as
// float_to_f16 and float_to_bf16 do; and the reverse, exactly as f16_to_float and bf16_to_float
// (NaN payloads aside). Vectorised on the current target: the KV cache's and the ops' dtype
// conversions.
void row_from_float(const float* src, int64_t n, void* dst, DType dt);
void row_to_float(const void* src, DType dt, int64_t n, float* dst);

}  // namespace cca::cpu

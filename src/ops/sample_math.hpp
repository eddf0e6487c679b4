// The arithmetic of ops::sample_rows shared by the cpu and cuda implementations (host and device
// code): the order-preserving integer key of a float, and the counter-based uniform draw, so that
// both devices pick from the same thresholds with the same random number.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CCA_SAMPLE_HD __host__ __device__ __forceinline__
#else
#define CCA_SAMPLE_HD inline
#endif

namespace cca::ops {

// Per-row sampling parameters (also the layout of the device array sample_rows reads).
struct SampleParams {
  float temperature = 1.f;  // > 0
  int32_t top_k = 0;        // 0: off; 1: greedy
  float top_p = 1.f;        // in (0, 1]; 1: off
  int32_t unused = 0;
  uint64_t seed = 0;
};

// Unsigned key with key(a) < key(b) exactly when a < b (NaN: above +inf, never kept by a
// threshold search over finite logits... treated as the largest keys).
CCA_SAMPLE_HD uint32_t order_key(float x) {
  uint32_t b;
  memcpy(&b, &x, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

CCA_SAMPLE_HD uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A uniform double in [0, 1) for draw number `counter` of stream `seed`.
CCA_SAMPLE_HD double uniform01(uint64_t seed, int64_t counter) {
  return double(mix64(seed ^ mix64(uint64_t(counter))) >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace cca::ops

// Tile sizes of every CUDA kernel (one constexpr table) and the runtime-to-compile-time switch
// over dtype and head dim (one place; the instantiation matrix is {f16, bf16} x {64, 128}).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <type_traits>

#include "cca/error.hpp"
#include "cca/tensor.hpp"

namespace cca::cuda {

// Prefill/chunked attend (mma.sync m16n8k16): kWarps warps of 16 query rows each, kBlockN keys
// per step, K/V double-buffered in shared memory.
#ifndef CCA_ATTEND_WARPS    // a build-time override for tile experiments (bench/gpu_bench.sh)
#define CCA_ATTEND_WARPS 8  // 128 query rows: measured 19% faster than 4 warps at 128K
#endif
template <int D>
struct AttendTile {
  static constexpr int kWarps = CCA_ATTEND_WARPS;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = 64;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStages = 2;
  // Q tile + kStages x (K tile + V tile), bf16/f16 elements.
  static constexpr int kSmemBytes = (kBlockM + kStages * 2 * kBlockN) * D * 2;
};

// Split-KV decode (mma.sync with the query rows as the M dimension): kWarps warps, each takes
// 16 of the kBlockN keys of a tile; tiles stream through kStages cp.async stages; at most
// kMaxRows query rows (queries x heads sharing a KV head) per block; kBlocksPerSm blocks are
// resident per SM (102 KB of shared memory each at D = 128) and the split count fills them.
struct DecodeTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;
  static constexpr int kStages = 3;
  static constexpr int kMaxRows = 16;
  static constexpr int kBlocksPerSm = 2;
  static constexpr int kMinKeysPerSplit = 256;
  template <int D>
  static constexpr int smem_bytes() {
    return (kMaxRows + kStages * 2 * kBlockN) * D * 2;
  }
};

// Attention backward (mma.sync m16n8k16, FlashAttention-2 style, two kernels, no atomics).
// dK/dV kernel: kKvWarps warps of 16 keys each own a key tile of kKvBlockN keys and walk the
// query tiles that see it, kKvBlockM queries per step, Q and dO double-buffered. dQ kernel: the
// forward's layout, kDqWarps warps of 16 query rows, kDqBlockN keys per step, K and V
// double-buffered. At D = 128 the steps are 32 wide: with 64, both kernels spill (ptxas, sm_90a:
// 255 registers and 60-100 bytes of spills per thread).
template <int D>
struct AttendBwdTile {
  static constexpr int kKvWarps = 4;
  static constexpr int kKvThreads = 32 * kKvWarps;
  static constexpr int kKvBlockN = 16 * kKvWarps;
  static constexpr int kKvBlockM = D == 128 ? 32 : 64;
  // K, V tiles + 2 stages x (Q tile + dO tile), 16-bit elements; then per stage and query the
  // float32 lse and delta and three int32 visibility bounds.
  static constexpr int kKvSmemBytes =
      (2 * kKvBlockN + 2 * 2 * kKvBlockM) * D * 2 + 2 * kKvBlockM * (2 * 4 + 3 * 4) + 16;
  static constexpr int kDqWarps = 4;
  static constexpr int kDqThreads = 32 * kDqWarps;
  static constexpr int kDqBlockM = 16 * kDqWarps;
  static constexpr int kDqBlockN = D == 128 ? 32 : 64;
  // Q and dO tiles + 2 stages x (K tile + V tile).
  static constexpr int kDqSmemBytes = (2 * kDqBlockM + 2 * 2 * kDqBlockN) * D * 2;
};

// Pooling: one warp per (batch, group, core head), D/8 lanes per key.
struct PoolTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
};

// Pooling backward: one block per (batch, group, KV head); its shared memory grows with the
// group size and the pooling heads (pool_bwd_smem_bytes), up to kMaxSmemBytes.
struct PoolBwdTile {
  static constexpr int kThreads = 128;
  static constexpr int64_t kMaxSmemBytes = 200 * 1024;
};

// "" if the CUDA kernels handle (dtype, D), else the reason.
inline std::string unsupported_dtype_dim(DType t, int64_t D) {
  if (t == DType::f32)
    return "the cuda backend takes float16 or bfloat16 inputs, got float32 (convert, or use the "
           "cpu backend)";
  if (D != 64 && D != 128)
    return "the cuda backend supports head dims 64 and 128, got D = " + std::to_string(D);
  return "";
}

template <typename T>
struct TypeTag {
  using type = T;
};
template <int D>
using DimTag = std::integral_constant<int, D>;

// Calls f(TypeTag<T>{}, DimTag<D>{}) for the runtime dtype and head dim (C++17: nvcc with
// CMake < 3.27 has no CUDA20 dialect).
template <typename F>
void dispatch_dtype_dim(DType t, int64_t D, F&& f) {
  const std::string why = unsupported_dtype_dim(t, D);
  if (!why.empty()) throw Error(why);
  if (t == DType::bf16) {
    if (D == 64)
      f(TypeTag<__nv_bfloat16>{}, DimTag<64>{});
    else
      f(TypeTag<__nv_bfloat16>{}, DimTag<128>{});
  } else {
    if (D == 64)
      f(TypeTag<__half>{}, DimTag<64>{});
    else
      f(TypeTag<__half>{}, DimTag<128>{});
  }
}

}  // namespace cca::cuda

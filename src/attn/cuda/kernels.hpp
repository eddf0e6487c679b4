// Host-side entry points of the CUDA kernels (launchers); the Backend in cuda_backend.cpp calls
// these after its checks. All launch on `stream` and return without synchronising.
#pragma once
#include <cuda_runtime.h>

#include "backend.hpp"

namespace cca::cuda {

// Query rows per block that the split-KV decode kernel handles: queries x heads sharing a KV
// head. attend() takes the decode kernel when this is at most DecodeTile::kMaxRows.
int64_t decode_rows(const AttendProblem& p);

// Tensor-core tile kernel (prefill, chunked prefill). Needs 16-byte aligned rows.
void launch_attend_tiles(const AttendProblem& p, cudaStream_t stream);
// Hopper path (wgmma + TMA, sm_90a): launches and returns true where it applies (sm_90a device
// code on a 9.0 GPU, D 64/128, tensor maps the driver accepts, CCA_CUDA_WGMMA != 0); returns
// false, launching nothing, otherwise.
bool launch_attend_wgmma(const AttendProblem& p, cudaStream_t stream);
// Split-KV decode for few query rows; `splits` <= 0 picks the split count from the GPU size.
void launch_attend_decode(const AttendProblem& p, cudaStream_t stream, int splits = 0);
void launch_pool(const PoolProblem& p, cudaStream_t stream);
// dst = src for two [B, n, H, D] views of the same shape and 16-bit or 32-bit dtype.
void launch_copy_tensor(const TensorView& dst, const TensorView& src, cudaStream_t stream);

// Per-view layout the vectorised kernels need: 16-byte aligned base and row strides.
bool rows_aligned_16(const TensorView& t);

}  // namespace cca::cuda

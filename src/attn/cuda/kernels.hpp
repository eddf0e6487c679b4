// Host-side entry points of the CUDA kernels (launchers); the Backend in cuda_backend.cpp calls
// these after its checks. All launch on `stream` and return without synchronising.
#pragma once
#include <cuda_runtime.h>

#include <vector>

#include "backend.hpp"

namespace cca::cuda {

// Query rows per block that the split-KV decode kernel handles: queries x heads sharing a KV
// head. attend() takes the decode kernel when this is at most DecodeTile::kMaxRows.
int64_t decode_rows(const AttendProblem& p);
// Upper bound of the decode workspace (RunOptions::workspace) for `sequences` problems.
int64_t decode_workspace_bound(int64_t sequences, int64_t hq, int64_t head_dim);

// Tensor-core tile kernel (prefill, chunked prefill). Needs 16-byte aligned rows.
void launch_attend_tiles(const AttendProblem& p, cudaStream_t stream);
// Hopper path (wgmma + TMA, sm_90a): launches and returns true where it applies (sm_90a device
// code on a 9.0 GPU, D 64/128, tensor maps the driver accepts, CCA_CUDA_WGMMA != 0); returns
// false, launching nothing, otherwise.
bool launch_attend_wgmma(const AttendProblem& p, cudaStream_t stream);
// Split-KV decode for few query rows (decode_rows(p) <= DecodeTile::kMaxRows), one launch for
// all `problems` (a ragged batch: each its own lengths, batch size and tensors; one dtype and
// head dim). `force_splits` > 0 sets every problem's key slices (tests); 0 picks them from the
// GPU size and the problems' lengths.
void launch_attend_decode(const std::vector<AttendProblem>& problems, cudaStream_t stream,
                          int force_splits = 0);
void launch_pool(const PoolProblem& p, cudaStream_t stream);
// Device-positioned pools (PoolProblem::pos_device) of one dtype and head dim, 16-byte aligned
// views, in one launch per 32.
void launch_pool_batch(const std::vector<PoolProblem>& problems, cudaStream_t stream);
// Backward (attend_bwd_kernel.cu, pool_bwd_kernel.cu); views checked by the backend, 16-byte
// aligned rows for the attention kernels. delta = rowsum(dout * out).
void launch_attend_bwd_delta(const AttendBwdProblem& p, cudaStream_t stream);
// dk/dv (and dk_core/dv_core for the first m core tokens) by key tiles, then dq by query tiles.
// Each of dK/dV and dQ runs on Hopper's wgmma where its launch_attend_bwd_*_wgmma applies, else
// on the mma.sync kernels of attend_bwd_kernel.cu.
void launch_attend_bwd(const AttendBwdProblem& p, int64_t m, cudaStream_t stream);
// Hopper dK/dV and dQ (attend_bwd_wgmma.cu): launch and return true where they apply (sm_90a
// device code on a 9.0 GPU, D 64/128, tensor maps the driver accepts, CCA_CUDA_BWD != mma);
// return false, launching nothing, otherwise.
bool launch_attend_bwd_dkdv_wgmma(const AttendBwdProblem& p, int64_t m, cudaStream_t stream);
bool launch_attend_bwd_dq_wgmma(const AttendBwdProblem& p, int64_t m, cudaStream_t stream);
// Whether the environment forces the mma.sync backward (CCA_CUDA_BWD=mma; read at every call).
bool attend_bwd_forced_mma();
// Launches of the wgmma backward kernels so far in this process (tests: did the path run?).
int64_t attend_bwd_wgmma_launches();
void launch_pool_bwd(const PoolBwdProblem& p, cudaStream_t stream);
// Shared memory of the pooling backward's blocks (PoolBwdTile::kMaxSmemBytes at most).
int64_t pool_bwd_smem_bytes(int64_t D, int64_t nh, int64_t g, PoolMode mode);
// dst = src for two [B, n, H, D] views of the same shape and 16-bit or 32-bit dtype; a float32
// src into a 16-bit dst is rounded to nearest (attn_bwd's gradients).
void launch_copy_tensor(const TensorView& dst, const TensorView& src, cudaStream_t stream);
// Each copy's dst_store rows (*pos_device - pos0) + t = its src rows t, the position read on the
// device; consecutive copies of one layout in one launch.
void launch_copy_tensor_at(const std::vector<CopyAt>& copies, cudaStream_t stream);

// Stream-ordered scratch memory from the backend's own pool (device.cpp), which keeps up to
// 256 MB of freed memory for reuse: the default pool returns it at every synchronisation, and
// mapping it again costs more than a decode step.
void* scratch_alloc(int64_t bytes, cudaStream_t stream);
void scratch_free(void* ptr, cudaStream_t stream);

// Per-view layout the vectorised kernels need: 16-byte aligned base and row strides.
bool rows_aligned_16(const TensorView& t);

}  // namespace cca::cuda

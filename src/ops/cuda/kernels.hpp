// Launchers of the CUDA kernels behind the ops (kernels.cu). The callers (kernel_ops.cpp,
// linear.cpp) have checked every view: 2-D [rows, cols] in GPU memory, contiguous last
// dimension, shapes and dtypes as each op needs. C++17 (nvcc compiles kernels.cu as such), so no
// ops.hpp here: it uses std::span.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cca/tensor.hpp"
#include "ops/sample_math.hpp"

namespace cca::ops::cuda {

// out [n, H] = x * rsqrt(mean(x^2) + eps) * w; x float32, w [H] any dtype (contiguous).
void launch_rms_norm(const TensorView& x, const void* w, DType w_dtype, float eps,
                     const TensorView& out, cudaStream_t stream);
// x [n, >= heads * D] rotated in place; inv_freq float32 [D / 2] on the GPU.
void launch_rope(const TensorView& x, int64_t heads, const int32_t* positions,
                 const float* inv_freq, int64_t half, cudaStream_t stream);
// out = silu(gate) * up, [n, I] views of one dtype.
void launch_swiglu(const TensorView& gate, const TensorView& up, const TensorView& out,
                   cudaStream_t stream);
// out float32 [n, H] = table [V, H] rows ids[0..n).
void launch_embed(const int32_t* ids, const TensorView& table, const TensorView& out,
                  cudaStream_t stream);
// dst [m, C] = src rows rows[0..m), same dtype.
void launch_gather_rows(const TensorView& src, const int32_t* rows, const TensorView& dst,
                        cudaStream_t stream);
// out[r] = argmax of logits row r (float32 [m, V]).
void launch_argmax_rows(const TensorView& logits, int32_t* out, cudaStream_t stream);
// out[r] = a draw from logits row r (float32 [m, V]) with params[r] (ops::sample_rows).
void launch_sample_rows(const TensorView& logits, const SampleParams* params,
                        const int32_t* counters, int32_t* out, cudaStream_t stream);
// dst [n, C] = src [n, C] with dtype conversion.
void launch_convert(const TensorView& src, const TensorView& dst, cudaStream_t stream);
// linear of n <= kGemvMaxRows rows as a matrix-vector kernel (gemv.cu): y [n, out] = x [n, in]
// W [out, in]^T (+ bias [out]) (+ y when accumulate), x and W 16-bit, y x's dtype or float32, the
// bias y's dtype or float32. Returns false, queuing nothing, where the views do not suit it (in
// not a multiple of 8, rows not 16-byte aligned): the caller then runs the GEMM.
// Up to 2 rows: from 3 rows cuBLASLt reads W faster (H200, Llama-3-8B shape, 2026-11-29: a
// decode step of 4 sequences 5.84 ms with cuBLASLt against 8.04 with this kernel; of 2, 5.33
// with it). A tensor-core variant (mma.sync, W staged through shared memory with cp.async) was
// slower than both at 1-8 rows (8 sequences: 9.59 ms against 6.45) and was not kept.
constexpr int64_t kGemvMaxRows = 2;
bool launch_gemv(const TensorView& x, const TensorView& w, const void* bias, DType bias_dtype,
                 const TensorView& y, bool accumulate, cudaStream_t stream);
template <typename T>
struct TypeTag {
  using type = T;
};
// y [n, C] += b [C] (b contiguous, any dtype), in float32, rounded once to y's dtype.
void launch_add_bias(const TensorView& y, const void* b, DType b_dtype, cudaStream_t stream);

}  // namespace cca::ops::cuda

// linear for a few rows (decode steps): y [n, out] = x [n, in] W [out, in]^T (+ b) (+ y), n <= 2,
// as a matrix-vector kernel that streams W once at close to the memory's bandwidth. cuBLASLt
// reads W at 1.2-2.5 TB/s on the q|k|v and o projections of an 8B model at one row (H200; its
// GEMM kernels tile for many rows), while a decode step is nothing but reading the weights.
//
// Each block computes a few outputs: its threads read the W rows in 16-byte vectors, multiply with
// the same columns of each x row (small and hot in L1/L2) and reduce across the block. Float32
// accumulation; y rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attn/cuda/cuda_check.hpp"
#include "attn/cuda/pdl.cuh"
#include "ops/cuda/elem.cuh"
#include "ops/cuda/kernels.hpp"

namespace cca::ops::cuda {

using ::cca::cuda::pdl_launch;
using ::cca::cuda::pdl_wait_and_release;
namespace {

constexpr int kThreads = 256, kRowsPerBlock = 4, kUnroll = 2;

// Eight 16-bit values as floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f(h[i]);
}

// T: x and W (16-bit); TY: y. Block b computes outputs j0 = b * kRowsPerBlock ..; all its
// threads stride together along the rows' 16-byte vectors, kUnroll per row in flight, each
// vector of x loaded once for the block's kRowsPerBlock rows; then a block reduction. in % 8 == 0;
// x rows and W rows aligned to 16 bytes.
template <typename T, typename TY, int N>
__global__ void __launch_bounds__(kThreads)
    gemv_kernel(const T* __restrict__ w, int64_t sw, const T* x, int64_t sx,
                const void* bias, bool bias_is_f32, TY* y, int64_t sy,
                int64_t out, int64_t in, bool accumulate) {
  constexpr int R = kRowsPerBlock, U = kUnroll, kWarps = kThreads / 32;
  const int64_t j0 = int64_t(blockIdx.x) * R;
  const int64_t vecs = in / 8;  // 16-byte vectors per row
  const uint4* wr[R];
#pragma unroll
  for (int r = 0; r < R; ++r)  // rows past the end read row j0 (their sums are dropped)
    wr[r] = reinterpret_cast<const uint4*>(w + (j0 + r < out ? j0 + r : j0) * sw);
  float acc[R][N];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int n = 0; n < N; ++n) acc[r][n] = 0.f;

  // The first vectors of W load before the wait for the previous kernel (W is never written
  // during a step): with PDL they are in flight while that kernel finishes.
  uint4 wv[U][R];
  auto load_w = [&](int64_t v0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + int64_t(u) * kThreads;
#pragma unroll
      for (int r = 0; r < R; ++r)  // streamed once: kept out of L1, where x lives
        wv[u][r] = v < vecs ? __ldcs(wr[r] + v) : make_uint4(0, 0, 0, 0);
    }
  };
  load_w(threadIdx.x);
  pdl_wait_and_release();

  for (int64_t v0 = threadIdx.x; v0 < vecs; v0 += int64_t(kThreads) * U) {
    if (v0 != threadIdx.x) load_w(v0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + int64_t(u) * kThreads;
      if (v >= vecs) break;
      float wf[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) unpack8<T>(wv[u][r], wf[r]);
#pragma unroll
      for (int n = 0; n < N; ++n) {
        // A plain load, not __ldg: x is written by the kernel before, which with PDL may still
        // run when this one starts (the non-coherent path assumes data read-only all along).
        float xf[8];
        unpack8<T>(reinterpret_cast<const uint4*>(x + n * sx)[v], xf);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][n] = fmaf(wf[r][i], xf[i], acc[r][n]);
      }
    }
  }

  __shared__ float part[kWarps][R * N];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float v = acc[r][n];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) part[warp][r * N + n] = v;
    }
  __syncthreads();
  if (threadIdx.x < R * N) {
    const int r = threadIdx.x / N, n = threadIdx.x % N;
    const int64_t j = j0 + r;
    if (j >= out) return;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += part[k][threadIdx.x];
    if (bias)
      s += bias_is_f32 ? static_cast<const float*>(bias)[j] : to_f(static_cast<const TY*>(bias)[j]);
    TY* yp = y + int64_t(n) * sy + j;
    if (accumulate) s += to_f(*yp);
    *yp = from_f<TY>(s);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool launch_gemv(const TensorView& x, const TensorView& w, const void* bias, DType bias_dtype,
                 const TensorView& y, bool accumulate, cudaStream_t stream) {
  const int64_t n = x.shape[0], in = x.shape[1], out = w.shape[0];
  const int64_t es = dtype_size(x.dtype);
  if (n < 1 || n > kGemvMaxRows || in % 8 != 0 || !aligned16(w.data) || !aligned16(x.data) ||
      (w.stride[0] * es) % 16 != 0 || (n > 1 && (x.stride[0] * es) % 16 != 0))
    return false;
  // A bias of y's dtype, or float32 (the bias of a float32 y).
  if (bias && bias_dtype != y.dtype && bias_dtype != DType::f32) return false;
  const unsigned blocks = unsigned((out + kRowsPerBlock - 1) / kRowsPerBlock);
  auto go = [&](auto t_tag, auto ty_tag, auto n_tag) {
    using T = typename decltype(t_tag)::type;
    using TY = typename decltype(ty_tag)::type;
    constexpr int N = decltype(n_tag)::value;
    pdl_launch(gemv_kernel<T, TY, N>, dim3(blocks), dim3(kThreads), 0, stream, 
        static_cast<const T*>(w.data), w.stride[0], static_cast<const T*>(x.data), x.stride[0],
        bias, bias_dtype == DType::f32, static_cast<TY*>(y.data), y.stride[0], out, in,
        accumulate);
  };
  auto with_n = [&](auto t_tag, auto ty_tag) {
    static_assert(kGemvMaxRows == 2);
    if (n == 1)
      go(t_tag, ty_tag, std::integral_constant<int, 1>{});
    else
      go(t_tag, ty_tag, std::integral_constant<int, 2>{});
  };
  auto with_y = [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    if (y.dtype == DType::f32)
      with_n(t_tag, TypeTag<float>{});
    else
      with_n(t_tag, TypeTag<T>{});
  };
  if (x.dtype == DType::bf16)
    with_y(TypeTag<__nv_bfloat16>{});
  else if (x.dtype == DType::f16)
    with_y(TypeTag<__half>{});
  else
    return false;
  CCA_CUDA_CHECK_LAUNCH("gemv_kernel");
  return true;
}

}  // namespace cca::ops::cuda

// ops::sample_rows on the GPU: one block per row; the top-k and top-p thresholds by bisection
// over the 32-bit order keys of the scaled logits (32 block reductions each), then the draw in
// index order (a block scan of per-thread segment sums). The same steps as the cpu op
// (cpu_ops.cpp), in float sums where it uses double.
#include <cuda_runtime.h>

#include "attn/cuda/cuda_check.hpp"
#include "attn/cuda/pdl.cuh"
#include "ops/cuda/kernels.hpp"
#include "ops/sample_math.hpp"

namespace cca::ops::cuda {

using ::cca::cuda::pdl_launch;
using ::cca::cuda::pdl_wait_and_release;
namespace {

constexpr int kThreads = 1024;

// Sum of x over the block (every thread gets it); `red` is kThreads/32 floats of shared memory.
__device__ float block_sum(float x, float* red) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) t += red[w];
  return t;
}

__device__ float block_max(float x, float* red) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float t = -INFINITY;
  for (int w = 0; w < kThreads / 32; ++w) t = fmaxf(t, red[w]);
  return t;
}

// logits [m, V] (row stride sl) -> out[m]; grid m blocks of kThreads.
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* logits, int64_t sl, int64_t V, const SampleParams* params,
                  const int32_t* counters, int32_t* out) {
  pdl_wait_and_release();
  __shared__ float red[kThreads / 32];
  __shared__ float seg[kThreads];
  const float* row = logits + int64_t(blockIdx.x) * sl;
  const SampleParams p = params[blockIdx.x];
  const float inv_t = 1.f / p.temperature;
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) mx = fmaxf(mx, row[i] * inv_t);
  mx = block_max(mx, red);
  auto key = [&](int64_t i) { return order_key(row[i] * inv_t); };
  auto prob = [&](int64_t i) { return expf(row[i] * inv_t - mx); };
  // The largest key t with (sum over keys >= t of w) >= need.
  auto threshold = [&](auto w, float need) {
    uint32_t lo = 0, hi = 0xFFFFFFFFu;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2 + 1;
      float s = 0.f;
      for (int64_t i = threadIdx.x; i < V; i += kThreads)
        if (key(i) >= mid) s += w(i);
      if (block_sum(s, red) >= need)
        lo = mid;
      else
        hi = mid - 1;
    }
    return lo;
  };
  const uint32_t tk = p.top_k > 0 && p.top_k < V
                          ? threshold([](int64_t) { return 1.f; }, float(p.top_k))
                          : 0u;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kThreads)
    if (key(i) >= tk) s += prob(i);
  const float total = block_sum(s, red);
  const uint32_t tp =
      p.top_p < 1.f
          ? threshold([&](int64_t i) { return key(i) >= tk ? prob(i) : 0.f; }, p.top_p * total)
          : 0u;
  const uint32_t t = tk > tp ? tk : tp;
  // Contiguous segments: thread j owns [j * per, (j + 1) * per).
  const int64_t per = (V + kThreads - 1) / kThreads;
  const int64_t b = threadIdx.x * per, e = b + per < V ? b + per : V;
  float mine = 0.f;
  for (int64_t i = b; i < e; ++i)
    if (key(i) >= t) mine += prob(i);
  seg[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive scan (1024 adds) and the target
    float acc = 0.f;
    for (int j = 0; j < kThreads; ++j) {
      const float x = seg[j];
      seg[j] = acc;
      acc += x;
    }
    red[0] = float(uniform01(p.seed, counters[blockIdx.x]) * double(acc));
    red[1] = acc;
  }
  __syncthreads();
  const float target = red[0], kept = red[1];
  const float start = seg[threadIdx.x];
  const bool last_thread = threadIdx.x == kThreads - 1;
  if ((target >= start && target < start + mine) || (last_thread && target >= kept)) {
    float acc = start;
    int64_t pick = -1, last = -1;
    for (int64_t i = b; i < e; ++i) {
      if (key(i) < t) continue;
      last = i;
      acc += prob(i);
      if (acc > target) {
        pick = i;
        break;
      }
    }
    if (pick < 0) pick = last;
    if (pick >= 0) out[blockIdx.x] = int32_t(pick);
  }
  // Rounding can leave the target past every segment with the last thread's segment empty: the
  // last kept token then (thread 0 finds it after the others are done).
  __syncthreads();
  if (threadIdx.x == 0 && !(target < kept)) {
    for (int64_t i = V - 1; i >= 0; --i)
      if (key(i) >= t) {
        out[blockIdx.x] = int32_t(i);
        break;
      }
  }
}

}  // namespace

void launch_sample_rows(const TensorView& logits, const SampleParams* params,
                        const int32_t* counters, int32_t* out, cudaStream_t stream) {
  const int64_t m = logits.shape[0];
  check(m < (int64_t(1) << 31), "sample_rows: too many rows");
  pdl_launch(sample_kernel, dim3(unsigned(m)), dim3(kThreads), 0, stream, 
      static_cast<const float*>(logits.data), logits.stride[0], logits.shape[1], params, counters,
      out);
  CCA_CUDA_CHECK_LAUNCH("sample_kernel");
}

}  // namespace cca::ops::cuda

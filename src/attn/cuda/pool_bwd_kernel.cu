// Pooling backward: one block per (batch, group, KV head) owns the group's g key and value rows
// of that head (and, for pool = cca, the last query's rows of the heads it pooled with), so it
// adds into dk, dv and dq with no other block touching them. The core heads of the KV head
// (one, or r with pool_heads = query) add in a fixed order, separated by barriers: the result
// does not depend on scheduling. Math (PoolBwdProblem in backend.hpp, as the cpu backend):
//   cca:  w = mean over the nh pooling heads of p_j = softmax(scale q_j . k_n), recomputed;
//         dk_n += w_n dKc + scale sum_j dz_jn q_j, dv_n += w_n dVc, dq_j += scale sum_n dz_jn k_n
//         with dw_n = dKc . k_n + dVc . v_n and dz_jn = p_jn (dw_n / nh - sum_n' p_jn' dw_n' / nh);
//   mean: w_n = 1 / g;
//   max:  each element's gradient goes to the first position of the group holding the maximum.
#include "attend_args.cuh"
#include "cuda_check.hpp"
#include "device_utils.cuh"
#include "kernels.hpp"
#include "tile_config.hpp"

namespace cca::cuda {
namespace {

struct PoolBwdArgs {
  Rows<const uint16_t> q, k, v;  // 16-bit, read as T
  Rows<const float> dk_core, dv_core;
  Rows<float> dq, dk, dv;
  int B, Hkv, r, nh;  // r query heads per KV head; nh of them pool into each core head
  int64_t m, g;
  bool per_query;
  bool vec4;  // dk and dv rows 16-byte aligned: their read-modify-writes go 4 floats at a time
  PoolMode mode;
  float scale;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// grid B * m * Hkv; dynamic shared memory pool_bwd_smem_bytes(D, nh, g, mode) bytes.
template <typename T, int D>
__global__ void __launch_bounds__(PoolBwdTile::kThreads, 7) pool_bwd_kernel(const PoolBwdArgs a) {
  constexpr int kThreads = PoolBwdTile::kThreads, kWarps = kThreads / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t item = blockIdx.x, g = a.g;
  const int kvh = int(item % a.Hkv);
  const int64_t i = (item / a.Hkv) % a.m, b = item / (int64_t(a.Hkv) * a.m);
  const int64_t row0 = i * g, last = row0 + g - 1;
  const bool cca = a.mode == PoolMode::cca;
  const int nh = cca ? a.nh : 0;

  extern __shared__ float smem[];
  float* s_dkc = smem;          // [D] this core head's dKc
  float* s_dvc = s_dkc + D;     // [D] and dVc
  float* s_w = s_dvc + D;       // [g] pooling weights
  float* s_dw = s_w + g;        // [g] dw (cca)
  float* s_mean = s_dw + g;     // [nh] sum_n p_jn dw_n / nh (cca)
  float* s_q = s_mean + nh;     // [nh][D] the pooling heads' last queries (cca)
  float* s_p = s_q + nh * D;    // [nh][g] logits, then p, then scale dz (cca)

  auto key = [&](int64_t x) { return reinterpret_cast<const T*>(a.k.at(b, row0 + x, kvh)); };
  auto value = [&](int64_t x) { return reinterpret_cast<const T*>(a.v.at(b, row0 + x, kvh)); };
  const int cores = a.per_query ? a.r : 1;
  for (int cc = 0; cc < cores; ++cc) {
    const int c = a.per_query ? kvh * a.r + cc : kvh, h0 = a.per_query ? c : c * a.r;
    for (int d = tid; d < D; d += kThreads) {
      s_dkc[d] = a.dk_core.at(b, i, c)[d];
      s_dvc[d] = a.dv_core.at(b, i, c)[d];
    }
    for (int e = tid; e < nh * D; e += kThreads)
      s_q[e] = to_float(reinterpret_cast<const T*>(a.q.at(b, last, h0 + e / D))[e % D]);
    __syncthreads();

    if (a.mode == PoolMode::max) {
      for (int d = tid; d < D; d += kThreads) {
        int64_t bk = 0, bv = 0;
        float mk = to_float(key(0)[d]), mv = to_float(value(0)[d]);
        for (int64_t x = 1; x < g; ++x) {
          const float kx = to_float(key(x)[d]), vx = to_float(value(x)[d]);
          if (kx > mk) mk = kx, bk = x;
          if (vx > mv) mv = vx, bv = x;
        }
        a.dk.at(b, row0 + bk, kvh)[d] += s_dkc[d];
        a.dv.at(b, row0 + bv, kvh)[d] += s_dvc[d];
      }
      __syncthreads();
      continue;
    }

    if (cca) {
      // Logits, a warp per (pooling head j, key x).
      for (int64_t e = warp; e < nh * g; e += kWarps) {
        const int j = int(e / g);
        const T* kx = key(e % g);
        float s = 0.f;
        for (int d = lane; d < D; d += 32) s = fmaf(s_q[j * D + d], to_float(kx[d]), s);
        s = warp_sum(s);
        if (lane == 0) s_p[e] = a.scale * s;
      }
      __syncthreads();
      // Softmax of each pooling head over the group, a warp per head.
      for (int j = warp; j < nh; j += kWarps) {
        float* pj = s_p + j * g;
        float mx = -INFINITY;
        for (int64_t x = lane; x < g; x += 32) mx = fmaxf(mx, pj[x]);
        mx = warp_max(mx);
        float sum = 0.f;
        for (int64_t x = lane; x < g; x += 32) sum += expf(pj[x] - mx);
        const float inv = 1.f / warp_sum(sum);
        __syncwarp();
        for (int64_t x = lane; x < g; x += 32) pj[x] = expf(pj[x] - mx) * inv;
      }
      // dw, a warp per key.
      for (int64_t x = warp; x < g; x += kWarps) {
        const T* kx = key(x);
        const T* vx = value(x);
        float s = 0.f;
        for (int d = lane; d < D; d += 32)
          s = fmaf(s_dkc[d], to_float(kx[d]), fmaf(s_dvc[d], to_float(vx[d]), s));
        s = warp_sum(s);
        if (lane == 0) s_dw[x] = s;
      }
      __syncthreads();
      for (int64_t x = tid; x < g; x += kThreads) {
        float w = 0.f;
        for (int j = 0; j < nh; ++j) w += s_p[j * g + x];
        s_w[x] = w / float(nh);
      }
      for (int j = warp; j < nh; j += kWarps) {
        float s = 0.f;
        for (int64_t x = lane; x < g; x += 32) s = fmaf(s_p[j * g + x], s_dw[x], s);
        s = warp_sum(s);
        if (lane == 0) s_mean[j] = s / float(nh);
      }
      __syncthreads();
      for (int64_t e = tid; e < nh * g; e += kThreads)
        s_p[e] = a.scale * s_p[e] * (s_dw[e % g] / float(nh) - s_mean[e / g]);
    } else {
      for (int64_t x = tid; x < g; x += kThreads) s_w[x] = 1.f / float(g);
    }
    __syncthreads();

    // The group's key and value rows, a thread per element, or per 4 elements with 16-byte
    // accesses where the rows allow: each read-modify-write waits for the store before it (the
    // compiler cannot tell that they never overlap), so fewer, wider ones wait less.
    auto grad_k = [&](int64_t x, int d) {
      float gk = s_w[x] * s_dkc[d];
      for (int j = 0; j < nh; ++j) gk = fmaf(s_p[j * g + x], s_q[j * D + d], gk);
      return gk;
    };
    if (a.vec4) {
      for (int64_t e = tid; e < g * (D / 4); e += kThreads) {
        const int64_t x = e / (D / 4);
        const int d = int(e % (D / 4)) * 4;
        float4* pk = reinterpret_cast<float4*>(a.dk.at(b, row0 + x, kvh) + d);
        float4* pv = reinterpret_cast<float4*>(a.dv.at(b, row0 + x, kvh) + d);
        float4 k4 = *pk, v4 = *pv;
        k4.x += grad_k(x, d), k4.y += grad_k(x, d + 1), k4.z += grad_k(x, d + 2),
            k4.w += grad_k(x, d + 3);
        v4.x += s_w[x] * s_dvc[d], v4.y += s_w[x] * s_dvc[d + 1], v4.z += s_w[x] * s_dvc[d + 2],
            v4.w += s_w[x] * s_dvc[d + 3];
        *pk = k4;
        *pv = v4;
      }
    } else {
      for (int64_t e = tid; e < g * D; e += kThreads) {
        const int64_t x = e / D;
        const int d = int(e % D);
        a.dk.at(b, row0 + x, kvh)[d] += grad_k(x, d);
        a.dv.at(b, row0 + x, kvh)[d] += s_w[x] * s_dvc[d];
      }
    }
    // The pooling heads' last queries (cca), a thread per element.
    for (int e = tid; e < nh * D; e += kThreads) {
      const int j = e / D, d = e % D;
      float gq = 0.f;
      for (int64_t x = 0; x < g; ++x) gq = fmaf(s_p[j * g + x], to_float(key(x)[d]), gq);
      a.dq.at(b, last, h0 + j)[d] += gq;
    }
    __syncthreads();  // shared memory is refilled for the next core head
  }
}

}  // namespace

int64_t pool_bwd_smem_bytes(int64_t D, int64_t nh, int64_t g, PoolMode mode) {
  const int64_t heads = mode == PoolMode::cca ? nh : 0;
  return (2 * D + 2 * g + heads * (1 + D + g)) * int64_t(sizeof(float));
}

void launch_pool_bwd(const PoolBwdProblem& p, cudaStream_t stream) {
  PoolBwdArgs a;
  a.q = make_rows<const uint16_t>(p.q);
  a.k = make_rows<const uint16_t>(p.k);
  a.v = make_rows<const uint16_t>(p.v);
  a.dk_core = make_rows<const float>(p.dk_core);
  a.dv_core = make_rows<const float>(p.dv_core);
  a.dq = make_rows<float>(p.dq);
  a.dk = make_rows<float>(p.dk);
  a.dv = make_rows<float>(p.dv);
  a.B = int(p.q.shape[0]);
  a.Hkv = int(p.k.shape[2]);
  a.r = int(p.q.shape[2] / p.k.shape[2]);
  a.per_query = p.variant.pool_heads == PoolHeads::query;
  a.nh = a.per_query ? 1 : a.r;
  a.m = p.dk_core.shape[1];
  a.g = p.variant.group;
  a.mode = p.variant.pool;
  a.scale = p.scale;
  a.vec4 = rows_aligned_16(p.dk) && rows_aligned_16(p.dv);
  const int64_t D = p.q.shape[3], items = int64_t(a.B) * a.m * a.Hkv;
  if (items == 0) return;
  const int64_t smem = pool_bwd_smem_bytes(D, a.nh, a.g, a.mode);
  check(smem <= PoolBwdTile::kMaxSmemBytes && items < (int64_t(1) << 31),
        "cuda pool_bwd: too large for one launch (" + std::to_string(items) + " groups x heads, " +
            std::to_string(smem) + " bytes of shared memory)");
  dispatch_dtype_dim(p.q.dtype, D, [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    auto kernel = pool_bwd_kernel<T, kD>;
    if (smem > 48 * 1024)
      CCA_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<unsigned(items), PoolBwdTile::kThreads, size_t(smem), stream>>>(a);
    CCA_CUDA_CHECK_LAUNCH("pool_bwd_kernel");
  });
}

}  // namespace cca::cuda

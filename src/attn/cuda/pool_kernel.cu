// Core-token pooling: one warp per (batch, group, core head) reads the group's g keys and
// values once (16-byte loads, D/8 lanes per key) and writes one core key and value.
// pool = cca: w[n] = mean over the group's query heads of softmax_n(scale q_last . k_n), in two
// passes over the group's keys (the second hits L1): per-head (max, sum), then the weighted sums.
#include <algorithm>

#include "backend.hpp"
#include "cuda_check.hpp"
#include "pdl.cuh"
#include "device_utils.cuh"
#include "kernels.hpp"
#include "tile_config.hpp"

namespace cca::cuda {
namespace {

struct PoolArgs {
  const void* q;
  int64_t q_sb, q_st, q_sh;
  const void* k;
  const void* v;
  int64_t k_sb, k_st, k_sh, v_sb, v_st, v_sh;
  void* kc;
  void* vc;
  int64_t kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh;
  int B, Hq, Hkv, Hc;
  int64_t q_pos0, raw_pos0, group, group_begin, count;
  const int32_t* pos;  // device-positioned mode (count = 1): see PoolProblem::pos_device
  PoolMode mode;
  float scale_log2;
};

// Up to kCap pools in one launch (a decode step's pools of all its sequences), passed by value;
// blockIdx.y is the pool.
template <int kCap>
struct PoolBatch {
  PoolArgs a[kCap];
};
constexpr int kPoolBatchCap = 32;
static_assert(sizeof(PoolBatch<kPoolBatchCap>) < 32000, "kernel parameters over the 32 KB limit");

// Sum of x over the kL lanes that share a key.
template <int kL>
__device__ __forceinline__ float key_sum(float x) {
#pragma unroll
  for (int off = 1; off < kL; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// raw K, V [B, *, Hkv, D], q [B, *, Hq, D] -> k_core, v_core [B, count, Hc, D];
// grid ceil(B * count * Hc / kWarps); dynamic smem kWarps * heads * D floats.
template <typename T, int D, int kCap>
__global__ void __launch_bounds__(PoolTile::kThreads)
    pool_kernel(const __grid_constant__ PoolBatch<kCap> batch) {
  pdl_wait_and_release();
  const PoolArgs& a = batch.a[blockIdx.y];
  constexpr int kL = D / 8, kGroups = 32 / kL, kU = 4;
  extern __shared__ float s_q[];  // [kWarps][nh][D], query rows pre-scaled
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kg = lane / kL, e = (lane % kL) * 8;
  const int64_t item = int64_t(blockIdx.x) * PoolTile::kWarps + warp;
  if (item >= int64_t(a.B) * a.count * a.Hc) return;  // whole warp leaves together
  const int64_t g = a.group;
  int64_t q_pos0 = a.q_pos0, group_begin = a.group_begin, out_row0 = 0;
  if (a.pos) {  // one query at a device-held position: pool the group it completes, if any
    q_pos0 = *a.pos;
    if ((q_pos0 + 1) % g != 0) return;
    group_begin = out_row0 = (q_pos0 + 1) / g - 1;
  }
  const int p = int(item % a.Hc);
  const int64_t il = (item / a.Hc) % a.count;
  const int b = int(item / (int64_t(a.Hc) * a.count));
  const int64_t i = group_begin + il;
  const int r = a.Hq / a.Hkv;
  // pool_heads = query (Hc = Hq): core head p pools with query head p alone.
  const bool per_query = a.Hc == a.Hq && r > 1;
  const int nh = per_query ? 1 : r, h_lo = per_query ? p : p * r, kvh = per_query ? p / r : p;

  const T* kp =
      static_cast<const T*>(a.k) + b * a.k_sb + kvh * a.k_sh + (i * g - a.raw_pos0) * a.k_st + e;
  const T* vp =
      static_cast<const T*>(a.v) + b * a.v_sb + kvh * a.v_sh + (i * g - a.raw_pos0) * a.v_st + e;
  float acc_k[8], acc_v[8];

  if (a.mode == PoolMode::max) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc_k[j] = acc_v[j] = -INFINITY;
    for (int64_t n = kg; n < g; n += kGroups) {
      float kf[8], vf[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(kp + n * a.k_st), kf);
      unpack8<T>(*reinterpret_cast<const uint4*>(vp + n * a.v_st), vf);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        acc_k[j] = fmaxf(acc_k[j], kf[j]);
        acc_v[j] = fmaxf(acc_v[j], vf[j]);
      }
    }
#pragma unroll
    for (int off = kL; off < 32; off <<= 1)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        acc_k[j] = fmaxf(acc_k[j], __shfl_xor_sync(0xffffffffu, acc_k[j], off));
        acc_v[j] = fmaxf(acc_v[j], __shfl_xor_sync(0xffffffffu, acc_v[j], off));
      }
  } else {
    float* sq = s_q + warp * nh * D;
    if (a.mode == PoolMode::cca) {
      const int64_t qrow = (i + 1) * g - 1 - q_pos0;
      for (int x = lane; x < nh * kL; x += 32) {
        const int j = x / kL, c = (x % kL) * 8;
        float qf[8];
        unpack8<T>(*reinterpret_cast<const uint4*>(static_cast<const T*>(a.q) + b * a.q_sb +
                                                   qrow * a.q_st + (h_lo + j) * a.q_sh + c),
                   qf);
#pragma unroll
        for (int t = 0; t < 8; ++t) sq[j * D + c + t] = qf[t] * a.scale_log2;
      }
      __syncwarp();
    }
    // Pass 1 (cca): per query head j, the max and 1 / (sum of 2^logit * nh) over the group, in
    // shared memory after all warps' q rows.
    float* stats = s_q + PoolTile::kWarps * nh * D + warp * nh * 2;
    if (a.mode == PoolMode::cca) {
      for (int j = 0; j < nh; ++j) {
        float qj[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) qj[t] = sq[j * D + e + t];
        float m = -INFINITY, l = 0.f;
        for (int64_t n0 = 0; n0 < g; n0 += kGroups * kU) {
          uint4 kr[kU];
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            const int64_t n = n0 + u * kGroups + kg;
            kr[u] = n < g ? *reinterpret_cast<const uint4*>(kp + n * a.k_st)
                          : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            float kf[8];
            unpack8<T>(kr[u], kf);
            float x = 0.f;
#pragma unroll
            for (int t = 0; t < 8; ++t) x = fmaf(qj[t], kf[t], x);
            x = key_sum<kL>(x);
            if (n0 + u * kGroups + kg < g) {
              const float m_new = fmaxf(m, x);
              l = l * exp2f(m - m_new) + exp2f(x - m_new);
              m = m_new;
            }
          }
        }
        // Merge the key groups' (m, l).
#pragma unroll
        for (int off = kL; off < 32; off <<= 1) {
          const float m_o = __shfl_xor_sync(0xffffffffu, m, off);
          const float l_o = __shfl_xor_sync(0xffffffffu, l, off);
          SoftmaxState st{m, l};
          float s_self, s_other, m_new;
          st.merge_scales(m_o, s_self, s_other, m_new);
          l = l * s_self + l_o * s_other;
          m = m_new;
        }
        if (lane == 0) {
          stats[2 * j] = m;
          stats[2 * j + 1] = 1.f / (l * float(nh));  // folds the mean over heads
        }
      }
      __syncwarp();
    }
    // Pass 2: weighted sums of keys and values.
#pragma unroll
    for (int t = 0; t < 8; ++t) acc_k[t] = acc_v[t] = 0.f;
    const float w_mean = 1.f / float(g);
    for (int64_t n0 = 0; n0 < g; n0 += kGroups * kU) {
      uint4 kr[kU], vr[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t n = n0 + u * kGroups + kg;
        const bool ok = n < g;
        kr[u] =
            ok ? *reinterpret_cast<const uint4*>(kp + n * a.k_st) : make_uint4(0, 0, 0, 0);
        vr[u] =
            ok ? *reinterpret_cast<const uint4*>(vp + n * a.v_st) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        float kf[8], vf[8];
        unpack8<T>(kr[u], kf);
        unpack8<T>(vr[u], vf);
        float w = w_mean;
        if (a.mode == PoolMode::cca) {
          w = 0.f;
          for (int j = 0; j < nh; ++j) {
            float x = 0.f;
#pragma unroll
            for (int t = 0; t < 8; ++t) x = fmaf(sq[j * D + e + t], kf[t], x);
            x = key_sum<kL>(x);
            w += exp2f(x - stats[2 * j]) * stats[2 * j + 1];
          }
        }
        if (n0 + u * kGroups + kg >= g) w = 0.f;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          acc_k[t] = fmaf(w, kf[t], acc_k[t]);
          acc_v[t] = fmaf(w, vf[t], acc_v[t]);
        }
      }
    }
#pragma unroll
    for (int off = kL; off < 32; off <<= 1)
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        acc_k[t] += __shfl_xor_sync(0xffffffffu, acc_k[t], off);
        acc_v[t] += __shfl_xor_sync(0xffffffffu, acc_v[t], off);
      }
  }

  if (kg == 0) {
    uint4 ok, ov;
    uint32_t* pk = reinterpret_cast<uint32_t*>(&ok);
    uint32_t* pv = reinterpret_cast<uint32_t*>(&ov);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      pk[t] = pack2<T>(acc_k[2 * t], acc_k[2 * t + 1]);
      pv[t] = pack2<T>(acc_v[2 * t], acc_v[2 * t + 1]);
    }
    const int64_t row = out_row0 + il;
    *reinterpret_cast<uint4*>(static_cast<T*>(a.kc) + b * a.kc_sb + row * a.kc_st + p * a.kc_sh +
                              e) = ok;
    *reinterpret_cast<uint4*>(static_cast<T*>(a.vc) + b * a.vc_sb + row * a.vc_st + p * a.vc_sh +
                              e) = ov;
  }
}

}  // namespace

namespace {

PoolArgs pool_args(const PoolProblem& p) {
  PoolArgs a;
  a.q = p.q.data;
  a.q_sb = p.q.stride[0];
  a.q_st = p.q.stride[1];
  a.q_sh = p.q.stride[2];
  a.k = p.raw.k.data;
  a.v = p.raw.v.data;
  a.k_sb = p.raw.k.stride[0];
  a.k_st = p.raw.k.stride[1];
  a.k_sh = p.raw.k.stride[2];
  a.v_sb = p.raw.v.stride[0];
  a.v_st = p.raw.v.stride[1];
  a.v_sh = p.raw.v.stride[2];
  a.kc = p.k_core.data;
  a.vc = p.v_core.data;
  a.kc_sb = p.k_core.stride[0];
  a.kc_st = p.k_core.stride[1];
  a.kc_sh = p.k_core.stride[2];
  a.vc_sb = p.v_core.stride[0];
  a.vc_st = p.v_core.stride[1];
  a.vc_sh = p.v_core.stride[2];
  a.B = int(p.q.shape[0]);
  a.Hq = int(p.q.shape[2]);
  a.Hkv = int(p.raw.k.shape[2]);
  a.Hc = int(p.k_core.shape[2]);
  a.q_pos0 = p.q_pos0;
  a.raw_pos0 = p.raw.pos0;
  a.group = p.variant.group;
  a.group_begin = p.group_begin;
  a.count = p.pos_device ? 1 : p.group_end - p.group_begin;
  a.pos = p.pos_device;
  a.mode = p.variant.pool;
  a.scale_log2 = p.scale * kLog2e;
  return a;
}

// One launch for problems [0, count), count <= kCap, of the first one's dtype, head dim and
// heads.
template <int kCap>
void launch_pools(const PoolProblem* ps, int count, cudaStream_t stream) {
  PoolBatch<kCap> b{};
  int64_t items = 0;
  for (int i = 0; i < count; ++i) {
    b.a[i] = pool_args(ps[i]);
    const PoolArgs& a = b.a[i];
    check(a.Hq == b.a[0].Hq && a.Hkv == b.a[0].Hkv && a.Hc == b.a[0].Hc &&
              ps[i].q.dtype == ps[0].q.dtype && ps[i].q.shape[3] == ps[0].q.shape[3],
          "cuda pool: the pools of a batch need one dtype, head dim and head counts");
    items = std::max<int64_t>(items, int64_t(a.B) * a.count * a.Hc);
  }
  if (items <= 0) return;
  const PoolArgs& a = b.a[0];
  const int nh = (a.Hc == a.Hq && a.Hq != a.Hkv) ? 1 : a.Hq / a.Hkv;
  const int64_t D = ps[0].q.shape[3];
  const size_t smem = size_t(PoolTile::kWarps) * nh * (D + 2) * sizeof(float);
  check(smem <= 200 * 1024,
        "cuda pool: too many query heads per KV head (" + std::to_string(nh) + ")");
  const dim3 grid(unsigned((items + PoolTile::kWarps - 1) / PoolTile::kWarps), unsigned(count));
  dispatch_dtype_dim(ps[0].q.dtype, D, [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    auto kernel = pool_kernel<T, kD, kCap>;
    if (smem > 48 * 1024)
      CCA_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    pdl_launch(kernel, grid, dim3(PoolTile::kThreads), smem, stream, b);
    CCA_CUDA_CHECK_LAUNCH("pool_kernel");
  });
}

}  // namespace

void launch_pool(const PoolProblem& p, cudaStream_t stream) { launch_pools<1>(&p, 1, stream); }

void launch_pool_batch(const std::vector<PoolProblem>& problems, cudaStream_t stream) {
  for (size_t i = 0; i < problems.size(); i += kPoolBatchCap)
    launch_pools<kPoolBatchCap>(problems.data() + i,
                                int(std::min<size_t>(kPoolBatchCap, problems.size() - i)), stream);
}

}  // namespace cca::cuda

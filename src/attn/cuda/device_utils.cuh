// Device helpers shared by the CUDA kernels: tensor-core fragments (ldmatrix, mma.sync
// m16n8k16), cp.async copies, 16-bit conversions and the one SoftmaxState merge algebra.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace cca::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- 16-bit element conversions -------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one register of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
// 8 16-bit values in a uint4 -> 8 floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_float(e[i]);
}

// ---- tensor cores (sm_80+) ------------------------------------------------------------------
// D[16x8] += A[16x16] (row) * B[16x8] (col), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Element offset of 16-byte chunk c of row r in a [rows][D] shared tile, XOR-swizzled so that
// ldmatrix's 8 row addresses hit 8 different bank groups (D >= 64).
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

// 16-byte global->shared copy; zero-fills when !valid (src must still be a mapped address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- softmax state --------------------------------------------------------------------------
// Partial attention over a subset of keys, in the log2 domain of scaled logits:
// m = max logit, l = sum 2^(x - m), o = sum 2^(x - m) v (unnormalised). Merging two states over
// disjoint key sets gives the state over their union; lse = (m + log2 l) * ln 2.
struct SoftmaxState {
  float m = -INFINITY, l = 0.f;
  // Factors that rescale this state's and the other's (o, l) onto the merged maximum.
  __device__ __forceinline__ void merge_scales(float m_other, float& self_scale, float& other_scale,
                                               float& m_new) const {
    m_new = fmaxf(m, m_other);
    const float base = m_new == -INFINITY ? 0.f : m_new;  // both empty: keep zeros, avoid NaN
    self_scale = exp2f(m - base);
    other_scale = exp2f(m_other - base);
  }
  __device__ __forceinline__ float lse() const {
    return l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  }
};

// ---- online softmax over mma.sync/wgmma accumulator fragments --------------------------------
// A thread holds two rows of a 16-row tile: row a in elements 0-1 and row b in elements 2-3 of
// each 8-key fragment sc[nt]; the 4 lanes of a quad share the rows.

// sc = -inf for the keys a row does not see: fragment nt, element e holds the key at position
// p0 + 8 nt + 2 (lane % 4) + (e & 1); row a sees [a_lo, a_hi), row b [b_lo, b_hi).
template <int NT>
__device__ __forceinline__ void mask_rows(float (&sc)[NT][4], int64_t p0, int lane, int64_t a_lo,
                                          int64_t a_hi, int64_t b_lo, int64_t b_hi) {
  const int64_t base = p0 + 2 * (lane & 3);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t pos = base + nt * 8 + (e & 1);
      const bool ok = e < 2 ? (pos >= a_lo && pos < a_hi) : (pos >= b_lo && pos < b_hi);
      if (!ok) sc[nt][e] = -INFINITY;
    }
}

// Maximum of each row over sc, across the quad.
template <int NT>
__device__ __forceinline__ void quad_row_max(const float (&sc)[NT][4], float& mx_a, float& mx_b) {
  mx_a = mx_b = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    mx_a = fmaxf(mx_a, fmaxf(sc[nt][0], sc[nt][1]));
    mx_b = fmaxf(mx_b, fmaxf(sc[nt][2], sc[nt][3]));
  }
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
  }
}

// One step over logits already scaled into the log2 domain (-inf where masked): sc becomes the
// unnormalised probabilities, the rows' (m, l) advance and acc is rescaled onto the new maxima.
template <int NT, int DT>
__device__ __forceinline__ void online_softmax_step(float (&sc)[NT][4], float (&acc)[DT][4],
                                                    float& m_a, float& m_b, float& l_a,
                                                    float& l_b) {
  float mx_a, mx_b;
  quad_row_max(sc, mx_a, mx_b);
  mx_a = fmaxf(m_a, mx_a);
  mx_b = fmaxf(m_b, mx_b);
  const float base_a = mx_a == -INFINITY ? 0.f : mx_a;  // no key yet: keep zeros, no NaN
  const float base_b = mx_b == -INFINITY ? 0.f : mx_b;
  const float corr_a = exp2f(m_a - base_a), corr_b = exp2f(m_b - base_b);
  m_a = mx_a;
  m_b = mx_b;
  float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    sc[nt][0] = exp2f(sc[nt][0] - base_a);
    sc[nt][1] = exp2f(sc[nt][1] - base_a);
    sc[nt][2] = exp2f(sc[nt][2] - base_b);
    sc[nt][3] = exp2f(sc[nt][3] - base_b);
    sum_a += sc[nt][0] + sc[nt][1];
    sum_b += sc[nt][2] + sc[nt][3];
  }
  l_a = l_a * corr_a + sum_a;
  l_b = l_b * corr_b + sum_b;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    acc[dt][0] *= corr_a;
    acc[dt][1] *= corr_a;
    acc[dt][2] *= corr_b;
    acc[dt][3] *= corr_b;
  }
}

// Merges n partial states (disjoint keys) into `st` and returns the merged unnormalised output:
// ml(k) is partial k's (m, l), o(k) its output. The maximum comes first, so the n loads are
// independent (in flight together) rather than a chain of dependent rescales.
template <typename ML, typename O>
__device__ __forceinline__ float merge_partials(int n, ML ml, O o, SoftmaxState& st) {
  float m = -INFINITY;
  for (int k = 0; k < n; ++k) m = fmaxf(m, ml(k).x);
  const float base = m == -INFINITY ? 0.f : m;  // all empty: zeros, no NaN
  float acc = 0.f, l = 0.f;
  for (int k = 0; k < n; ++k) {
    const float2 x = ml(k);
    const float w = exp2f(x.x - base);
    l += w * x.y;
    acc += w * o(k);
  }
  st.m = m;
  st.l = l;
  return acc;
}

}  // namespace cca::cuda

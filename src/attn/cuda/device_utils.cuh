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

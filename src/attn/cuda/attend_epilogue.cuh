// The epilogue of the attend tile kernels (attend_kernel.cu, attend_wgmma.cu): normalise and store
// the output rows and their LSE. A warp holds rows ra = base + lane/4 and rb = ra + 8 of a 16-row
// fragment, columns 2*(lane%4) + 8*dt: the mma.sync m16n8 accumulator layout, which wgmma's
// accumulators share. Each row's sum l is spread over the 4 lanes that hold the row.
#pragma once
#include "attend_args.cuh"
#include "device_utils.cuh"

namespace cca::cuda {

template <typename T, int D>
__device__ __forceinline__ void store_attend_rows(const AttendArgs& a, int b, int h, int row0,
                                                  int ra, int rb, int rows_here, int lane,
                                                  const float (&acc)[D / 8][4], float m_a,
                                                  float l_a, float m_b, float l_b) {
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
  }
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  T* out = static_cast<T*>(a.out) + b * a.o_sb + h * a.o_sh;
  const int col = 2 * (lane & 3);
  if (ra < rows_here) {
    T* o = out + int64_t(row0 + ra) * a.o_st + col;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(o + dt * 8) = pack2<T>(acc[dt][0] * inv_a, acc[dt][1] * inv_a);
  }
  if (rb < rows_here) {
    T* o = out + int64_t(row0 + rb) * a.o_st + col;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(o + dt * 8) = pack2<T>(acc[dt][2] * inv_b, acc[dt][3] * inv_b);
  }
  if (a.lse && (lane & 3) == 0) {
    float* lse = a.lse + b * a.l_sb + h * a.l_sh;
    if (ra < rows_here) lse[int64_t(row0 + ra) * a.l_st] = SoftmaxState{m_a, l_a}.lse();
    if (rb < rows_here) lse[int64_t(row0 + rb) * a.l_st] = SoftmaxState{m_b, l_b}.lse();
  }
}

}  // namespace cca::cuda

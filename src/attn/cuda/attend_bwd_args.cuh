// Kernel-side view of an AttendBwdProblem (attend_bwd_kernel.cu, attend_bwd_wgmma.cu): raw
// pointers and element strides, passed by value.
#pragma once
#include "attend_args.cuh"
#include "device_utils.cuh"

namespace cca::cuda {

using In = Rows<const uint16_t>;  // 16-bit inputs, read as T

struct BwdArgs {
  SegArgs seg[3];  // the forward's segments: core tokens, raw keys (sink), raw keys (local)
  In q, out, dout;
  PerQuery lse, delta;
  Rows<float> dq, dk_core, dv_core, dk, dv;
  int B, Hq;
  int64_t T, m;  // queries, core tokens
  VariantSpec variant;
  float scale, scale_log2;
};

inline BwdArgs make_bwd_args(const AttendBwdProblem& p, int64_t m) {
  BwdArgs a;
  if (m > 0)
    a.seg[0] = make_seg_args(
        KvSegment{p.k_core.slice(1, 0, m), p.v_core.slice(1, 0, m), 0});
  a.seg[1] = a.seg[2] = make_seg_args(KvSegment{p.k, p.v, 0});
  a.q = make_rows<const uint16_t>(p.q);
  a.out = make_rows<const uint16_t>(p.out);
  a.dout = make_rows<const uint16_t>(p.dout);
  a.lse = make_per_query(p.lse);
  a.delta = make_per_query(p.delta);
  a.dq = make_rows<float>(p.dq);
  a.dk = make_rows<float>(p.dk);
  a.dv = make_rows<float>(p.dv);
  if (m > 0) {
    a.dk_core = make_rows<float>(p.dk_core);
    a.dv_core = make_rows<float>(p.dv_core);
  }
  a.B = int(p.q.shape[0]);
  a.Hq = int(p.q.shape[2]);
  a.T = p.q.shape[1];
  a.m = m;
  a.variant = p.variant;
  a.scale = p.scale;
  a.scale_log2 = p.scale * kLog2e;
  return a;
}

// dq rows row0 + ra and row0 + rb (those below rows_here) of query head h of batch row b =
// scale x acc, the rows' m16n8-layout accumulators (column 8 dt + 2 (lane % 4) + {0, 1}).
template <int D>
__device__ __forceinline__ void store_dq_rows(const BwdArgs& a, int b, int h, int64_t row0,
                                              int ra, int rb, int rows_here, int lane,
                                              const float (&acc)[D / 8][4]) {
  const int col = 2 * (lane & 3);
  // row r holds accumulator elements i and i + 1
  auto store = [&](int r, int i) {
    if (r >= rows_here) return;
    float* g = a.dq.at(b, row0 + r, h);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      g[dt * 8 + col] = a.scale * acc[dt][i];
      g[dt * 8 + col + 1] = a.scale * acc[dt][i + 1];
    }
  };
  store(ra, 0);
  store(rb, 2);
}

}  // namespace cca::cuda

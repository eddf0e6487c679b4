// Kernel-side view of an AttendProblem: raw pointers and element strides (passed by value),
// shared by the tile kernel and the split-KV decode kernel.
#pragma once
#include <cstdint>

#include "backend.hpp"
#include "policy.hpp"

namespace cca::cuda {

// One key segment; row r holds position pos0 + r. Strides in elements.
struct SegArgs {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_sb = 0, k_st = 0, k_sh = 0, v_sb = 0, v_st = 0, v_sh = 0;
  int64_t pos0 = 0, rows = 0;
  int heads = 1;
};

struct AttendArgs {
  const void* q;
  int64_t q_sb, q_st, q_sh;
  void* out;
  int64_t o_sb, o_st, o_sh;
  float* lse;  // nullptr: not wanted
  int64_t l_sb, l_sh, l_st;
  SegArgs seg[3];  // core, sink, local
  int B, n, Hq;
  int64_t q_pos0;
  const int32_t* q_pos_dev;  // decode: read q_pos0 here on the device when set
  VariantSpec variant;
  float scale_log2;  // softmax scale * log2(e): logits live in the log2 domain
};

// Keys [lo, hi) of segment s (0 core, 1 sink, 2 local) that a query with visibility v sees.
CCA_HD void seg_range(const Visible& v, int s, int64_t& lo, int64_t& hi) {
  if (s == 0) {
    lo = 0;
    hi = v.n_core;
  } else if (s == 1) {
    lo = 0;
    hi = v.sink_end;
  } else {
    lo = v.local_begin;
    hi = v.local_end;
  }
}

inline SegArgs make_seg_args(const KvSegment& s) {
  SegArgs a;
  if (s.rows() == 0) return a;
  a.k = s.k.data;
  a.v = s.v.data;
  a.k_sb = s.k.stride[0];
  a.k_st = s.k.stride[1];
  a.k_sh = s.k.stride[2];
  a.v_sb = s.v.stride[0];
  a.v_st = s.v.stride[1];
  a.v_sh = s.v.stride[2];
  a.pos0 = s.pos0;
  a.rows = s.rows();
  a.heads = int(s.k.shape[2]);
  return a;
}

inline AttendArgs make_attend_args(const AttendProblem& p) {
  AttendArgs a;
  a.q = p.q.data;
  a.q_sb = p.q.stride[0];
  a.q_st = p.q.stride[1];
  a.q_sh = p.q.stride[2];
  a.out = p.out.data;
  a.o_sb = p.out.stride[0];
  a.o_st = p.out.stride[1];
  a.o_sh = p.out.stride[2];
  a.lse = static_cast<float*>(p.lse.data);
  a.l_sb = p.lse.data ? p.lse.stride[0] : 0;
  a.l_sh = p.lse.data ? p.lse.stride[1] : 0;
  a.l_st = p.lse.data ? p.lse.stride[2] : 0;
  a.seg[0] = make_seg_args(p.core);
  a.seg[1] = make_seg_args(p.sink);
  a.seg[2] = make_seg_args(p.local);
  a.B = int(p.q.shape[0]);
  a.n = int(p.q.shape[1]);
  a.Hq = int(p.q.shape[2]);
  a.q_pos0 = p.q_pos0;
  a.q_pos_dev = p.q_pos_device;
  a.variant = p.variant;
  a.scale_log2 = p.scale * 1.4426950408889634f;
  return a;
}

// ---- backward (attend_bwd_kernel.cu, pool_bwd_kernel.cu) ---------------------------------------
// A [B, n, H, D] view: its data and element strides (the last dimension contiguous).
template <typename E>
struct Rows {
  E* p = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  __host__ __device__ E* at(int64_t b, int64_t t, int64_t h) const {
    return p + b * sb + t * st + h * sh;
  }
};
// A [B, Hq, T] float32 view (lse, delta).
struct PerQuery {
  float* p = nullptr;
  int64_t sb = 0, sh = 0, st = 0;
  __device__ float& at(int64_t b, int64_t h, int64_t t) const { return p[b * sb + h * sh + t * st]; }
};

template <typename E>
inline Rows<E> make_rows(const TensorView& t) {
  Rows<E> r;
  if (!t.data) return r;
  r.p = static_cast<E*>(t.data);
  r.sb = t.stride[0];
  r.st = t.stride[1];
  r.sh = t.stride[2];
  return r;
}
inline PerQuery make_per_query(const TensorView& t) {
  return PerQuery{static_cast<float*>(t.data), t.stride[0], t.stride[1], t.stride[2]};
}

}  // namespace cca::cuda

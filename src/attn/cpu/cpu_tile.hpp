// Pieces of the CPU attention shared by the forward (cpu_attend.cpp) and the backward
// (cpu_attend_bwd.cpp) that are the same on every SIMD target: block sizes, constants, the
// three key segments. The per-target pieces (rows as float32 blocks, the key blocks a tile
// visits, masks) are in cpu_tile-inl.h.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "backend.hpp"
#include "cpu_simd.hpp"

namespace cca::cpu {

constexpr int kBlockN = 128;  // keys per block (64 and 256 measured slower: docs/perf.md)
constexpr int kSegments = 3;  // core, sink, local
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Running max before any key: finite, so m_old - m_new never computes inf - inf.
constexpr float kMaxInit = -FLT_MAX;

// Key range [lo, hi) of segment `s` for a query that sees `v`.
inline void segment_range(const Visible& v, int s, int64_t& lo, int64_t& hi) {
  switch (s) {
    case 0:
      lo = 0;
      hi = v.n_core;
      break;
    case 1:
      lo = 0;
      hi = v.sink_end;
      break;
    default:
      lo = v.local_begin;
      hi = v.local_end;
      break;
  }
}

// One segment's keys and values for one (batch, KV head): row pointers at segment row 0.
struct SegmentRows {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t k_stride = 0, v_stride = 0;  // between rows, in elements
  DType k_dtype = DType::f32, v_dtype = DType::f32;
  int64_t pos0 = 0;

  SegmentRows(const KvSegment& s, int64_t b, int64_t head)
      : k(static_cast<const char*>(s.k.ptr(s.k.offset(b, 0, head)))),
        v(static_cast<const char*>(s.v.ptr(s.v.offset(b, 0, head)))),
        k_stride(s.k.stride[1]),
        v_stride(s.v.stride[1]),
        k_dtype(s.k.dtype),
        v_dtype(s.v.dtype),
        pos0(s.pos0) {}
};

}  // namespace cca::cpu

// Variant policy: which keys a query at absolute position t sees, as key ranges. Kernels loop
// over these ranges and never name a variant. Usable on host and device.
#pragma once
#include <cstdint>

#include "cca/variant.hpp"

#if defined(__CUDACC__)
#define CCA_HD __host__ __device__ __forceinline__
#else
#define CCA_HD inline
#endif

namespace cca {

// Query t sees core tokens [0, n_core), raw keys [0, sink_end) and raw keys
// [local_begin, local_end). Always sink_end <= local_begin < local_end = t + 1.
struct Visible {
  int64_t n_core;
  int64_t sink_end;
  int64_t local_begin;
  int64_t local_end;
  CCA_HD int64_t count() const { return n_core + sink_end + (local_end - local_begin); }
};

CCA_HD int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
CCA_HD int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// j(t) = max(0, floor((t + 1 - s) / g)): core tokens visible to query t.
CCA_HD int64_t cca_core_visible(int64_t group, int64_t window, int64_t t) {
  int64_t x = t + 1 - window;
  return x > 0 ? x / group : 0;
}

CCA_HD Visible visible_keys(const VariantSpec& v, int64_t t) {
  Visible r{0, 0, 0, t + 1};
  switch (v.kind) {
    case VariantKind::full:
      break;
    case VariantKind::sliding:
      r.local_begin = max_i64(0, t - v.window + 1);
      break;
    case VariantKind::streaming:
    case VariantKind::lminfinite:
      r.sink_end = min_i64(v.sinks, t + 1);
      r.local_begin = max_i64(r.sink_end, t - v.window + 1);
      break;
    case VariantKind::cca:
      r.n_core = cca_core_visible(v.group, v.window, t);
      r.local_begin = r.n_core * v.group;
      break;
  }
  return r;
}

// First i in [lo, hi) where pred(i) holds, for a pred that is false and then true; hi if none.
template <typename F>
CCA_HD int64_t first_where(int64_t lo, int64_t hi, F pred) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pred(mid))
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

// The inverse of visible_keys for a backward over key tiles: the query tiles
// i (queries [i kM, min((i+1) kM, T))) in which some query sees some key of [k0, k1) of the core
// tokens (core) or of the raw keys, as the tiles [lo0, hi0) and then [lo1, hi1), hi0 <= lo1.
// Every bound of Visible is non-decreasing in t, so each segment's tiles form an interval:
// core tokens and sinks a suffix (binary search), local windows the tiles from the one holding
// k0 on, up to the first whose first query's window starts at k1 or later.
struct QueryTiles {
  int64_t lo0, hi0, lo1, hi1;
  CCA_HD int64_t count() const { return (hi0 - lo0) + (hi1 - lo1); }
  CCA_HD int64_t tile(int64_t j) const { return j < hi0 - lo0 ? lo0 + j : lo1 + j - (hi0 - lo0); }
};
CCA_HD QueryTiles query_tiles_seeing(const VariantSpec& v, int64_t T, int64_t kM, bool core,
                                     int64_t k0, int64_t k1) {
  const int64_t n = (T + kM - 1) / kM;
  auto last_q = [&](int64_t i) { return min_i64(T - 1, i * kM + kM - 1); };
  QueryTiles r{0, 0, n, n};
  if (core) {
    r.lo1 = first_where(0, n, [&](int64_t i) { return visible_keys(v, last_q(i)).n_core > k0; });
    return r;
  }
  r.lo0 = k0 / kM;
  r.hi0 = first_where(r.lo0, n,
                      [&](int64_t i) { return visible_keys(v, i * kM).local_begin >= k1; });
  r.lo1 = first_where(0, n, [&](int64_t i) { return visible_keys(v, last_q(i)).sink_end > k0; });
  if (r.lo0 < r.hi0 && r.lo1 <= r.hi0) {  // overlapping or adjacent: one interval
    r.lo0 = min_i64(r.lo0, r.lo1);
    r.hi0 = n;
    r.lo1 = n;
  }
  return r;
}

// Whether every query of [t0, t1] sees every key of [k0, k1) (core tokens or raw keys).
CCA_HD bool sees_all(const VariantSpec& v, bool core, int64_t k0, int64_t k1, int64_t t0,
                     int64_t t1) {
  const Visible first = visible_keys(v, t0), last = visible_keys(v, t1);
  if (core) return k1 <= first.n_core;
  return k1 <= first.sink_end || (k0 >= last.local_begin && k1 - 1 <= t0);
}

}  // namespace cca

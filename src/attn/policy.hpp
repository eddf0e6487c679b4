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

}  // namespace cca

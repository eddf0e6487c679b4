// Decode path of the CPU backend, for few queries per KV head (token-by-token decoding, small
// chunks). The tile path puts 64 queries of one head on the vector lanes, so one decode query
// would waste 63/64 of its work. Here each (query, query head) is a row vectorised over D, and
// all rows reading the same KV head share each key and value row as it streams by: every visible
// K/V row is read once per (batch, KV head), which is the memory-bound floor of decoding.
// The item code is compiled per SIMD target (see cpu_attend.cpp).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/cpu_decode.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "cpu_ops.hpp"
#include "cpu_simd.hpp"
#include "simd-inl.h"

#ifndef CCA_CPU_DECODE_SCRATCH
#define CCA_CPU_DECODE_SCRATCH
namespace cca::cpu {
namespace {

constexpr int kKeyBlock = 64;  // keys scored before one softmax rescale

// The running softmax state of one (query, query head) row.
struct Row {
  int64_t i = 0, h = 0;  // query row, query head
  Visible vis{};
  float* q = nullptr;  // [D], scaled by scale * log2 e (softmax in base 2)
  float* o = nullptr;  // [D] unnormalised output
  float m = -FLT_MAX, l = 0.f;
  bool none = false;   // nothing visible in the current key block
  float s[kKeyBlock];  // the block's logits, then probabilities
};

// One thread's scratch: rows, their q and o vectors, converted key and value rows.
struct DecodeScratch {
  AlignedFloats buf;
  std::vector<Row> rows;
  std::vector<Row*> group;
  DecodeScratch(int64_t nrows, int64_t D)
      : buf(2 * nrows * D + (kKeyBlock + 1) * D), rows(static_cast<size_t>(nrows)) {}
};

void segment_bounds(const Visible& v, int s, int64_t& lo, int64_t& hi) {
  lo = s == 2 ? v.local_begin : 0;
  hi = s == 0 ? v.n_core : s == 1 ? v.sink_end : v.local_end;
}

}  // namespace
}  // namespace cca::cpu
#endif  // CCA_CPU_DECODE_SCRATCH

HWY_BEFORE_NAMESPACE();
namespace cca::cpu::HWY_NAMESPACE {
namespace {

// Rows `rows` (all reading head `head` of segment `seg`) attend over its visible keys.
void attend_segment(const KvSegment& seg, int s, int64_t b, int64_t head, int64_t D,
                    std::vector<Row*>& rows, float* kbuf, float* vbuf) {
  int64_t ulo = INT64_MAX, uhi = INT64_MIN;
  for (Row* r : rows) {
    int64_t lo, hi;
    segment_bounds(r->vis, s, lo, hi);
    if (hi > lo) ulo = std::min(ulo, lo), uhi = std::max(uhi, hi);
  }
  if (uhi <= ulo) return;
  const char* kbase = static_cast<const char*>(seg.k.ptr(seg.k.offset(b, 0, head)));
  const char* vbase = static_cast<const char*>(seg.v.ptr(seg.v.offset(b, 0, head)));
  const int64_t kstep = seg.k.stride[1] * dtype_size(seg.k.dtype);
  const int64_t vstep = seg.v.stride[1] * dtype_size(seg.v.dtype);
  const float* krow[kKeyBlock];
  for (int64_t k0 = ulo; k0 < uhi; k0 += kKeyBlock) {
    const int nk = int(std::min<int64_t>(kKeyBlock, uhi - k0));
    for (int j = 0; j < nk; ++j)
      krow[j] = row_as_float(kbase + (k0 + j - seg.pos0) * kstep, seg.k.dtype, D, kbuf + j * D);
    for (Row* r : rows) {
      int64_t lo, hi;
      segment_bounds(r->vis, s, lo, hi);
      float mx = -INFINITY;
      for (int j = 0; j < nk; ++j) {
        const int64_t pos = k0 + j;
        r->s[j] = pos >= lo && pos < hi ? dot_product(r->q, krow[j], D) : -INFINITY;
        mx = std::max(mx, r->s[j]);
      }
      r->none = mx == -INFINITY;
      if (r->none) continue;
      const float m_new = std::max(r->m, mx), alpha = std::exp2(r->m - m_new);
      for (int j = 0; j < nk; ++j) r->s[j] -= m_new;
      exp2_row(r->s, nk);  // -inf (keys not visible) gives 0
      float sum = 0.f;
      for (int j = 0; j < nk; ++j) sum += r->s[j];
      scale_row(alpha, r->o, D);
      r->l = r->l * alpha + sum;
      r->m = m_new;
    }
    for (int j = 0; j < nk; ++j) {
      const float* v = row_as_float(vbase + (k0 + j - seg.pos0) * vstep, seg.v.dtype, D, vbuf);
      for (Row* r : rows)
        if (!r->none && r->s[j] != 0.f) axpy(r->s[j], v, r->o, D);
    }
  }
}

}  // namespace

// Work item (batch b, KV head c): the n * Hq/Hkv query rows reading KV head c.
void decode_item(const AttendProblem& p, DecodeScratch& scratch, int64_t b, int64_t c) {
  const int64_t n = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hkv = p.local.k.shape[2], r = Hq / Hkv, nrows = n * r;
  const bool core_per_query_head = p.variant.pool_heads == PoolHeads::query;
  const float qscale = p.scale * 1.4426950408889634f;
  const KvSegment* segs[3] = {&p.core, &p.sink, &p.local};
  std::vector<Row>& rows = scratch.rows;
  float* buf = scratch.buf.data();
  for (int64_t x = 0; x < nrows; ++x) {
    Row& row = rows[size_t(x)];
    row.i = x / r;
    row.h = c * r + x % r;
    row.vis = visible_keys(p.variant, p.q_pos0 + row.i);
    row.q = buf + 2 * x * D;
    row.o = row.q + D;
    row.m = -FLT_MAX;
    row.l = 0.f;
    load_row(p.q.ptr(p.q.offset(b, row.i, row.h)), p.q.dtype, D, row.q);
    scale_row(qscale, row.q, D);
    std::fill(row.o, row.o + D, 0.f);
  }
  float* kbuf = buf + 2 * nrows * D;
  float* vbuf = kbuf + kKeyBlock * D;
  for (int s = 0; s < 3; ++s) {
    // Core tokens pooled per query head: each query head reads its own core head.
    const int64_t head_groups = s == 0 && core_per_query_head ? r : 1;
    for (int64_t hg = 0; hg < head_groups; ++hg) {
      scratch.group.clear();
      for (Row& row : rows)
        if (head_groups == 1 || row.h % r == hg) scratch.group.push_back(&row);
      const int64_t head = head_groups == 1 ? c : c * r + hg;
      attend_segment(*segs[s], s, b, head, D, scratch.group, kbuf, vbuf);
    }
  }
  for (const Row& row : rows) {
    scale_row(1.f / row.l, row.o, D);
    store_row(row.o, D, p.out.ptr(p.out.offset(b, row.i, row.h)), p.out.dtype);
    if (p.lse.data)
      p.lse.store(p.lse.offset(b, row.h, row.i), row.m * 0.6931471805599453f + std::log(row.l));
  }
}

}  // namespace cca::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace cca::cpu {
namespace {
HWY_EXPORT(decode_item);
}  // namespace

bool prefers_decode_path(const AttendProblem& p) {
  return p.q.shape[1] * (p.q.shape[2] / p.local.k.shape[2]) <= kDecodeMaxRows;
}

// q [B, n, Hq, D] with n * Hq/Hkv <= kDecodeMaxRows; segments as in attend().
void attend_decode(const AttendProblem& p) {
  const int64_t B = p.q.shape[0], n = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hkv = p.local.k.shape[2], r = Hq / Hkv, items = B * Hkv, nrows = n * r;
  const int nthreads = thread_count(p.threads, items, attend_flops(p));
  init_simd_target();
  const auto item = HWY_DYNAMIC_DISPATCH(decode_item);

#pragma omp parallel num_threads(nthreads)
  {
    DecodeScratch scratch(nrows, D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < items; ++w) item(p, scratch, w / Hkv, w % Hkv);
  }
}

}  // namespace cca::cpu
#endif  // HWY_ONCE

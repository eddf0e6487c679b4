// Decode path of the CPU backend, for few queries per KV head (token-by-token decoding, small
// chunks). The tile path puts 64 queries of one head on the vector lanes, so one decode query
// would waste 63/64 of its work. Here each (query, query head) is a row vectorised over D, and
// all rows reading the same KV head share each key and value row as it streams by: every visible
// K/V row is read once per (batch, KV head), which is the memory-bound floor of decoding.
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "cpu_ops.hpp"
#include "cpu_simd.hpp"

namespace cca::cpu {
namespace {

constexpr int kKeyBlock = 64;  // keys scored before one softmax rescale

// The running softmax state of one (query, query head) row.
struct Row {
  int64_t i = 0, h = 0;  // query row, query head
  Visible vis{};
  float* q = nullptr;    // [D], scaled by scale * log2 e (softmax in base 2)
  float* o = nullptr;    // [D] unnormalised output
  float m = -FLT_MAX, l = 0.f;
  float s[kKeyBlock];
};

void segment_bounds(const Visible& v, int s, int64_t& lo, int64_t& hi) {
  lo = s == 2 ? v.local_begin : 0;
  hi = s == 0 ? v.n_core : s == 1 ? v.sink_end : v.local_end;
}

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
      if (mx == -INFINITY) {
        r->s[0] = NAN;  // marks "nothing visible in this block" for the value pass
        continue;
      }
      const float m_new = std::max(r->m, mx), alpha = std::exp2(r->m - m_new);
      float sum = 0.f;
      for (int j = 0; j < nk; ++j) sum += (r->s[j] = std::exp2(r->s[j] - m_new));
      for (int64_t d = 0; d < D; ++d) r->o[d] *= alpha;
      r->l = r->l * alpha + sum;
      r->m = m_new;
    }
    for (int j = 0; j < nk; ++j) {
      const float* v = row_as_float(vbase + (k0 + j - seg.pos0) * vstep, seg.v.dtype, D, vbuf);
      for (Row* r : rows) {
        const float p = r->s[j];
        if (std::isnan(r->s[0]) || p == 0.f) continue;
        for (int64_t d = 0; d < D; ++d) r->o[d] += p * v[d];
      }
    }
  }
}

}  // namespace

bool prefers_decode_path(const AttendProblem& p) {
  return p.q.shape[1] * (p.q.shape[2] / p.local.k.shape[2]) <= kDecodeMaxRows;
}

// q [B, n, Hq, D] with n * Hq/Hkv <= kDecodeMaxRows; segments as in attend().
void attend_decode(const AttendProblem& p) {
  const int64_t B = p.q.shape[0], n = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hkv = p.local.k.shape[2], r = Hq / Hkv, items = B * Hkv, nrows = n * r;
  const int nthreads = thread_count(p.threads, items, attend_flops(p));
  const bool core_per_query_head = p.variant.pool_heads == PoolHeads::query;
  const float qscale = p.scale * 1.4426950408889634f;
  const KvSegment* segs[3] = {&p.core, &p.sink, &p.local};

#pragma omp parallel num_threads(nthreads)
  {
    AlignedFloats buf(2 * nrows * D + (kKeyBlock + 1) * D);
    std::vector<Row> rows(static_cast<size_t>(nrows));
    std::vector<Row*> group;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < items; ++w) {
      const int64_t b = w / Hkv, c = w % Hkv;
      for (int64_t x = 0; x < nrows; ++x) {
        Row& row = rows[size_t(x)];
        row.i = x / r;
        row.h = c * r + x % r;
        row.vis = visible_keys(p.variant, p.q_pos0 + row.i);
        row.q = buf.data() + 2 * x * D;
        row.o = row.q + D;
        row.m = -FLT_MAX;
        row.l = 0.f;
        load_row(p.q.ptr(p.q.offset(b, row.i, row.h)), p.q.dtype, D, row.q);
        for (int64_t d = 0; d < D; ++d) row.q[d] *= qscale, row.o[d] = 0.f;
      }
      float* kbuf = buf.data() + 2 * nrows * D;
      float* vbuf = kbuf + kKeyBlock * D;
      for (int s = 0; s < 3; ++s) {
        // Core tokens pooled per query head: each query head reads its own core head.
        const int64_t head_groups = s == 0 && core_per_query_head ? r : 1;
        for (int64_t hg = 0; hg < head_groups; ++hg) {
          group.clear();
          for (Row& row : rows)
            if (head_groups == 1 || row.h % r == hg) group.push_back(&row);
          const int64_t head = head_groups == 1 ? c : c * r + hg;
          attend_segment(*segs[s], s, b, head, D, group, kbuf, vbuf);
        }
      }
      for (const Row& row : rows) {
        const float inv = 1.f / row.l;
        const int64_t oo = p.out.offset(b, row.i, row.h);
        for (int64_t d = 0; d < D; ++d) p.out.store(oo + d, row.o[d] * inv);
        if (p.lse.data)
          p.lse.store(p.lse.offset(b, row.h, row.i), row.m * 0.6931471805599453f + std::log(row.l));
      }
    }
  }
}

}  // namespace cca::cpu

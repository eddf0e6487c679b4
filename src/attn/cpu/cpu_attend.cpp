// CPU attention: tiled online softmax (flash-attention style) over the key ranges of policy.hpp.
//
// Layout. A work item is (batch b, query head h, tile of kBlockM = 64 consecutive queries). The
// tile keeps its queries transposed, Qt [D][64] (pre-scaled by scale * log2 e, so the softmax runs
// in base 2), and its output transposed, Ot [D][64], with a running max m and sum l per query.
// Each key block of up to kBlockN keys computes S^T [keys][64] = K_blk Qt, then P^T = 2^(S^T - m)
// and Ot = Ot * alpha + V_blk^T P^T. With queries along the vector lanes, the softmax needs no
// horizontal reductions, K and V float32 rows are read in place (broadcast operands, no packing),
// and both products are the same register-blocked kernel (cpu_simd.hpp). float16/bfloat16 key
// and value blocks are converted to float32 first.
//
// Work. For each segment (core, sink, local) a tile visits only the blocks of the union of its
// queries' ranges, and masks elements only in blocks that are not inside every query's range, so
// cca costs O(T (T/g + s)) and full causal O(T^2 / 2).
//
// Cost model at T = 16384, Hq = 8, D = 64 (issue 2 target): useful FLOPs of full causal
// 4 D Hq T(T+1)/2 = 275 GFLOP; cca g=16 s=1024 48.6 GFLOP (each query sees ~t/16 + 1032 keys),
// 5.66x less work; pooling reads K and V once (~0.05 GFLOP). The tile product keeps 6 x 4
// accumulator vectors on AVX-512 (24 FMAs per 4 loads + 6 broadcasts; peak 2 FMA/cycle x 16
// lanes x 2 = 64 FLOP/cycle/core on a 512-bit FMA core) and 6 x 2 on AVX2 (16 registers).
// Measured results and the tuning history: docs/perf.md.
//
// SIMD targets. The tile code (namespace HWY_NAMESPACE) is compiled once per target by
// hwy/foreach_target.h, which re-includes this file; attend() runs the OpenMP loop once and calls
// the chosen target's attend_tile for each item.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/cpu_attend.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>

#include "cca/error.hpp"
#include "cpu_ops.hpp"
#include "cpu_simd.hpp"
#include "cpu_tile-inl.h"
#include "cpu_tile.hpp"
#include "simd-inl.h"

#ifndef CCA_CPU_ATTEND_TILE_STATE
#define CCA_CPU_ATTEND_TILE_STATE
namespace cca::cpu {
namespace {

// Per-thread scratch of one query tile (the same layout on every target).
struct TileState {
  int64_t D = 0;
  float* qt = nullptr;     // [D][kBlockM] queries, scaled by scale * log2 e
  float* ot = nullptr;     // [D][kBlockM] unnormalised output
  float* st = nullptr;     // [kBlockN][kBlockM] logits, then probabilities
  float* kbuf = nullptr;   // [kBlockN][D] converted keys (float16/bfloat16 inputs)
  float* vbuf = nullptr;   // [kBlockN][D] converted values
  float* m = nullptr;      // [kBlockM] running max (base-2 logits)
  float* l = nullptr;      // [kBlockM] running sum
  float* alpha = nullptr;  // [kBlockM] rescale of this block

  static int64_t floats(int64_t D) {
    return 2 * D * kBlockM + int64_t(kBlockN) * kBlockM + 2 * int64_t(kBlockN) * D + 3 * kBlockM;
  }
  // Carves the buffers out of `base` (64-byte aligned; every piece is a multiple of 16 floats
  // except kbuf/vbuf, which are placed last and read unaligned).
  void bind(float* base, int64_t head_dim) {
    D = head_dim;
    qt = base;
    ot = qt + D * kBlockM;
    st = ot + D * kBlockM;
    m = st + kBlockN * kBlockM;
    l = m + kBlockM;
    alpha = l + kBlockM;
    kbuf = alpha + kBlockM;
    vbuf = kbuf + kBlockN * D;
  }
};

}  // namespace
}  // namespace cca::cpu
#endif  // CCA_CPU_ATTEND_TILE_STATE

HWY_BEFORE_NAMESPACE();
namespace cca::cpu::HWY_NAMESPACE {
namespace {

// One key block [k0, k0 + nk) of a segment for the tile in `ts`. `lo`/`hi`: each query's visible
// range in this segment (empty for padding columns), used only when `masked`.
void attend_block(TileState& ts, const SegmentRows& seg, int64_t k0, int64_t nk, bool masked,
                  const int64_t* lo, const int64_t* hi) {
  const int64_t D = ts.D;
  int64_t ks = 0, vs = 0;
  const float* kp = block_rows(seg.k, seg.k_dtype, seg.k_stride, k0 - seg.pos0, nk, D, ts.kbuf, ks);
  const float* vp = block_rows(seg.v, seg.v_dtype, seg.v_stride, k0 - seg.pos0, nk, D, ts.vbuf, vs);

  // S^T [nk][64] = K_blk [nk][D] Qt [D][64]
  tile_product_rows<false>(nk, D, kp, ks, 1, ts.qt, ts.st, nullptr);

  if (masked) mask_block(ts.st, k0, nk, lo, hi);

  // Online softmax update, vectorised over the 64 queries of the tile.
  const DF d;
  const size_t N = hn::Lanes(d);
  for (size_t c = 0; c < size_t(kBlockM); c += N) {
    float* sv = ts.st + c;
    VF mx = hn::Set(d, -INFINITY);
    for (int64_t j = 0; j < nk; ++j) mx = hn::Max(mx, hn::Load(d, sv + j * kBlockM));
    const VF m_old = hn::Load(d, ts.m + c);
    const VF m_new = hn::Max(m_old, mx);
    const VF a = exp2(d, hn::Sub(m_old, m_new));
    VF sum = hn::Zero(d);
    for (int64_t j = 0; j < nk; ++j) {
      const VF p = exp2(d, hn::Sub(hn::Load(d, sv + j * kBlockM), m_new));
      hn::Store(p, d, sv + j * kBlockM);
      sum = hn::Add(sum, p);
    }
    hn::Store(m_new, d, ts.m + c);
    hn::Store(hn::MulAdd(hn::Load(d, ts.l + c), a, sum), d, ts.l + c);
    hn::Store(a, d, ts.alpha + c);
  }

  // Ot [D][64] = Ot * alpha + V_blk^T [D][nk] P^T [nk][64]
  tile_product_rows<true>(D, nk, vp, 1, vs, ts.st, ts.ot, ts.alpha);
}

}  // namespace

// Queries [r0, r0 + nq) of (batch b, query head h), with the thread's scratch at `scratch`
// (TileState::floats(D) floats, 64-byte aligned).
void attend_tile(const AttendProblem& p, float* scratch, int64_t b, int64_t h, int64_t r0,
                 int64_t nq) {
  TileState ts;
  ts.bind(scratch, p.q.shape[3]);
  const int64_t D = ts.D, Hq = p.q.shape[2], Hkv = p.local.k.shape[2], group_size = Hq / Hkv;
  const float qscale = p.scale * kLog2e;

  load_transposed(p.q, b, r0, nq, h, qscale, ts.qt);
  for (int64_t x = 0; x < D * kBlockM; ++x) ts.ot[x] = 0.f;
  for (int i = 0; i < kBlockM; ++i) {
    ts.m[i] = kMaxInit;
    ts.l[i] = 0.f;
  }

  Visible vis[kBlockM];
  for (int64_t i = 0; i < nq; ++i) vis[i] = visible_keys(p.variant, p.q_pos0 + r0 + i);

  const KvSegment* segs[kSegments] = {&p.core, &p.sink, &p.local};
  for_each_key_block(
      segs, p.variant, vis, nq, b, h, group_size, D,
      [&](const SegmentRows& rows, int64_t k0, int64_t nk, bool masked, const int64_t* lo,
          const int64_t* hi) { attend_block(ts, rows, k0, nk, masked, lo, hi); });

  // O = Ot^T / l, lse = ln(2^m l) = m ln 2 + ln l.
  float row[1024];  // D <= 1024, checked
  for (int64_t i = 0; i < nq; ++i) {
    const float inv = 1.f / ts.l[i];
    for (int64_t x = 0; x < D; ++x) row[x] = ts.ot[x * kBlockM + i] * inv;
    store_row(row, D, p.out.ptr(p.out.offset(b, r0 + i, h)), p.out.dtype);
    if (p.lse.data) p.lse.store(p.lse.offset(b, h, r0 + i), ts.m[i] * kLn2 + std::log(ts.l[i]));
  }
}

}  // namespace cca::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace cca::cpu {
namespace {

HWY_EXPORT(attend_tile);

std::string seg_name(int s) { return s == 0 ? "core" : s == 1 ? "sink" : "local"; }

// Shapes, head counts and that every segment holds the rows its queries need. Throws before any
// output is written.
void check_problem(const AttendProblem& p) {
  check(p.q.data && p.q.ndim == 4, "cpu attend: q must be a 4-d tensor [B, n, Hq, D]");
  check(p.out.data && p.out.ndim == 4, "cpu attend: out must be a 4-d tensor [B, n, Hq, D]");
  const int64_t B = p.q.shape[0], n = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  check(D >= 1 && D <= 1024, "cpu attend: head dim D = " + std::to_string(D) +
                                 " is outside the supported range 1..1024");
  check(p.q.stride[3] == 1 && p.out.stride[3] == 1,
        "cpu attend: q and out must be contiguous in their last dimension");
  check(p.local.k.data && p.local.v.data, "cpu attend: the local segment is missing");
  const int64_t Hkv = p.local.k.shape[2];
  check(Hkv >= 1 && Hq % Hkv == 0, "cpu attend: Hq = " + std::to_string(Hq) +
                                       " is not a multiple of Hkv = " + std::to_string(Hkv));
  if (n == 0 || B == 0) return;
  const Visible first = visible_keys(p.variant, p.q_pos0);
  const Visible last = visible_keys(p.variant, p.q_pos0 + n - 1);
  const KvSegment* segs[kSegments] = {&p.core, &p.sink, &p.local};
  for (int s = 0; s < kSegments; ++s) {
    int64_t lo0, hi0, lo1, hi1;
    segment_range(first, s, lo0, hi0);
    segment_range(last, s, lo1, hi1);
    const int64_t lo = std::min(lo0, lo1), hi = std::max(hi0, hi1);
    if (hi <= lo) continue;
    const KvSegment& seg = *segs[s];
    const std::string name = seg_name(s);
    check(seg.k.data && seg.v.data, "cpu attend: the " + name + " segment is missing");
    check(seg.k.ndim == 4 && seg.v.ndim == 4 && seg.k.shape[0] == B && seg.v.shape[0] == B &&
              seg.k.shape[3] == D && seg.v.shape[3] == D && seg.k.stride[3] == 1 &&
              seg.v.stride[3] == 1 && seg.v.shape[1] == seg.k.shape[1] &&
              seg.v.shape[2] == seg.k.shape[2],
          "cpu attend: " + name + " segment k " + seg.k.shape_string() + ", v " +
              seg.v.shape_string() + " do not match q " + p.q.shape_string());
    const int64_t want_heads = s == 0 ? p.variant.core_heads(Hq, Hkv) : Hkv;
    check(seg.k.shape[2] == want_heads, "cpu attend: " + name + " segment has " +
                                            std::to_string(seg.k.shape[2]) + " heads, expected " +
                                            std::to_string(want_heads));
    check(lo >= seg.pos0 && hi <= seg.end(),
          "cpu attend: " + name + " segment holds rows [" + std::to_string(seg.pos0) + ", " +
              std::to_string(seg.end()) + ") but the queries need [" + std::to_string(lo) + ", " +
              std::to_string(hi) + ")");
  }
}

}  // namespace

int thread_count(int threads, int64_t items, double flops) {
  // A thread costs a fork/join (and, on a busy machine, a wait for a core): give each at least
  // kMinFlopsPerThread of work, so decode steps and tiny problems stay on the calling thread.
  constexpr double kMinFlopsPerThread = 4e6;
  const int64_t want = threads > 0 ? threads : omp_get_max_threads();
  const int64_t useful = std::max<int64_t>(1, int64_t(flops / kMinFlopsPerThread));
  return int(std::max<int64_t>(1, std::min({want, items, useful})));
}

// Useful FLOPs of `p` (4 D per visible key and query), counted from its first and last queries.
double attend_flops(const AttendProblem& p) {
  const int64_t n = p.q.shape[1];
  const double keys = 0.5 * double(visible_keys(p.variant, p.q_pos0).count() +
                                   visible_keys(p.variant, p.q_pos0 + n - 1).count());
  return 4.0 * double(p.q.shape[0] * p.q.shape[2] * p.q.shape[3] * n) * keys;
}

// q [B, n, Hq, D] at positions q_pos0..; segments [B, rows, Hkv or Hc, D]; out [B, n, Hq, D].
void attend(const AttendProblem& p) {
  check_problem(p);
  const int64_t B = p.q.shape[0], n = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  if (B == 0 || n == 0) return;
  if (prefers_decode_path(p)) return attend_decode(p);
  const int64_t tiles = (n + kBlockM - 1) / kBlockM, items = B * Hq * tiles;
  const int nthreads = thread_count(p.threads, items, attend_flops(p));
  const int64_t per_thread = (TileState::floats(D) + 15) / 16 * 16;
  AlignedFloats scratch(per_thread * nthreads);

  init_simd_target();
  const auto tile = HWY_DYNAMIC_DISPATCH(attend_tile);

#pragma omp parallel num_threads(nthreads)
  {
    float* ts = scratch.data() + per_thread * omp_get_thread_num();
    // Longest tiles (latest queries) first, so the dynamic schedule ends on short ones.
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < items; ++w) {
      const int64_t b = w / (Hq * tiles), h = (w / tiles) % Hq, t = tiles - 1 - w % tiles;
      const int64_t r0 = t * kBlockM;
      tile(p, ts, b, h, r0, std::min<int64_t>(kBlockM, n - r0));
    }
  }
}

}  // namespace cca::cpu
#endif  // HWY_ONCE

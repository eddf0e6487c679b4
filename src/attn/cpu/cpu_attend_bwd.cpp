// CPU attention backward (FlashAttention-2 style, two passes, deterministic by construction).
//
// Both passes recompute the probabilities from the forward's LSE, P = 2^(S2 - lse log2 e) with
// S2 = scale log2(e) q.k, and use delta = rowsum(dO * O) (attend_bwd_delta):
//   dQ pass, one work item per (batch, query head, tile of 64 queries), the forward's layout
//     (queries along the vector lanes, the same key blocks and masks): per key block
//     S^T = K Qt, dP^T = V dOt, dS^T = P^T (dP^T - delta), dQt += K^T dS^T;
//   dK/dV pass, one work item per (batch, key head, tile of 64 keys) of the raw keys and of the
//     core tokens (keys along the lanes): per query block of the heads that read this key head
//     (r for a KV head, or one with per-query-head core tokens) S = Q Kt, dP = dO Vt,
//     dS = P (dP - delta), dVt += dO^T P, dKt += Q^T dS.
// Every output element is written by one work item in a fixed order, so the result does not
// depend on the thread count. All products are the tile kernel of simd-inl.h. Useful FLOPs:
// 3 products in the dQ pass and 4 in the dK/dV pass, 3.5x the forward's 2. The item code is
// compiled per SIMD target (see cpu_attend.cpp).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/cpu_attend_bwd.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <string>

#include "cca/error.hpp"
#include "cpu_ops.hpp"
#include "cpu_simd.hpp"
#include "cpu_tile-inl.h"
#include "cpu_tile.hpp"
#include "simd-inl.h"

#ifndef CCA_CPU_BWD_SHARED
#define CCA_CPU_BWD_SHARED
namespace cca::cpu {
namespace {

constexpr int kBlockQ = 64;  // queries per block of the dK/dV pass
alignas(64) constexpr float kOnes[kBlockM] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// Per-thread scratch; a thread runs items of both passes.
struct BwdState {
  int64_t D = 0;
  // dQ pass: [D][kBlockM] queries (scaled by scale log2 e), dO, dQ accumulator.
  float *qt, *dot, *dqt;
  // dK/dV pass: [D][kBlockM] keys (scaled by scale log2 e), values, dK and dV accumulators.
  float *kt, *vt, *dkt, *dvt;
  float *s, *dp;        // [kRows][kBlockM] logits then P, dP then dS
  float *lse2, *delta;  // [kBlockM] per query column (dQ pass)
  float *kbuf, *vbuf;   // [kRows][D] converted 16-bit rows (K, V; or Q, dO in the dK/dV pass)

  static constexpr int64_t kRows = std::max(kBlockN, kBlockQ);
  static int64_t floats(int64_t D) {
    return 7 * D * kBlockM + 2 * kRows * kBlockM + 2 * kBlockM + 2 * kRows * D;
  }
  void bind(float* base, int64_t head_dim) {
    D = head_dim;
    float* x = base;
    for (float** b : {&qt, &dot, &dqt, &kt, &vt, &dkt, &dvt}) *b = x, x += D * kBlockM;
    s = x, x += kRows * kBlockM;
    dp = x, x += kRows * kBlockM;
    lse2 = x, x += kBlockM;
    delta = x, x += kBlockM;
    kbuf = x, x += kRows * D;  // last: rows read unaligned
    vbuf = x;
  }
};

// Keys [k0, k0 + nk) of one head of the raw keys (core = false) or of the core tokens.
struct KeyTile {
  bool core;
  int64_t b, head, k0, nk;
};

// Whether query t sees key position (or core token) x of the tile's segment.
inline bool sees(const Visible& v, bool core, int64_t x) {
  return core ? x < v.n_core : x < v.sink_end || (x >= v.local_begin && x < v.local_end);
}

}  // namespace
}  // namespace cca::cpu
#endif  // CCA_CPU_BWD_SHARED

HWY_BEFORE_NAMESPACE();
namespace cca::cpu::HWY_NAMESPACE {

// One row of kBlockM lanes: s = P = 2^(s - lse2), dp = dS = P (dp - delta). lse2 and delta hold
// one value per lane (dQ pass: a query per lane) or, with kBroadcast, one for the whole row (dK/dV
// pass: a query per row).
template <bool kBroadcast>
HWY_INLINE void softmax_grad_row(float* s, float* dp, const float* lse2, const float* delta) {
  const DF d;
  const size_t N = hn::Lanes(d);
  for (size_t c = 0; c < size_t(kBlockM); c += N) {
    const VF l = kBroadcast ? hn::Set(d, *lse2) : hn::Load(d, lse2 + c);
    const VF dl = kBroadcast ? hn::Set(d, *delta) : hn::Load(d, delta + c);
    const VF p = exp2(d, hn::Sub(hn::Load(d, s + c), l));
    hn::Store(p, d, s + c);
    hn::Store(hn::Mul(p, hn::Sub(hn::Load(d, dp + c), dl)), d, dp + c);
  }
}

// Queries [r0, r0 + nq) of (batch b, query head h): dq rows, over the forward's key blocks.
void dq_tile(const AttendBwdProblem& p, float* scratch, int64_t b, int64_t h, int64_t r0,
             int64_t nq) {
  BwdState st;
  st.bind(scratch, p.q.shape[3]);
  const int64_t D = st.D, Hq = p.q.shape[2], Hkv = p.k.shape[2];
  load_transposed(p.q, b, r0, nq, h, p.scale * kLog2e, st.qt);
  load_transposed(p.dout, b, r0, nq, h, 1.f, st.dot);
  for (int64_t x = 0; x < D * kBlockM; ++x) st.dqt[x] = 0.f;
  for (int i = 0; i < kBlockM; ++i) {  // padding columns: P = 2^(0 - FLT_MAX) = 0
    st.lse2[i] = i < nq ? p.lse.load(p.lse.offset(b, h, r0 + i)) * kLog2e : FLT_MAX;
    st.delta[i] = i < nq ? p.delta.load(p.delta.offset(b, h, r0 + i)) : 0.f;
  }
  Visible vis[kBlockM];
  for (int64_t i = 0; i < nq; ++i) vis[i] = visible_keys(p.variant, r0 + i);

  const KvSegment core{p.k_core, p.v_core, 0}, raw{p.k, p.v, 0};
  const KvSegment* segs[kSegments] = {&core, &raw, &raw};
  for_each_key_block(
      segs, p.variant, vis, nq, b, h, Hq / Hkv, D,
      [&](const SegmentRows& rows, int64_t k0, int64_t nk, bool masked, const int64_t* lo,
          const int64_t* hi) {
        int64_t ks = 0, vs = 0;
        const float* kp =
            block_rows(rows.k, rows.k_dtype, rows.k_stride, k0 - rows.pos0, nk, D, st.kbuf, ks);
        const float* vp =
            block_rows(rows.v, rows.v_dtype, rows.v_stride, k0 - rows.pos0, nk, D, st.vbuf, vs);
        tile_product_rows<false>(nk, D, kp, ks, 1, st.qt, st.s, nullptr);  // S^T = K Qt
        if (masked) mask_block(st.s, k0, nk, lo, hi);
        tile_product_rows<false>(nk, D, vp, vs, 1, st.dot, st.dp, nullptr);  // dP^T = V dOt
        for (int64_t j = 0; j < nk; ++j)
          softmax_grad_row<false>(st.s + j * kBlockM, st.dp + j * kBlockM, st.lse2, st.delta);
        tile_product_rows<true>(D, nk, kp, 1, ks, st.dp, st.dqt, kOnes);  // dQt += K^T dS^T
      });

  for (int64_t i = 0; i < nq; ++i) {
    float* dq = static_cast<float*>(p.dq.ptr(p.dq.offset(b, r0 + i, h)));
    for (int64_t d = 0; d < D; ++d) dq[d] = p.scale * st.dqt[d * kBlockM + i];
  }
}

// The dK/dV pass for one key tile: every query block that sees some of its keys, for every
// query head that reads its key head.
void dkdv_tile(const AttendBwdProblem& p, float* scratch, const KeyTile& tile) {
  BwdState st;
  st.bind(scratch, p.q.shape[3]);
  const int64_t D = st.D, T = p.q.shape[1], Hq = p.q.shape[2], Hkv = p.k.shape[2];
  const int64_t r = Hq / Hkv, k0 = tile.k0, k1 = tile.k0 + tile.nk;
  const TensorView& K = tile.core ? p.k_core : p.k;
  const TensorView& V = tile.core ? p.v_core : p.v;
  const float kscale = p.scale * kLog2e;
  for (int64_t x = 0; x < D * kBlockM; ++x) st.kt[x] = st.vt[x] = st.dkt[x] = st.dvt[x] = 0.f;
  {
    float row[1024];  // D <= 1024, checked
    for (int64_t j = 0; j < tile.nk; ++j) {
      load_row(K.ptr(K.offset(tile.b, k0 + j, tile.head)), K.dtype, D, row);
      for (int64_t d = 0; d < D; ++d) st.kt[d * kBlockM + j] = row[d] * kscale;
      load_row(V.ptr(V.offset(tile.b, k0 + j, tile.head)), V.dtype, D, row);
      for (int64_t d = 0; d < D; ++d) st.vt[d * kBlockM + j] = row[d];
    }
  }
  const bool per_query_core = tile.core && p.variant.pool_heads == PoolHeads::query;
  const int64_t h_begin = per_query_core ? tile.head : tile.head * r;
  const int64_t h_end = per_query_core ? tile.head + 1 : h_begin + r;

  // Queries before k0 see none of the keys (a query sees raw keys up to itself and core tokens
  // below j(t) <= t).
  for (int64_t t0 = k0 / kBlockQ * kBlockQ; t0 < T; t0 += kBlockQ) {
    const int64_t nq = std::min<int64_t>(kBlockQ, T - t0);
    // The union of the block's visible sets, and whether each query sees every key of the
    // tile, from its first and last queries (every bound is non-decreasing in t).
    const Visible first = visible_keys(p.variant, t0), last = visible_keys(p.variant, t0 + nq - 1);
    bool any, all;
    if (tile.core) {
      any = k0 < last.n_core;
      all = k1 <= first.n_core;
    } else {
      any = k0 < last.sink_end || (k1 > first.local_begin && k0 < last.local_end);
      all = k1 <= first.sink_end || (k0 >= last.local_begin && k1 <= first.local_end);
    }
    if (!any) continue;
    const bool masked = !all || tile.nk < kBlockM;
    Visible vis[kBlockQ];
    if (masked)
      for (int64_t i = 0; i < nq; ++i) vis[i] = visible_keys(p.variant, t0 + i);

    for (int64_t h = h_begin; h < h_end; ++h) {
      int64_t qs = 0, dos = 0;
      const float* qp = block_rows(static_cast<const char*>(p.q.ptr(p.q.offset(tile.b, 0, h))),
                                   p.q.dtype, p.q.stride[1], t0, nq, D, st.kbuf, qs);
      const float* dop =
          block_rows(static_cast<const char*>(p.dout.ptr(p.dout.offset(tile.b, 0, h))),
                     p.dout.dtype, p.dout.stride[1], t0, nq, D, st.vbuf, dos);
      tile_product_rows<false>(nq, D, qp, qs, 1, st.kt, st.s, nullptr);     // S = Q Kt
      tile_product_rows<false>(nq, D, dop, dos, 1, st.vt, st.dp, nullptr);  // dP = dO Vt
      for (int64_t i = 0; i < nq; ++i) {
        float* si = st.s + i * kBlockM;
        if (masked)
          for (int j = 0; j < kBlockM; ++j)
            if (j >= tile.nk || !sees(vis[i], tile.core, k0 + j)) si[j] = -INFINITY;
        const float lse2 = p.lse.load(p.lse.offset(tile.b, h, t0 + i)) * kLog2e;
        const float delta = p.delta.load(p.delta.offset(tile.b, h, t0 + i));
        softmax_grad_row<true>(si, st.dp + i * kBlockM, &lse2, &delta);
      }
      tile_product_rows<true>(D, nq, dop, 1, dos, st.s, st.dvt, kOnes);  // dVt += dO^T P
      tile_product_rows<true>(D, nq, qp, 1, qs, st.dp, st.dkt, kOnes);   // dKt += Q^T dS
    }
  }

  const TensorView& dK = tile.core ? p.dk_core : p.dk;
  const TensorView& dV = tile.core ? p.dv_core : p.dv;
  for (int64_t j = 0; j < tile.nk; ++j) {
    float* dk = static_cast<float*>(dK.ptr(dK.offset(tile.b, k0 + j, tile.head)));
    float* dv = static_cast<float*>(dV.ptr(dV.offset(tile.b, k0 + j, tile.head)));
    for (int64_t d = 0; d < D; ++d) {
      dk[d] = p.scale * st.dkt[d * kBlockM + j];
      dv[d] = st.dvt[d * kBlockM + j];
    }
  }
}

// delta[b, h, t] = sum_d dout[b, t, h, d] out[b, t, h, d] for every query head h of row bt.
void delta_row(const AttendBwdProblem& p, int64_t bt) {
  const int64_t T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t b = bt / T, t = bt % T;
  float o[1024], g[1024];  // D <= 1024, checked
  for (int64_t h = 0; h < Hq; ++h) {
    load_row(p.out.ptr(p.out.offset(b, t, h)), p.out.dtype, D, o);
    load_row(p.dout.ptr(p.dout.offset(b, t, h)), p.dout.dtype, D, g);
    p.delta.store(p.delta.offset(b, h, t), dot_product(o, g, D));
  }
}

}  // namespace cca::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace cca::cpu {
namespace {

HWY_EXPORT(dq_tile);
HWY_EXPORT(dkdv_tile);
HWY_EXPORT(delta_row);

void check_view(const TensorView& t, const char* name, int ndim, const int64_t* shape, bool f32) {
  bool ok = t.data && t.ndim == ndim && t.stride[ndim - 1] == 1 && (!f32 || t.dtype == DType::f32);
  for (int i = 0; ok && i < ndim; ++i) ok = t.shape[i] == shape[i];
  std::string want = "[";
  for (int i = 0; i < ndim; ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
  check(ok, std::string("cpu attend_bwd: ") + name + " must be " + (f32 ? "float32 " : "") + want +
                "] with a contiguous last dimension, got " + t.shape_string() + " " +
                dtype_name(t.dtype));
}

// Every tensor of `p` present with its shape (float32 where written); throws before writing.
void check_bwd_problem(const AttendBwdProblem& p, bool delta_written) {
  check(p.q.data && p.q.ndim == 4 && p.k.data && p.k.ndim == 4,
        "cpu attend_bwd: q and k must be 4-d tensors");
  const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hkv = p.k.shape[2];
  check(D >= 1 && D <= 1024, "cpu attend_bwd: head dim D = " + std::to_string(D) +
                                 " is outside the supported range 1..1024");
  check(Hkv >= 1 && Hq % Hkv == 0, "cpu attend_bwd: Hq = " + std::to_string(Hq) +
                                       " is not a multiple of Hkv = " + std::to_string(Hkv));
  const int64_t qs[4] = {B, T, Hq, D}, ks[4] = {B, T, Hkv, D}, ls[3] = {B, Hq, T};
  check_view(p.q, "q", 4, qs, false);
  check_view(p.out, "out", 4, qs, false);
  check_view(p.dout, "dout", 4, qs, false);
  check_view(p.lse, "lse", 3, ls, true);
  check_view(p.delta, "delta", 3, ls, true);
  if (delta_written) return;
  check_view(p.k, "k", 4, ks, false);
  check_view(p.v, "v", 4, ks, false);
  check_view(p.dq, "dq", 4, qs, true);
  check_view(p.dk, "dk", 4, ks, true);
  check_view(p.dv, "dv", 4, ks, true);
  const int64_t m = T >= 1 ? visible_keys(p.variant, T - 1).n_core : 0;
  if (m == 0) return;
  const int64_t cs[4] = {B, m, p.variant.core_heads(Hq, Hkv), D};
  for (const TensorView* c : {&p.k_core, &p.v_core})
    check(c->data && c->ndim == 4 && c->shape[1] >= m,
          "cpu attend_bwd: the queries need " + std::to_string(m) + " core tokens");
  TensorView kc = p.k_core.slice(1, 0, m), vc = p.v_core.slice(1, 0, m);
  check_view(kc, "k_core", 4, cs, false);
  check_view(vc, "v_core", 4, cs, false);
  check_view(p.dk_core, "dk_core", 4, cs, true);
  check_view(p.dv_core, "dv_core", 4, cs, true);
}

}  // namespace

// delta[b, h, t] = sum_d dout[b, t, h, d] out[b, t, h, d], float32.
void attend_bwd_delta(const AttendBwdProblem& p) {
  check_bwd_problem(p, /*delta_written=*/true);
  const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t rows = B * T;
  const int nthreads = thread_count(p.threads, rows, 2.0 * double(rows * Hq * D));
  init_simd_target();
  const auto row_fn = HWY_DYNAMIC_DISPATCH(delta_row);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t bt = 0; bt < rows; ++bt) row_fn(p, bt);
}

void attend_bwd(const AttendBwdProblem& p) {
  check_bwd_problem(p, /*delta_written=*/false);
  const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hkv = p.k.shape[2], Hc = p.variant.core_heads(Hq, Hkv);
  const int64_t m = visible_keys(p.variant, T - 1).n_core;
  auto tiles = [](int64_t n) { return (n + kBlockM - 1) / kBlockM; };
  // Items: core-token tiles (each seen by most queries) first, then raw-key tiles, then query
  // tiles, latest first, so that the dynamic schedule ends on short items.
  const int64_t core_items = B * Hc * tiles(m), raw_items = B * Hkv * tiles(T);
  const int64_t q_items = B * Hq * tiles(T), items = core_items + raw_items + q_items;
  const double keys =
      0.5 * double(visible_keys(p.variant, 0).count() + visible_keys(p.variant, T - 1).count());
  const double flops = 14.0 * double(B * Hq * D * T) * keys;
  const int nthreads = thread_count(p.threads, items, flops);
  const int64_t per_thread = (BwdState::floats(D) + 15) / 16 * 16;
  AlignedFloats scratch(per_thread * nthreads);
  std::exception_ptr error;  // an exception must not leave the parallel region

  init_simd_target();
  const auto dkdv = HWY_DYNAMIC_DISPATCH(dkdv_tile);
  const auto dq = HWY_DYNAMIC_DISPATCH(dq_tile);

#pragma omp parallel num_threads(nthreads)
  {
    float* st = scratch.data() + per_thread * omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < items; ++w) {
      try {
        if (w < core_items + raw_items) {
          const bool core = w < core_items;
          const int64_t x = core ? w : w - core_items, heads = core ? Hc : Hkv;
          const int64_t n = tiles(core ? m : T), tile = x % n, k0 = tile * kBlockM;
          dkdv(p, st,
               KeyTile{core, x / (heads * n), (x / n) % heads, k0,
                       std::min<int64_t>(kBlockM, (core ? m : T) - k0)});
        } else {
          const int64_t x = w - core_items - raw_items, n = tiles(T);
          const int64_t b = x / (Hq * n), h = (x / n) % Hq, tile = n - 1 - x % n;
          dq(p, st, b, h, tile * kBlockM, std::min<int64_t>(kBlockM, T - tile * kBlockM));
        }
      } catch (...) {
#pragma omp critical
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace cca::cpu
#endif  // HWY_ONCE

// CPU core-token pooling (docs: "Globality-aware pooling") and its backward. One work item is
// (batch, group, core head) forward and (batch, group, KV head) backward; it reads the group's g
// key and value rows once or twice and its last query's row for each pooling query head, so
// pooling costs O(B T Hc D (r + 2)) and is memory-bound. The item code is compiled per SIMD
// target (see cpu_attend.cpp).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/cpu_pool.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "cca/error.hpp"
#include "cpu_ops.hpp"
#include "cpu_simd.hpp"
#include "simd-inl.h"

#ifndef CCA_CPU_POOL_SHARED
#define CCA_CPU_POOL_SHARED
namespace cca::cpu {
namespace {

inline const void* row_ptr(const TensorView& t, int64_t b, int64_t row, int64_t head) {
  return t.ptr(t.offset(b, row, head));
}

// Floats of one thread's scratch for pool (nh query rows, nh x g logits, g weights, a key row, a
// value row, two sums) and pool_bwd (nh query rows, nh x g softmaxes, g weights and dw, g key,
// value and gradient rows of each, a dq row).
int64_t pool_scratch_floats(int64_t nh, int64_t g, int64_t D) {
  return (nh * D + nh * g + g + 4 * D + 15) / 16 * 16;
}
int64_t pool_bwd_scratch_floats(int64_t nh, int64_t g, int64_t D) {
  return (nh * D + nh * g + 2 * g + 4 * g * D + D + 15) / 16 * 16;
}

}  // namespace
}  // namespace cca::cpu
#endif  // CCA_CPU_POOL_SHARED

HWY_BEFORE_NAMESPACE();
namespace cca::cpu::HWY_NAMESPACE {
namespace {

// Pooling weights of one group for pool = cca: w[x] = mean over the nh query rows qrows[j] [D]
// of softmax_x(scale qrows[j] . key x), with key x read by key(x) -> const float* [D]. The
// softmaxes stay in probs [nh][g] (the backward needs them); they are computed in base 2, as the
// attention's (logits scaled by log2 e, then exp2).
template <class KeyRow>
void cca_weights(const float* qrows, int64_t nh, KeyRow key, int64_t g, int64_t D, float scale,
                 float* probs, float* w) {
  const float scale2 = scale * 1.4426950408889634f;
  for (int64_t x = 0; x < g; ++x) {
    const float* kx = key(x);
    for (int64_t j = 0; j < nh; ++j) probs[j * g + x] = scale2 * dot_product(qrows + j * D, kx, D);
  }
  std::fill(w, w + g, 0.f);
  for (int64_t j = 0; j < nh; ++j) {
    float* pj = probs + j * g;
    const float mx = *std::max_element(pj, pj + g);
    for (int64_t x = 0; x < g; ++x) pj[x] -= mx;
    exp2_row(pj, g);
    float sum = 0.f;
    for (int64_t x = 0; x < g; ++x) sum += pj[x];
    scale_row(1.f / sum, pj, g);
    axpy(1.f / float(nh), pj, w, g);
  }
}

}  // namespace

// One item of pool(): core token of group `i` for core head `c` of batch `b`.
void pool_item(const PoolProblem& p, float* scratch, int64_t b, int64_t i, int64_t c) {
  const int64_t Hq = p.q.shape[2], D = p.q.shape[3], Hkv = p.raw.k.shape[2];
  const int64_t r = Hq / Hkv, g = p.variant.group;
  const bool per_query = p.variant.pool_heads == PoolHeads::query;
  const int64_t nh = per_query ? 1 : r;  // query heads per core head
  float* qbuf = scratch;
  float* logits = qbuf + nh * D;
  float* w = logits + nh * g;
  float* krow = w + g;
  float* vrow = krow + D;
  float* ksum = vrow + D;
  float* vsum = ksum + D;
  const int64_t kvh = per_query ? c / r : c;
  const int64_t row0 = i * g - p.raw.pos0;
  const PoolMode mode = p.variant.pool;

  if (mode == PoolMode::max) {
    std::fill(ksum, ksum + D, -INFINITY);
    std::fill(vsum, vsum + D, -INFINITY);
    for (int64_t x = 0; x < g; ++x) {
      max_row(row_as_float(row_ptr(p.raw.k, b, row0 + x, kvh), p.raw.k.dtype, D, krow), ksum, D);
      max_row(row_as_float(row_ptr(p.raw.v, b, row0 + x, kvh), p.raw.v.dtype, D, vrow), vsum, D);
    }
  } else {
    if (mode == PoolMode::mean) {
      std::fill(w, w + g, 1.f / float(g));
    } else {
      // w[x] = mean over the nh query heads h of softmax_x(scale q[last, h] . k[i g + x]).
      const int64_t h0 = per_query ? c : c * r, last_q = (i + 1) * g - 1 - p.q_pos0;
      for (int64_t j = 0; j < nh; ++j)
        load_row(row_ptr(p.q, b, last_q, h0 + j), p.q.dtype, D, qbuf + j * D);
      cca_weights(
          qbuf, nh,
          [&](int64_t x) {
            return row_as_float(row_ptr(p.raw.k, b, row0 + x, kvh), p.raw.k.dtype, D, krow);
          },
          g, D, p.scale, logits, w);
    }
    std::fill(ksum, ksum + D, 0.f);
    std::fill(vsum, vsum + D, 0.f);
    for (int64_t x = 0; x < g; ++x) {
      axpy(w[x], row_as_float(row_ptr(p.raw.k, b, row0 + x, kvh), p.raw.k.dtype, D, krow), ksum, D);
      axpy(w[x], row_as_float(row_ptr(p.raw.v, b, row0 + x, kvh), p.raw.v.dtype, D, vrow), vsum, D);
    }
  }
  store_row(ksum, D, p.k_core.ptr(p.k_core.offset(b, i - p.group_begin, c)), p.k_core.dtype);
  store_row(vsum, D, p.v_core.ptr(p.v_core.offset(b, i - p.group_begin, c)), p.v_core.dtype);
}

// One item of pool_bwd(): group `i` of KV head `kvh` of batch `b`, which owns the group's key
// rows and last query rows.
void pool_bwd_item(const PoolBwdProblem& p, float* scratch, int64_t b, int64_t i, int64_t kvh) {
  const int64_t Hq = p.q.shape[2], D = p.q.shape[3], Hkv = p.k.shape[2];
  const int64_t r = Hq / Hkv, g = p.variant.group;
  const bool per_query = p.variant.pool_heads == PoolHeads::query;
  // Core heads of a KV head, and query heads pooled into each.
  const int64_t cores = per_query ? r : 1, nh = per_query ? 1 : r;
  const PoolMode mode = p.variant.pool;
  float* qbuf = scratch;
  float* probs = qbuf + nh * D;
  float* w = probs + nh * g;
  float* dw = w + g;
  float* krows = dw + g;
  float* vrows = krows + g * D;
  float* gk = vrows + g * D;
  float* gv = gk + g * D;
  float* gq = gv + g * D;
  const int64_t row0 = i * g, last = row0 + g - 1;
  for (int64_t x = 0; x < g; ++x) {
    load_row(row_ptr(p.k, b, row0 + x, kvh), p.k.dtype, D, krows + x * D);
    load_row(row_ptr(p.v, b, row0 + x, kvh), p.v.dtype, D, vrows + x * D);
  }
  std::fill(gk, gk + g * D, 0.f);
  std::fill(gv, gv + g * D, 0.f);
  for (int64_t cc = 0; cc < cores; ++cc) {
    const int64_t c = per_query ? kvh * r + cc : kvh, h0 = per_query ? c : c * r;
    const float* dkc = static_cast<const float*>(row_ptr(p.dk_core, b, i, c));
    const float* dvc = static_cast<const float*>(row_ptr(p.dv_core, b, i, c));
    if (mode == PoolMode::max) {
      // The gradient goes to the first position holding the maximum, as the reference's.
      for (int64_t d = 0; d < D; ++d) {
        int64_t bk = 0, bv = 0;
        for (int64_t x = 1; x < g; ++x) {
          if (krows[x * D + d] > krows[bk * D + d]) bk = x;
          if (vrows[x * D + d] > vrows[bv * D + d]) bv = x;
        }
        gk[bk * D + d] += dkc[d];
        gv[bv * D + d] += dvc[d];
      }
      continue;
    }
    if (mode == PoolMode::mean) {
      std::fill(w, w + g, 1.f / float(g));
    } else {
      for (int64_t j = 0; j < nh; ++j)
        load_row(row_ptr(p.q, b, last, h0 + j), p.q.dtype, D, qbuf + j * D);
      cca_weights(
          qbuf, nh, [&](int64_t x) { return krows + x * D; }, g, D, p.scale, probs, w);
    }
    for (int64_t x = 0; x < g; ++x) {
      const float* kx = krows + x * D;
      const float* vx = vrows + x * D;
      dw[x] = dot_product(dkc, kx, D) + dot_product(dvc, vx, D);
      axpy(w[x], dkc, gk + x * D, D);
      axpy(w[x], dvc, gv + x * D, D);
    }
    if (mode != PoolMode::cca) continue;
    // w = mean_j softmax(z_j): dz_j = p_j (dw/nh - sum_x p_j dw/nh).
    for (int64_t j = 0; j < nh; ++j) {
      const float* pj = probs + j * g;
      const float* qj = qbuf + j * D;
      float mean = 0.f;
      for (int64_t x = 0; x < g; ++x) mean += pj[x] * dw[x];
      mean /= float(nh);
      std::fill(gq, gq + D, 0.f);
      for (int64_t x = 0; x < g; ++x) {
        const float dz = p.scale * pj[x] * (dw[x] / float(nh) - mean);
        axpy(dz, krows + x * D, gq, D);
        axpy(dz, qj, gk + x * D, D);
      }
      float* dq = static_cast<float*>(p.dq.ptr(p.dq.offset(b, last, h0 + j)));
      axpy(1.f, gq, dq, D);
    }
  }
  for (int64_t x = 0; x < g; ++x) {
    axpy(1.f, gk + x * D, static_cast<float*>(p.dk.ptr(p.dk.offset(b, row0 + x, kvh))), D);
    axpy(1.f, gv + x * D, static_cast<float*>(p.dv.ptr(p.dv.offset(b, row0 + x, kvh))), D);
  }
}

}  // namespace cca::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace cca::cpu {
namespace {

HWY_EXPORT(pool_item);
HWY_EXPORT(pool_bwd_item);

// Throws unless every group's key rows and (for pool = cca) last query rows are held.
void check_pool_problem(const PoolProblem& p) {
  const int64_t g = p.variant.group;
  check(g >= 1, "cpu pool: group size g = " + std::to_string(g) + " must be >= 1");
  check(p.group_begin >= 0 && p.group_end >= p.group_begin,
        "cpu pool: bad group range [" + std::to_string(p.group_begin) + ", " +
            std::to_string(p.group_end) + ")");
  if (p.group_end == p.group_begin) return;
  check(p.q.data && p.q.ndim == 4 && p.raw.k.data && p.raw.v.data && p.raw.k.ndim == 4 &&
            p.raw.v.ndim == 4 && p.k_core.data && p.v_core.data && p.k_core.ndim == 4 &&
            p.v_core.ndim == 4,
        "cpu pool: q, raw k/v and k_core/v_core must be 4-d tensors");
  const int64_t B = p.q.shape[0], Hq = p.q.shape[2], D = p.q.shape[3], Hkv = p.raw.k.shape[2];
  check(Hkv >= 1 && Hq % Hkv == 0, "cpu pool: Hq = " + std::to_string(Hq) +
                                       " is not a multiple of Hkv = " + std::to_string(Hkv));
  const int64_t Hc = p.variant.core_heads(Hq, Hkv), count = p.group_end - p.group_begin;
  for (const TensorView* c : {&p.k_core, &p.v_core})
    check(c->shape[0] == B && c->shape[1] >= count && c->shape[2] == Hc && c->shape[3] == D &&
              c->stride[3] == 1,
          "cpu pool: core tensor " + c->shape_string() + " must be [" + std::to_string(B) +
              ", >= " + std::to_string(count) + ", " + std::to_string(Hc) + ", " +
              std::to_string(D) + "]");
  check(p.raw.k.shape[0] == B && p.raw.k.shape[3] == D && p.raw.v.shape[0] == B &&
            p.raw.v.shape[1] == p.raw.k.shape[1] && p.raw.v.shape[2] == Hkv &&
            p.raw.v.shape[3] == D && p.raw.k.stride[3] == 1 && p.raw.v.stride[3] == 1 &&
            p.q.stride[3] == 1,
        "cpu pool: raw k " + p.raw.k.shape_string() + ", v " + p.raw.v.shape_string() +
            " do not match q " + p.q.shape_string());
  const int64_t key_lo = p.group_begin * g, key_hi = p.group_end * g;
  check(key_lo >= p.raw.pos0 && key_hi <= p.raw.end(),
        "cpu pool: groups [" + std::to_string(p.group_begin) + ", " + std::to_string(p.group_end) +
            ") need raw keys [" + std::to_string(key_lo) + ", " + std::to_string(key_hi) +
            ") but the segment holds [" + std::to_string(p.raw.pos0) + ", " +
            std::to_string(p.raw.end()) + ")");
  if (p.variant.pool == PoolMode::cca) {
    const int64_t first_q = key_lo + g - 1, last_q = key_hi - 1;
    check(first_q >= p.q_pos0 && last_q < p.q_pos0 + p.q.shape[1],
          "cpu pool: groups need queries at positions " + std::to_string(first_q) + " .. " +
              std::to_string(last_q) + " but q holds " + std::to_string(p.q_pos0) + " .. " +
              std::to_string(p.q_pos0 + p.q.shape[1] - 1));
  }
}

void check_pool_bwd_problem(const PoolBwdProblem& p) {
  check(p.q.data && p.k.data && p.v.data && p.q.ndim == 4 && p.k.ndim == 4 && p.v.ndim == 4 &&
            p.dk_core.data && p.dv_core.data && p.dk_core.ndim == 4 && p.dv_core.ndim == 4,
        "cpu pool_bwd: q, k, v, dk_core and dv_core must be 4-d tensors");
  const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hkv = p.k.shape[2], m = p.dk_core.shape[1], g = p.variant.group;
  check(Hkv >= 1 && Hq % Hkv == 0 && D <= 1024 && g >= 1 && m * g <= T,
        "cpu pool_bwd: bad problem: q " + p.q.shape_string() + ", k " + p.k.shape_string() + ", " +
            std::to_string(m) + " groups of " + std::to_string(g));
  const int64_t Hc = p.variant.core_heads(Hq, Hkv);
  auto same = [](const TensorView& t, const TensorView& like, bool f32) {
    bool ok = t.data && t.ndim == 4 && t.stride[3] == 1 && (!f32 || t.dtype == DType::f32);
    for (int i = 0; ok && i < 4; ++i) ok = t.shape[i] == like.shape[i];
    return ok;
  };
  for (const TensorView* c : {&p.dk_core, &p.dv_core})
    check(c->dtype == DType::f32 && c->stride[3] == 1 && c->shape[0] == B && c->shape[1] == m &&
              c->shape[2] == Hc && c->shape[3] == D,
          "cpu pool_bwd: core gradients " + c->shape_string() + " must be float32 [" +
              std::to_string(B) + ", " + std::to_string(m) + ", " + std::to_string(Hc) + ", " +
              std::to_string(D) + "]");
  check(same(p.k, p.k, false) && same(p.v, p.k, false) && same(p.q, p.q, false) &&
            p.k.shape[0] == B && p.k.shape[1] == T && p.k.shape[3] == D,
        "cpu pool_bwd: k " + p.k.shape_string() + ", v " + p.v.shape_string() + " do not match q " +
            p.q.shape_string());
  check(same(p.dq, p.q, true) && same(p.dk, p.k, true) && same(p.dv, p.v, true),
        "cpu pool_bwd: dq, dk, dv must be float32 with the shapes of q, k, v");
}

}  // namespace

// q [B, n, Hq, D] at q_pos0.., raw k/v [B, rows, Hkv, D] at raw.pos0.. -> k_core/v_core
// [B, group_end - group_begin, Hc, D], Hc = Hkv (or Hq with pool_heads = query).
void pool(const PoolProblem& p) {
  check_pool_problem(p);
  const int64_t count = p.group_end - p.group_begin;
  if (count == 0) return;
  const int64_t B = p.q.shape[0], Hq = p.q.shape[2], D = p.q.shape[3], Hkv = p.raw.k.shape[2];
  const int64_t r = Hq / Hkv, g = p.variant.group;
  const bool per_query = p.variant.pool_heads == PoolHeads::query;
  const int64_t Hc = per_query ? Hq : Hkv, nh = per_query ? 1 : r;  // query heads per core head
  const int64_t items = B * count * Hc;
  // About 4 FLOPs per key/value element of a group (weights, two weighted sums).
  const int nthreads = thread_count(p.threads, items, 4.0 * double(items * g * D) * double(nh + 1));
  const int64_t per_thread = pool_scratch_floats(nh, g, D);
  AlignedFloats scratch(per_thread * nthreads);
  init_simd_target();
  const auto item_fn = HWY_DYNAMIC_DISPATCH(pool_item);

#pragma omp parallel num_threads(nthreads)
  {
    float* buf = scratch.data() + per_thread * omp_get_thread_num();
#pragma omp for schedule(dynamic, 16)
    for (int64_t item = 0; item < items; ++item)
      item_fn(p, buf, item / (count * Hc), p.group_begin + (item / Hc) % count, item % Hc);
  }
}

// Gradients of the core tokens of groups 0..m-1 into dq (pool = cca), dk and dv: one work item
// per (batch, group, KV head), so each item owns its group's key rows and last query rows.
void pool_bwd(const PoolBwdProblem& p) {
  check_pool_bwd_problem(p);
  const int64_t m = p.dk_core.shape[1];
  if (m == 0) return;
  const int64_t B = p.q.shape[0], Hq = p.q.shape[2], D = p.q.shape[3], Hkv = p.k.shape[2];
  const int64_t r = Hq / Hkv, g = p.variant.group;
  const bool per_query = p.variant.pool_heads == PoolHeads::query;
  const int64_t nh = per_query ? 1 : r;
  const int64_t items = B * m * Hkv;
  const int nthreads = thread_count(p.threads, items, 8.0 * double(items * g * D) * double(r + 1));
  const int64_t per_thread = pool_bwd_scratch_floats(nh, g, D);
  AlignedFloats scratch(per_thread * nthreads);
  init_simd_target();
  const auto item_fn = HWY_DYNAMIC_DISPATCH(pool_bwd_item);

#pragma omp parallel num_threads(nthreads)
  {
    float* buf = scratch.data() + per_thread * omp_get_thread_num();
#pragma omp for schedule(dynamic, 16)
    for (int64_t item = 0; item < items; ++item)
      item_fn(p, buf, item / (m * Hkv), (item / Hkv) % m, item % Hkv);
  }
}

}  // namespace cca::cpu
#endif  // HWY_ONCE

// CPU core-token pooling (docs: "Globality-aware pooling"). One work item is (batch, group,
// core head); it reads the group's g key and value rows once or twice and its last query's row
// for each pooling query head, so pooling costs O(B T Hc D (r + 2)) and is memory-bound.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "cca/error.hpp"
#include "cpu_ops.hpp"
#include "cpu_simd.hpp"

namespace cca::cpu {
namespace {

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

const void* row_ptr(const TensorView& t, int64_t b, int64_t row, int64_t head) {
  return t.ptr(t.offset(b, row, head));
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
  // Per thread: nh query rows, nh x g logits, g weights, a key row, a value row, two sums.
  const int64_t per_thread = (nh * D + nh * g + g + 4 * D + 15) / 16 * 16;
  AlignedFloats scratch(per_thread * nthreads);

#pragma omp parallel num_threads(nthreads)
  {
    float* qbuf = scratch.data() + per_thread * omp_get_thread_num();
    float* logits = qbuf + nh * D;
    float* w = logits + nh * g;
    float* krow = w + g;
    float* vrow = krow + D;
    float* ksum = vrow + D;
    float* vsum = ksum + D;
#pragma omp for schedule(dynamic, 16)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / (count * Hc), i = p.group_begin + (item / Hc) % count;
      const int64_t c = item % Hc, kvh = per_query ? c / r : c;
      const int64_t row0 = i * g - p.raw.pos0;
      const PoolMode mode = p.variant.pool;

      if (mode == PoolMode::max) {
        std::fill(ksum, ksum + D, -INFINITY);
        std::fill(vsum, vsum + D, -INFINITY);
        for (int64_t x = 0; x < g; ++x) {
          const float* kx =
              row_as_float(row_ptr(p.raw.k, b, row0 + x, kvh), p.raw.k.dtype, D, krow);
          const float* vx =
              row_as_float(row_ptr(p.raw.v, b, row0 + x, kvh), p.raw.v.dtype, D, vrow);
          for (int64_t d = 0; d < D; ++d) {
            ksum[d] = std::max(ksum[d], kx[d]);
            vsum[d] = std::max(vsum[d], vx[d]);
          }
        }
      } else {
        if (mode == PoolMode::mean) {
          std::fill(w, w + g, 1.f / float(g));
        } else {
          // w[x] = mean over the nh query heads h of softmax_x(scale q[last, h] . k[i g + x]).
          const int64_t h0 = per_query ? c : c * r, last_q = (i + 1) * g - 1 - p.q_pos0;
          for (int64_t j = 0; j < nh; ++j)
            load_row(row_ptr(p.q, b, last_q, h0 + j), p.q.dtype, D, qbuf + j * D);
          for (int64_t x = 0; x < g; ++x) {
            const float* kx =
                row_as_float(row_ptr(p.raw.k, b, row0 + x, kvh), p.raw.k.dtype, D, krow);
            for (int64_t j = 0; j < nh; ++j)
              logits[j * g + x] = p.scale * dot_product(qbuf + j * D, kx, D);
          }
          std::fill(w, w + g, 0.f);
          for (int64_t j = 0; j < nh; ++j) {
            float* lj = logits + j * g;
            const float mx = *std::max_element(lj, lj + g);
            float sum = 0.f;
            for (int64_t x = 0; x < g; ++x) sum += (lj[x] = std::exp(lj[x] - mx));
            const float norm = 1.f / (sum * float(nh));
            for (int64_t x = 0; x < g; ++x) w[x] += lj[x] * norm;
          }
        }
        std::fill(ksum, ksum + D, 0.f);
        std::fill(vsum, vsum + D, 0.f);
        for (int64_t x = 0; x < g; ++x) {
          const float* kx =
              row_as_float(row_ptr(p.raw.k, b, row0 + x, kvh), p.raw.k.dtype, D, krow);
          const float* vx =
              row_as_float(row_ptr(p.raw.v, b, row0 + x, kvh), p.raw.v.dtype, D, vrow);
          for (int64_t d = 0; d < D; ++d) {
            ksum[d] += w[x] * kx[d];
            vsum[d] += w[x] * vx[d];
          }
        }
      }
      const int64_t ok = p.k_core.offset(b, i - p.group_begin, c);
      const int64_t ov = p.v_core.offset(b, i - p.group_begin, c);
      if (p.k_core.dtype == DType::f32 && p.v_core.dtype == DType::f32) {
        std::copy(ksum, ksum + D, static_cast<float*>(p.k_core.ptr(ok)));
        std::copy(vsum, vsum + D, static_cast<float*>(p.v_core.ptr(ov)));
      } else {
        for (int64_t d = 0; d < D; ++d) {
          p.k_core.store(ok + d, ksum[d]);
          p.v_core.store(ov + d, vsum[d]);
        }
      }
    }
  }
}

}  // namespace cca::cpu

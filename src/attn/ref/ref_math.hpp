// The reference's forward math, written once over a view type V: TensorView for the backend
// (float64 arithmetic, results stored in the view's dtype), F64View for computations that stay
// in float64 end to end (the finite-difference oracle of tests/test_backward.cpp). V needs
// shape[], offset(b, t, h, d), load(offset) and store(offset, value).
// Dense masks written from the contract's formulas, not from policy.hpp, so that the optimised
// backends (which use policy.hpp's ranges) are checked against an independent statement.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "cca/error.hpp"
#include "cca/variant.hpp"

namespace cca::ref {

// A strided float64 view of up to 4 dimensions, the float64 twin of TensorView.
struct F64View {
  double* data = nullptr;
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
  int64_t offset(int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) const {
    return i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3];
  }
  double load(int64_t off) const { return data[off]; }
  void store(int64_t off, double x) const { data[off] = x; }
};

// A zero-filled contiguous float64 array of shape [d0, d1, d2, d3] (trailing 1s for fewer dims).
struct F64Array {
  std::vector<double> values;
  F64View view;
  F64Array(int64_t d0, int64_t d1, int64_t d2, int64_t d3 = 1)
      : values(size_t(d0 * d1 * d2 * d3), 0.0) {
    view.data = values.data();
    const int64_t s[4] = {d0, d1, d2, d3};
    int64_t stride = 1;
    for (int i = 3; i >= 0; --i) {
      view.shape[i] = s[i];
      view.stride[i] = stride;
      stride *= s[i];
    }
  }
};

// Keys and values [B, rows, H, D] whose row r holds position (or core token) pos0 + r.
template <class V>
struct Segment {
  V k, v;
  int64_t pos0 = 0;
  int64_t rows() const { return k.data ? k.shape[1] : 0; }
  int64_t end() const { return pos0 + rows(); }
};

// j(t) = max(0, floor((t + 1 - s) / g)), floor and not truncation.
inline int64_t core_visible(const VariantSpec& v, int64_t t) {
  if (v.kind != VariantKind::cca) return 0;
  return std::max<int64_t>(0, int64_t(std::floor(double(t + 1 - v.window) / double(v.group))));
}

// Whether raw key position p is visible to query t (the contract's masks).
inline bool raw_visible(const VariantSpec& v, int64_t t, int64_t p) {
  if (p > t || p < 0) return false;
  switch (v.kind) {
    case VariantKind::full:
      return true;
    case VariantKind::sliding:
      return p >= t - v.window + 1;
    case VariantKind::streaming:
    case VariantKind::lminfinite:
      return p < v.sinks || p >= t - v.window + 1;
    case VariantKind::cca:
      return p >= core_visible(v, t) * v.group;
  }
  return false;
}

template <class A, class B>
double dot(const A& a, int64_t oa, const B& b, int64_t ob, int64_t D) {
  double s = 0;
  for (int64_t d = 0; d < D; ++d) s += double(a.load(oa + d)) * double(b.load(ob + d));
  return s;
}

// The keys query t sees, as (segment, row) pairs: core tokens 0..j(t)-1, then raw positions in
// increasing order, each from whichever of `local` and `sink` holds it.
template <class V>
void visible_key_rows(const VariantSpec& variant, int64_t t, const Segment<V>& core,
                      const Segment<V>& sink, const Segment<V>& local,
                      std::vector<std::pair<const Segment<V>*, int64_t>>& keys) {
  keys.clear();
  const int64_t j = core_visible(variant, t);
  check(j <= core.rows(), "ref attend: query at position " + std::to_string(t) + " needs " +
                              std::to_string(j) + " core tokens, have " +
                              std::to_string(core.rows()));
  for (int64_t c = 0; c < j; ++c) keys.push_back({&core, c});
  for (int64_t pos = 0; pos <= t; ++pos) {
    if (!raw_visible(variant, t, pos)) continue;
    const Segment<V>* seg = pos >= local.pos0 && pos < local.end() ? &local
                            : pos >= sink.pos0 && pos < sink.end() ? &sink
                                                                   : nullptr;
    check(seg != nullptr,
          "ref attend: raw key at position " + std::to_string(pos) + " is not held by any segment");
    keys.push_back({seg, pos - seg->pos0});
  }
}

// q [B, n, Hq, D] at positions q_pos0..; core [B, m, Hc, D]; sink/local [B, *, Hkv, D].
// out [B, n, Hq, D]; lse [B, Hq, n] when lse.data is set.
template <class V>
void attend(const V& q, int64_t q_pos0, const Segment<V>& core, const Segment<V>& sink,
            const Segment<V>& local, const V& out, const V& lse, const VariantSpec& variant,
            double scale) {
  const int64_t B = q.shape[0], n = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = local.k.shape[2], r = Hq / Hkv;
  const bool per_query_core = variant.pool_heads == PoolHeads::query;
  std::vector<double> logits, acc(static_cast<size_t>(D));
  std::vector<std::pair<const Segment<V>*, int64_t>> keys;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < n; ++i) {
        visible_key_rows(variant, q_pos0 + i, core, sink, local, keys);
        const int64_t oq = q.offset(b, i, h);
        logits.assign(keys.size(), 0.0);
        double mx = -std::numeric_limits<double>::infinity();
        for (size_t x = 0; x < keys.size(); ++x) {
          const Segment<V>& s = *keys[x].first;
          const int64_t kh = (&s == &core && per_query_core) ? h : h / r;
          logits[x] = scale * dot(q, oq, s.k, s.k.offset(b, keys[x].second, kh), D);
          mx = std::max(mx, logits[x]);
        }
        double sum = 0;
        for (double& l : logits) sum += (l = std::exp(l - mx));
        std::fill(acc.begin(), acc.end(), 0.0);
        for (size_t x = 0; x < keys.size(); ++x) {
          const Segment<V>& s = *keys[x].first;
          const int64_t kh = (&s == &core && per_query_core) ? h : h / r;
          const int64_t ov = s.v.offset(b, keys[x].second, kh);
          for (int64_t d = 0; d < D; ++d) acc[size_t(d)] += logits[x] * double(s.v.load(ov + d));
        }
        const int64_t oo = out.offset(b, i, h);
        for (int64_t d = 0; d < D; ++d) out.store(oo + d, acc[size_t(d)] / sum);
        if (lse.data) lse.store(lse.offset(b, h, i), mx + std::log(sum));
      }
}

// Pooling weights of group i for core head c (pool = cca or mean): w[0..g-1], and for pool = cca
// each pooling head's softmax, probs[j * g + n] for query heads h0 + j, j < nh.
// q [B, *, Hq, D] holds the group's last query at row last_q; the group's keys are k rows
// row0 .. row0 + g - 1 of KV head kvh.
template <class Q, class K>
void pool_weights(const Q& q, int64_t last_q, const K& k, int64_t row0, int64_t b, int64_t kvh,
                  int64_t h0, int64_t nh, const VariantSpec& variant, double scale,
                  std::vector<double>& w, std::vector<double>& probs) {
  const int64_t g = variant.group, D = q.shape[3];
  w.assign(size_t(g), variant.pool == PoolMode::mean ? 1.0 / double(g) : 0.0);
  probs.assign(size_t(nh * g), 0.0);
  if (variant.pool != PoolMode::cca) return;
  // Softmax of each query head's last query over the group's keys, averaged over the nh query
  // heads of this core head (the r heads of a KV head, or one with pool_heads = query).
  for (int64_t j = 0; j < nh; ++j) {
    double* pj = probs.data() + j * g;
    double mx = -std::numeric_limits<double>::infinity(), sum = 0;
    for (int64_t x = 0; x < g; ++x) {
      pj[x] = scale * dot(q, q.offset(b, last_q, h0 + j), k, k.offset(b, row0 + x, kvh), D);
      mx = std::max(mx, pj[x]);
    }
    for (int64_t x = 0; x < g; ++x) sum += (pj[x] = std::exp(pj[x] - mx));
    for (int64_t x = 0; x < g; ++x) {
      pj[x] /= sum;
      w[size_t(x)] += pj[x] / double(nh);
    }
  }
}

// Core tokens of groups [group_begin, group_end) into k_core/v_core [B, count, Hc, D]: group
// i's last query is q row (i+1)*g - 1 - q_pos0, its keys are rows of `raw`.
template <class V>
void pool(const V& q, int64_t q_pos0, const Segment<V>& raw, int64_t group_begin, int64_t group_end,
          const V& k_core, const V& v_core, const VariantSpec& variant, double scale) {
  const int64_t B = q.shape[0], Hq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = raw.k.shape[2], r = Hq / Hkv, g = variant.group;
  const bool per_query = variant.pool_heads == PoolHeads::query;
  const int64_t Hc = per_query ? Hq : Hkv;
  std::vector<double> w, probs;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = group_begin; i < group_end; ++i) {
      const int64_t row0 = i * g - raw.pos0, last_q = (i + 1) * g - 1 - q_pos0;
      check(row0 >= 0 && row0 + g <= raw.rows() && last_q >= 0 && last_q < q.shape[1],
            "ref pool: group " + std::to_string(i) + " is not held by the inputs");
      for (int64_t c = 0; c < Hc; ++c) {
        const int64_t kvh = per_query ? c / r : c;
        const int64_t oc = k_core.offset(b, i - group_begin, c);
        const int64_t ovc = v_core.offset(b, i - group_begin, c);
        if (variant.pool == PoolMode::max) {
          for (int64_t d = 0; d < D; ++d) {
            double mk = -std::numeric_limits<double>::infinity(), mv = mk;
            for (int64_t x = 0; x < g; ++x) {
              mk = std::max(mk, double(raw.k.load(raw.k.offset(b, row0 + x, kvh, d))));
              mv = std::max(mv, double(raw.v.load(raw.v.offset(b, row0 + x, kvh, d))));
            }
            k_core.store(oc + d, mk);
            v_core.store(ovc + d, mv);
          }
          continue;
        }
        pool_weights(q, last_q, raw.k, row0, b, kvh, per_query ? c : c * r, per_query ? 1 : r,
                     variant, scale, w, probs);
        for (int64_t d = 0; d < D; ++d) {
          double sk = 0, sv = 0;
          for (int64_t x = 0; x < g; ++x) {
            sk += w[size_t(x)] * double(raw.k.load(raw.k.offset(b, row0 + x, kvh, d)));
            sv += w[size_t(x)] * double(raw.v.load(raw.v.offset(b, row0 + x, kvh, d)));
          }
          k_core.store(oc + d, sk);
          v_core.store(ovc + d, sv);
        }
      }
    }
}

}  // namespace cca::ref

// The float64 reference backend: a literal translation of docs/semantics.md (the contract). The
// forward's math is in ref_math.hpp; the backward is written here, as literally: every (query,
// visible key) pair of the forward, differentiated, in float64.
#include <cmath>
#include <tuple>
#include <vector>

#include "backend.hpp"
#include "cca/error.hpp"
#include "ref_math.hpp"

namespace cca::ref {
namespace {

using Seg = Segment<TensorView>;

Seg segment(const KvSegment& s) { return Seg{s.k, s.v, s.pos0}; }

// dst += src element-wise (dst float32 [d0, d1, d2, D] in any strides, src contiguous float64).
void add_into(const TensorView& dst, const F64Array& src) {
  const F64View& s = src.view;
  for (int64_t a = 0; a < s.shape[0]; ++a)
    for (int64_t b = 0; b < s.shape[1]; ++b)
      for (int64_t c = 0; c < s.shape[2]; ++c)
        for (int64_t d = 0; d < s.shape[3]; ++d) {
          const int64_t o = dst.offset(a, b, c, d);
          dst.store(o, float(double(dst.load(o)) + s.load(s.offset(a, b, c, d))));
        }
}

// dst = src element-wise.
void store_into(const TensorView& dst, const F64Array& src) {
  const F64View& s = src.view;
  for (int64_t a = 0; a < s.shape[0]; ++a)
    for (int64_t b = 0; b < s.shape[1]; ++b)
      for (int64_t c = 0; c < s.shape[2]; ++c)
        for (int64_t d = 0; d < s.shape[3]; ++d)
          dst.store(dst.offset(a, b, c, d), float(s.load(s.offset(a, b, c, d))));
}

// g[o .. o + D) += alpha * t[ot .. ot + D).
void axpy(const F64View& g, int64_t o, double alpha, const TensorView& t, int64_t ot, int64_t D) {
  for (int64_t d = 0; d < D; ++d) g.data[o + d] += alpha * double(t.load(ot + d));
}

class RefBackend final : public Backend {
 public:
  BackendKind kind() const override { return BackendKind::ref; }

  void attend(const AttendProblem& p) const override {
    ref::attend(p.q, p.q_pos0, segment(p.core), segment(p.sink), segment(p.local), p.out, p.lse,
                p.variant, p.scale);
  }

  void pool(const PoolProblem& p) const override {
    ref::pool(p.q, p.q_pos0, segment(p.raw), p.group_begin, p.group_end, p.k_core, p.v_core,
              p.variant, p.scale);
  }

  std::string unsupported_bwd(const AttendBwdProblem&) const override { return ""; }

  // delta[b, h, t] = sum_d dout[b, t, h, d] * out[b, t, h, d].
  void attend_bwd_delta(const AttendBwdProblem& p) const override {
    const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t t = 0; t < T; ++t)
          p.delta.store(p.delta.offset(b, h, t), float(dot(p.dout, p.dout.offset(b, t, h), p.out,
                                                           p.out.offset(b, t, h), D)));
  }

  // For each query t, head h and key x it sees: P = exp(scale q.k_x - lse), dP = dO.v_x,
  // dS = P (dP - delta); dq += scale dS k_x, dk_x += scale dS q, dv_x += P dO.
  void attend_bwd(const AttendBwdProblem& p) const override {
    const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
    const int64_t Hkv = p.k.shape[2], r = Hq / Hkv;
    const bool per_query_core = p.variant.pool_heads == PoolHeads::query;
    const Seg core{p.k_core, p.v_core, 0}, raw{p.k, p.v, 0};
    const int64_t m = core.rows(), Hc = p.variant.core_heads(Hq, Hkv);
    F64Array dq(B, T, Hq, D), dk(B, T, Hkv, D), dv(B, T, Hkv, D);
    F64Array dkc(B, m, Hc, D), dvc(B, m, Hc, D);
    std::vector<std::pair<const Seg*, int64_t>> keys;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t t = 0; t < T; ++t) {
          visible_key_rows(p.variant, t, core, raw, raw, keys);
          const int64_t oq = p.q.offset(b, t, h), odo = p.dout.offset(b, t, h);
          const double lse = p.lse.load(p.lse.offset(b, h, t));
          const double delta = p.delta.load(p.delta.offset(b, h, t));
          for (const auto& [seg, row] : keys) {
            const bool is_core = seg == &core;
            const int64_t kh = is_core && per_query_core ? h : h / r;
            const int64_t ok = seg->k.offset(b, row, kh), ov = seg->v.offset(b, row, kh);
            const double prob = std::exp(p.scale * dot(p.q, oq, seg->k, ok, D) - lse);
            const double ds = prob * (dot(p.dout, odo, seg->v, ov, D) - delta);
            const F64View& gk = (is_core ? dkc : dk).view;
            const F64View& gv = (is_core ? dvc : dv).view;
            axpy(dq.view, dq.view.offset(b, t, h), p.scale * ds, seg->k, ok, D);
            axpy(gk, gk.offset(b, row, kh), p.scale * ds, p.q, oq, D);
            axpy(gv, gv.offset(b, row, kh), prob, p.dout, odo, D);
          }
        }
    store_into(p.dq, dq);
    store_into(p.dk, dk);
    store_into(p.dv, dv);
    if (m > 0) {
      store_into(p.dk_core, dkc);
      store_into(p.dv_core, dvc);
    }
  }

  // Core token (i, c) = sum_n w_n (k_n, v_n) over the group's positions n: see PoolBwdProblem.
  void pool_bwd(const PoolBwdProblem& p) const override {
    const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
    const int64_t Hkv = p.k.shape[2], r = Hq / Hkv, g = p.variant.group;
    const int64_t m = p.dk_core.shape[1];
    const bool per_query = p.variant.pool_heads == PoolHeads::query;
    const int64_t Hc = per_query ? Hq : Hkv, nh = per_query ? 1 : r;
    F64Array gq(B, T, Hq, D), gk(B, T, Hkv, D), gv(B, T, Hkv, D);
    std::vector<double> w, probs, dw(static_cast<size_t>(g));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t c = 0; c < Hc; ++c) {
          const int64_t kvh = per_query ? c / r : c, row0 = i * g, last = row0 + g - 1;
          const int64_t h0 = per_query ? c : c * r;
          const int64_t okc = p.dk_core.offset(b, i, c), ovc = p.dv_core.offset(b, i, c);
          if (p.variant.pool == PoolMode::max) {
            // Each element's gradient goes to the first position holding the group's maximum.
            const std::tuple<const TensorView*, const TensorView*, const F64View*> kv[2] = {
                {&p.k, &p.dk_core, &gk.view}, {&p.v, &p.dv_core, &gv.view}};
            for (const auto& [x, dx, gx] : kv)
              for (int64_t d = 0; d < D; ++d) {
                int64_t best = 0;
                for (int64_t n = 1; n < g; ++n)
                  if (x->load(x->offset(b, row0 + n, kvh, d)) >
                      x->load(x->offset(b, row0 + best, kvh, d)))
                    best = n;
                gx->data[gx->offset(b, row0 + best, kvh, d)] += dx->load(dx->offset(b, i, c, d));
              }
            continue;
          }
          pool_weights(p.q, last, p.k, row0, b, kvh, h0, nh, p.variant, p.scale, w, probs);
          for (int64_t n = 0; n < g; ++n) {
            const int64_t ok = p.k.offset(b, row0 + n, kvh), ov = p.v.offset(b, row0 + n, kvh);
            dw[size_t(n)] = dot(p.dk_core, okc, p.k, ok, D) + dot(p.dv_core, ovc, p.v, ov, D);
            axpy(gk.view, gk.view.offset(b, row0 + n, kvh), w[size_t(n)], p.dk_core, okc, D);
            axpy(gv.view, gv.view.offset(b, row0 + n, kvh), w[size_t(n)], p.dv_core, ovc, D);
          }
          if (p.variant.pool != PoolMode::cca) continue;
          // w = mean_j p_j with p_j = softmax(z_j): dz_j = p_j (dw/nh - sum_n p_j dw/nh).
          for (int64_t j = 0; j < nh; ++j) {
            const double* pj = probs.data() + j * g;
            double mean = 0;
            for (int64_t n = 0; n < g; ++n) mean += pj[n] * dw[size_t(n)] / double(nh);
            const int64_t oq = p.q.offset(b, last, h0 + j);
            for (int64_t n = 0; n < g; ++n) {
              const double dz = pj[n] * (dw[size_t(n)] / double(nh) - mean);
              axpy(gq.view, gq.view.offset(b, last, h0 + j), p.scale * dz, p.k,
                   p.k.offset(b, row0 + n, kvh), D);
              axpy(gk.view, gk.view.offset(b, row0 + n, kvh), p.scale * dz, p.q, oq, D);
            }
          }
        }
    add_into(p.dq, gq);
    add_into(p.dk, gk);
    add_into(p.dv, gv);
  }
};

}  // namespace

const Backend& backend() {
  static const RefBackend b;
  return b;
}

}  // namespace cca::ref

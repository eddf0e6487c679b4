// The float64 reference backend: a literal translation of docs/semantics.md (the contract).
// Dense masks written from the contract's formulas, not from policy.hpp, so that the optimised
// backends (which use policy.hpp's ranges) are checked against an independent statement.
#include <cmath>
#include <limits>
#include <vector>

#include "backend.hpp"
#include "cca/error.hpp"

namespace cca::ref {
namespace {

// j(t) = max(0, floor((t + 1 - s) / g)), floor and not truncation.
int64_t core_visible(const VariantSpec& v, int64_t t) {
  if (v.kind != VariantKind::cca) return 0;
  return std::max<int64_t>(0, int64_t(std::floor(double(t + 1 - v.window) / double(v.group))));
}

// Whether raw key position p is visible to query t (the contract's masks).
bool raw_visible(const VariantSpec& v, int64_t t, int64_t p) {
  if (p > t || p < 0) return false;
  switch (v.kind) {
    case VariantKind::full: return true;
    case VariantKind::sliding: return p >= t - v.window + 1;
    case VariantKind::streaming:
    case VariantKind::lminfinite: return p < v.sinks || p >= t - v.window + 1;
    case VariantKind::cca: return p >= core_visible(v, t) * v.group;
  }
  return false;
}

double dot(const TensorView& a, int64_t oa, const TensorView& b, int64_t ob, int64_t D) {
  double s = 0;
  for (int64_t d = 0; d < D; ++d) s += double(a.load(oa + d)) * double(b.load(ob + d));
  return s;
}

class RefBackend final : public Backend {
 public:
  BackendKind kind() const override { return BackendKind::ref; }

  // q [B, n, Hq, D] at positions q_pos0..; core [B, m, Hc, D]; sink/local [B, *, Hkv, D].
  void attend(const AttendProblem& p) const override {
    const int64_t B = p.q.shape[0], n = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
    const int64_t Hkv = p.local.k.shape[2], r = Hq / Hkv;
    const bool per_query_core = p.variant.pool_heads == PoolHeads::query;
    std::vector<double> logits, acc(static_cast<size_t>(D));
    std::vector<std::pair<const KvSegment*, int64_t>> keys;  // (segment, row) of each visible key
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = p.q_pos0 + i;
          keys.clear();
          const int64_t j = core_visible(p.variant, t);
          check(j <= p.core.rows(), "ref attend: query at position " + std::to_string(t) +
                                        " needs " + std::to_string(j) + " core tokens, have " +
                                        std::to_string(p.core.rows()));
          for (int64_t c = 0; c < j; ++c) keys.push_back({&p.core, c});
          for (int64_t pos = 0; pos <= t; ++pos) {
            if (!raw_visible(p.variant, t, pos)) continue;
            const KvSegment* seg = pos >= p.local.pos0 && pos < p.local.end() ? &p.local
                                   : pos >= p.sink.pos0 && pos < p.sink.end() ? &p.sink
                                                                              : nullptr;
            check(seg != nullptr, "ref attend: raw key at position " + std::to_string(pos) +
                                      " is not held by any segment");
            keys.push_back({seg, pos - seg->pos0});
          }
          const int64_t oq = p.q.offset(b, i, h);
          logits.assign(keys.size(), 0.0);
          double mx = -std::numeric_limits<double>::infinity();
          for (size_t x = 0; x < keys.size(); ++x) {
            const KvSegment& s = *keys[x].first;
            const int64_t kh = (&s == &p.core && per_query_core) ? h : h / r;
            logits[x] = p.scale * dot(p.q, oq, s.k, s.k.offset(b, keys[x].second, kh), D);
            mx = std::max(mx, logits[x]);
          }
          double sum = 0;
          for (double& l : logits) sum += (l = std::exp(l - mx));
          std::fill(acc.begin(), acc.end(), 0.0);
          for (size_t x = 0; x < keys.size(); ++x) {
            const KvSegment& s = *keys[x].first;
            const int64_t kh = (&s == &p.core && per_query_core) ? h : h / r;
            const int64_t ov = s.v.offset(b, keys[x].second, kh);
            for (int64_t d = 0; d < D; ++d) acc[size_t(d)] += logits[x] * double(s.v.load(ov + d));
          }
          const int64_t oo = p.out.offset(b, i, h);
          for (int64_t d = 0; d < D; ++d) p.out.store(oo + d, float(acc[size_t(d)] / sum));
          if (p.lse.data) p.lse.store(p.lse.offset(b, h, i), float(mx + std::log(sum)));
        }
  }

  // Core tokens of groups [group_begin, group_end): k_core/v_core [B, count, Hc, D].
  void pool(const PoolProblem& p) const override {
    const int64_t B = p.q.shape[0], Hq = p.q.shape[2], D = p.q.shape[3];
    const int64_t Hkv = p.raw.k.shape[2], r = Hq / Hkv, g = p.variant.group;
    const bool per_query = p.variant.pool_heads == PoolHeads::query;
    const int64_t Hc = per_query ? Hq : Hkv;
    std::vector<double> w(static_cast<size_t>(g)), prob(static_cast<size_t>(g));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = p.group_begin; i < p.group_end; ++i) {
        const int64_t row0 = i * g - p.raw.pos0, last_q = (i + 1) * g - 1 - p.q_pos0;
        check(row0 >= 0 && row0 + g <= p.raw.rows() && last_q >= 0 && last_q < p.q.shape[1],
              "ref pool: group " + std::to_string(i) + " is not held by the inputs");
        for (int64_t c = 0; c < Hc; ++c) {
          const int64_t kvh = per_query ? c / r : c;
          const int64_t oc = p.k_core.offset(b, i - p.group_begin, c);
          const int64_t ovc = p.v_core.offset(b, i - p.group_begin, c);
          if (p.variant.pool == PoolMode::max) {
            for (int64_t d = 0; d < D; ++d) {
              double mk = -std::numeric_limits<double>::infinity(), mv = mk;
              for (int64_t x = 0; x < g; ++x) {
                mk = std::max(mk, double(p.raw.k.load(p.raw.k.offset(b, row0 + x, kvh, d))));
                mv = std::max(mv, double(p.raw.v.load(p.raw.v.offset(b, row0 + x, kvh, d))));
              }
              p.k_core.store(oc + d, float(mk));
              p.v_core.store(ovc + d, float(mv));
            }
            continue;
          }
          std::fill(w.begin(), w.end(), p.variant.pool == PoolMode::mean ? 1.0 / double(g) : 0.0);
          if (p.variant.pool == PoolMode::cca) {
            // Softmax of each query head's last query over the group's keys, averaged over the
            // r query heads of this KV head (or one query head with pool_heads = query).
            const int64_t h0 = per_query ? c : c * r, nh = per_query ? 1 : r;
            for (int64_t h = h0; h < h0 + nh; ++h) {
              double mx = -std::numeric_limits<double>::infinity(), sum = 0;
              for (int64_t x = 0; x < g; ++x) {
                prob[size_t(x)] = p.scale * dot(p.q, p.q.offset(b, last_q, h), p.raw.k,
                                                p.raw.k.offset(b, row0 + x, kvh), D);
                mx = std::max(mx, prob[size_t(x)]);
              }
              for (double& e : prob) sum += (e = std::exp(e - mx));
              for (int64_t x = 0; x < g; ++x) w[size_t(x)] += prob[size_t(x)] / sum / double(nh);
            }
          }
          for (int64_t d = 0; d < D; ++d) {
            double sk = 0, sv = 0;
            for (int64_t x = 0; x < g; ++x) {
              sk += w[size_t(x)] * double(p.raw.k.load(p.raw.k.offset(b, row0 + x, kvh, d)));
              sv += w[size_t(x)] * double(p.raw.v.load(p.raw.v.offset(b, row0 + x, kvh, d)));
            }
            p.k_core.store(oc + d, float(sk));
            p.v_core.store(ovc + d, float(sv));
          }
        }
      }
  }
};

}  // namespace

const Backend& backend() {
  static const RefBackend b;
  return b;
}

}  // namespace cca::ref

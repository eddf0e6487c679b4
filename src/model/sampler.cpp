#include "model/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "cca/error.hpp"

namespace cca::model {

void SamplingParams::validate() const {
  if (greedy) return;
  auto bad = [](const char* name, double v, const char* rule) {
    std::ostringstream o;
    o << "invalid " << name << " = " << v << ": " << rule;
    throw Error(o.str());
  };
  if (!(temperature > 0) || !std::isfinite(temperature))
    bad("--temperature", temperature, "must be > 0 (use --greedy for argmax)");
  if (top_k < 0) bad("--top-k", double(top_k), "must be >= 0 (0 = off)");
  if (!(top_p > 0 && top_p <= 1)) bad("--top-p", top_p, "must be in (0, 1]");
}

int32_t argmax(std::span<const float> logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) { p_.validate(); }

int32_t Sampler::next(std::span<const float> logits) {
  if (p_.greedy) return argmax(logits);
  // Candidates sorted by logit, best first; top-k keeps the first k.
  cand_.clear();
  for (size_t i = 0; i < logits.size(); ++i) cand_.emplace_back(logits[i], int32_t(i));
  const size_t k = p_.top_k > 0 ? std::min<size_t>(size_t(p_.top_k), cand_.size()) : cand_.size();
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::partial_sort(cand_.begin(), cand_.begin() + ptrdiff_t(k), cand_.end(), by_logit);
  cand_.resize(k);
  // Softmax at the temperature, in double.
  const double inv_t = 1.0 / p_.temperature, top = cand_[0].first * inv_t;
  std::vector<double> prob(k);
  double sum = 0;
  for (size_t i = 0; i < k; ++i) sum += prob[i] = std::exp(cand_[i].first * inv_t - top);
  for (double& x : prob) x /= sum;
  // Top-p: the smallest prefix whose mass reaches p (always at least one token).
  size_t keep = k;
  if (p_.top_p < 1.0) {
    double mass = 0;
    for (size_t i = 0; i < k; ++i) {
      mass += prob[i];
      if (mass >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += prob[i];
  const double u = std::uniform_real_distribution<double>(0.0, kept)(rng_);
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += prob[i];
    if (u < acc) return cand_[i].second;
  }
  return cand_[keep - 1].second;
}

}  // namespace cca::model

#include "model/sampler.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <sstream>

#include "cca/error.hpp"
#include "model/config.hpp"

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

SamplingParams resolve_sampling(const SamplingRequest& a, const GenerationConfig& gen) {
  SamplingParams p;
  p.seed = a.seed;
  const bool asked = a.temperature || a.top_k || a.top_p;
  p.greedy = a.greedy || !(asked || gen.do_sample) || (a.temperature && *a.temperature == 0.0);
  p.temperature = a.temperature.value_or(gen.present ? gen.temperature : 1.0);
  p.top_k = a.top_k.value_or(gen.present ? gen.top_k : 0);
  p.top_p = a.top_p.value_or(gen.present ? gen.top_p : 1.0);
  p.validate();
  return p;
}

int32_t argmax(std::span<const float> logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

ops::SampleParams SamplingParams::op_params() const {
  ops::SampleParams p;
  p.temperature = greedy ? 1.f : float(temperature);
  p.top_k = greedy ? 1 : int32_t(std::min<int64_t>(top_k, INT32_MAX));
  p.top_p = greedy ? 1.f : float(top_p);
  p.seed = seed;
  return p;
}

}  // namespace cca::model

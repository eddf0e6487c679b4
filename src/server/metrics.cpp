#include "server/metrics.hpp"

#include <sstream>

namespace cca::server {

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  std::lock_guard<std::mutex> g(mu_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++count_;
}

std::string Histogram::render(const std::string& name, const std::string& help) const {
  std::lock_guard<std::mutex> g(mu_);
  std::ostringstream o;
  o << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
  int64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    o << name << "_bucket{le=\"" << bounds_[i] << "\"} " << cum << "\n";
  }
  o << name << "_bucket{le=\"+Inf\"} " << count_ << "\n";
  o << name << "_sum " << sum_ << "\n" << name << "_count " << count_ << "\n";
  return o.str();
}

Metrics::Metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}),
      e2e_({0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}) {}

void Metrics::request(const std::string& endpoint, int status) {
  std::lock_guard<std::mutex> g(mu_);
  ++requests_[{endpoint, status}];
}
void Metrics::prompt_tokens(int64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  prompt_tokens_ += n;
}
void Metrics::generated_tokens(int64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  generated_tokens_ += n;
}
void Metrics::ttft(double s) { ttft_.observe(s); }
void Metrics::itl(double s) { itl_.observe(s); }
void Metrics::e2e(double s) { e2e_.observe(s); }

std::string Metrics::render(const SchedulerGauges& s) const {
  std::ostringstream o;
  {
    std::lock_guard<std::mutex> g(mu_);
    o << "# HELP cca_requests_total HTTP requests answered, by endpoint and status.\n"
         "# TYPE cca_requests_total counter\n";
    for (const auto& [k, n] : requests_)
      o << "cca_requests_total{endpoint=\"" << k.first << "\",status=\"" << k.second << "\"} "
        << n << "\n";
    o << "# HELP cca_prompt_tokens_total Prompt tokens of accepted generation requests.\n"
         "# TYPE cca_prompt_tokens_total counter\ncca_prompt_tokens_total "
      << prompt_tokens_ << "\n";
    o << "# HELP cca_generated_tokens_total Tokens generated.\n"
         "# TYPE cca_generated_tokens_total counter\ncca_generated_tokens_total "
      << generated_tokens_ << "\n";
  }
  auto gauge = [&](const char* name, const char* help, int64_t v) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " gauge\n"
      << name << " " << v << "\n";
  };
  gauge("cca_requests_running", "Sequences in the running batch.", s.running);
  gauge("cca_requests_queued", "Requests waiting for a slot or for cache memory.", s.queued);
  gauge("cca_kv_cache_reserved_bytes",
        "Cache bytes reserved by the running sequences (each at its capacity).", s.kv_reserved);
  gauge("cca_kv_cache_used_bytes", "Cache bytes the running sequences' keys and values take now.",
        s.kv_held);
  gauge("cca_kv_cache_budget_bytes", "Cache bytes the running sequences may reserve in all.",
        s.kv_budget);
  o << "# HELP cca_engine_steps_total Engine steps run.\n# TYPE cca_engine_steps_total counter\n"
       "cca_engine_steps_total " << s.steps << "\n";
  o << ttft_.render("cca_time_to_first_token_seconds",
                    "From a request's arrival to its first generated token.");
  o << itl_.render("cca_inter_token_latency_seconds", "Between consecutive tokens of a request.");
  o << e2e_.render("cca_request_duration_seconds",
                   "From a generation request's arrival to its last token.");
  return o.str();
}

}  // namespace cca::server

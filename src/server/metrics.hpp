// The server's counters and histograms, printed in Prometheus' text format by GET /metrics.
// Every method is thread-safe.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace cca::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);
  // `name`_bucket{le=...}, `name`_sum, `name`_count lines.
  std::string render(const std::string& name, const std::string& help) const;

 private:
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;  // per bucket (not cumulative); last: above every bound
  double sum_ = 0;
  int64_t count_ = 0;
  mutable std::mutex mu_;
};

// What the scheduler reports at the time of a scrape.
struct SchedulerGauges {
  int64_t queued = 0, running = 0;
  int64_t kv_reserved = 0;  // cache bytes reserved by the running sequences (at their capacity)
  int64_t kv_held = 0;      // cache bytes their keys and values take now
  int64_t kv_budget = 0;
  int64_t steps = 0;        // engine steps run
};

class Metrics {
 public:
  Metrics();
  void request(const std::string& endpoint, int status);
  void prompt_tokens(int64_t n);
  void generated_tokens(int64_t n);
  void ttft(double seconds);
  void itl(double seconds);
  void e2e(double seconds);
  std::string render(const SchedulerGauges& g) const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, int64_t> requests_;
  int64_t prompt_tokens_ = 0, generated_tokens_ = 0;
  Histogram ttft_, itl_, e2e_;
};

}  // namespace cca::server

// The optimised CPU backend: host tensors, OpenMP threads, AVX-512 where the build has it.
#include <omp.h>

#include <exception>

#include "cpu_ops.hpp"

namespace cca::cpu {
namespace {

class CpuBackend final : public Backend {
 public:
  BackendKind kind() const override { return BackendKind::cpu; }
  void attend(const AttendProblem& p) const override { cpu::attend(p); }
  void pool(const PoolProblem& p) const override { cpu::pool(p); }
  std::string unsupported_bwd(const AttendBwdProblem&) const override { return ""; }
  void attend_bwd_delta(const AttendBwdProblem& p) const override { cpu::attend_bwd_delta(p); }
  void attend_bwd(const AttendBwdProblem& p) const override { cpu::attend_bwd(p); }
  void pool_bwd(const PoolBwdProblem& p) const override { cpu::pool_bwd(p); }

  // Sequences in parallel, each on one thread: a decode step of one sequence is too small to
  // split, and the sequences' lengths differ, so a dynamic schedule balances them.
  void attend_batch(const std::vector<AttendProblem>& problems) const override {
    if (problems.empty()) return;
    double flops = 0;
    for (const AttendProblem& p : problems) flops += attend_flops(p);
    const int64_t n = int64_t(problems.size());
    const int threads = thread_count(problems[0].threads, n, flops);
    std::exception_ptr error;  // an exception must not leave the parallel region
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) {
      AttendProblem p = problems[size_t(i)];
      p.threads = 1;
      try {
        cpu::attend(p);
      } catch (...) {
#pragma omp critical
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  }
};

}  // namespace

const Backend& backend() {
  static const CpuBackend b;
  return b;
}

}  // namespace cca::cpu

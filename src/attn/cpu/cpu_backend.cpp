// The optimised CPU backend: host tensors, OpenMP threads, AVX-512 where the build has it.
#include "cpu_ops.hpp"

namespace cca::cpu {
namespace {

class CpuBackend final : public Backend {
 public:
  BackendKind kind() const override { return BackendKind::cpu; }
  void attend(const AttendProblem& p) const override { cpu::attend(p); }
  void pool(const PoolProblem& p) const override { cpu::pool(p); }
};

}  // namespace

const Backend& backend() {
  static const CpuBackend b;
  return b;
}

}  // namespace cca::cpu

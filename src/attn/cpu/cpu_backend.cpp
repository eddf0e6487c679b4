// The optimised CPU backend: host tensors, OpenMP threads, the best SIMD target of the CPU it
// runs on (cpu_simd.hpp).
#include <omp.h>

#include <cstring>
#include <exception>
#include <vector>

#include "cpu_ops.hpp"
#include "cpu_simd.hpp"

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

  // dst = src row by row, converting dtypes with the vector conversions (attn_bwd's float32
  // accumulators into 16-bit gradients); rows of one dtype are copied.
  void copy_tensor(const TensorView& dst, const TensorView& src, void*) const override {
    const int64_t D = src.shape[3], row_bytes = D * dtype_size(src.dtype);
    std::vector<float> buf;
    if (src.dtype != DType::f32 && dst.dtype != DType::f32) buf.resize(size_t(D));
    for (int64_t b = 0; b < src.shape[0]; ++b)
      for (int64_t t = 0; t < src.shape[1]; ++t)
        for (int64_t h = 0; h < src.shape[2]; ++h) {
          void* o = dst.ptr(dst.offset(b, t, h));
          const void* i = src.ptr(src.offset(b, t, h));
          if (dst.dtype == src.dtype) {
            std::memcpy(o, i, size_t(row_bytes));
          } else if (src.dtype == DType::f32) {
            row_from_float(static_cast<const float*>(i), D, o, dst.dtype);
          } else if (dst.dtype == DType::f32) {
            row_to_float(i, src.dtype, D, static_cast<float*>(o));
          } else {
            row_to_float(i, src.dtype, D, buf.data());
            row_from_float(buf.data(), D, o, dst.dtype);
          }
        }
  }

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

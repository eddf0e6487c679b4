// The CUDA ops other than linear: each checks its views on the host, then queues a kernel of
// kernels.cu on the context's stream.
#include <cstdint>
#include <limits>

#include "ops/cuda/checks.hpp"
#include "ops/cuda/kernels.hpp"
#include "ops/impl.hpp"

namespace cca::ops::cuda {
namespace {

cudaStream_t stream_of(const Context& ctx) { return static_cast<cudaStream_t>(ctx.stream()); }

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

}  // namespace

void rms_norm(const Context& ctx, const TensorView& x, const TensorView& w, float eps,
              const TensorView& out) {
  const char* op = "rms_norm";
  check_matrix(x, op, "x");
  check_matrix(out, op, "out");
  check_dtype(x, DType::f32, op, "x");
  const int64_t n = x.shape[0], H = x.shape[1];
  check_shape(out, n, H, op, "out");
  check_vector(w, H, op, "w");
  check(eps >= 0.f && eps < std::numeric_limits<float>::infinity(),
        "rms_norm: eps must be finite and >= 0, got " + std::to_string(eps));
  launch_rms_norm(x, w.data, w.dtype, eps, out, stream_of(ctx));
}

void rope(const Context& ctx, const TensorView& x, int64_t heads, const int32_t* positions,
          const TensorView& inv_freq) {
  const char* op = "rope";
  check_matrix(x, op, "x");
  check_dtype(inv_freq, DType::f32, op, "inv_freq");
  const int64_t half = inv_freq.ndim == 2 ? inv_freq.shape[1] : inv_freq.shape[0];
  check_vector(inv_freq, half, op, "inv_freq");
  // The cos/sin table of a row lives in shared memory: 2 * half floats, at most 32 KiB.
  check(half >= 1 && half <= 4096,
        "rope: inv_freq must hold 1 to 4096 frequencies (D = 2 to 8192), got " +
            std::to_string(half));
  check(heads >= 0, "rope: negative head count " + std::to_string(heads));
  check(heads * 2 * half <= x.shape[1],
        "rope: x has " + std::to_string(x.shape[1]) + " columns, fewer than heads * D = " +
            std::to_string(heads) + " * " + std::to_string(2 * half));
  check(x.shape[0] == 0 || positions != nullptr, "rope: positions is null");
  launch_rope(x, heads, positions, static_cast<const float*>(inv_freq.data), half,
              stream_of(ctx));
}

void swiglu(const Context& ctx, const TensorView& gate, const TensorView& up,
            const TensorView& out) {
  const char* op = "swiglu";
  check_matrix(gate, op, "gate");
  check_matrix(up, op, "up");
  check_matrix(out, op, "out");
  check_shape(up, gate.shape[0], gate.shape[1], op, "up");
  check_shape(out, gate.shape[0], gate.shape[1], op, "out");
  check_dtype(up, gate.dtype, op, "up");
  check_dtype(out, gate.dtype, op, "out");
  launch_swiglu(gate, up, out, stream_of(ctx));
}

void embed(const Context& ctx, const int32_t* ids, const TensorView& table,
           const TensorView& out) {
  const char* op = "embed";
  check_matrix(table, op, "table");
  check_matrix(out, op, "out");
  check_dtype(out, DType::f32, op, "out");
  check_shape(out, out.shape[0], table.shape[1], op, "out");
  check(out.shape[0] == 0 || ids != nullptr, "embed: ids is null");
  launch_embed(ids, table, out, stream_of(ctx));
}

void gather_rows(const Context& ctx, const TensorView& src, const int32_t* rows,
                 const TensorView& dst) {
  const char* op = "gather_rows";
  check_matrix(src, op, "src");
  check_matrix(dst, op, "dst");
  check_dtype(dst, src.dtype, op, "dst");
  check_shape(dst, dst.shape[0], src.shape[1], op, "dst");
  check(dst.shape[0] == 0 || rows != nullptr, "gather_rows: rows is null");
  launch_gather_rows(src, rows, dst, stream_of(ctx));
}

void sample_rows(const Context& ctx, const TensorView& logits, const SampleParams* params,
                 const int32_t* counters, int32_t* out) {
  launch_sample_rows(logits, params, counters, out, stream_of(ctx));
}

void argmax_rows(const Context& ctx, const TensorView& logits, int32_t* out) {
  const char* op = "argmax_rows";
  check_matrix(logits, op, "logits");
  check_dtype(logits, DType::f32, op, "logits");
  const int64_t m = logits.shape[0], V = logits.shape[1];
  check(m == 0 || (V >= 1 && V <= kMaxInt32),
        "argmax_rows: logits must have 1 to 2^31 - 1 columns, got " + std::to_string(V));
  check(m == 0 || out != nullptr, "argmax_rows: out is null");
  launch_argmax_rows(logits, out, stream_of(ctx));
}

void convert(const Context& ctx, const TensorView& src, const TensorView& dst) {
  const char* op = "convert";
  check_matrix(src, op, "src");
  check_matrix(dst, op, "dst");
  check_shape(dst, src.shape[0], src.shape[1], op, "dst");
  launch_convert(src, dst, stream_of(ctx));
}

}  // namespace cca::ops::cuda

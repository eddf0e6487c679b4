// Op dispatch on the context's device, checks shared by both implementations, Context methods.
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cca/attention.hpp"
#include "cca/error.hpp"
#include "ops/impl.hpp"

namespace cca::ops {
namespace {

bool on_cuda(const Context& ctx) {
#ifdef CCA_WITH_CUDA
  return ctx.device() == Device::cuda;
#else
  (void)ctx;
  return false;
#endif
}

void check_matrix(const TensorView& t, const char* op, const char* name, Device device) {
  check(t.data != nullptr, std::string(op) + ": " + name + " is missing");
  check(t.ndim == 2 && t.stride[1] == 1 && t.stride[0] >= t.shape[1] && t.shape[0] >= 0 &&
            t.shape[1] >= 1,
        std::string(op) + ": " + name + " must be a 2-D view with contiguous rows, got " +
            t.shape_string());
  check(t.device == device, std::string(op) + ": " + name + " is in " +
                                (t.device == Device::cuda ? "GPU" : "host") +
                                " memory, the context runs on the " +
                                (device == Device::cuda ? "GPU" : "CPU"));
}

void check_rows(const TensorView& a, const TensorView& b, const char* op) {
  check(a.shape[0] == b.shape[0], std::string(op) + ": row counts differ: " + a.shape_string() +
                                      " and " + b.shape_string());
}

}  // namespace

TensorView matrix(void* data, DType dtype, int64_t rows, int64_t cols, int64_t ld,
                  Device device) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = 2;
  v.shape[0] = rows;
  v.shape[1] = cols;
  v.stride[0] = ld;
  v.stride[1] = 1;
  return v;
}

Context Context::cpu(int threads) {
  check(threads >= 0, "threads must be >= 0 (0 = all cores), got " + std::to_string(threads));
  const int n = cpu::resolve_threads(threads);
  cpu::set_threads(n);
  return ContextFactory::make(Device::cpu, n, nullptr, nullptr, nullptr, 0);
}

Context Context::cuda() {
#ifdef CCA_WITH_CUDA
  return cuda::make_context();
#else
  throw Error(std::string("no usable CUDA GPU: ") +
              backend_unavailable_reason(BackendKind::cuda));
#endif
}

Context::Context(Context&& o) noexcept { *this = std::move(o); }
Context& Context::operator=(Context&& o) noexcept {
  if (this != &o) {
    release();
    device_ = o.device_;
    threads_ = o.threads_;
    stream_ = o.stream_;
    blas_ = o.blas_;
    workspace_ = o.workspace_;
    workspace_bytes_ = o.workspace_bytes_;
    profile_ = std::move(o.profile_);
    o.stream_ = o.blas_ = o.workspace_ = nullptr;
    o.workspace_bytes_ = 0;
  }
  return *this;
}
Context::~Context() { release(); }

void Context::release() noexcept {
  profile_.reset();  // its events first, while the device is still set up
#ifdef CCA_WITH_CUDA
  if (device_ == Device::cuda && (stream_ || blas_ || workspace_))
    cuda::release(stream_, blas_, workspace_);
#endif
  stream_ = blas_ = workspace_ = nullptr;
}

void* Context::alloc(int64_t bytes, const char* what) const {
  check(bytes >= 0, std::string("negative size for ") + what);
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::alloc(bytes, what);
#endif
  void* p = std::malloc(size_t(bytes > 0 ? bytes : 1));
  check(p != nullptr, "out of host memory allocating " + std::to_string(bytes) + " bytes for " +
                          what);
  return p;
}

void Context::free(void* ptr) const {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::free(ptr);
#endif
  std::free(ptr);
}

void Context::upload(void* dst, const void* src, int64_t bytes) const {
  if (bytes <= 0) return;
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::upload(*this, dst, src, bytes);
#endif
  std::memcpy(dst, src, size_t(bytes));
}

void Context::download(void* dst, const void* src, int64_t bytes) const {
  if (bytes <= 0) return;
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::download(*this, dst, src, bytes);
#endif
  std::memcpy(dst, src, size_t(bytes));
}

void Context::synchronize() const {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) cuda::synchronize(*this);
#endif
}

void* Context::alloc_host(int64_t bytes, const char* what) const {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::alloc_host(bytes, what);
#endif
  void* p = std::malloc(size_t(bytes > 0 ? bytes : 1));
  check(p != nullptr, "out of host memory allocating " + std::to_string(bytes) + " bytes for " +
                          what);
  return p;
}

void Context::free_host(void* ptr) const {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::free_host(ptr);
#endif
  std::free(ptr);
}

void Context::download_async(void* dst, const void* src, int64_t bytes) const {
  if (bytes <= 0) return;
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::download_async(*this, dst, src, bytes);
#endif
  std::memcpy(dst, src, size_t(bytes));
}

namespace {
[[noreturn]] void graphs_need_cuda() {
  throw Error("CUDA graphs need a cuda context");
}
}  // namespace

void Context::begin_capture() const {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::begin_capture(*this);
#endif
  graphs_need_cuda();
}

void* Context::end_capture() const {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::end_capture(*this);
#endif
  graphs_need_cuda();
}

void Context::abort_capture() const noexcept {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) cuda::abort_capture(*this);
#endif
}

void Context::launch_graph(void* graph) const {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::launch_graph(*this, graph);
#endif
  graphs_need_cuda();
}

void Context::destroy_graph(void* graph) noexcept {
#ifdef CCA_WITH_CUDA
  cuda::destroy_graph(graph);
#else
  (void)graph;
#endif
}

void Context::memory_info(int64_t* free_bytes, int64_t* total_bytes) const {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return cuda::memory_info(free_bytes, total_bytes);
#endif
  const long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES),
             page = sysconf(_SC_PAGESIZE);
  *total_bytes = int64_t(pages) * page;
  *free_bytes = int64_t(avail) * page;
}

std::string Context::describe() const {
#ifdef CCA_WITH_CUDA
  if (on_cuda(*this)) return "cuda: " + cuda::device_name();
#endif
  return "cpu (" + std::to_string(threads_) + (threads_ == 1 ? " thread)" : " threads)");
}

// ---- the ops: checks shared by both implementations, then dispatch ------------------------

namespace {
void run_linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
                const TensorView& y, bool accumulate, bool tuning) {
  const Device dev = ctx.device();
  check_matrix(x, "linear", "x", dev);
  check_matrix(y, "linear", "y", dev);
  check_rows(x, y, "linear");
  check(!parts.empty(), "linear: no weight given");
  int64_t cols = 0;
  for (const LinearPart& p : parts) {
    check_matrix(p.w, "linear", "weight", dev);
    check(p.w.shape[1] == x.shape[1], "linear: weight " + p.w.shape_string() + " does not take x " +
                                          x.shape_string() + " (in features differ)");
    check(p.w.stride[0] == p.w.shape[1], "linear: weight rows must be contiguous");
    if (p.b.data)
      check(p.b.numel() == p.w.shape[0], "linear: bias " + p.b.shape_string() +
                                             " does not match weight " + p.w.shape_string());
    cols += p.w.shape[0];
  }
  check(cols <= y.shape[1], "linear: y " + y.shape_string() + " has fewer columns than the " +
                                std::to_string(cols) + " outputs of the weights");
  if (x.shape[0] == 0) return;
  if (on_cuda(ctx)) {
#ifdef CCA_WITH_CUDA
    return tuning ? cuda::tune_linear(ctx, x, parts, y, accumulate)
                  : cuda::linear(ctx, x, parts, y, accumulate);
#endif
  }
  (void)tuning;  // the cpu's BLAS has nothing to choose
  cpu::linear(ctx, x, parts, y, accumulate);
}
}  // namespace

void linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
            const TensorView& y, bool accumulate) {
  run_linear(ctx, x, parts, y, accumulate, /*tuning=*/false);
}

void tune_linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
                 const TensorView& y, bool accumulate) {
  run_linear(ctx, x, parts, y, accumulate, /*tuning=*/true);
}

void rms_norm(const Context& ctx, const TensorView& x, const TensorView& w, float eps,
              const TensorView& out) {
  check_matrix(x, "rms_norm", "x", ctx.device());
  check_matrix(out, "rms_norm", "out", ctx.device());
  check_rows(x, out, "rms_norm");
  check(x.dtype == DType::f32, "rms_norm: x (the residual stream) must be float32");
  check(w.data && w.numel() == x.shape[1] && out.shape[1] == x.shape[1],
        "rms_norm: weight " + w.shape_string() + " and out " + out.shape_string() +
            " must match x " + x.shape_string());
  if (x.shape[0] == 0) return;
  if (on_cuda(ctx)) {
#ifdef CCA_WITH_CUDA
    return cuda::rms_norm(ctx, x, w, eps, out);
#endif
  }
  cpu::rms_norm(ctx, x, w, eps, out);
}

void rope(const Context& ctx, const TensorView& x, int64_t heads, const int32_t* positions,
          const TensorView& inv_freq) {
  check_matrix(x, "rope", "x", ctx.device());
  check(inv_freq.data && inv_freq.dtype == DType::f32, "rope: inv_freq must be float32");
  check(heads >= 1 && heads * 2 * inv_freq.numel() <= x.shape[1],
        "rope: " + std::to_string(heads) + " heads of D = " + std::to_string(2 * inv_freq.numel()) +
            " do not fit x " + x.shape_string());
  if (x.shape[0] == 0) return;
  check(positions != nullptr, "rope: positions missing");
  if (on_cuda(ctx)) {
#ifdef CCA_WITH_CUDA
    return cuda::rope(ctx, x, heads, positions, inv_freq);
#endif
  }
  cpu::rope(ctx, x, heads, positions, inv_freq);
}

void swiglu(const Context& ctx, const TensorView& gate, const TensorView& up,
            const TensorView& out) {
  for (auto [t, name] : {std::pair{&gate, "gate"}, {&up, "up"}, {&out, "out"}}) {
    check_matrix(*t, "swiglu", name, ctx.device());
    check(t->shape[0] == gate.shape[0] && t->shape[1] == gate.shape[1] && t->dtype == gate.dtype,
          std::string("swiglu: ") + name + " " + t->shape_string() + " differs from gate " +
              gate.shape_string() + " in shape or dtype");
  }
  if (gate.shape[0] == 0) return;
  if (on_cuda(ctx)) {
#ifdef CCA_WITH_CUDA
    return cuda::swiglu(ctx, gate, up, out);
#endif
  }
  cpu::swiglu(ctx, gate, up, out);
}

void embed(const Context& ctx, const int32_t* ids, const TensorView& table,
           const TensorView& out) {
  check_matrix(table, "embed", "table", ctx.device());
  check_matrix(out, "embed", "out", ctx.device());
  check(out.dtype == DType::f32 && out.shape[1] == table.shape[1],
        "embed: out " + out.shape_string() + " must be float32 with the table's width " +
            table.shape_string());
  if (out.shape[0] == 0) return;
  check(ids != nullptr, "embed: ids missing");
  if (on_cuda(ctx)) {
#ifdef CCA_WITH_CUDA
    return cuda::embed(ctx, ids, table, out);
#endif
  }
  cpu::embed(ctx, ids, table, out);
}

void gather_rows(const Context& ctx, const TensorView& src, const int32_t* rows,
                 const TensorView& dst) {
  check_matrix(src, "gather_rows", "src", ctx.device());
  check_matrix(dst, "gather_rows", "dst", ctx.device());
  check(src.dtype == dst.dtype && src.shape[1] == dst.shape[1],
        "gather_rows: dst " + dst.shape_string() + " must have src's width and dtype");
  if (dst.shape[0] == 0) return;
  if (on_cuda(ctx)) {
#ifdef CCA_WITH_CUDA
    return cuda::gather_rows(ctx, src, rows, dst);
#endif
  }
  cpu::gather_rows(ctx, src, rows, dst);
}

void argmax_rows(const Context& ctx, const TensorView& logits, int32_t* out) {
  check_matrix(logits, "argmax_rows", "logits", ctx.device());
  check(logits.dtype == DType::f32, "argmax_rows: logits must be float32");
  if (logits.shape[0] == 0) return;
  if (on_cuda(ctx)) {
#ifdef CCA_WITH_CUDA
    return cuda::argmax_rows(ctx, logits, out);
#endif
  }
  cpu::argmax_rows(ctx, logits, out);
}

void sample_rows(const Context& ctx, const TensorView& logits, const SampleParams* params,
                 const int32_t* counters, int32_t* out) {
  check_matrix(logits, "sample_rows", "logits", ctx.device());
  check(logits.dtype == DType::f32, "sample_rows: logits must be float32");
  check(logits.shape[1] <= INT32_MAX, "sample_rows: too many columns");
  if (logits.shape[0] == 0) return;
  check(params && counters && out, "sample_rows: params, counters and out are needed");
  if (on_cuda(ctx)) {
#ifdef CCA_WITH_CUDA
    return cuda::sample_rows(ctx, logits, params, counters, out);
#endif
  }
  cpu::sample_rows(ctx, logits, params, counters, out);
}

void convert(const Context& ctx, const TensorView& src, const TensorView& dst) {
  check_matrix(src, "convert", "src", ctx.device());
  check_matrix(dst, "convert", "dst", ctx.device());
  check(src.shape[0] == dst.shape[0] && src.shape[1] == dst.shape[1],
        "convert: shapes differ: " + src.shape_string() + " and " + dst.shape_string());
  if (src.shape[0] == 0) return;
  if (on_cuda(ctx)) {
#ifdef CCA_WITH_CUDA
    return cuda::convert(ctx, src, dst);
#endif
  }
  cpu::convert(ctx, src, dst);
}

}  // namespace cca::ops

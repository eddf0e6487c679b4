// The cuda backend: checks, layout normalisation and kernel choice; the kernels live in the
// .cu files beside this one. Work is queued on the problem's stream (cudaStream_t or null).
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "backend.hpp"
#include "cuda_check.hpp"
#include "kernels.hpp"
#include "tile_config.hpp"

namespace cca::cuda {
namespace {

// Stream-ordered scratch: contiguous copies of views whose rows are not 16-byte aligned.
class Scratch {
 public:
  explicit Scratch(cudaStream_t s) : stream_(s) {}
  ~Scratch() {
    for (void* p : ptrs_) cudaFreeAsync(p, stream_);
  }
  // An aligned contiguous copy of `t` (copied in if `fill`); `t` itself when already aligned.
  TensorView aligned(const TensorView& t, bool fill) {
    if (!t.data || rows_aligned_16(t)) return t;
    void* p = nullptr;
    CCA_CUDA_CHECK(cudaMallocAsync(&p, size_t(t.numel() * dtype_size(t.dtype)), stream_));
    ptrs_.push_back(p);
    TensorView c =
        make_view(p, t.dtype, {t.shape[0], t.shape[1], t.shape[2], t.shape[3]}, Device::cuda);
    if (fill) launch_copy_tensor(c, t, stream_);
    return c;
  }

 private:
  cudaStream_t stream_;
  std::vector<void*> ptrs_;
};

std::string check_view(const TensorView& t, const char* name, DType dtype, int64_t D) {
  if (!t.data) return "";
  if (t.device != Device::cuda) return std::string(name) + " must be in GPU memory";
  if (t.dtype != dtype) return std::string(name) + " must have the dtype of q";
  if (t.ndim != 4 || t.shape[3] != D || t.stride[3] != 1)
    return std::string(name) + " must be [B, n, H, " + std::to_string(D) +
           "] with a contiguous last dimension, got " + t.shape_string();
  return "";
}

class CudaBackend final : public Backend {
 public:
  BackendKind kind() const override { return BackendKind::cuda; }
  Device device() const override { return Device::cuda; }

  std::string unsupported(const AttendProblem& p) const override {
    const int64_t D = p.q.shape[3], Hq = p.q.shape[2];
    std::string why = unsupported_dtype_dim(p.q.dtype, D);
    if (!why.empty()) return why;
    for (auto [t, name] : {std::pair{&p.q, "q"},
                           {&p.out, "out"},
                           {&p.core.k, "core k"},
                           {&p.core.v, "core v"},
                           {&p.sink.k, "sink k"},
                           {&p.sink.v, "sink v"},
                           {&p.local.k, "local k"},
                           {&p.local.v, "local v"}}) {
      why = check_view(*t, name, p.q.dtype, D);
      if (!why.empty()) return why;
    }
    for (const KvSegment* s : {&p.core, &p.sink, &p.local})
      if (s->rows() > 0 && Hq % s->k.shape[2] != 0)
        return "key segment heads " + std::to_string(s->k.shape[2]) +
               " do not divide Hq = " + std::to_string(Hq);
    if (p.lse.data && p.lse.device != Device::cuda) return "lse must be in GPU memory";
    if (p.q.shape[1] > (int64_t(1) << 31) / 2) return "too many query rows for one call";
    return "";
  }

  void attend(const AttendProblem& p) const override {
    const std::string why = unsupported(p);
    check(why.empty(), "backend cuda: " + why);
    cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
    Scratch scratch(stream);
    AttendProblem a = p;
    a.q = scratch.aligned(p.q, true);
    for (KvSegment* s : {&a.core, &a.sink, &a.local}) {
      s->k = scratch.aligned(s->k, true);
      s->v = scratch.aligned(s->v, true);
    }
    a.out = scratch.aligned(p.out, false);
    if (decode_rows(a) <= DecodeTile::kMaxRows)
      launch_attend_decode(a, stream);
    else if (!launch_attend_wgmma(a, stream))
      launch_attend_tiles(a, stream);
    if (a.out.data != p.out.data) launch_copy_tensor(p.out, a.out, stream);
  }

  void pool(const PoolProblem& p) const override {
    const int64_t D = p.q.shape[3];
    std::string why = unsupported_dtype_dim(p.q.dtype, D);
    for (auto [t, name] : {std::pair{&p.q, "q"},
                           {&p.raw.k, "k"},
                           {&p.raw.v, "v"},
                           {&p.k_core, "k_core"},
                           {&p.v_core, "v_core"}})
      if (why.empty()) why = check_view(*t, name, p.q.dtype, D);
    check(why.empty(), "backend cuda: " + why);
    if (p.group_end <= p.group_begin) return;
    cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
    Scratch scratch(stream);
    PoolProblem a = p;
    a.q = scratch.aligned(p.q, true);
    a.raw.k = scratch.aligned(p.raw.k, true);
    a.raw.v = scratch.aligned(p.raw.v, true);
    a.k_core = scratch.aligned(p.k_core, false);
    a.v_core = scratch.aligned(p.v_core, false);
    launch_pool(a, stream);
    if (a.k_core.data != p.k_core.data) launch_copy_tensor(p.k_core, a.k_core, stream);
    if (a.v_core.data != p.v_core.data) launch_copy_tensor(p.v_core, a.v_core, stream);
  }

  void* alloc(int64_t bytes) const override {
    void* p = nullptr;
    CCA_CUDA_CHECK(cudaMalloc(&p, size_t(std::max<int64_t>(bytes, 1))));
    return p;
  }
  void free(void* ptr) const override {
    if (ptr) cudaFree(ptr);  // never throws from destructors' paths
  }
  // On the legacy default stream, which orders against blocking streams.
  void copy(void* dst, const void* src, int64_t bytes) const override {
    if (bytes > 0)
      CCA_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(bytes), cudaMemcpyDeviceToDevice, nullptr));
  }
  void copy_tensor(const TensorView& dst, const TensorView& src, void* stream) const override {
    launch_copy_tensor(dst, src, static_cast<cudaStream_t>(stream));
  }
};

}  // namespace

std::string unavailable_reason() {
  static const std::string reason = [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error so later calls start clean
      return std::string("no CUDA device: ") + cudaGetErrorString(err);
    }
    if (n == 0) return std::string("no CUDA device: cudaGetDeviceCount found none");
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
      return std::string("no CUDA device: cannot query device properties");
    if (major < 8)
      return "the CUDA device has compute capability " + std::to_string(major) + "." +
             std::to_string(minor) + "; the cuda backend needs 8.0 (Ampere) or newer";
    return std::string();
  }();
  return reason;
}

const Backend* backend() {
  static const CudaBackend instance;
  return unavailable_reason().empty() ? &instance : nullptr;
}

}  // namespace cca::cuda

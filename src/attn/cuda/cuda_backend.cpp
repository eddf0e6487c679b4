// The cuda backend: checks, layout normalisation and kernel choice; the kernels live in the
// .cu files beside this one. Work is queued on the problem's stream (cudaStream_t or null).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <string>
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
    for (void* p : ptrs_) scratch_free(p, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  // An aligned contiguous copy of `t` (copied in if `fill`); `t` itself when already aligned.
  TensorView aligned(const TensorView& t, bool fill) {
    if (!t.data || rows_aligned_16(t)) return t;
    void* p = scratch_alloc(t.numel() * dtype_size(t.dtype), stream_);
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

// "" if `t` is a [shape] view of `dtype` in GPU memory with a contiguous last dimension.
std::string check_tensor(const TensorView& t, const char* name, DType dtype,
                         std::initializer_list<int64_t> shape) {
  std::string want = "[";
  for (int64_t d : shape) want += (want.size() > 1 ? ", " : "") + std::to_string(d);
  want += "]";
  bool ok = t.data && t.ndim == int(shape.size()) && t.dtype == dtype &&
            t.stride[t.ndim - 1] == 1;
  int i = 0;
  for (int64_t d : shape) ok = ok && t.shape[i++] == d;
  if (!ok)
    return std::string(name) + " must be " + dtype_name(dtype) + " " + want +
           " with a contiguous last dimension, got " +
           (t.data ? std::string(dtype_name(t.dtype)) + " " + t.shape_string() : "none");
  if (t.device != Device::cuda) return std::string(name) + " must be in GPU memory";
  return "";
}

// `p` with every view the kernels read or write 16-byte aligned (scratch copies where not).
AttendProblem aligned(const AttendProblem& p, Scratch& scratch) {
  AttendProblem a = p;
  a.q = scratch.aligned(p.q, true);
  for (KvSegment* s : {&a.core, &a.sink, &a.local}) {
    s->k = scratch.aligned(s->k, true);
    s->v = scratch.aligned(s->v, true);
  }
  a.out = scratch.aligned(p.out, false);
  return a;
}

// The output of `a` into the caller's view, where aligned() gave the kernels a scratch copy.
void copy_out(const AttendProblem& p, const AttendProblem& a, cudaStream_t stream) {
  if (a.out.data != p.out.data) launch_copy_tensor(p.out, a.out, stream);
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
    check(!p.q_pos_device || decode_rows(p) <= DecodeTile::kMaxRows,
          "backend cuda: device-held query positions need a decode-sized problem");
    Scratch scratch(stream);
    const AttendProblem a = aligned(p, scratch);
    if (decode_rows(a) <= DecodeTile::kMaxRows)
      launch_attend_decode({a}, stream);
    else if (!launch_attend_wgmma(a, stream))
      launch_attend_tiles(a, stream);
    copy_out(p, a, stream);
  }

  // A decode step of several sequences (each its own lengths and cache) is one split-KV launch
  // when every problem is a decode-sized one on one stream with one dtype and head dim;
  // anything else runs problem by problem.
  void attend_batch(const std::vector<AttendProblem>& problems) const override {
    if (problems.empty()) return;
    const AttendProblem& p0 = problems.front();
    bool fused = true;
    for (const AttendProblem& p : problems) {
      const std::string why = unsupported(p);
      check(why.empty(), "backend cuda: " + why);
      fused = fused && decode_rows(p) <= DecodeTile::kMaxRows && p.stream == p0.stream &&
              p.q.dtype == p0.q.dtype && p.q.shape[3] == p0.q.shape[3];
    }
    if (!fused) return Backend::attend_batch(problems);
    cudaStream_t stream = static_cast<cudaStream_t>(p0.stream);
    Scratch scratch(stream);
    std::vector<AttendProblem> batch;
    for (const AttendProblem& p : problems) batch.push_back(aligned(p, scratch));
    launch_attend_decode(batch, stream);
    for (size_t i = 0; i < problems.size(); ++i) copy_out(problems[i], batch[i], stream);
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
    if (p.group_end <= p.group_begin && !p.pos_device) return;
    check(!p.pos_device || p.q.shape[1] == 1,
          "backend cuda: a device-positioned pool takes one query");
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

  // ---- backward: delta, then the dK/dV and dQ kernels, then the pooling backward -----------
  std::string unsupported_bwd(const AttendBwdProblem& p) const override {
    const int64_t D = p.q.shape[3];
    std::string why = unsupported_dtype_dim(p.q.dtype, D);
    for (auto [t, name] : {std::pair{&p.q, "q"},
                           {&p.k, "k"},
                           {&p.v, "v"},
                           {&p.out, "out"},
                           {&p.dout, "dout"}})
      if (why.empty())
        why = t->data ? check_view(*t, name, p.q.dtype, D) : std::string(name) + " is missing";
    for (auto [t, name] : {std::pair{&p.lse, "lse"}, {&p.delta, "delta"}})
      if (why.empty() && t->data && (t->device != Device::cuda || t->dtype != DType::f32))
        why = std::string(name) + " must be float32 in GPU memory";
    if (why.empty() && p.q.shape[1] >= (int64_t(1) << 30))
      why = "T = " + std::to_string(p.q.shape[1]) +
            " is too long for the backward kernels (at most 2^30 - 1 tokens)";
    if (why.empty() && core_tokens_needed(p.variant, p.q.shape[1]) > 0 &&
        p.variant.pool == PoolMode::cca) {
      const int64_t nh = p.variant.pool_heads == PoolHeads::query ? 1 : p.q.shape[2] / p.k.shape[2];
      const int64_t bytes = pool_bwd_smem_bytes(D, nh, p.variant.group, p.variant.pool);
      if (bytes > PoolBwdTile::kMaxSmemBytes)
        why = "the pooling backward keeps a group's " + std::to_string(p.variant.group) +
              " weights for " + std::to_string(nh) + " query heads in " +
              std::to_string(bytes / 1024) + " KB of shared memory, more than the " +
              std::to_string(PoolBwdTile::kMaxSmemBytes / 1024) + " KB it may use (reduce g)";
    }
    return why.empty() ? why : "backend cuda: " + why;
  }

  void attend_bwd_delta(const AttendBwdProblem& p) const override {
    std::string why = unsupported_bwd(p);
    if (why.empty())
      why = check_tensor(p.delta, "delta", DType::f32, {p.q.shape[0], p.q.shape[2], p.q.shape[1]});
    check(why.empty(), why);
    launch_attend_bwd_delta(p, static_cast<cudaStream_t>(p.stream));
  }

  void attend_bwd(const AttendBwdProblem& p) const override {
    std::string why = unsupported_bwd(p);
    const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
    const int64_t Hkv = p.k.shape[2], Hc = p.variant.core_heads(Hq, Hkv);
    const int64_t m = visible_keys(p.variant, T - 1).n_core;
    for (auto [t, name] : {std::pair{&p.lse, "lse"}, {&p.delta, "delta"}})
      if (why.empty()) why = check_tensor(*t, name, DType::f32, {B, Hq, T});
    if (why.empty()) why = check_tensor(p.dq, "dq", DType::f32, {B, T, Hq, D});
    if (why.empty()) why = check_tensor(p.dk, "dk", DType::f32, {B, T, Hkv, D});
    if (why.empty()) why = check_tensor(p.dv, "dv", DType::f32, {B, T, Hkv, D});
    if (m > 0) {
      for (auto [t, name] : {std::pair{&p.k_core, "k_core"}, {&p.v_core, "v_core"}})
        if (why.empty())
          why = t->data && t->ndim == 4 && t->shape[1] >= m
                    ? check_tensor(t->slice(1, 0, m), name, p.q.dtype, {B, m, Hc, D})
                    : std::string(name) + ": the queries need " + std::to_string(m) +
                          " core tokens";
      if (why.empty()) why = check_tensor(p.dk_core, "dk_core", DType::f32, {B, m, Hc, D});
      if (why.empty()) why = check_tensor(p.dv_core, "dv_core", DType::f32, {B, m, Hc, D});
    }
    check(why.empty(), "backend cuda: " + why);
    cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
    Scratch scratch(stream);
    AttendBwdProblem a = p;
    for (TensorView* t : {&a.q, &a.k, &a.v, &a.dout, &a.k_core, &a.v_core})
      *t = scratch.aligned(*t, true);
    launch_attend_bwd(a, m, stream);
  }

  void pool_bwd(const PoolBwdProblem& p) const override {
    const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
    const int64_t Hkv = p.k.shape[2], Hc = p.variant.core_heads(Hq, Hkv);
    const int64_t m = p.dk_core.shape[1];
    std::string why = unsupported_dtype_dim(p.q.dtype, D);
    for (auto [t, name] : {std::pair{&p.q, "q"}, {&p.k, "k"}, {&p.v, "v"}})
      if (why.empty()) why = check_view(*t, name, p.q.dtype, D);
    if (why.empty() && m * p.variant.group > T)
      why = std::to_string(m) + " groups of " + std::to_string(p.variant.group) +
            " need more than T = " + std::to_string(T) + " positions";
    if (why.empty()) why = check_tensor(p.dk_core, "dk_core", DType::f32, {B, m, Hc, D});
    if (why.empty()) why = check_tensor(p.dv_core, "dv_core", DType::f32, {B, m, Hc, D});
    if (why.empty()) why = check_tensor(p.dq, "dq", DType::f32, {B, T, Hq, D});
    if (why.empty()) why = check_tensor(p.dk, "dk", DType::f32, {B, T, Hkv, D});
    if (why.empty()) why = check_tensor(p.dv, "dv", DType::f32, {B, T, Hkv, D});
    check(why.empty(), "backend cuda: pool_bwd: " + why);
    launch_pool_bwd(p, static_cast<cudaStream_t>(p.stream));
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
  void copy_tensor_at(const TensorView& dst_store, int64_t pos0, const int32_t* pos_device,
                      const TensorView& src, void* stream) const override {
    launch_copy_tensor_at(dst_store, pos0, pos_device, src, static_cast<cudaStream_t>(stream));
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

namespace cca {

int64_t decode_workspace_bytes(int64_t sequences, int64_t hq, int64_t head_dim) {
  if (!cuda::unavailable_reason().empty()) return 0;
  return cuda::decode_workspace_bound(sequences, hq, head_dim);
}

}  // namespace cca

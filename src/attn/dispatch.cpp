// Backend registry, shape checks and the public entry points attn_fwd / attn_bwd / cca_pool.
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "backend.hpp"
#include "cca/error.hpp"
#include "workspace.hpp"

namespace cca {

const char* backend_name(BackendKind b) {
  switch (b) {
    case BackendKind::automatic: return "auto";
    case BackendKind::ref: return "ref";
    case BackendKind::cpu: return "cpu";
    case BackendKind::cuda: return "cuda";
  }
  return "?";
}

BackendKind parse_backend(const std::string& s) {
  for (auto b : {BackendKind::automatic, BackendKind::ref, BackendKind::cpu, BackendKind::cuda})
    if (s == backend_name(b)) return b;
  throw Error("unknown backend '" + s + "' (expected ref, cpu, cuda or auto)");
}

std::string backend_unavailable_reason(BackendKind b) {
  if (b != BackendKind::cuda) return "";
#ifdef CCA_WITH_CUDA
  return cuda::unavailable_reason();
#else
  return "this build has no CUDA backend (configured with -DCCA_CUDA=OFF, or nvcc was not found)";
#endif
}

std::vector<BackendKind> available_backends() {
  std::vector<BackendKind> r{BackendKind::ref, BackendKind::cpu};
  if (backend_unavailable_reason(BackendKind::cuda).empty()) r.push_back(BackendKind::cuda);
  return r;
}

const Backend& get_backend(BackendKind kind, Device data_device) {
  if (kind == BackendKind::automatic)
    kind = data_device == Device::cuda ? BackendKind::cuda : BackendKind::cpu;
  const Backend* b = nullptr;
  switch (kind) {
    case BackendKind::ref: b = &ref::backend(); break;
    case BackendKind::cpu: b = &cpu::backend(); break;
    case BackendKind::cuda: {
      std::string why = backend_unavailable_reason(BackendKind::cuda);
      check(why.empty(), "backend cuda unavailable: " + why);
#ifdef CCA_WITH_CUDA
      b = cuda::backend();
#endif
      break;
    }
    case BackendKind::automatic: break;
  }
  check(b != nullptr, std::string("backend ") + backend_name(kind) + " is not available");
  check(b->device() == data_device,
        std::string("backend ") + backend_name(kind) + " needs tensors in " +
            (b->device() == Device::cuda ? "GPU" : "host") + " memory");
  return *b;
}

void* Backend::alloc(int64_t bytes) const { return std::malloc(size_t(bytes > 0 ? bytes : 1)); }
void Backend::free(void* ptr) const { std::free(ptr); }
void Backend::copy(void* dst, const void* src, int64_t bytes) const {
  if (bytes > 0) std::memmove(dst, src, size_t(bytes));
}

void Backend::attend_batch(const std::vector<AttendProblem>& problems) const {
  for (const AttendProblem& p : problems) attend(p);
}

void Backend::copy_tensor_at(const TensorView&, int64_t, const int32_t*, const TensorView&,
                             void*) const {
  throw Error(std::string("backend ") + backend_name(kind()) +
              " has no device-positioned copies (CUDA-graph decode steps need the cuda backend)");
}

#ifndef CCA_WITH_CUDA
int64_t decode_workspace_bytes(int64_t, int64_t, int64_t) { return 0; }
#endif

void Backend::copy_tensor(const TensorView& dst, const TensorView& src, void*) const {
  const int64_t row_bytes = src.shape[3] * dtype_size(src.dtype);
  for (int64_t b = 0; b < src.shape[0]; ++b)
    for (int64_t t = 0; t < src.shape[1]; ++t)
      for (int64_t h = 0; h < src.shape[2]; ++h) {
        const int64_t od = dst.offset(b, t, h), os = src.offset(b, t, h);
        if (dst.dtype == src.dtype)
          std::memcpy(dst.ptr(od), src.ptr(os), size_t(row_bytes));
        else
          for (int64_t d = 0; d < src.shape[3]; ++d) dst.store(od + d, src.load(os + d));
      }
}

std::string Backend::unsupported_bwd(const AttendBwdProblem&) const {
  return std::string("the ") + backend_name(kind()) +
         " backend has no backward (attn_bwd runs on the ref, cpu and cuda backends)";
}
void Backend::attend_bwd_delta(const AttendBwdProblem& p) const { throw Error(unsupported_bwd(p)); }
void Backend::attend_bwd(const AttendBwdProblem& p) const { throw Error(unsupported_bwd(p)); }
void Backend::pool_bwd(const PoolBwdProblem& p) const {
  throw Error(unsupported_bwd(AttendBwdProblem{}));
}

static void check_4d(const TensorView& t, const char* name) {
  check(t.data != nullptr, std::string(name) + " is missing (null data)");
  check(t.ndim == 4, std::string(name) + " must have 4 dimensions [B, T, H, D], got shape " +
                         t.shape_string());
  for (int i = 0; i < 4; ++i)
    check(t.shape[i] >= 1, std::string(name) + " has an empty dimension: shape " + t.shape_string());
  check(t.stride[3] == 1, std::string(name) + " must be contiguous in its last dimension (D)");
}

void check_qkv(const TensorView& q, const TensorView& k, const TensorView& v) {
  check_4d(q, "q");
  check_4d(k, "k");
  check_4d(v, "v");
  auto dims = [](const TensorView& t) { return t.shape_string(); };
  check(k.shape[0] == q.shape[0] && v.shape[0] == q.shape[0],
        "batch mismatch: q " + dims(q) + ", k " + dims(k) + ", v " + dims(v));
  check(k.shape[1] == q.shape[1] && v.shape[1] == q.shape[1],
        "token count T mismatch: q " + dims(q) + ", k " + dims(k) + ", v " + dims(v));
  check(k.shape[2] == v.shape[2], "k and v head counts differ: k " + dims(k) + ", v " + dims(v));
  check(k.shape[3] == q.shape[3] && v.shape[3] == q.shape[3],
        "head dim D mismatch: q " + dims(q) + ", k " + dims(k) + ", v " + dims(v));
  std::ostringstream heads;
  heads << "Hq = " << q.shape[2] << " is not a multiple of Hkv = " << k.shape[2];
  check(q.shape[2] % k.shape[2] == 0, heads.str());
  check(q.dtype == k.dtype && q.dtype == v.dtype,
        std::string("dtype mismatch: q ") + dtype_name(q.dtype) + ", k " + dtype_name(k.dtype) +
            ", v " + dtype_name(v.dtype));
  check(q.device == k.device && q.device == v.device, "q, k and v must be on the same device");
}

void check_attn_out(const TensorView& q, const TensorView& out, const TensorView& lse) {
  check_4d(out, "out");
  for (int i = 0; i < 4; ++i)
    check(out.shape[i] == q.shape[i],
          "out shape " + out.shape_string() + " must equal q shape " + q.shape_string());
  check(out.dtype == q.dtype, std::string("out dtype ") + dtype_name(out.dtype) +
                                  " must equal q dtype " + dtype_name(q.dtype));
  check(out.device == q.device, "out must be on the same device as q");
  if (lse.data) {
    check(lse.ndim == 3 && lse.shape[0] == q.shape[0] && lse.shape[1] == q.shape[2] &&
              lse.shape[2] == q.shape[1],
          "lse shape " + lse.shape_string() + " must be [B, Hq, T] for q " + q.shape_string());
    check(lse.dtype == DType::f32, "lse must be float32");
    check(lse.device == q.device, "lse must be on the same device as q");
  }
}

int64_t core_tokens_needed(const VariantSpec& v, int64_t T) {
  return v.has_core() && T >= 1 ? visible_keys(v, T - 1).n_core : 0;
}

// Slices of one backend workspace, each 64-byte aligned.
class WorkspacePlan {
 public:
  // Reserves a contiguous tensor of 3 or 4 dimensions; returns its index for view().
  int add(DType dt, std::initializer_list<int64_t> shape) {
    Part pt{dt, shape, bytes_};
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    bytes_ += (n * dtype_size(dt) + 63) / 64 * 64;
    parts_.push_back(pt);
    return int(parts_.size()) - 1;
  }
  int64_t bytes() const { return bytes_; }
  // Part i inside a workspace of bytes() bytes at `base`.
  TensorView view(void* base, int i, Device dev) const {
    const Part& pt = parts_[size_t(i)];
    char* ptr = static_cast<char*>(base) + pt.offset;
    const std::vector<int64_t>& d = pt.shape;
    return d.size() == 3 ? make_view(ptr, pt.dt, {d[0], d[1], d[2]}, dev)
                         : make_view(ptr, pt.dt, {d[0], d[1], d[2], d[3]}, dev);
  }

 private:
  struct Part {
    DType dt;
    std::vector<int64_t> shape;
    int64_t offset;
  };
  std::vector<Part> parts_;
  int64_t bytes_ = 0;
};

// `t` has the shape of `like` (and its dtype where `same_dtype`) and lives on its device.
static void check_same_shape(const TensorView& t, const char* name, const TensorView& like,
                             const char* like_name, bool same_dtype) {
  check_4d(t, name);
  for (int i = 0; i < 4; ++i)
    check(t.shape[i] == like.shape[i], std::string(name) + " shape " + t.shape_string() +
                                           " must equal " + like_name + " shape " +
                                           like.shape_string());
  check(!same_dtype || t.dtype == like.dtype, std::string(name) + " dtype " + dtype_name(t.dtype) +
                                                  " must equal " + like_name + " dtype " +
                                                  dtype_name(like.dtype));
  check(t.device == like.device, std::string(name) + " must be on the same device as " + like_name);
}

// Core tokens of groups 0..m-1 (m = kc.shape[1]) of a prefill, as attn_fwd and attn_bwd use them.
static void pool_prefill(const Backend& be, const TensorView& q, const TensorView& k,
                         const TensorView& v, const VariantSpec& variant, float scale,
                         const RunOptions& run, const TensorView& kc, const TensorView& vc) {
  PoolProblem pp;
  pp.q = q;
  pp.raw = KvSegment{k, v, 0};
  pp.group_begin = 0;
  pp.group_end = kc.shape[1];
  pp.k_core = kc;
  pp.v_core = vc;
  pp.variant = variant;
  pp.scale = scale;
  pp.threads = run.threads;
  pp.stream = run.stream;
  be.pool(pp);
}

void attn_fwd(const AttnFwdParams& p) {
  p.variant.validate();
  check_qkv(p.q, p.k, p.v);
  check_attn_out(p.q, p.out, p.lse);
  const Backend& be = get_backend(p.run.backend, p.q.device);
  const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hc = p.variant.core_heads(Hq, p.k.shape[2]);

  AttendProblem a;
  a.q = p.q;
  a.sink = a.local = KvSegment{p.k, p.v, 0};
  a.out = p.out;
  a.lse = p.lse;
  a.variant = p.variant;
  a.scale = p.variant.scale_for(D);
  a.threads = p.run.threads;
  a.stream = p.run.stream;
  std::string why = be.unsupported(a);
  check(why.empty(), std::string("backend ") + backend_name(be.kind()) + ": " + why);

  // Core tokens live in a workspace of the input dtype, as the decode cache stores them.
  const int64_t m = core_tokens_needed(p.variant, T);
  WorkspacePlan plan;
  const int kc = plan.add(p.q.dtype, {B, m, Hc, D}), vc = plan.add(p.q.dtype, {B, m, Hc, D});
  Workspace ws(be, plan.bytes());
  if (m > 0) {
    a.core =
        KvSegment{plan.view(ws.data(), kc, p.q.device), plan.view(ws.data(), vc, p.q.device), 0};
    pool_prefill(be, p.q, p.k, p.v, p.variant, a.scale, p.run, a.core.k, a.core.v);
  }
  be.attend(a);
}

// Backward of the prefill: recompute the core tokens (pool, as attn_fwd did), delta =
// rowsum(dout * out), the attention backward into float32 gradients (dk_core/dv_core for the
// core tokens), the pooling backward from those into dq/dk/dv, then the 16-bit gradients from
// their float32 accumulators. Float32 gradients are accumulated in place.
void attn_bwd(const AttnBwdParams& p) {
  p.variant.validate();
  check_qkv(p.q, p.k, p.v);
  check(p.out.data != nullptr, "out is missing: attn_bwd needs the forward's output");
  check(p.lse.data != nullptr,
        "lse is missing: attn_bwd needs the forward's log-sum-exp (float32 [B, Hq, T])");
  check_attn_out(p.q, p.out, p.lse);
  check_same_shape(p.dout, "dout", p.q, "q", /*same_dtype=*/true);
  check_same_shape(p.dq, "dq", p.q, "q", false);
  check_same_shape(p.dk, "dk", p.k, "k", false);
  check_same_shape(p.dv, "dv", p.v, "v", false);
  const Backend& be = get_backend(p.run.backend, p.q.device);
  const int64_t B = p.q.shape[0], T = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hkv = p.k.shape[2], Hc = p.variant.core_heads(Hq, Hkv);
  const int64_t m = core_tokens_needed(p.variant, T);

  AttendBwdProblem a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.dout = p.dout;
  a.lse = p.lse;
  a.variant = p.variant;
  a.scale = p.variant.scale_for(D);
  a.threads = p.run.threads;
  a.stream = p.run.stream;
  a.deterministic = p.deterministic;
  const std::string why = be.unsupported_bwd(a);
  check(why.empty(), why);

  WorkspacePlan plan;
  const int kc = plan.add(p.q.dtype, {B, m, Hc, D}), vc = plan.add(p.q.dtype, {B, m, Hc, D});
  const int dkc = plan.add(DType::f32, {B, m, Hc, D}), dvc = plan.add(DType::f32, {B, m, Hc, D});
  const int delta = plan.add(DType::f32, {B, Hq, T});
  // Float32 accumulators: the caller's tensors where they are float32, else workspace.
  const TensorView* grads[3] = {&p.dq, &p.dk, &p.dv};
  int acc[3];
  for (int i = 0; i < 3; ++i) {
    const TensorView& g = *grads[i];
    acc[i] =
        g.dtype == DType::f32 ? -1 : plan.add(DType::f32, {g.shape[0], g.shape[1], g.shape[2], D});
  }
  Workspace ws(be, plan.bytes());
  const Device dev = p.q.device;
  if (m > 0) {
    a.k_core = plan.view(ws.data(), kc, dev);
    a.v_core = plan.view(ws.data(), vc, dev);
    a.dk_core = plan.view(ws.data(), dkc, dev);
    a.dv_core = plan.view(ws.data(), dvc, dev);
    pool_prefill(be, p.q, p.k, p.v, p.variant, a.scale, p.run, a.k_core, a.v_core);
  }
  a.delta = plan.view(ws.data(), delta, dev);
  TensorView* acc_views[3] = {&a.dq, &a.dk, &a.dv};
  for (int i = 0; i < 3; ++i)
    *acc_views[i] = acc[i] < 0 ? *grads[i] : plan.view(ws.data(), acc[i], dev);

  be.attend_bwd_delta(a);
  be.attend_bwd(a);
  if (m > 0) {
    PoolBwdProblem pb;
    pb.q = p.q;
    pb.k = p.k;
    pb.v = p.v;
    pb.dk_core = a.dk_core;
    pb.dv_core = a.dv_core;
    pb.dq = a.dq;
    pb.dk = a.dk;
    pb.dv = a.dv;
    pb.variant = p.variant;
    pb.scale = a.scale;
    pb.threads = a.threads;
    pb.stream = a.stream;
    pb.deterministic = a.deterministic;
    be.pool_bwd(pb);
  }
  for (int i = 0; i < 3; ++i)
    if (acc[i] >= 0) be.copy_tensor(*grads[i], *acc_views[i], p.run.stream);
}

void cca_pool(const PoolParams& p) {
  p.variant.validate();
  check(p.variant.has_core(), std::string("cca_pool needs the cca variant, got ") +
                                  variant_name(p.variant.kind));
  check_qkv(p.q, p.k, p.v);
  check_4d(p.k_core, "k_core");
  check_4d(p.v_core, "v_core");
  const int64_t B = p.q.shape[0], T = p.q.shape[1], D = p.q.shape[3];
  const int64_t Hc = p.variant.core_heads(p.q.shape[2], p.k.shape[2]), m = p.k_core.shape[1];
  std::ostringstream want;
  want << "[" << B << ", m <= " << T / p.variant.group << ", " << Hc << ", " << D << "]";
  for (const TensorView* c : {&p.k_core, &p.v_core}) {
    check(c->shape[0] == B && c->shape[1] == m && c->shape[2] == Hc && c->shape[3] == D &&
              m <= T / p.variant.group,
          "core tensor shape " + c->shape_string() + " must be " + want.str());
    check(c->dtype == p.q.dtype, "core tensors must have the dtype of q");
    check(c->device == p.q.device, "core tensors must be on the device of q");
  }
  const Backend& be = get_backend(p.run.backend, p.q.device);
  PoolProblem pp;
  pp.q = p.q;
  pp.raw = KvSegment{p.k, p.v, 0};
  pp.group_end = m;
  pp.k_core = p.k_core;
  pp.v_core = p.v_core;
  pp.variant = p.variant;
  pp.scale = p.variant.scale_for(D);
  pp.threads = p.run.threads;
  pp.stream = p.run.stream;
  be.pool(pp);
}

}  // namespace cca

// Backend registry, shape checks and the public entry points attn_fwd / cca_pool.
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
  return "this build has no CUDA backend (nvcc was not found when it was configured)";
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
      for (int64_t h = 0; h < src.shape[2]; ++h)
        std::memcpy(dst.ptr(dst.offset(b, t, h)), src.ptr(src.offset(b, t, h)), size_t(row_bytes));
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
  Workspace ws(be, 2 * B * m * Hc * D * dtype_size(p.q.dtype));
  if (m > 0) {
    char* base = static_cast<char*>(ws.data());
    TensorView kc = make_view(base, p.q.dtype, {B, m, Hc, D}, p.q.device);
    TensorView vc = kc;
    vc.data = base + B * m * Hc * D * dtype_size(p.q.dtype);
    PoolProblem pp;
    pp.q = p.q;
    pp.raw = a.local;
    pp.group_begin = 0;
    pp.group_end = m;
    pp.k_core = kc;
    pp.v_core = vc;
    pp.variant = p.variant;
    pp.scale = a.scale;
    pp.threads = a.threads;
    pp.stream = a.stream;
    be.pool(pp);
    a.core = KvSegment{kc, vc, 0};
  }
  be.attend(a);
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

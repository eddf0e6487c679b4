// The interface every backend implements. Two operations carry all the math:
//   attend: queries at consecutive absolute positions attend, in one softmax, over the keys the
//           variant policy lets them see, drawn from up to three key segments;
//   pool:   core tokens of a range of groups.
// Prefill, chunked prefill and decode are all built from these (dispatch.cpp, kv_cache.cpp), and
// the backward (attn_bwd) from their counterparts attend_bwd and pool_bwd.
#pragma once
#include <string>
#include <vector>

#include "cca/attention.hpp"
#include "policy.hpp"

namespace cca {

// Keys and values [B, n, H, D] whose row r holds absolute position pos0 + r (for the core
// segment: core token pos0 + r). H is Hkv, or Hq for core tokens pooled per query head.
struct KvSegment {
  TensorView k, v;
  int64_t pos0 = 0;
  int64_t rows() const { return k.data ? k.shape[1] : 0; }
  int64_t end() const { return pos0 + rows(); }
};

// q [B, n, Hq, D] at positions q_pos0 .. q_pos0+n-1. Query t sees (policy.hpp):
//   core tokens [0, n_core) from `core`, raw keys [0, sink_end) from `sink`,
//   raw keys [local_begin, t] from `local`.
// Each segment must hold the rows its queries need. out [B, n, Hq, D]; lse optional [B, Hq, n].
struct AttendProblem {
  TensorView q;
  int64_t q_pos0 = 0;
  KvSegment core, sink, local;
  TensorView out, lse;
  VariantSpec variant;
  float scale = 1.f;
  int threads = 0;
  void* stream = nullptr;
  // Decode steps replayed from a CUDA graph: the position of q's first row is read from this
  // device int32 when set (q_pos0 is then only the host's copy, used to plan the launch).
  const int32_t* q_pos_device = nullptr;
  void* workspace = nullptr;  // caller-owned decode scratch (RunOptions::workspace)
  int64_t workspace_bytes = 0;
};

// Pool groups [group_begin, group_end) into k_core/v_core rows 0 .. count-1.
// Group i's last query is q row (i+1)*g - 1 - q_pos0; its keys are raw rows of `raw`.
struct PoolProblem {
  TensorView q;
  int64_t q_pos0 = 0;
  KvSegment raw;
  int64_t group_begin = 0, group_end = 0;
  TensorView k_core, v_core;
  VariantSpec variant;
  float scale = 1.f;
  int threads = 0;
  void* stream = nullptr;
  // Device-positioned mode (one query, q_pos0 read from here on the device): the group that
  // this query completes, if any, is pooled into row (position + 1) / g - 1 of k_core/v_core,
  // which then view the whole core store; group_begin/group_end are ignored.
  const int32_t* pos_device = nullptr;
};

// Backward of a prefill's attend (attn_bwd): queries at positions 0..T-1 over the core tokens
// and the raw keys 0..T-1 (which serve as both sink and local segments), as in attn_fwd. With
// P = exp(scale q.key - lse) recomputed from the forward's LSE,
//   dV_key += P dO,   dP = dO . V_key,   dS = P (dP - delta),
//   dQ += scale dS K_key,   dK_key += scale dS Q,
// summed over every (query, visible key) pair; GQA sums the r query heads of a KV head (of a
// core head with pool_heads = kv). A FlashAttention-2/3-style kernel pair maps onto it: a
// dK/dV pass over key tiles and a dQ pass over query tiles, both reading lse and delta.
struct AttendBwdProblem {
  TensorView q;               // [B, T, Hq, D], the forward's queries
  TensorView k, v;            // [B, T, Hkv, D], the forward's raw keys and values
  TensorView k_core, v_core;  // [B, m, Hc, D] core tokens as the forward pooled them (input
                              // dtype); empty when m = 0
  TensorView out, dout;       // [B, T, Hq, D], the forward's output and its gradient
  TensorView lse;             // [B, Hq, T] float32, the forward's LSE
  TensorView delta;           // [B, Hq, T] float32: rowsum(dout * out), see attend_bwd_delta
  // Float32 outputs, overwritten (every element): dq [B, T, Hq, D], dk/dv [B, T, Hkv, D] (raw
  // keys), dk_core/dv_core [B, m, Hc, D]. Any strides with a contiguous last dimension.
  TensorView dq, dk, dv, dk_core, dv_core;
  VariantSpec variant;
  float scale = 1.f;
  int threads = 0;
  void* stream = nullptr;
  bool deterministic = false;  // no floating-point atomics (ref and cpu always are)
};

// Backward of pooling groups 0..m-1 (m = dk_core.shape[1]), as attn_fwd pooled them from q, k,
// v: adds the gradients of the core tokens, dk_core/dv_core (float32 [B, m, Hc, D]), into the
// float32 accumulators dk, dv (rows 0 .. m*g-1) and, for pool = cca, dq (each group's last row):
//   cca:  Kc = sum_n w_n K_n, w = mean over the pooling heads of softmax(scale q_last . K_n);
//         dK_n += w_n dKc, dV_n += w_n dVc, and dw_n = dKc.K_n + dVc.V_n flows through each
//         head's softmax (dz = p (dw/nh - sum p dw/nh)) into dK_n += scale dz q_last and
//         dq_last += scale sum_n dz_n K_n. The weights are recomputed from q and k.
//   mean: dK_n += dKc / g, dV_n += dVc / g.
//   max:  each element's gradient goes to the group's first position holding the maximum.
// pool_heads = query: the r core heads of a KV head each add their share into its keys.
struct PoolBwdProblem {
  TensorView q, k, v;           // the forward's inputs
  TensorView dk_core, dv_core;  // float32 [B, m, Hc, D]
  TensorView dq, dk, dv;        // float32 accumulators shaped as q, k, v: added to
  VariantSpec variant;
  float scale = 1.f;
  int threads = 0;
  void* stream = nullptr;
  bool deterministic = false;
};

// One append of Backend::copy_tensor_at.
struct CopyAt {
  TensorView dst_store;
  int64_t pos0 = 0;
  const int32_t* pos_device = nullptr;
  TensorView src;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual BackendKind kind() const = 0;
  // Where its tensors live.
  virtual Device device() const { return Device::cpu; }
  // "" if it can run `p`, else the reason.
  virtual std::string unsupported(const AttendProblem&) const { return ""; }
  virtual void attend(const AttendProblem& p) const = 0;
  // Several independent problems, e.g. one decode step of sequences at different lengths, each
  // from its own cache. The default runs them one by one; a backend may fuse them into one launch.
  virtual void attend_batch(const std::vector<AttendProblem>& problems) const;
  virtual void pool(const PoolProblem& p) const = 0;
  // Backward (attn_bwd runs them in this order, see dispatch.cpp): "" if the backend runs `p`,
  // else the reason (the default: it has no backward); delta = rowsum(dout * out); the
  // attention backward; the pooling backward.
  virtual std::string unsupported_bwd(const AttendBwdProblem& p) const;
  virtual void attend_bwd_delta(const AttendBwdProblem& p) const;
  virtual void attend_bwd(const AttendBwdProblem& p) const;
  virtual void pool_bwd(const PoolBwdProblem& p) const;
  // Device memory helpers for backends whose tensors do not live on the host.
  virtual void* alloc(int64_t bytes) const;
  virtual void free(void* ptr) const;
  virtual void copy(void* dst, const void* src, int64_t bytes) const;  // same-device copy
  // dst = src for two [B, n, H, D] views of the same shape on this backend's device, ordered on
  // `stream` (a cudaStream_t for the cuda backend; ignored on the host). Host backends also
  // convert between dtypes (attn_bwd's float32 accumulators into 16-bit gradients).
  virtual void copy_tensor(const TensorView& dst, const TensorView& src, void* stream) const;
  // Each copy's dst_store rows (position - pos0) .. = its src [B, n, H, D], with `position` read
  // on the device from `pos_device`: a decode step's appends of the new keys and values of all
  // its sequences, in one launch (cuda only).
  virtual void copy_tensor_at(const std::vector<CopyAt>& copies, void* stream) const;
  // Several pools on one stream (a decode step's device-positioned pools of all its sequences).
  // The default runs them one by one; a backend may fuse them into one launch.
  virtual void pool_batch(const std::vector<PoolProblem>& problems) const;
};

// The backend to run; throws cca::Error if it is not compiled in or cannot run here.
const Backend& get_backend(BackendKind kind, Device data_device);

namespace ref { const Backend& backend(); }
namespace cpu { const Backend& backend(); }
#ifdef CCA_WITH_CUDA
namespace cuda {
const Backend* backend();  // nullptr when no GPU is usable
std::string unavailable_reason();
}  // namespace cuda
#endif

// Shape checks shared by every entry point; throw cca::Error naming the tensor and dimension.
void check_qkv(const TensorView& q, const TensorView& k, const TensorView& v);
void check_attn_out(const TensorView& q, const TensorView& out, const TensorView& lse);

}  // namespace cca

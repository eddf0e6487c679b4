// Attention entry points: prefill forward, core-token pooling. All shapes are [B, T, H, D].
#pragma once
#include <string>
#include <vector>

#include "cca/tensor.hpp"
#include "cca/variant.hpp"

namespace cca {

enum class BackendKind : uint8_t { automatic, ref, cpu, cuda };
const char* backend_name(BackendKind b);
BackendKind parse_backend(const std::string& s);
// Backends compiled into this build and usable on this machine (cuda needs a GPU).
std::vector<BackendKind> available_backends();
// Why `b` cannot run here, or "" if it can.
std::string backend_unavailable_reason(BackendKind b);

// Told the phases of a call as they are queued (KvCache appends: "kv copy", "pool", "attend"),
// so that a profiler can time them; begin/end pairs nest. ops::Profile implements it.
class PhaseTimer {
 public:
  virtual ~PhaseTimer() = default;
  virtual void begin(const char* phase) = 0;
  virtual void end() = 0;
};

struct RunOptions {
  BackendKind backend = BackendKind::automatic;  // automatic: cuda for device tensors, else cpu
  int threads = 0;                               // CPU threads; 0 = all
  void* stream = nullptr;                        // cudaStream_t for the cuda backend
  // Caller-owned device scratch for the split-KV decode kernel's partial results (see
  // decode_workspace_bytes); without it (or when too small) the backend takes scratch from its
  // stream-ordered pool.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  PhaseTimer* timer = nullptr;  // optional, for breakdowns (nothing is timed without it)
};

// Bytes of workspace that a decode step of `sequences` sequences (one token each, Hq query
// heads of head_dim D, any lengths) needs at most on the cuda backend: the split-KV partial
// outputs. 0 where the cuda backend is not built.
int64_t decode_workspace_bytes(int64_t sequences, int64_t hq, int64_t head_dim);

// Prefill: O[B,T,Hq,D] = attention of Q[B,T,Hq,D] over K,V[B,T,Hkv,D] under `variant`
// (for cca: pooling of the m = max(0, (T-s)/g) core tokens, then one softmax over core + local).
// `lse` (optional; empty view = not wanted) is float32 [B, Hq, T], natural log of scaled logits.
struct AttnFwdParams {
  TensorView q, k, v, out, lse;
  VariantSpec variant;
  RunOptions run;
};
void attn_fwd(const AttnFwdParams& p);

// Backward of attn_fwd (docs/semantics.md, Gradients): from the forward's inputs q, k, v, its
// output `out` and log-sum-exp `lse` (float32 [B, Hq, T], as attn_fwd wrote it) and the gradient
// `dout` of the output, writes dq, dk, dv (the shapes of q, k, v; any float dtype). For cca the
// gradient flows through the core tokens into the pooled groups' keys and values and, with
// pool = cca, through the pooling softmax into those keys and each group's last query.
// `deterministic`: the same inputs give bit-identical gradients (no floating-point atomics).
struct AttnBwdParams {
  TensorView q, k, v, out, lse, dout;
  TensorView dq, dk, dv;
  VariantSpec variant;
  RunOptions run;
  bool deterministic = false;
};
void attn_bwd(const AttnBwdParams& p);

// Core tokens: for groups 0..m-1 with m = k_core.shape[1] (at most T/g), pooled as the
// variant's pool and pool_heads say. k_core/v_core are [B, m, Hc, D], Hc = Hkv or Hq.
struct PoolParams {
  TensorView q, k, v, k_core, v_core;
  VariantSpec variant;
  RunOptions run;
};
void cca_pool(const PoolParams& p);

// Number of core tokens a prefill of T tokens needs: max(0, floor((T - s) / g)), 0 without core.
int64_t core_tokens_needed(const VariantSpec& v, int64_t T);

}  // namespace cca

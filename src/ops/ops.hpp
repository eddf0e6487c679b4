// The non-attention operations of a Llama-family layer, as named ops over tensor views and an
// explicit execution context. Each op dispatches on the context's device: ops/cpu (float32,
// OpenBLAS + OpenMP; the oracle) or ops/cuda (cuBLASLt GEMMs in bf16/f16 with float32
// accumulation, fused kernels for the rest). Views are 2-D [rows, cols] with a contiguous last
// dimension and any row stride (stride[0]); all live in the context's device memory, as do the
// int32 arrays (token ids, positions, row indices). Every op is queued on the context's stream
// and returns without synchronising; none allocates.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "cca/tensor.hpp"
#include "ops/profile.hpp"
#include "ops/sample_math.hpp"

namespace cca::ops {

// Where ops run, and what they run with. Move-only; owns its CUDA stream, cuBLASLt handle and
// GEMM workspace.
class Context {
 public:
  // Host ops on `threads` OpenMP threads (0 = OMP_NUM_THREADS, else all cores).
  static Context cpu(int threads);
  // Ops on the current CUDA device, on a stream of their own. Throws cca::Error saying why when
  // this build has no CUDA backend or no GPU is usable.
  static Context cuda();

  Context(Context&&) noexcept;
  Context& operator=(Context&&) noexcept;
  ~Context();

  Device device() const { return device_; }
  int threads() const { return threads_; }  // cpu: the OpenMP team size in use
  void* stream() const { return stream_; }  // cudaStream_t (nullptr on the cpu)
  void* blas() const { return blas_; }      // cublasLtHandle_t (nullptr on the cpu)
  void* gemm_workspace() const { return workspace_; }
  int64_t gemm_workspace_bytes() const { return workspace_bytes_; }

  // Memory on the context's device (host memory for the cpu). alloc throws cca::Error naming the
  // size and what is free when it fails.
  void* alloc(int64_t bytes, const char* what) const;
  void free(void* ptr) const;
  // Host -> device, ordered on the stream; `src` must stay valid until the next synchronize().
  void upload(void* dst, const void* src, int64_t bytes) const;
  // Device -> host; waits for the stream.
  void download(void* dst, const void* src, int64_t bytes) const;
  void synchronize() const;

  // Page-locked host memory (plain host memory on the cpu): staging for transfers that a CUDA
  // graph replays from fixed addresses.
  void* alloc_host(int64_t bytes, const char* what) const;
  void free_host(void* ptr) const;
  // Device -> host ordered on the stream, not waited for (dst from alloc_host; synchronize()
  // before reading it).
  void download_async(void* dst, const void* src, int64_t bytes) const;

  // CUDA graphs (cuda only): the work queued on the stream between begin_capture() and
  // end_capture() becomes an executable graph (an opaque handle) that launch_graph() replays on
  // the stream; abort_capture() ends a failed capture; destroy_graph() frees a graph.
  void begin_capture() const;
  void* end_capture() const;
  void abort_capture() const noexcept;
  void launch_graph(void* graph) const;
  static void destroy_graph(void* graph) noexcept;

  // Free and total bytes of the device's memory (the host's available and total memory on the
  // cpu).
  void memory_info(int64_t* free_bytes, int64_t* total_bytes) const;
  // A name for messages: "cpu (2 threads)", "cuda: NVIDIA H200 (sm_90)".
  std::string describe() const;

  // Timing of the work queued on this context, by named region (off until enabled).
  Profile& profile() const { return *profile_; }

 private:
  friend struct ContextFactory;  // the cpu and cuda factories (ops/cpu, ops/cuda)
  Context() = default;
  void release() noexcept;
  Device device_ = Device::cpu;
  int threads_ = 1;
  void* stream_ = nullptr;
  void* blas_ = nullptr;
  void* workspace_ = nullptr;
  int64_t workspace_bytes_ = 0;
  std::unique_ptr<Profile> profile_;
};

// One weight matrix W [out, in] (as Hugging Face stores it) and an optional bias b [out].
struct LinearPart {
  TensorView w;
  TensorView b;  // empty: no bias
};

// y [n, sum(out_i)] = x [n, in] W_i^T + b_i, the parts' outputs side by side in y's first
// columns; with `accumulate`, y += instead (the residual add). cpu: all float32. cuda: x and W of
// one 16-bit dtype; y that dtype, or float32 (logits, the float32 residual stream); a bias of a
// 16-bit y has y's dtype. cuBLASLt rounds x W^T to a 16-bit y before adding the bias or the old
// y, so such a y may be rounded twice.
void linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
            const TensorView& y, bool accumulate = false);

// linear, with its GEMM algorithms chosen by timing where that pays (GPU, GEMMs of 1024 rows and
// more: cuBLASLt's candidates, a few hundred milliseconds per shape, once per process); later
// calls of linear with the same views use that choice. linear itself never times anything.
void tune_linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
                 const TensorView& y, bool accumulate = false);

// out [n, H] = x * rsqrt(mean(x^2) + eps) * w, in float32, rounded once to out's dtype.
// x float32 [n, H], w [H] (the weights' dtype).
void rms_norm(const Context& ctx, const TensorView& x, const TensorView& w, float eps,
              const TensorView& out);

// Rotary embedding in place on x [n, heads * D] (the first heads*D columns of each row;
// D = 2 * inv_freq's length): row r is at position positions[r]; angle = pos * inv_freq in
// float32, element i rotates with element i + D/2 (Hugging Face's rotate_half). inv_freq float32.
void rope(const Context& ctx, const TensorView& x, int64_t heads, const int32_t* positions,
          const TensorView& inv_freq);

// out [n, I] = silu(gate) * up, all [n, I] views of one dtype (gate and up may be column slices
// of one [n, 2I] buffer; out may be gate itself).
void swiglu(const Context& ctx, const TensorView& gate, const TensorView& up,
            const TensorView& out);

// out [n, H] (float32) = table [V, H] rows ids[0..n); ids must be in [0, V) (checked by the
// caller, on the host).
void embed(const Context& ctx, const int32_t* ids, const TensorView& table, const TensorView& out);

// dst [m, C] = src rows rows[0..m) (same dtype).
void gather_rows(const Context& ctx, const TensorView& src, const int32_t* rows,
                 const TensorView& dst);

// out[r] = index of the largest value of logits row r (float32 [m, V]): the lowest index among
// equals, as torch.argmax; unlike torch, NaN counts as smaller than every number (0 for a row of
// NaN).
void argmax_rows(const Context& ctx, const TensorView& logits, int32_t* out);

// out[r] = a token drawn from row r of float32 logits [m, V] with params[r] (sample_math.hpp):
// z = logits / temperature; keep the top_k largest z (0: all; ties at the k-th value all kept),
// then the smallest set of the largest with probability mass >= top_p of what is kept (ties
// likewise); draw u = uniform01(seed, counters[r]) and take, in index order, the first kept token
// whose cumulative probability exceeds u (top_k = 1 is greedy). `params` and `counters` (the
// position of the token being continued: a (seed, position) pair always draws the same u) live
// in the context's device memory.
void sample_rows(const Context& ctx, const TensorView& logits, const SampleParams* params,
                 const int32_t* counters, int32_t* out);

// dst = src elementwise with dtype conversion, two [n, C] views.
void convert(const Context& ctx, const TensorView& src, const TensorView& dst);

// A 2-D view [rows, cols] over `data` with row stride `ld` (elements).
TensorView matrix(void* data, DType dtype, int64_t rows, int64_t cols, int64_t ld, Device device);

}  // namespace cca::ops

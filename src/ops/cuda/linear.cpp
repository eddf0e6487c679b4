// linear on the GPU: one cuBLASLt GEMM per part (a matrix-vector kernel for a few rows, gemv.cu),
// bf16/f16 inputs, float32 accumulation and scale, bf16/f16/float32 output, the bias fused as an
// epilogue where cuBLASLt can.
//
// Row-major y [n, out] = x [n, in] W [out, in]^T is, in cuBLASLt's column-major terms,
// D [out, n] = op_T(A) B with A = W (column-major [in, out], ld = W's row stride), B = x
// (column-major [in, n], ld = x's row stride) and D = y's columns [c0, c0 + out) (ld = y's row
// stride). accumulate: beta = 1 with C = D.
//
// Each distinct GEMM (shapes, leading dimensions, dtypes, pointer alignments, accumulate, bias)
// is planned once: descriptors, layouts and the algorithm go into a process-wide cache, so
// repeated calls make no heuristic query. tune_linear (the engine's warm-up) times the heuristic's
// candidates for a GEMM of at least kTuneMinRows rows and keeps the fastest (a few hundred
// milliseconds, once per process and shape); linear alone takes the heuristic's first choice for
// a shape it has not seen tuned, so no request pays for timing.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "attn/cuda/cuda_check.hpp"
#include "ops/cuda/checks.hpp"
#include "ops/cuda/kernels.hpp"
#include "ops/impl.hpp"

namespace cca::ops::cuda {
namespace {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::f32: return CUDA_R_32F;
    case DType::f16: return CUDA_R_16F;
    case DType::bf16: return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

// The largest power of two (at most 256, cuBLASLt's default requirement) dividing the address.
// False when the environment variable `name` is "1": the switches of A/B runs (docs/perf.md).
bool env_flag_off(const char* name) {
  const char* v = std::getenv(name);
  return !(v && std::string(v) == "1");
}

uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t r = 256;
  while (r > 1 && a % r != 0) r /= 2;
  return r;
}

// A leading dimension cuBLASLt accepts: a single row may have any stride, but ld >= its length.
int64_t ld_of(const TensorView& v) {
  return v.shape[0] <= 1 ? std::max(v.stride[0], v.shape[1]) : v.stride[0];
}

struct GemmKey {
  int device;
  int64_t n, out, in, lda, ldb, ldd;
  DType ab, d;
  bool accumulate, bias;  // bias: the epilogue is asked for
  uint32_t align_a, align_b, align_d, align_bias;
  int64_t workspace_bytes;
  auto operator<=>(const GemmKey&) const = default;
};

// One planned GEMM. bias_epilogue is false when the key asked for a bias but cuBLASLt found no
// algorithm with the epilogue: the caller then adds the bias with a kernel.
struct Gemm {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  std::vector<cublasLtMatmulAlgo_t> candidates;  // the heuristic's, best first
  bool bias_epilogue = false;
  bool tuned = false;  // algo is the fastest candidate, timed (tune())

  Gemm() = default;
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  ~Gemm() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

std::string describe(const GemmKey& k) {
  return "x [" + std::to_string(k.n) + ", " + std::to_string(k.in) + "] (" + dtype_name(k.ab) +
         ", ld " + std::to_string(k.ldb) + ") times W [" + std::to_string(k.out) + ", " +
         std::to_string(k.in) + "]^T (ld " + std::to_string(k.lda) + ") into y (" +
         dtype_name(k.d) + ", ld " + std::to_string(k.ldd) + ")";
}

void check_blas(cublasStatus_t st, const char* call, const GemmKey& k) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("linear: ") + call + " failed (" + cublasLtGetStatusName(st) + ": " +
                cublasLtGetStatusString(st) + ") for " + describe(k));
}

template <typename T>
void set_attr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value,
              const GemmKey& k) {
  check_blas(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)),
             "cublasLtMatmulDescSetAttribute", k);
}

// Descriptors and layouts for `k` (with the bias epilogue if `epilogue`), and the heuristic's
// best algorithm; nullptr when the heuristic offers none.
std::unique_ptr<Gemm> plan(const GemmKey& k, bool epilogue, const void* bias,
                           cublasLtHandle_t handle) {
  auto g = std::make_unique<Gemm>();
  check_blas(cublasLtMatmulDescCreate(&g->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
             "cublasLtMatmulDescCreate", k);
  set_attr(g->desc, CUBLASLT_MATMUL_DESC_TRANSA, cublasOperation_t(CUBLAS_OP_T), k);
  set_attr(g->desc, CUBLASLT_MATMUL_DESC_TRANSB, cublasOperation_t(CUBLAS_OP_N), k);
  if (epilogue) {
    set_attr(g->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, cublasLtEpilogue_t(CUBLASLT_EPILOGUE_BIAS), k);
    // The heuristic reads the pointer's alignment; the bias dtype defaults to D's.
    set_attr(g->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, k);
  }
  const char* layout_call = "cublasLtMatrixLayoutCreate";
  check_blas(cublasLtMatrixLayoutCreate(&g->a, cuda_type(k.ab), uint64_t(k.in), uint64_t(k.out),
                                        k.lda),
             layout_call, k);
  check_blas(cublasLtMatrixLayoutCreate(&g->b, cuda_type(k.ab), uint64_t(k.in), uint64_t(k.n),
                                        k.ldb),
             layout_call, k);
  check_blas(cublasLtMatrixLayoutCreate(&g->d, cuda_type(k.d), uint64_t(k.out), uint64_t(k.n),
                                        k.ldd),
             layout_call, k);

  cublasLtMatmulPreference_t pref = nullptr;
  check_blas(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate", k);
  std::unique_ptr<void, void (*)(void*)> pref_guard(pref, [](void* p) {
    cublasLtMatmulPreferenceDestroy(static_cast<cublasLtMatmulPreference_t>(p));
  });
  auto set_pref = [&](cublasLtMatmulPreferenceAttributes_t attr, auto value) {
    check_blas(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)),
               "cublasLtMatmulPreferenceSetAttribute", k);
  };
  set_pref(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t(k.workspace_bytes));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, k.align_a);
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, k.align_b);
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, k.align_d);  // C is D
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, k.align_d);
  // Split-K partial sums reduced in float32 only, never in a 16-bit D's dtype (the default also
  // allows that, and in-place reduction in D).
  set_pref(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
           uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE));

  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
      handle, g->desc, g->a, g->b, g->d, g->d, pref, kCandidates, results, &found);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || (st == CUBLAS_STATUS_SUCCESS && found == 0))
    return nullptr;
  check_blas(st, "cublasLtMatmulAlgoGetHeuristic", k);
  g->algo = results[0].algo;
  g->bias_epilogue = epilogue;
  for (int i = 0; i < found; ++i)
    if (results[i].state == CUBLAS_STATUS_SUCCESS) g->candidates.push_back(results[i].algo);
  return g;
}

// The heuristic's first choice is often not the fastest on large GEMMs (on an H200 it ran the
// Llama-3-8B q|k|v projection of an 8192-token chunk 1.4x slower than torch.matmul did). For
// those, the candidates are timed once, on the call's own operands, into a scratch output
// (never into y, which an accumulating GEMM reads), and the fastest is kept.
constexpr int64_t kTuneMinRows = 1024;

void tune(Gemm& g, const GemmKey& k, const void* w, const void* x, const void* bias,
          cublasLtHandle_t handle, void* workspace, cudaStream_t stream) {
  g.tuned = true;  // tried once, whatever happens below
  if (g.candidates.size() < 2 || k.n < kTuneMinRows || !env_flag_off("CCA_NO_GEMM_TUNING"))
    return;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess ||
      capturing != cudaStreamCaptureStatusNone)
    return;  // no synchronisation inside a graph capture: the heuristic's choice stands
  void* scratch = nullptr;
  if (cudaMallocAsync(&scratch, size_t(k.ldd * k.n * dtype_size(k.d)), stream) != cudaSuccess) {
    cudaGetLastError();
    return;  // no room to time them: the heuristic's choice stands
  }
  if (g.bias_epilogue) set_attr(g.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, k);
  cudaEvent_t ev[2];
  CCA_CUDA_CHECK(cudaEventCreate(&ev[0]));
  CCA_CUDA_CHECK(cudaEventCreate(&ev[1]));
  const float alpha = 1.f, beta = 0.f;
  auto run = [&](const cublasLtMatmulAlgo_t& algo) {
    return cublasLtMatmul(handle, g.desc, &alpha, w, g.a, x, g.b, &beta, scratch, g.d, scratch,
                          g.d, &algo, workspace, size_t(k.workspace_bytes), stream);
  };
  // Milliseconds per run of `algo` over `reps` runs (< 0 when it fails).
  auto time = [&](const cublasLtMatmulAlgo_t& algo, int reps) {
    CCA_CUDA_CHECK(cudaEventRecord(ev[0], stream));
    for (int r = 0; r < reps; ++r)
      if (run(algo) != CUBLAS_STATUS_SUCCESS) return -1.f;
    CCA_CUDA_CHECK(cudaEventRecord(ev[1], stream));
    CCA_CUDA_CHECK(cudaEventSynchronize(ev[1]));
    float ms = 0.f;
    CCA_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
    return ms / float(reps);
  };
  // Clocks ramp up under load: ~30 ms of the first candidate before anything counts, then two
  // rounds over the candidates, each keeping its faster round.
  const float first = time(g.candidates[0], 1);
  if (first > 0.f) time(g.candidates[0], std::clamp(int(30.f / first), 2, 200));
  std::vector<float> best(g.candidates.size(), -1.f);
  for (int round = 0; round < 2; ++round)
    for (size_t i = 0; i < g.candidates.size(); ++i) {
      if (round > 0 && best[i] < 0.f) continue;  // failed in the first round
      const float ms = time(g.candidates[i], 3);
      if (ms > 0.f && (best[i] < 0.f || ms < best[i])) best[i] = ms;
    }
  size_t pick = 0;
  for (size_t i = 1; i < best.size(); ++i)
    if (best[i] > 0.f && (best[pick] < 0.f || best[i] < best[pick])) pick = i;
  if (best[pick] > 0.f) g.algo = g.candidates[pick];
  cudaEventDestroy(ev[0]);
  cudaEventDestroy(ev[1]);
  CCA_CUDA_CHECK(cudaFreeAsync(scratch, stream));
}

// The plan cache. The mutex also covers the use of a plan (its bias pointer is set per call), a
// few microseconds of host work per GEMM.
std::mutex cache_mutex;
std::map<GemmKey, std::unique_ptr<Gemm>> cache;
constexpr size_t kMaxPlans = 4096;  // distinct shapes are few; a flood (many n) starts over

// The plan of `k`, made on first use; with `tuning`, its algorithm timed (once) as well.
Gemm& plan_for(const GemmKey& k, const void* w, const void* x, const void* bias,
               cublasLtHandle_t handle, void* workspace, cudaStream_t stream, bool tuning) {
  auto it = cache.find(k);
  if (it != cache.end()) {
    if (tuning && !it->second->tuned) tune(*it->second, k, w, x, bias, handle, workspace, stream);
    return *it->second;
  }
  std::unique_ptr<Gemm> g = plan(k, k.bias, bias, handle);
  if (!g && k.bias) g = plan(k, false, nullptr, handle);  // epilogue refused: bias by kernel
  if (!g)
    throw Error("linear: cuBLASLt offers no algorithm (workspace " +
                std::to_string(k.workspace_bytes) + " bytes, alignments A " +
                std::to_string(k.align_a) + ", B " + std::to_string(k.align_b) + ", D " +
                std::to_string(k.align_d) + " bytes) for " + describe(k));
  if (tuning) tune(*g, k, w, x, bias, handle, workspace, stream);
  if (cache.size() >= kMaxPlans) cache.clear();
  return *cache.emplace(k, std::move(g)).first->second;
}

// The matrix-vector kernel for a few rows (gemv.cu) unless CCA_NO_GEMV=1 (for A/B runs).
bool use_gemv() {
  static const bool on = env_flag_off("CCA_NO_GEMV");
  return on;
}

void check_args(const TensorView& x, std::span<const LinearPart> parts, const TensorView& y) {
  const char* op = "linear";
  check_matrix(x, op, "x");
  check_matrix(y, op, "y");
  check(x.dtype == DType::bf16 || x.dtype == DType::f16,
        std::string("linear: x must be bfloat16 or float16 on the GPU, got ") +
            dtype_name(x.dtype));
  check(y.dtype == x.dtype || y.dtype == DType::f32,
        std::string("linear: y must be ") + dtype_name(x.dtype) + " (x's dtype) or float32, got " +
            dtype_name(y.dtype));
  check(x.shape[1] >= 1, "linear: x has no columns (in = 0)");
  check(y.shape[0] == x.shape[0], "linear: y has " + std::to_string(y.shape[0]) +
                                      " rows, x has " + std::to_string(x.shape[0]));
  check(!parts.empty(), "linear: no weight parts");
  int64_t cols = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string part = "parts[" + std::to_string(i) + "]", w = part + ".w", b = part + ".b";
    const TensorView& pw = parts[i].w;
    check_matrix(pw, op, w.c_str());
    check_dtype(pw, x.dtype, op, w.c_str());
    check(pw.shape[1] == x.shape[1], "linear: " + w + " shape " + pw.shape_string() +
                                         " does not take x's " + std::to_string(x.shape[1]) +
                                         " columns");
    if (!parts[i].b.empty()) {
      check_vector(parts[i].b, pw.shape[0], op, b.c_str());
      if (y.dtype != DType::f32) check_dtype(parts[i].b, y.dtype, op, b.c_str());
    }
    cols += pw.shape[0];
  }
  check(cols <= y.shape[1], "linear: the parts give " + std::to_string(cols) +
                                " output columns, y has only " + std::to_string(y.shape[1]));
}

}  // namespace

namespace {
void run_linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
                const TensorView& y, bool accumulate, bool tuning) {
  check_args(x, parts, y);
  const int64_t n = x.shape[0];
  if (n == 0) return;
  int device = 0;
  CCA_CUDA_CHECK(cudaGetDevice(&device));
  const auto handle = static_cast<cublasLtHandle_t>(ctx.blas());
  const auto stream = static_cast<cudaStream_t>(ctx.stream());
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  int64_t c0 = 0;
  for (const LinearPart& part : parts) {
    const int64_t out = part.w.shape[0];
    TensorView yi = y.slice(1, c0, out);  // y's columns [c0, c0 + out)
    c0 += out;
    if (out == 0) continue;
    const bool has_bias = !part.b.empty();
    if (use_gemv() && launch_gemv(x, part.w, part.b.data, part.b.dtype, yi, accumulate, stream))
      continue;
    // cuBLASLt's bias epilogue takes a bias of D's dtype; a float32 y adds its bias by kernel.
    const bool want_epilogue = has_bias && y.dtype != DType::f32;
    const GemmKey k{.device = device,
                    .n = n,
                    .out = out,
                    .in = x.shape[1],
                    .lda = ld_of(part.w),
                    .ldb = ld_of(x),
                    .ldd = ld_of(yi),
                    .ab = x.dtype,
                    .d = y.dtype,
                    .accumulate = accumulate,
                    .bias = want_epilogue,
                    .align_a = alignment(part.w.data),
                    .align_b = alignment(x.data),
                    .align_d = alignment(yi.data),
                    .align_bias = want_epilogue ? alignment(part.b.data) : 0u,
                    .workspace_bytes = ctx.gemm_workspace_bytes()};
    bool bias_done = false;
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      const Gemm& g = plan_for(k, part.w.data, x.data, part.b.data, handle, ctx.gemm_workspace(),
                               stream, tuning);
      if (g.bias_epilogue) {
        set_attr(g.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(part.b.data),
                 k);
        bias_done = true;
      }
      check_blas(cublasLtMatmul(handle, g.desc, &alpha, part.w.data, g.a, x.data, g.b, &beta,
                                yi.data, g.d, yi.data, g.d, &g.algo, ctx.gemm_workspace(),
                                size_t(ctx.gemm_workspace_bytes()), stream),
                 "cublasLtMatmul", k);
    }
    if (has_bias && !bias_done) launch_add_bias(yi, part.b.data, part.b.dtype, stream);
  }
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

}  // namespace cca::ops::cuda

// The CUDA context: a non-blocking stream, a cuBLASLt handle and a GEMM workspace on the current
// device; device memory and host <-> device copies ordered on that stream.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "attn/cuda/cuda_check.hpp"
#include "cca/attention.hpp"
#include "ops/impl.hpp"

namespace cca::ops::cuda {
namespace {

constexpr int64_t kWorkspaceBytes = int64_t(32) << 20;  // cuBLASLt's GEMM workspace

std::string gib(int64_t bytes) {
  char s[32];
  std::snprintf(s, sizeof s, "%.2f GiB", double(bytes) / double(int64_t(1) << 30));
  return s;
}

cudaStream_t stream_of(const Context& ctx) { return static_cast<cudaStream_t>(ctx.stream()); }

}  // namespace

Context make_context() {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  check(why.empty(), "no usable CUDA GPU: " + why);
  cudaStream_t stream = nullptr;
  cublasLtHandle_t blas = nullptr;
  void* workspace = nullptr;
  try {
    CCA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const cublasStatus_t st = cublasLtCreate(&blas);
    check(st == CUBLAS_STATUS_SUCCESS,
          std::string("cuBLASLt error in cublasLtCreate: ") + cublasLtGetStatusString(st));
    workspace = alloc(kWorkspaceBytes, "the cuBLASLt GEMM workspace");
  } catch (...) {
    release(stream, blas, workspace);
    throw;
  }
  return ContextFactory::make(Device::cuda, 0, stream, blas, workspace, kWorkspaceBytes);
}

// Waits for the stream's work (a GEMM may still be using the workspace), then frees everything.
// Errors are ignored: this runs on destructors' paths.
void release(void* stream, void* blas, void* workspace) noexcept {
  if (stream) cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  if (blas) cublasLtDestroy(static_cast<cublasLtHandle_t>(blas));
  if (workspace) cudaFree(workspace);
  if (stream) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
}

void* alloc(int64_t bytes, const char* what) {
  check(bytes >= 0, std::string("alloc: negative size ") + std::to_string(bytes) + " for " + what);
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, size_t(bytes > 0 ? bytes : 1));
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the error, so that the next call does not see it
    size_t free_bytes = 0, total_bytes = 0;
    std::string mem;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess)
      mem = " (" + gib(int64_t(free_bytes)) + " free of " + gib(int64_t(total_bytes)) + ")";
    cudaGetLastError();
    throw Error("cannot allocate " + gib(bytes) + " of GPU memory for " + what + ": " +
                cudaGetErrorString(err) + mem);
  }
  return p;
}

void free(void* ptr) noexcept {
  if (ptr) cudaFree(ptr);
}

void upload(const Context& ctx, void* dst, const void* src, int64_t bytes) {
  check(bytes >= 0, "upload: negative size " + std::to_string(bytes));
  if (bytes > 0)
    CCA_CUDA_CHECK(
        cudaMemcpyAsync(dst, src, size_t(bytes), cudaMemcpyHostToDevice, stream_of(ctx)));
}

void download(const Context& ctx, void* dst, const void* src, int64_t bytes) {
  check(bytes >= 0, "download: negative size " + std::to_string(bytes));
  if (bytes > 0)
    CCA_CUDA_CHECK(
        cudaMemcpyAsync(dst, src, size_t(bytes), cudaMemcpyDeviceToHost, stream_of(ctx)));
  CCA_CUDA_CHECK(cudaStreamSynchronize(stream_of(ctx)));
}

void synchronize(const Context& ctx) { CCA_CUDA_CHECK(cudaStreamSynchronize(stream_of(ctx))); }

}  // namespace cca::ops::cuda

// Pinned host staging, asynchronous downloads and CUDA graphs of a context's stream: what the
// engine needs to capture a decode step once and replay it.
#include <cuda_runtime.h>

#include "attn/cuda/cuda_check.hpp"
#include "ops/impl.hpp"

namespace cca::ops::cuda {
namespace {
cudaStream_t stream_of(const Context& ctx) { return static_cast<cudaStream_t>(ctx.stream()); }
}  // namespace

void* alloc_host(int64_t bytes, const char* what) {
  void* p = nullptr;
  const cudaError_t err = cudaMallocHost(&p, size_t(bytes > 0 ? bytes : 1));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw Error("cannot allocate " + std::to_string(bytes) + " bytes of pinned host memory for " +
                what + ": " + cudaGetErrorString(err));
  }
  return p;
}

void free_host(void* ptr) noexcept {
  if (ptr) cudaFreeHost(ptr);
}

void download_async(const Context& ctx, void* dst, const void* src, int64_t bytes) {
  CCA_CUDA_CHECK(
      cudaMemcpyAsync(dst, src, size_t(bytes), cudaMemcpyDeviceToHost, stream_of(ctx)));
}

void begin_capture(const Context& ctx) {
  // Thread-local: another thread's CUDA calls neither join nor break this capture.
  CCA_CUDA_CHECK(cudaStreamBeginCapture(stream_of(ctx), cudaStreamCaptureModeThreadLocal));
}

void* end_capture(const Context& ctx) {
  cudaGraph_t graph = nullptr;
  CCA_CUDA_CHECK(cudaStreamEndCapture(stream_of(ctx), &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  CCA_CUDA_CHECK(err);
  return exec;
}

void abort_capture(const Context& ctx) noexcept {
  cudaGraph_t graph = nullptr;
  if (cudaStreamEndCapture(stream_of(ctx), &graph) == cudaSuccess && graph)
    cudaGraphDestroy(graph);
  cudaGetLastError();
}

void launch_graph(const Context& ctx, void* graph) {
  CCA_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph), stream_of(ctx)));
}

void destroy_graph(void* graph) noexcept {
  if (graph) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph));
}

}  // namespace cca::ops::cuda

namespace cca::ops::cuda {

void* event_create() {
  cudaEvent_t e = nullptr;
  CCA_CUDA_CHECK(cudaEventCreate(&e));
  return e;
}

void event_record(void* event, void* stream) {
  CCA_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
}

float event_elapsed_ms(void* start, void* stop) {
  CCA_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(stop)));
  float ms = 0.f;
  CCA_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start),
                                      static_cast<cudaEvent_t>(stop)));
  return ms;
}

void event_destroy(void* event) noexcept {
  if (event) cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

}  // namespace cca::ops::cuda

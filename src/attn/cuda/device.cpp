// Public host <-> device helpers (include/cca/device.hpp) for the CLI and tests.
#include "cca/device.hpp"

#include <cuda_runtime.h>

#include "backend.hpp"
#include "cuda_check.hpp"

namespace cca {
namespace {
void require_gpu() {
  const std::string why = cuda::unavailable_reason();
  check(why.empty(), "GPU memory helpers unavailable: " + why);
}
}  // namespace

void* device_alloc(int64_t bytes) {
  require_gpu();
  check(bytes >= 0, "device_alloc: negative size " + std::to_string(bytes));
  void* p = nullptr;
  CCA_CUDA_CHECK(cudaMalloc(&p, size_t(bytes > 0 ? bytes : 1)));
  return p;
}

void device_free(void* ptr) {
  if (ptr) CCA_CUDA_CHECK(cudaFree(ptr));
}

void copy_to_device(void* dst, const void* src, int64_t bytes) {
  require_gpu();
  if (bytes > 0) CCA_CUDA_CHECK(cudaMemcpy(dst, src, size_t(bytes), cudaMemcpyHostToDevice));
}

void copy_to_host(void* dst, const void* src, int64_t bytes) {
  require_gpu();
  if (bytes > 0) CCA_CUDA_CHECK(cudaMemcpy(dst, src, size_t(bytes), cudaMemcpyDeviceToHost));
}

void device_synchronize() {
  require_gpu();
  CCA_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace cca

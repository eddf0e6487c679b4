// Public host <-> device helpers (include/cca/device.hpp) for the CLI and tests.
#include "cca/device.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "backend.hpp"
#include "cuda_check.hpp"
#include "kernels.hpp"

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

namespace cca::cuda {
namespace {
// One pool per device, created on first use and kept for the process.
cudaMemPool_t scratch_pool() {
  static std::mutex mu;
  static std::map<int, cudaMemPool_t> pools;
  int dev = 0;
  CCA_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  auto it = pools.find(dev);
  if (it != pools.end()) return it->second;
  cudaMemPoolProps props = {};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = dev;
  cudaMemPool_t pool;
  CCA_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
  uint64_t keep = uint64_t(256) << 20;
  CCA_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  pools.emplace(dev, pool);
  return pool;
}
}  // namespace

void* scratch_alloc(int64_t bytes, cudaStream_t stream) {
  void* p = nullptr;
  CCA_CUDA_CHECK(cudaMallocFromPoolAsync(&p, size_t(std::max<int64_t>(bytes, 1)), scratch_pool(),
                                         stream));
  return p;
}

void scratch_free(void* ptr, cudaStream_t stream) {
  if (ptr) cudaFreeAsync(ptr, stream);  // on destructors' paths: never throws
}

}  // namespace cca::cuda

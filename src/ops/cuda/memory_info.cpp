// Device memory figures and the device's name, for the engine's memory check and messages.
#include <cuda_runtime.h>

#include "attn/cuda/cuda_check.hpp"
#include "ops/impl.hpp"

namespace cca::ops::cuda {

void memory_info(int64_t* free_bytes, int64_t* total_bytes) {
  size_t f = 0, t = 0;
  CCA_CUDA_CHECK(cudaMemGetInfo(&f, &t));
  *free_bytes = int64_t(f);
  *total_bytes = int64_t(t);
}

std::string device_name() {
  int dev = 0;
  cudaDeviceProp prop{};
  CCA_CUDA_CHECK(cudaGetDevice(&dev));
  CCA_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + ")";
}

}  // namespace cca::ops::cuda

// Error checking for CUDA runtime calls: every failure becomes a cca::Error naming the call.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "cca/error.hpp"

namespace cca::cuda {

inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess)
    throw Error(std::string("CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
                "): " + cudaGetErrorString(err));
}

}  // namespace cca::cuda

#define CCA_CUDA_CHECK(call) ::cca::cuda::check_cuda((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors surface here, not at the next sync.
#define CCA_CUDA_CHECK_LAUNCH(name) \
  ::cca::cuda::check_cuda(cudaGetLastError(), name, __FILE__, __LINE__)

// Host <-> device helpers in a build without the CUDA backend: each call says why it cannot run.
#ifndef CCA_WITH_CUDA
#include "cca/device.hpp"
#include "cca/error.hpp"

namespace cca {
namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw Error(std::string(what) +
              ": this build has no CUDA backend (configured with -DCCA_CUDA=OFF, or nvcc was not found)");
}
}  // namespace

void* device_alloc(int64_t) { no_cuda("device_alloc"); }
void device_free(void* ptr) {
  if (ptr) no_cuda("device_free");
}
void copy_to_device(void*, const void*, int64_t) { no_cuda("copy_to_device"); }
void copy_to_host(void*, const void*, int64_t) { no_cuda("copy_to_host"); }
void device_synchronize() { no_cuda("device_synchronize"); }

}  // namespace cca
#endif  // CCA_WITH_CUDA

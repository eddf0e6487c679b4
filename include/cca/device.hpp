// GPU memory helpers for the CLI, tests and bindings. Each throws cca::Error with a clear message
// when this build has no CUDA backend or no usable GPU. Copies are synchronous.
#pragma once
#include <cstdint>

namespace cca {

void* device_alloc(int64_t bytes);
void device_free(void* ptr);
void copy_to_device(void* dst, const void* src, int64_t bytes);  // host -> GPU
void copy_to_host(void* dst, const void* src, int64_t bytes);    // GPU -> host
void device_synchronize();

}  // namespace cca

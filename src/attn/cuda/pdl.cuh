// Programmatic dependent launch (PDL, sm_90): a kernel launched with it may start while the
// kernel before it in the stream still runs its last blocks, so the launch latency and the ramp
// of one kernel hide behind the tail of the other. A decode step is ~400 short kernels, each
// boundary a few microseconds of idle GPU without it.
//
// The rule: a kernel launched by pdl_launch() must call pdl_wait_and_release() before it reads
// anything an earlier kernel of the stream writes (or writes anything one reads); before that it
// may only touch memory no kernel of the step writes (the weights). The call then lets the next
// kernel's blocks start. Without PDL (older GPUs, code for sm_80, CCA_CUDA_PDL=0) both are no-ops
// and launches are ordinary.
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>

#include "cuda_check.hpp"

namespace cca::cuda {

__device__ __forceinline__ void pdl_wait_and_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether `kernel`'s loaded binary is sm_90+ code (it has griddepcontrol) and CCA_CUDA_PDL is not
// 0 (A/B runs). Every kernel of a build is compiled for the same architectures, so the first
// answer holds for all.
template <typename Kernel>
bool pdl_enabled(Kernel kernel) {
  static const bool on = [&] {
    cudaFuncAttributes fa;
    CCA_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
    const char* e = std::getenv("CCA_CUDA_PDL");
    return fa.binaryVersion >= 90 && !(e && e[0] == '0');
  }();
  return on;
}

// kernel<<<grid, block, smem, stream>>>(args...), with PDL where pdl_enabled().
template <typename... Params, typename... Args>
void pdl_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl_enabled(kernel) ? 1 : 0;
  CCA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...));
}

}  // namespace cca::cuda

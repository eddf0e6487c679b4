// Tensor maps for the Hopper kernels' bulk tensor copies (TMA): the forward (attend_wgmma.cu)
// and the backward (attend_bwd_wgmma.cu) describe their [B, rows, H, D] views the same way.
#pragma once
#include <cuda.h>

#include "cca/tensor.hpp"

namespace cca::cuda {

// The map of a 16-bit [B, rows, H, D] view (D contiguous), boxes of 64 x box_rows elements with
// the 128-byte swizzle. False where the driver has no encoder or refuses the view (strides not
// multiples of 16 bytes, ...): the caller then runs its portable kernel.
bool encode_tensor_map(CUtensorMap& m, const TensorView& t, int box_rows);

}  // namespace cca::cuda

// Tensor maps of the Hopper kernels (tensor_map.hpp).
#include "tensor_map.hpp"

#include <cudaTypedefs.h>
#include <cuda_runtime.h>

namespace cca::cuda {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

}  // namespace

bool encode_tensor_map(CUtensorMap& m, const TensorView& t, int box_rows) {
  auto fn = encode_fn();
  if (!fn || !t.data) return false;
  const cuuint64_t dims[4] = {cuuint64_t(t.shape[3]), cuuint64_t(t.shape[1]),
                              cuuint64_t(t.shape[2]), cuuint64_t(t.shape[0])};
  cuuint64_t strides[3];
  for (int i = 0; i < 3; ++i) {
    const int vd = i == 0 ? 1 : (i == 1 ? 2 : 0);  // dims[i + 1] is view dim 1, 2, 0
    // A dimension of size 1 is never stepped: give it a legal stride.
    const int64_t st = t.shape[vd] == 1 ? 16 / 2 : t.stride[vd];
    if (st <= 0) return false;
    strides[i] = cuuint64_t(st) * 2;
    if (strides[i] % 16 != 0) return false;
  }
  const cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1};
  const cuuint32_t estr[4] = {1, 1, 1, 1};
  const CUtensorMapDataType dt = t.dtype == DType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                        : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return fn(&m, dt, 4, t.data, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace cca::cuda

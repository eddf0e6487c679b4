// Strided tensor copy on the device (the KV cache's appends and reallocations) and the layout
// test the vectorised kernels rely on.
#include <cstdint>

#include "cuda_check.hpp"
#include "device_utils.cuh"
#include "kernels.hpp"

namespace cca::cuda {
namespace {

struct CopyArgs {
  int64_t n1, n2, n3, total;
  int64_t ds[3], ss[3];  // element strides of dims 0..2 (dim 3 is contiguous)
  const int32_t* pos;    // when set, dst rows start at row *pos - pos0
  int64_t pos0;
};

// dst[b, t, h, :] = src[b, t, h, :] for [B, n, H, D] views; E is the element type.
template <typename E>
__global__ void copy_tensor_kernel(E* dst, const E* src, CopyArgs c) {
  if (c.pos) dst += (int64_t(*c.pos) - c.pos0) * c.ds[1];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < c.total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % c.n3, rest = i / c.n3, h = rest % c.n2, rest2 = rest / c.n2;
    const int64_t t = rest2 % c.n1, b = rest2 / c.n1;
    dst[b * c.ds[0] + t * c.ds[1] + h * c.ds[2] + d] =
        src[b * c.ss[0] + t * c.ss[1] + h * c.ss[2] + d];
  }
}

// dst = src rounded to nearest, float32 into a 16-bit dtype (attn_bwd's gradients).
template <typename E>
__global__ void round_tensor_kernel(E* dst, const float* src, CopyArgs c) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < c.total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % c.n3, rest = i / c.n3, h = rest % c.n2, rest2 = rest / c.n2;
    const int64_t t = rest2 % c.n1, b = rest2 / c.n1;
    dst[b * c.ds[0] + t * c.ds[1] + h * c.ds[2] + d] =
        from_float<E>(src[b * c.ss[0] + t * c.ss[1] + h * c.ss[2] + d]);
  }
}

}  // namespace

bool rows_aligned_16(const TensorView& t) {
  const int64_t es = dtype_size(t.dtype);
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (t.shape[i] > 1 && (t.stride[i] * es) % 16 != 0) return false;
  return (t.shape[3] * es) % 16 == 0;
}

namespace {
void launch_copy(const TensorView& dst, const TensorView& src, const int32_t* pos, int64_t pos0,
                 cudaStream_t stream) {
  const bool rounds = src.dtype == DType::f32 && dst.dtype != DType::f32;
  check(dst.dtype == src.dtype || (rounds && !pos),
        std::string("copy_tensor: cannot copy ") + dtype_name(src.dtype) + " into " +
            dtype_name(dst.dtype));
  for (int i = 0; i < 4; ++i)
    check(i == 1 ? dst.shape[i] >= src.shape[i] : dst.shape[i] == src.shape[i],
          "copy_tensor: shape " + dst.shape_string() + " vs " + src.shape_string());
  CopyArgs c;
  c.n1 = src.shape[1];
  c.n2 = src.shape[2];
  c.n3 = src.shape[3];
  c.total = src.shape[0] * c.n1 * c.n2 * c.n3;
  c.pos = pos;
  c.pos0 = pos0;
  if (c.total == 0) return;
  for (int i = 0; i < 3; ++i) {
    c.ds[i] = dst.stride[i];
    c.ss[i] = src.stride[i];
  }
  const unsigned blocks = unsigned(std::min<int64_t>((c.total + 255) / 256, 65535));
  if (rounds && dst.dtype == DType::bf16)
    round_tensor_kernel<<<blocks, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(dst.data),
                                                    static_cast<const float*>(src.data), c);
  else if (rounds)
    round_tensor_kernel<<<blocks, 256, 0, stream>>>(static_cast<__half*>(dst.data),
                                                    static_cast<const float*>(src.data), c);
  else if (dtype_size(src.dtype) == 4)
    copy_tensor_kernel<<<blocks, 256, 0, stream>>>(static_cast<float*>(dst.data),
                                                   static_cast<const float*>(src.data), c);
  else
    copy_tensor_kernel<<<blocks, 256, 0, stream>>>(static_cast<uint16_t*>(dst.data),
                                                   static_cast<const uint16_t*>(src.data), c);
  CCA_CUDA_CHECK_LAUNCH("copy_tensor_kernel");
}
}  // namespace

void launch_copy_tensor(const TensorView& dst, const TensorView& src, cudaStream_t stream) {
  check(dst.shape[1] == src.shape[1],
        "copy_tensor: shape " + dst.shape_string() + " vs " + src.shape_string());
  launch_copy(dst, src, nullptr, 0, stream);
}

void launch_copy_tensor_at(const TensorView& dst_store, int64_t pos0, const int32_t* pos_device,
                           const TensorView& src, cudaStream_t stream) {
  launch_copy(dst_store, src, pos_device, pos0, stream);
}

}  // namespace cca::cuda

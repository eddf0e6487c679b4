// Strided tensor copy on the device (the KV cache's appends and reallocations) and the layout
// test the vectorised kernels rely on.
#include <algorithm>
#include <cstdint>

#include "cuda_check.hpp"
#include "device_utils.cuh"
#include "pdl.cuh"
#include "kernels.hpp"

namespace cca::cuda {
namespace {

struct CopyArgs {
  int64_t n1, n2, n3, total;
  int64_t ds[3], ss[3];  // element strides of dims 0..2 (dim 3 is contiguous)
  const int32_t* pos;    // when set, dst rows start at row *pos - pos0
  int64_t pos0;
};

// One copy of a launch: dst = src in units E (see copy_job).
struct CopyJob {
  void* dst;
  const void* src;
  CopyArgs c;
};
// Up to kCap copies in one launch (a decode step's appends of all its sequences' keys and
// values), passed by value; blockIdx.y is the copy.
template <int kCap>
struct CopyBatch {
  int count;
  CopyJob j[kCap];
};
constexpr int kCopyBatchCap = 64;  // 9 KB of kernel parameters
static_assert(sizeof(CopyBatch<kCopyBatchCap>) < 32000, "kernel parameters over the 32 KB limit");

// dst[b, t, h, :] = src[b, t, h, :] for [B, n, H, D] views, counted in units E (an element, or
// 16 bytes when rows allow); `pos` offsets dst by whole rows.
template <typename E, int kCap>
__global__ void copy_tensor_kernel(const __grid_constant__ CopyBatch<kCap> batch) {
  pdl_wait_and_release();
  const CopyJob& job = batch.j[blockIdx.y];
  const CopyArgs& c = job.c;
  E* dst = static_cast<E*>(job.dst);
  const E* src = static_cast<const E*>(job.src);
  if (c.pos) dst += (int64_t(*c.pos) - c.pos0) * c.ds[1];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < c.total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % c.n3, rest = i / c.n3, h = rest % c.n2, rest2 = rest / c.n2;
    const int64_t t = rest2 % c.n1, b = rest2 / c.n1;
    dst[b * c.ds[0] + t * c.ds[1] + h * c.ds[2] + d] =
        src[b * c.ss[0] + t * c.ss[1] + h * c.ss[2] + d];
  }
}

// dst = src rounded to nearest, float32 into a 16-bit dtype (attn_bwd's gradients), kVec
// elements per thread step: 8 (two 16-byte loads, one 16-byte store) where rows allow, else 1.
// The element index splits into (b, t, h, d) in I: 32-bit where the tensor allows (64-bit
// division is emulated, and at one element per step it bounded the kernel, ~3.5x the bytes).
template <typename E, int kVec, typename I>
__global__ void round_tensor_kernel(E* dst, const float* src, CopyArgs c) {
  const I n3 = I(c.n3 / kVec), n2 = I(c.n2), n1 = I(c.n1), units = I(c.total / kVec);
  const I stride = I(gridDim.x) * blockDim.x;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < units; i += stride) {
    const I u = i % n3, rest = i / n3, h = rest % n2, rest2 = rest / n2;
    const I t = rest2 % n1, b = rest2 / n1;
    const int64_t d = int64_t(u) * kVec;
    const float* from =
        src + int64_t(b) * c.ss[0] + int64_t(t) * c.ss[1] + int64_t(h) * c.ss[2] + d;
    E* to = dst + int64_t(b) * c.ds[0] + int64_t(t) * c.ds[1] + int64_t(h) * c.ds[2] + d;
    if constexpr (kVec == 8) {
      const float4 lo = *reinterpret_cast<const float4*>(from);
      const float4 hi = *reinterpret_cast<const float4*>(from + 4);
      *reinterpret_cast<uint4*>(to) = make_uint4(pack2<E>(lo.x, lo.y), pack2<E>(lo.z, lo.w),
                                                 pack2<E>(hi.x, hi.y), pack2<E>(hi.z, hi.w));
    } else {
      *to = from_float<E>(*from);
    }
  }
}

// Whether t's rows start at multiples of `elems` elements from a 16-byte aligned base.
bool rows_start_aligned(const TensorView& t, int64_t elems) {
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (t.shape[i] > 1 && t.stride[i] % elems != 0) return false;
  return true;
}

template <typename E>
void launch_round(const TensorView& dst, const TensorView& src, const CopyArgs& c,
                  cudaStream_t stream) {
  const bool vec = c.n3 % 8 == 0 && rows_start_aligned(src, 4) && rows_start_aligned(dst, 8);
  const int64_t steps = vec ? c.total / 8 : c.total;
  const unsigned blocks = unsigned(std::min<int64_t>((steps + 255) / 256, 65535));
  E* to = static_cast<E*>(dst.data);
  const float* from = static_cast<const float*>(src.data);
  // 32-bit indices when the unit count, its stride over the grid and the dims all fit
  const bool narrow = c.total + int64_t(blocks) * 256 < (int64_t(1) << 32);
  if (vec && narrow)
    round_tensor_kernel<E, 8, uint32_t><<<blocks, 256, 0, stream>>>(to, from, c);
  else if (vec)
    round_tensor_kernel<E, 8, int64_t><<<blocks, 256, 0, stream>>>(to, from, c);
  else if (narrow)
    round_tensor_kernel<E, 1, uint32_t><<<blocks, 256, 0, stream>>>(to, from, c);
  else
    round_tensor_kernel<E, 1, int64_t><<<blocks, 256, 0, stream>>>(to, from, c);
  CCA_CUDA_CHECK_LAUNCH("round_tensor_kernel");
}

}  // namespace

bool rows_aligned_16(const TensorView& t) {
  const int64_t es = dtype_size(t.dtype);
  return rows_start_aligned(t, 16 / es) && (t.shape[3] * es) % 16 == 0;
}

namespace {
template <typename E>
struct Unit {
  using type = E;
};

// The checked arguments of dst = src; `unit` (bytes) is the size of E, 0 for a float32 src
// rounded into a 16-bit dst (round_tensor_kernel; c counts elements).
CopyJob copy_job(const TensorView& dst, const TensorView& src, const int32_t* pos, int64_t pos0,
                 int64_t& unit) {
  const bool rounds = src.dtype == DType::f32 && dst.dtype != DType::f32;
  check(dst.dtype == src.dtype || (rounds && !pos),
        std::string("copy_tensor: cannot copy ") + dtype_name(src.dtype) + " into " +
            dtype_name(dst.dtype));
  for (int i = 0; i < 4; ++i)
    check(i == 1 ? dst.shape[i] >= src.shape[i] : dst.shape[i] == src.shape[i],
          "copy_tensor: shape " + dst.shape_string() + " vs " + src.shape_string());
  CopyJob j{dst.data, src.data, {}};
  CopyArgs& c = j.c;
  c.n1 = src.shape[1];
  c.n2 = src.shape[2];
  c.n3 = src.shape[3];
  c.total = src.shape[0] * c.n1 * c.n2 * c.n3;
  c.pos = pos;
  c.pos0 = pos0;
  for (int i = 0; i < 3; ++i) {
    c.ds[i] = dst.stride[i];
    c.ss[i] = src.stride[i];
  }
  unit = 0;
  if (rounds) return j;
  // Rows of 16-byte multiples at 16-byte aligned addresses move in 16-byte units: 8x fewer
  // index computations than per 2-byte element (the chunk appends of a prefill are ~30 MB).
  const int64_t es = dtype_size(src.dtype);
  unit = rows_aligned_16(dst) && rows_aligned_16(src) ? 16 : es;
  c.n3 = c.n3 * es / unit;
  c.total = c.total * es / unit;
  for (int i = 0; i < 3; ++i) {
    c.ds[i] = c.ds[i] * es / unit;
    c.ss[i] = c.ss[i] * es / unit;
  }
  return j;
}

// One launch of the batch's copies, all of `unit` bytes.
template <int kCap>
void launch_batch(const CopyBatch<kCap>& b, int64_t unit, cudaStream_t stream) {
  int64_t most = 0;
  for (int i = 0; i < b.count; ++i) most = std::max(most, b.j[i].c.total);
  if (most == 0) return;
  const dim3 grid(unsigned(std::min<int64_t>((most + 255) / 256, 65535)), unsigned(b.count));
  auto go = [&](auto tag) {
    using E = typename decltype(tag)::type;
    pdl_launch(copy_tensor_kernel<E, kCap>, grid, dim3(256), 0, stream, b);
  };
  if (unit == 16)
    go(Unit<uint4>{});
  else if (unit == 4)
    go(Unit<float>{});
  else
    go(Unit<uint16_t>{});
  CCA_CUDA_CHECK_LAUNCH("copy_tensor_kernel");
}
}  // namespace

void launch_copy_tensor(const TensorView& dst, const TensorView& src, cudaStream_t stream) {
  check(dst.shape[1] == src.shape[1],
        "copy_tensor: shape " + dst.shape_string() + " vs " + src.shape_string());
  int64_t unit = 0;
  const CopyJob j = copy_job(dst, src, nullptr, 0, unit);
  if (j.c.total == 0) return;
  if (unit != 0) return launch_batch(CopyBatch<1>{1, {j}}, unit, stream);
  // float32 gradients into 16-bit ones
  if (dst.dtype == DType::bf16)
    launch_round<__nv_bfloat16>(dst, src, j.c, stream);
  else
    launch_round<__half>(dst, src, j.c, stream);
}

void launch_copy_tensor_at(const std::vector<CopyAt>& copies, cudaStream_t stream) {
  // Consecutive copies of one unit share a launch (all of a decode step's, in practice).
  CopyBatch<kCopyBatchCap> b{};
  int64_t unit = 0;
  for (const CopyAt& c : copies) {
    int64_t u = 0;
    const CopyJob j = copy_job(c.dst_store, c.src, c.pos_device, c.pos0, u);
    if (b.count == kCopyBatchCap || (b.count > 0 && u != unit)) {
      launch_batch(b, unit, stream);
      b.count = 0;
    }
    unit = u;
    b.j[b.count++] = j;
  }
  if (b.count > 0) launch_batch(b, unit, stream);
}

}  // namespace cca::cuda

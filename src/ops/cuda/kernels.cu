// The CUDA kernels of the ops other than the GEMMs (ops.hpp documents each op), and their
// launchers. All math in float32; 16-bit values are rounded once, to nearest even, on the store.
// Row-wise kernels put rows on blockIdx.y (a grid-stride loop past 65,535) and columns on x.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "attn/cuda/cuda_check.hpp"
#include "ops/cuda/kernels.hpp"

namespace cca::ops::cuda {
namespace {

constexpr int kThreads = 256;         // elementwise kernels and rms_norm
constexpr int kArgmaxThreads = 1024;  // one block per (long) vocabulary row
constexpr unsigned kMaxGridY = 65535;

// ---- element types --------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Calls f(Tag<T>{}) with T the device type of `dtype`.
template <typename T>
struct Tag {
  using type = T;
};
template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(Tag<float>{}); return;
    case DType::f16: f(Tag<__half>{}); return;
    case DType::bf16: f(Tag<__nv_bfloat16>{}); return;
  }
}

template <typename T>
T* data_of(const TensorView& v) {
  return static_cast<T*>(v.data);
}

// Blocks for a row-wise kernel over [rows, cols].
dim3 row_grid(int64_t rows, int64_t cols) {
  return dim3(unsigned((cols + kThreads - 1) / kThreads),
              unsigned(std::min<int64_t>(rows, kMaxGridY)));
}

// ---- reductions -----------------------------------------------------------------------------
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// Call once per kernel (one shared array, no barrier after its last read).
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// An argmax candidate: value v at index i (i < 0: none yet). Order: larger values first, NaN
// below every number, the lower index among equals (-0 == +0; NaNs tie with each other).
struct Best {
  float v;
  int32_t i;
};
__device__ __forceinline__ bool beats(Best a, Best b) {
  if (a.i < 0) return false;
  if (b.i < 0) return true;
  const bool an = isnan(a.v), bn = isnan(b.v);
  if (an || bn) return an && bn ? a.i < b.i : bn;
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}
__device__ __forceinline__ Best warp_best(Best b) {
  for (int o = 16; o > 0; o >>= 1) {
    const Best other{__shfl_xor_sync(0xffffffffu, b.v, o), __shfl_xor_sync(0xffffffffu, b.i, o)};
    if (beats(other, b)) b = other;
  }
  return b;
}

// ---- kernels --------------------------------------------------------------------------------
// x float32 [n, H] (row stride sx), w [H], out [n, H] (row stride so); one block per row.
template <typename TW, typename TO>
__global__ void rms_norm_kernel(const float* x, int64_t sx, const TW* w, TO* out, int64_t so,
                                int64_t H, float eps) {
  const float* xr = x + int64_t(blockIdx.x) * sx;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
  ss = block_sum(ss);
  // Correctly rounded sqrt and division (no fast math here), as the CPU's 1 / sqrt.
  const float inv = 1.f / sqrtf(ss / float(H) + eps);
  TO* o = out + int64_t(blockIdx.x) * so;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
    o[i] = from_f<TO>(to_f(w[i]) * (xr[i] * inv));
}

// x [n, heads * D] (row stride sx) in place, positions [n], inv_freq [half = D / 2]; one block per
// row, whose cos/sin table [half] goes to shared memory first.
template <typename T>
__global__ void rope_kernel(T* x, int64_t sx, int64_t heads, int64_t half,
                            const int32_t* positions, const float* inv_freq) {
  extern __shared__ float table[];  // cos [half], then sin [half]
  const float pos = float(positions[blockIdx.x]);
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    // sincosf, not __sincosf: angles reach ~1e6 rad, which needs the full range reduction.
    float s, c;
    sincosf(pos * inv_freq[i], &s, &c);
    table[i] = c;
    table[half + i] = s;
  }
  __syncthreads();
  T* xr = x + int64_t(blockIdx.x) * sx;
  for (int64_t j = threadIdx.x; j < heads * half; j += blockDim.x) {
    const int64_t i = j % half;
    T* v = xr + (j / half) * 2 * half;
    const float a = to_f(v[i]), b = to_f(v[i + half]), c = table[i], s = table[half + i];
    v[i] = from_f<T>(a * c - b * s);
    v[i + half] = from_f<T>(b * c + a * s);
  }
}

// gate, up, out [n, I] (row strides sg, su, so); out may be gate or up.
template <typename T>
__global__ void swiglu_kernel(const T* gate, int64_t sg, const T* up, int64_t su, T* out,
                              int64_t so, int64_t n, int64_t I) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= I) return;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
    const float g = to_f(gate[r * sg + c]), u = to_f(up[r * su + c]);
    out[r * so + c] = from_f<T>(g / (1.f + expf(-g)) * u);
  }
}

// ids [n], table [V, H] (row stride st), out float32 [n, H] (row stride so).
template <typename T>
__global__ void embed_kernel(const int32_t* ids, const T* table, int64_t st, float* out,
                             int64_t so, int64_t n, int64_t H) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= H) return;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
    out[r * so + c] = to_f(table[ids[r] * st + c]);
}

// src [V, C], rows [m], dst [m, C], counted in units U (16, 4 or 2 bytes) per row.
template <typename U>
__global__ void gather_rows_kernel(const U* src, int64_t ss, const int32_t* rows, U* dst,
                                   int64_t ds, int64_t m, int64_t units) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= units) return;
  for (int64_t r = blockIdx.y; r < m; r += gridDim.y) dst[r * ds + c] = src[rows[r] * ss + c];
}

// logits float32 [m, V] (row stride sl), out [m]; one block of kArgmaxThreads per row.
__global__ void argmax_rows_kernel(const float* logits, int64_t sl, int64_t V, int32_t* out) {
  __shared__ Best warp_results[32];
  const float* row = logits + int64_t(blockIdx.x) * sl;
  Best b{0.f, -1};
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {  // rising indices: ties keep the first
    const Best c{row[i], int32_t(i)};
    if (beats(c, b)) b = c;
  }
  b = warp_best(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_results[warp] = b;
  __syncthreads();
  if (warp == 0) {
    b = lane < int(blockDim.x >> 5) ? warp_results[lane] : Best{0.f, -1};
    b = warp_best(b);
    if (lane == 0) out[blockIdx.x] = b.i;
  }
}

// src [n, C] -> dst [n, C] (row strides ss, ds).
template <typename S, typename D>
__global__ void convert_kernel(const S* src, int64_t ss, D* dst, int64_t ds, int64_t n,
                               int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
    dst[r * ds + c] = from_f<D>(to_f(src[r * ss + c]));
}

// y [n, C] (row stride sy) += b [C].
template <typename TY, typename TB>
__global__ void add_bias_kernel(TY* y, int64_t sy, const TB* b, int64_t n, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float bias = to_f(b[c]);
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
    y[r * sy + c] = from_f<TY>(to_f(y[r * sy + c]) + bias);
}

}  // namespace

// ---- launchers ------------------------------------------------------------------------------
void launch_rms_norm(const TensorView& x, const void* w, DType w_dtype, float eps,
                     const TensorView& out, cudaStream_t stream) {
  const int64_t n = x.shape[0], H = x.shape[1];
  if (n == 0 || H == 0) return;
  with_dtype(w_dtype, [&](auto tw) {
    using TW = typename decltype(tw)::type;
    with_dtype(out.dtype, [&](auto to) {
      using TO = typename decltype(to)::type;
      rms_norm_kernel<TW, TO><<<unsigned(n), kThreads, 0, stream>>>(
          data_of<const float>(x), x.stride[0], static_cast<const TW*>(w), data_of<TO>(out),
          out.stride[0], H, eps);
    });
  });
  CCA_CUDA_CHECK_LAUNCH("rms_norm_kernel");
}

void launch_rope(const TensorView& x, int64_t heads, const int32_t* positions,
                 const float* inv_freq, int64_t half, cudaStream_t stream) {
  const int64_t n = x.shape[0];
  if (n == 0 || heads == 0) return;
  const size_t smem = size_t(2 * half) * sizeof(float);
  with_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rope_kernel<T><<<unsigned(n), kThreads, smem, stream>>>(data_of<T>(x), x.stride[0], heads,
                                                            half, positions, inv_freq);
  });
  CCA_CUDA_CHECK_LAUNCH("rope_kernel");
}

void launch_swiglu(const TensorView& gate, const TensorView& up, const TensorView& out,
                   cudaStream_t stream) {
  const int64_t n = out.shape[0], I = out.shape[1];
  if (n == 0 || I == 0) return;
  with_dtype(out.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    swiglu_kernel<T><<<row_grid(n, I), kThreads, 0, stream>>>(
        data_of<const T>(gate), gate.stride[0], data_of<const T>(up), up.stride[0],
        data_of<T>(out), out.stride[0], n, I);
  });
  CCA_CUDA_CHECK_LAUNCH("swiglu_kernel");
}

void launch_embed(const int32_t* ids, const TensorView& table, const TensorView& out,
                  cudaStream_t stream) {
  const int64_t n = out.shape[0], H = out.shape[1];
  if (n == 0 || H == 0) return;
  with_dtype(table.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    embed_kernel<T><<<row_grid(n, H), kThreads, 0, stream>>>(
        ids, data_of<const T>(table), table.stride[0], data_of<float>(out), out.stride[0], n, H);
  });
  CCA_CUDA_CHECK_LAUNCH("embed_kernel");
}

void launch_gather_rows(const TensorView& src, const int32_t* rows, const TensorView& dst,
                        cudaStream_t stream) {
  const int64_t m = dst.shape[0], es = dtype_size(src.dtype), row_bytes = dst.shape[1] * es;
  if (m == 0 || row_bytes == 0) return;
  // The widest unit (16, 4 or 2 bytes) that divides both base addresses, both row strides and
  // the row length.
  auto fits = [&](int64_t unit) {
    return reinterpret_cast<uintptr_t>(src.data) % unit == 0 &&
           reinterpret_cast<uintptr_t>(dst.data) % unit == 0 && src.stride[0] * es % unit == 0 &&
           dst.stride[0] * es % unit == 0 && row_bytes % unit == 0;
  };
  auto launch = [&](auto tag) {
    using U = typename decltype(tag)::type;
    const int64_t u = sizeof(U);
    gather_rows_kernel<U><<<row_grid(m, row_bytes / u), kThreads, 0, stream>>>(
        static_cast<const U*>(src.data), src.stride[0] * es / u, rows, static_cast<U*>(dst.data),
        dst.stride[0] * es / u, m, row_bytes / u);
  };
  if (fits(16))
    launch(Tag<uint4>{});
  else if (fits(4))
    launch(Tag<uint32_t>{});
  else
    launch(Tag<uint16_t>{});
  CCA_CUDA_CHECK_LAUNCH("gather_rows_kernel");
}

void launch_argmax_rows(const TensorView& logits, int32_t* out, cudaStream_t stream) {
  const int64_t m = logits.shape[0];
  if (m == 0) return;
  argmax_rows_kernel<<<unsigned(m), kArgmaxThreads, 0, stream>>>(
      data_of<const float>(logits), logits.stride[0], logits.shape[1], out);
  CCA_CUDA_CHECK_LAUNCH("argmax_rows_kernel");
}

void launch_convert(const TensorView& src, const TensorView& dst, cudaStream_t stream) {
  const int64_t n = dst.shape[0], C = dst.shape[1];
  if (n == 0 || C == 0) return;
  with_dtype(src.dtype, [&](auto ts) {
    using S = typename decltype(ts)::type;
    with_dtype(dst.dtype, [&](auto td) {
      using D = typename decltype(td)::type;
      convert_kernel<S, D><<<row_grid(n, C), kThreads, 0, stream>>>(
          data_of<const S>(src), src.stride[0], data_of<D>(dst), dst.stride[0], n, C);
    });
  });
  CCA_CUDA_CHECK_LAUNCH("convert_kernel");
}

void launch_add_bias(const TensorView& y, const void* b, DType b_dtype, cudaStream_t stream) {
  const int64_t n = y.shape[0], C = y.shape[1];
  if (n == 0 || C == 0) return;
  with_dtype(y.dtype, [&](auto ty) {
    using TY = typename decltype(ty)::type;
    with_dtype(b_dtype, [&](auto tb) {
      using TB = typename decltype(tb)::type;
      add_bias_kernel<TY, TB><<<row_grid(n, C), kThreads, 0, stream>>>(
          data_of<TY>(y), y.stride[0], static_cast<const TB*>(b), n, C);
    });
  });
  CCA_CUDA_CHECK_LAUNCH("add_bias_kernel");
}

}  // namespace cca::ops::cuda

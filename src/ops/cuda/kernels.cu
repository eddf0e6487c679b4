// The CUDA kernels of the ops other than the GEMMs (ops.hpp documents each op), and their
// launchers. All math in float32; 16-bit values are rounded once, to nearest even, on the store.
// Row-wise kernels put rows on blockIdx.y (a grid-stride loop past 65,535) and columns on x.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "attn/cuda/cuda_check.hpp"
#include "attn/cuda/pdl.cuh"
#include "ops/cuda/elem.cuh"
#include "ops/cuda/kernels.hpp"

namespace cca::ops::cuda {

using ::cca::cuda::pdl_launch;
using ::cca::cuda::pdl_wait_and_release;
namespace {

constexpr int kThreads = 256;         // elementwise kernels and rms_norm
constexpr int kArgmaxThreads = 1024;  // one block per (long) vocabulary row
constexpr unsigned kMaxGridY = 65535;

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
// N values of type T that move as one aligned load or store (16 bytes of 16-bit values, 16
// bytes of float32 for N = 4, ...).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// x float32 [n, H] (row stride sx), w [H], out [n, H] (row stride so); one block per row. V
// values per load: 4 when H, the row strides and the pointers allow 16-byte loads of x, else 1.
template <typename TW, typename TO, int V>
__global__ void rms_norm_kernel(const float* x, int64_t sx, const TW* w, TO* out, int64_t so,
                                int64_t H, float eps) {
  pdl_wait_and_release();
  const float* xr = x + int64_t(blockIdx.x) * sx;
  const int64_t nv = H / V;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
    const Vec<float, V> a = reinterpret_cast<const Vec<float, V>*>(xr)[i];
#pragma unroll
    for (int j = 0; j < V; ++j) ss = fmaf(a.v[j], a.v[j], ss);
  }
  ss = block_sum(ss);
  // Correctly rounded sqrt and division (no fast math here), as the CPU's 1 / sqrt.
  const float inv = 1.f / sqrtf(ss / float(H) + eps);
  TO* o = out + int64_t(blockIdx.x) * so;
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {  // the row is in L1 by now
    const Vec<float, V> a = reinterpret_cast<const Vec<float, V>*>(xr)[i];
    const Vec<TW, V> wv = reinterpret_cast<const Vec<TW, V>*>(w)[i];
    Vec<TO, V> r;
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = from_f<TO>(to_f(wv.v[j]) * (a.v[j] * inv));
    reinterpret_cast<Vec<TO, V>*>(o)[i] = r;
  }
}

// x [n, heads * D] (row stride sx) in place, positions [n], inv_freq [half = D / 2]; one block per
// row, whose cos/sin table [half] goes to shared memory first. V values per load: 16 bytes' worth
// when half, the stride and the pointer allow, else 1.
template <typename T, int V>
__global__ void rope_kernel(T* x, int64_t sx, int64_t heads, int64_t half,
                            const int32_t* positions, const float* inv_freq) {
  pdl_wait_and_release();
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
  const int64_t hv = half / V;  // units of V values per half head
  for (int64_t j = threadIdx.x; j < heads * hv; j += blockDim.x) {
    const int64_t i = (j % hv) * V;
    T* v = xr + (j / hv) * 2 * half;
    Vec<T, V> a = *reinterpret_cast<const Vec<T, V>*>(v + i),
              b = *reinterpret_cast<const Vec<T, V>*>(v + i + half);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float af = to_f(a.v[e]), bf = to_f(b.v[e]), c = table[i + e], s = table[half + i + e];
      a.v[e] = from_f<T>(af * c - bf * s);
      b.v[e] = from_f<T>(bf * c + af * s);
    }
    *reinterpret_cast<Vec<T, V>*>(v + i) = a;
    *reinterpret_cast<Vec<T, V>*>(v + i + half) = b;
  }
}

// gate, up, out [n, I] (row strides sg, su, so); out may be gate or up. V values per thread: 8
// (16 bytes) when I, the strides and the pointers allow, else 1.
template <typename T, int V>
__global__ void swiglu_kernel(const T* gate, int64_t sg, const T* up, int64_t su, T* out,
                              int64_t so, int64_t n, int64_t I) {
  pdl_wait_and_release();
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // in units of V
  if (c >= I / V) return;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
    const Vec<T, V> g = reinterpret_cast<const Vec<T, V>*>(gate + r * sg)[c];
    const Vec<T, V> u = reinterpret_cast<const Vec<T, V>*>(up + r * su)[c];
    Vec<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float gf = to_f(g.v[j]);
      o.v[j] = from_f<T>(gf / (1.f + expf(-gf)) * to_f(u.v[j]));
    }
    reinterpret_cast<Vec<T, V>*>(out + r * so)[c] = o;
  }
}

// ids [n], table [V, H] (row stride st), out float32 [n, H] (row stride so).
template <typename T>
__global__ void embed_kernel(const int32_t* ids, const T* table, int64_t st, float* out,
                             int64_t so, int64_t n, int64_t H) {
  pdl_wait_and_release();
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= H) return;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
    out[r * so + c] = to_f(table[ids[r] * st + c]);
}

// src [V, C], rows [m], dst [m, C], counted in units U (16, 4 or 2 bytes) per row.
template <typename U>
__global__ void gather_rows_kernel(const U* src, int64_t ss, const int32_t* rows, U* dst,
                                   int64_t ds, int64_t m, int64_t units) {
  pdl_wait_and_release();
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= units) return;
  for (int64_t r = blockIdx.y; r < m; r += gridDim.y) dst[r * ds + c] = src[rows[r] * ss + c];
}

// logits float32 [m, V] (row stride sl), out [m]; one block of kArgmaxThreads per row.
__global__ void argmax_rows_kernel(const float* logits, int64_t sl, int64_t V, int32_t* out) {
  pdl_wait_and_release();
  __shared__ Best warp_results[32];
  const float* row = logits + int64_t(blockIdx.x) * sl;
  Best b{0.f, -1};
  // Four values per load where the row allows (one row of a 128K vocabulary is 0.5 MB: one
  // block reads it in ~60 us a value at a time, ~10 us four at a time); each thread's indices
  // rise, so ties keep the first.
  int64_t head = 0;
  if (reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    head = V / 4 * 4;
    const float4* row4 = reinterpret_cast<const float4*>(row);
    for (int64_t i = threadIdx.x; i < head / 4; i += blockDim.x) {
      const float4 v = row4[i];
      const int32_t k = int32_t(4 * i);
      if (beats(Best{v.x, k}, b)) b = Best{v.x, k};
      if (beats(Best{v.y, k + 1}, b)) b = Best{v.y, k + 1};
      if (beats(Best{v.z, k + 2}, b)) b = Best{v.z, k + 2};
      if (beats(Best{v.w, k + 3}, b)) b = Best{v.w, k + 3};
    }
  }
  for (int64_t i = head + threadIdx.x; i < V; i += blockDim.x) {
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
  pdl_wait_and_release();
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
    dst[r * ds + c] = from_f<D>(to_f(src[r * ss + c]));
}

// y [n, C] (row stride sy) += b [C].
template <typename TY, typename TB>
__global__ void add_bias_kernel(TY* y, int64_t sy, const TB* b, int64_t n, int64_t C) {
  pdl_wait_and_release();
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float bias = to_f(b[c]);
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
    y[r * sy + c] = from_f<TY>(to_f(y[r * sy + c]) + bias);
}

}  // namespace

// ---- launchers ------------------------------------------------------------------------------
namespace {
// Whether `p` and row stride `stride` (elements of `es` bytes) allow loads of `bytes` bytes.
bool aligned(const void* p, int64_t stride, int64_t es, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0 && (stride * es) % bytes == 0;
}
}  // namespace

void launch_rms_norm(const TensorView& x, const void* w, DType w_dtype, float eps,
                     const TensorView& out, cudaStream_t stream) {
  const int64_t n = x.shape[0], H = x.shape[1];
  if (n == 0 || H == 0) return;
  const int64_t ws = dtype_size(w_dtype), os = dtype_size(out.dtype);
  const bool vec = H % 4 == 0 && aligned(x.data, x.stride[0], 4, 16) &&
                   aligned(w, 0, ws, 4 * ws) && aligned(out.data, out.stride[0], os, 4 * os);
  with_dtype(w_dtype, [&](auto tw) {
    using TW = typename decltype(tw)::type;
    with_dtype(out.dtype, [&](auto to) {
      using TO = typename decltype(to)::type;
      auto launch = [&](auto kernel) {
        pdl_launch(kernel, dim3(unsigned(n)), dim3(kThreads), 0, stream, data_of<const float>(x), x.stride[0],
                                                     static_cast<const TW*>(w), data_of<TO>(out),
                                                     out.stride[0], H, eps);
      };
      if (vec)
        launch(rms_norm_kernel<TW, TO, 4>);
      else
        launch(rms_norm_kernel<TW, TO, 1>);
    });
  });
  CCA_CUDA_CHECK_LAUNCH("rms_norm_kernel");
}

void launch_rope(const TensorView& x, int64_t heads, const int32_t* positions,
                 const float* inv_freq, int64_t half, cudaStream_t stream) {
  const int64_t n = x.shape[0];
  if (n == 0 || heads == 0) return;
  const size_t smem = size_t(2 * half) * sizeof(float);
  const int64_t es = dtype_size(x.dtype);
  const bool vec = half % (16 / es) == 0 && aligned(x.data, x.stride[0], es, 16);
  with_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto kernel) {
      pdl_launch(kernel, dim3(unsigned(n)), dim3(kThreads), smem, stream, data_of<T>(x), x.stride[0], heads, half,
                                                      positions, inv_freq);
    };
    if (vec)
      launch(rope_kernel<T, 16 / sizeof(T)>);
    else
      launch(rope_kernel<T, 1>);
  });
  CCA_CUDA_CHECK_LAUNCH("rope_kernel");
}

void launch_swiglu(const TensorView& gate, const TensorView& up, const TensorView& out,
                   cudaStream_t stream) {
  const int64_t n = out.shape[0], I = out.shape[1];
  if (n == 0 || I == 0) return;
  const int64_t es = dtype_size(out.dtype);
  const int64_t V = 16 / es;
  const bool vec = I % V == 0 && aligned(gate.data, gate.stride[0], es, 16) &&
                   aligned(up.data, up.stride[0], es, 16) &&
                   aligned(out.data, out.stride[0], es, 16);
  with_dtype(out.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto kernel, int64_t units) {
      pdl_launch(kernel, dim3(row_grid(n, units)), dim3(kThreads), 0, stream, 
          data_of<const T>(gate), gate.stride[0], data_of<const T>(up), up.stride[0],
          data_of<T>(out), out.stride[0], n, I);
    };
    if (vec)
      launch(swiglu_kernel<T, 16 / sizeof(T)>, I / V);
    else
      launch(swiglu_kernel<T, 1>, I);
  });
  CCA_CUDA_CHECK_LAUNCH("swiglu_kernel");
}

void launch_embed(const int32_t* ids, const TensorView& table, const TensorView& out,
                  cudaStream_t stream) {
  const int64_t n = out.shape[0], H = out.shape[1];
  if (n == 0 || H == 0) return;
  with_dtype(table.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    pdl_launch(embed_kernel<T>, dim3(row_grid(n, H)), dim3(kThreads), 0, stream, 
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
    pdl_launch(gather_rows_kernel<U>, dim3(row_grid(m, row_bytes / u)), dim3(kThreads), 0, stream, 
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
  pdl_launch(argmax_rows_kernel, dim3(unsigned(m)), dim3(kArgmaxThreads), 0, stream, 
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
      pdl_launch(convert_kernel<S, D>, dim3(row_grid(n, C)), dim3(kThreads), 0, stream, 
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
      pdl_launch(add_bias_kernel<TY, TB>, dim3(row_grid(n, C)), dim3(kThreads), 0, stream, 
          data_of<TY>(y), y.stride[0], static_cast<const TB*>(b), n, C);
    });
  });
  CCA_CUDA_CHECK_LAUNCH("add_bias_kernel");
}

}  // namespace cca::ops::cuda

// SIMD building blocks of the CPU backend: the register-blocked tile product, a vector exp2 and
// row loads that convert float16/bfloat16 to float32. Each has an AVX-512 path (we build with
// -march=native) and a portable path, so the backend compiles and runs on any x86-64 or ARM host.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "cca/tensor.hpp"

#if defined(__AVX512F__)
// GCC 12 reports false 'may be used uninitialized' inside its own AVX-512 headers (GCC bug
// 105593); the diagnostic state that applies is the one at the header's lines.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define CCA_CPU_AVX512 1
#endif

namespace cca::cpu {

// Columns of every tile product: the queries of one tile. 64 = four AVX-512 vectors, which with
// 4-6 rows of accumulators fills the 32 vector registers without spilling.
constexpr int kBlockM = 64;
constexpr int kLanes = 16;
constexpr int kVecs = kBlockM / kLanes;

// Float buffer aligned to a cache line (vector loads of tile rows never split lines).
class AlignedFloats {
 public:
  AlignedFloats() = default;
  explicit AlignedFloats(int64_t n) { reset(n); }
  ~AlignedFloats() { std::free(p_); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  void reset(int64_t n) {
    std::free(p_);
    size_t bytes = (size_t(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64;
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p_) throw std::bad_alloc();
  }
  float* data() const { return p_; }

 private:
  float* p_ = nullptr;
};

// C[Mr x kBlockM] (row stride kBlockM) = (accumulate ? C * col_scale : 0) + A * B, where
// A(i, k) = a[i * a_rs + k * a_cs] is broadcast (any strides, so K rows or V columns are read in
// place) and B is [K x kBlockM] with row stride kBlockM. Shape: Mr x K times K x 64.
template <int Mr, bool kAccumulate>
inline void tile_product(int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                         float* c, const float* col_scale) {
#if defined(CCA_CPU_AVX512)
  __m512 acc[Mr][kVecs];
#pragma GCC unroll 8
  for (int i = 0; i < Mr; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v)
      acc[i][v] = kAccumulate ? _mm512_mul_ps(_mm512_load_ps(c + i * kBlockM + v * kLanes),
                                              _mm512_load_ps(col_scale + v * kLanes))
                              : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) bv[v] = _mm512_load_ps(b + k * kBlockM + v * kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < Mr; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * a_rs + k * a_cs]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < Mr; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) _mm512_store_ps(c + i * kBlockM + v * kLanes, acc[i][v]);
#else
  for (int i = 0; i < Mr; ++i) {
    float* ci = c + i * kBlockM;
    for (int j = 0; j < kBlockM; ++j) ci[j] = kAccumulate ? ci[j] * col_scale[j] : 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float ai = a[i * a_rs + k * a_cs];
      const float* bk = b + k * kBlockM;
      for (int j = 0; j < kBlockM; ++j) ci[j] += ai * bk[j];
    }
  }
#endif
}

// Rows [0, M) of C in register blocks of kRowBlock rows, then the remainder.
template <bool kAccumulate>
inline void tile_product_rows(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_cs,
                              const float* b, float* c, const float* col_scale) {
  constexpr int kRowBlock = 6;
  int64_t i = 0;
  for (; i + kRowBlock <= M; i += kRowBlock)
    tile_product<kRowBlock, kAccumulate>(K, a + i * a_rs, a_rs, a_cs, b, c + i * kBlockM,
                                         col_scale);
  const float* ar = a + i * a_rs;
  float* cr = c + i * kBlockM;
  switch (M - i) {
    case 5:
      tile_product<5, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    case 4:
      tile_product<4, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    case 3:
      tile_product<3, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    case 2:
      tile_product<2, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    case 1:
      tile_product<1, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    default:
      break;
  }
}

#if defined(CCA_CPU_AVX512)
// 2^x for x <= 128 (values below -150 give exactly 0, -inf included). Cephes exp2f: x = n + f with
// |f| <= 1/2, 2^f by a degree-6 polynomial, then scalef applies 2^n. Max relative error 7.7e-8
// against std::exp2 over [-122, 0] (normal results), measured with a scratch sweep.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.f));
  x = _mm512_min_ps(x, _mm512_set1_ps(128.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// dst[0..n) = float32 of the n elements at src (dtype `dt`, contiguous).
inline void load_row(const void* src, DType dt, int64_t n, float* dst) {
  int64_t i = 0;
  if (dt == DType::f32) {
    const float* s = static_cast<const float*>(src);
    for (; i < n; ++i) dst[i] = s[i];
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
#if defined(CCA_CPU_AVX512)
  for (; i + kLanes <= n; i += kLanes) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m512 f = dt == DType::f16
                         ? _mm512_cvtph_ps(h)
                         : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_storeu_ps(dst + i, f);
  }
#endif
  if (dt == DType::f16)
    for (; i < n; ++i) dst[i] = f16_to_float(s[i]);
  else
    for (; i < n; ++i) dst[i] = bf16_to_float(s[i]);
}

// The n elements at src as float32: in place for float32, else converted into buf.
inline const float* row_as_float(const void* src, DType dt, int64_t n, float* buf) {
  if (dt == DType::f32) return static_cast<const float*>(src);
  load_row(src, dt, n, buf);
  return buf;
}

// sum_i a[i] b[i] with independent partial sums (a single running sum is latency-bound).
inline float dot_product(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
#if defined(CCA_CPU_AVX512)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + kLanes), _mm512_loadu_ps(b + i + kLanes), acc1);
  }
  for (; i + kLanes <= n; i += kLanes)
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (float x : part) s += x;
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace cca::cpu

// The CPU backend's vector layer, written once with Google Highway (1.0.3, Debian 12's) and
// compiled for every SIMD target: the register-blocked tile product, a vector exp2, row loads
// and stores that convert float16/bfloat16, dot products and row updates. Included by the
// translation units that compile per target (hwy/foreach_target.h re-includes them once per
// target; every function here lands in cca::cpu::N_AVX2, N_AVX3, ...); the attention kernels,
// the pooling, the decode path, the backward and the model runtime's CPU ops all use it.
//
// Include guard for per-target headers: toggled by foreach_target.h on each re-inclusion.
#if defined(CCA_CPU_SIMD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef CCA_CPU_SIMD_INL_H_
#undef CCA_CPU_SIMD_INL_H_
#else
#define CCA_CPU_SIMD_INL_H_
#endif

#include <hwy/highway.h>

#include <cstdint>
#include <cstring>

#include "cca/tensor.hpp"
#include "cpu_simd.hpp"

HWY_BEFORE_NAMESPACE();
namespace cca::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Float vectors of at most 16 lanes (512 bits): 16 on AVX3, 8 on AVX2, 4 on SSE4/NEON, 1 on
// SCALAR; on SVE the hardware width up to 512 bits. kBlockM = 64 is a multiple of each.
using DF = hn::CappedTag<float, 16>;
using VF = hn::Vec<DF>;

// Accumulator vectors per row of the tile product's register block: 6 rows x kColVecs vectors
// stay in registers. x86 before AVX-512 has 16 vector registers: 6 x 2 = 12 accumulators, two B
// vectors and a broadcast (the classic 6x16 AVX2 kernel); AVX3, NEON and SVE have 32: 6 x 4.
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
inline constexpr int kColVecs = 2;
#else
inline constexpr int kColVecs = 4;
#endif
inline constexpr int kRowBlock = 6;

// Whether PromoteTo(float16 -> float32) is a hardware conversion (x86 F16C from AVX2 on, Arm
// A64). Highway's software fallback (SSE4, SCALAR, EMU128) maps infinities and NaNs to finite
// values, so those targets use f16_bits_to_float's integer path instead.
#if (HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2) || (HWY_ARCH_ARM_A64 && HWY_TARGET <= HWY_NEON)
inline constexpr bool kHardwareF16 = true;
#else
inline constexpr bool kHardwareF16 = false;
#endif

// ---- exp2 ----------------------------------------------------------------------------------
// 2^x for x <= 127; x <= -126.5 (-inf included) gives exactly 0 (NaN gives 0 on x86). Cephes
// exp2f: x = n + f with |f| <= 1/2, 2^f by a degree-6 polynomial, times 2^n built in the exponent
// field. n comes from adding 1.5 * 2^23, which rounds x to the nearest integer (ties to even) and
// leaves n in the low mantissa bits, so shifting those bits by 23 gives n << 23 (a float to int
// conversion would add overflow fix-ups for inputs that the clamp has excluded). Max relative
// error 7.7e-8 against std::exp2 over [-122, 0] with FMA (measured with a scratch sweep of the
// earlier AVX-512 version; the polynomial is the same).
template <class D, class V = hn::Vec<D>>
HWY_INLINE V exp2(D d, V x) {
  const hn::RebindToUnsigned<D> du;
  const V magic = hn::Set(d, 12582912.f);  // 1.5 * 2^23
  x = hn::Min(hn::Max(x, hn::Set(d, -127.f)), hn::Set(d, 127.f));
  const V t = hn::Add(x, magic);
  const V n = hn::Sub(t, magic);
  const V f = hn::Sub(x, n);
  V p = hn::Set(d, 1.535336188319500e-4f);
  p = hn::MulAdd(p, f, hn::Set(d, 1.339887440266574e-3f));
  p = hn::MulAdd(p, f, hn::Set(d, 9.618437357674640e-3f));
  p = hn::MulAdd(p, f, hn::Set(d, 5.550332471162809e-2f));
  p = hn::MulAdd(p, f, hn::Set(d, 2.402264791363012e-1f));
  p = hn::MulAdd(p, f, hn::Set(d, 6.931472028550421e-1f));
  p = hn::MulAdd(p, f, hn::Set(d, 1.f));
  // 2^n for n in [-127, 127]: (n + 127) << 23; n = -127 gives the bit pattern 0, i.e. 0.
  const auto e = hn::Add(hn::ShiftLeft<23>(hn::BitCast(du, t)), hn::Set(du, 127u << 23));
  return hn::Mul(p, hn::BitCast(d, e));
}

// exp2 of n floats in place (n any).
HWY_INLINE void exp2_row(float* HWY_RESTRICT x, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(exp2(d, hn::LoadU(d, x + i)), d, x + i);
  if (i < n) {  // the tail through a full vector of a padded copy
    HWY_ALIGN float buf[16] = {};
    std::memcpy(buf, x + i, size_t(n - i) * sizeof(float));
    hn::Store(exp2(d, hn::Load(d, buf)), d, buf);
    std::memcpy(x + i, buf, size_t(n - i) * sizeof(float));
  }
}

// ---- float16 / bfloat16 <-> float32 ----------------------------------------------------------
// Lanes of 16-bit patterns (zero-extended to 32 bits by the caller's PromoteTo) as float32,
// exactly f16_to_float (tensor.hpp), NaN payloads aside.
template <class D>
HWY_INLINE hn::Vec<D> f16_bits_to_float(D d, hn::Vec<hn::Rebind<uint16_t, D>> h) {
  if constexpr (kHardwareF16) {
    const hn::Rebind<hwy::float16_t, D> dh;
    return hn::PromoteTo(d, hn::BitCast(dh, h));
  } else {
    const hn::RebindToUnsigned<D> du;
    const hn::RebindToSigned<D> di;
    const auto x = hn::PromoteTo(du, h);
    const auto sign = hn::ShiftLeft<16>(hn::And(x, hn::Set(du, 0x8000u)));
    const auto exp = hn::And(hn::ShiftRight<10>(x), hn::Set(du, 0x1fu));
    const auto man = hn::And(x, hn::Set(du, 0x3ffu));
    const auto normal =
        hn::Or(hn::ShiftLeft<23>(hn::Add(exp, hn::Set(du, 112u))), hn::ShiftLeft<13>(man));
    const auto special = hn::Or(hn::Set(du, 0x7f800000u), hn::ShiftLeft<13>(man));
    // zero and subnormals: man * 2^-24, exact
    const auto sub =
        hn::BitCast(du, hn::Mul(hn::ConvertTo(d, hn::BitCast(di, man)), hn::Set(d, 0x1p-24f)));
    auto bits = hn::IfThenElse(hn::Eq(exp, hn::Zero(du)), sub, normal);
    bits = hn::IfThenElse(hn::Eq(exp, hn::Set(du, 0x1fu)), special, bits);
    return hn::BitCast(d, hn::Or(sign, bits));
  }
}

// float32 lanes as float16 bit patterns (in 32-bit lanes), exactly float_to_f16: round to
// nearest even, subnormals, overflow to infinity, NaN to 0x7e00 with the sign.
template <class D>
HWY_INLINE hn::Vec<hn::RebindToUnsigned<D>> float_to_f16_bits(D d, hn::Vec<D> v) {
  const hn::RebindToUnsigned<D> du;
  const hn::RebindToSigned<D> di;
  const auto x = hn::BitCast(du, v);
  const auto sign = hn::And(hn::ShiftRight<16>(x), hn::Set(du, 0x8000u));
  const auto absx = hn::And(x, hn::Set(du, 0x7fffffffu));
  const auto abs_i = hn::BitCast(di, absx);  // < 2^31: signed compares are exact
  // normal: rebias, round to nearest even on the 13 dropped bits
  const auto normal =
      hn::ShiftRight<13>(hn::Sub(hn::Add(hn::Add(absx, hn::Set(du, 0xfffu)),
                                         hn::And(hn::ShiftRight<13>(absx), hn::Set(du, 1u))),
                                 hn::Set(du, 112u << 23)));
  // subnormal or zero: |v| * 2^24 rounded to nearest even (exact scaling; at most 1024)
  const auto small = hn::Min(hn::BitCast(d, absx), hn::Set(d, 0x1p-14f));
  const auto sub =
      hn::BitCast(du, hn::ConvertTo(di, hn::Round(hn::Mul(small, hn::Set(d, 0x1p24f)))));
  auto r = hn::IfThenElse(hn::RebindMask(du, hn::Lt(abs_i, hn::Set(di, 0x38800000))), sub, normal);
  r = hn::IfThenElse(hn::RebindMask(du, hn::Gt(abs_i, hn::Set(di, 0x477fefff))),
                     hn::Set(du, 0x7c00u), r);
  r = hn::IfThenElse(hn::RebindMask(du, hn::Gt(abs_i, hn::Set(di, 0x7f800000))),
                     hn::Set(du, 0x7e00u), r);
  return hn::Or(sign, r);
}

// float32 lanes as bfloat16 bit patterns, exactly float_to_bf16: round to nearest even, NaN
// quieted.
template <class D>
HWY_INLINE hn::Vec<hn::RebindToUnsigned<D>> float_to_bf16_bits(D d, hn::Vec<D> v) {
  const hn::RebindToUnsigned<D> du;
  const hn::RebindToSigned<D> di;
  const auto x = hn::BitCast(du, v);
  const auto rounded = hn::ShiftRight<16>(
      hn::Add(hn::Add(x, hn::Set(du, 0x7fffu)), hn::And(hn::ShiftRight<16>(x), hn::Set(du, 1u))));
  const auto nan = hn::Or(hn::ShiftRight<16>(x), hn::Set(du, 0x40u));
  const auto abs_i = hn::BitCast(di, hn::And(x, hn::Set(du, 0x7fffffffu)));
  return hn::IfThenElse(hn::RebindMask(du, hn::Gt(abs_i, hn::Set(di, 0x7f800000))), nan, rounded);
}

// dst[0..n) = float32 of the n elements at src (dtype `dt`, contiguous).
HWY_INLINE void load_row(const void* HWY_RESTRICT src, DType dt, int64_t n,
                         float* HWY_RESTRICT dst) {
  if (dt == DType::f32) {
    std::memcpy(dst, src, size_t(n) * sizeof(float));
    return;
  }
  const DF d;
  const hn::Rebind<uint16_t, DF> d16;
  const hn::RebindToUnsigned<DF> du;
  const int64_t N = int64_t(hn::Lanes(d));
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (dt == DType::bf16) {
    for (; i + N <= n; i += N)
      hn::StoreU(hn::BitCast(d, hn::ShiftLeft<16>(hn::PromoteTo(du, hn::LoadU(d16, s + i)))), d,
                 dst + i);
    for (; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    for (; i + N <= n; i += N) hn::StoreU(f16_bits_to_float(d, hn::LoadU(d16, s + i)), d, dst + i);
    for (; i < n; ++i) dst[i] = f16_to_float(s[i]);
  }
}

// The n elements at src as float32: in place for float32, else converted into buf.
HWY_INLINE const float* row_as_float(const void* src, DType dt, int64_t n, float* buf) {
  if (dt == DType::f32) return static_cast<const float*>(src);
  load_row(src, dt, n, buf);
  return buf;
}

// dst[0..n) (dtype `dt`) = src[0..n), rounded as TensorView::store does.
HWY_INLINE void store_row(const float* HWY_RESTRICT src, int64_t n, void* HWY_RESTRICT dst,
                          DType dt) {
  if (dt == DType::f32) {
    std::memcpy(dst, src, size_t(n) * sizeof(float));
    return;
  }
  const DF d;
  const hn::Rebind<uint16_t, DF> d16;
  const hn::RebindToSigned<DF> di;
  const int64_t N = int64_t(hn::Lanes(d));
  uint16_t* o = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  if (dt == DType::bf16) {
    for (; i + N <= n; i += N)
      hn::StoreU(hn::DemoteTo(d16, hn::BitCast(di, float_to_bf16_bits(d, hn::LoadU(d, src + i)))),
                 d16, o + i);
    for (; i < n; ++i) o[i] = float_to_bf16(src[i]);
  } else {
    for (; i + N <= n; i += N)
      hn::StoreU(hn::DemoteTo(d16, hn::BitCast(di, float_to_f16_bits(d, hn::LoadU(d, src + i)))),
                 d16, o + i);
    for (; i < n; ++i) o[i] = float_to_f16(src[i]);
  }
}

// ---- rows of float32 -------------------------------------------------------------------------
// sum_i a[i] b[i] with two independent partial sums (one running sum is latency-bound).
HWY_INLINE float dot_product(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  VF acc0 = hn::Zero(d), acc1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    acc0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), acc0);
    acc1 = hn::MulAdd(hn::LoadU(d, a + i + N), hn::LoadU(d, b + i + N), acc1);
  }
  for (; i + N <= n; i += N) acc0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), acc0);
  float s = hn::GetLane(hn::SumOfLanes(d, hn::Add(acc0, acc1)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0..n) += a x[0..n)
HWY_INLINE void axpy(float a, const float* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const VF va = hn::Set(d, a);
  int64_t i = 0;
  for (; i + N <= n; i += N)
    hn::StoreU(hn::MulAdd(va, hn::LoadU(d, x + i), hn::LoadU(d, y + i)), d, y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

// y[0..n) *= a
HWY_INLINE void scale_row(float a, float* HWY_RESTRICT y, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const VF va = hn::Set(d, a);
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(va, hn::LoadU(d, y + i)), d, y + i);
  for (; i < n; ++i) y[i] *= a;
}

// y[0..n) = max(y, x) elementwise
HWY_INLINE void max_row(const float* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N)
    hn::StoreU(hn::Max(hn::LoadU(d, y + i), hn::LoadU(d, x + i)), d, y + i);
  for (; i < n; ++i) y[i] = y[i] < x[i] ? x[i] : y[i];
}

// Asks for the cache line at p to be brought into L2 (prefetcht1 on x86, prfm pldl2keep on Arm).
HWY_INLINE void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// ---- the tile product ------------------------------------------------------------------------
// One register block: C[Mr x W] (row stride kBlockM, W = kColVecs vectors) =
// (kAccumulate ? C * col_scale : 0) + A * B, where A(i, k) = a[i * a_rs + k * a_cs] is broadcast
// and B is [K x W] with row stride kBlockM; b, c and col_scale point at the strip's first column.
// Accumulators are named variables, not an array: SVE vectors are sizeless.
template <int Mr, bool kAccumulate>
HWY_INLINE void tile_block(int64_t K, const float* HWY_RESTRICT a, int64_t a_rs, int64_t a_cs,
                           const float* HWY_RESTRICT b, float* HWY_RESTRICT c,
                           const float* HWY_RESTRICT col_scale) {
  static_assert(Mr >= 1 && Mr <= kRowBlock, "register block of 1-6 rows");
  const DF d;
  const size_t N = hn::Lanes(d);
  const VF z = hn::Zero(d);
  VF c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z;
  VF c20 = z, c21 = z, c22 = z, c23 = z, c30 = z, c31 = z, c32 = z, c33 = z;
  VF c40 = z, c41 = z, c42 = z, c43 = z, c50 = z, c51 = z, c52 = z, c53 = z;
#define CCA_FOR_ROW_VECS(OP, i)           \
  if constexpr (Mr > i) {                 \
    OP(i, 0);                             \
    if constexpr (kColVecs > 1) OP(i, 1); \
    if constexpr (kColVecs > 2) OP(i, 2); \
    if constexpr (kColVecs > 3) OP(i, 3); \
  }
  // clang-format off
#define CCA_FOR_ALL(OP)                                                   \
  CCA_FOR_ROW_VECS(OP, 0) CCA_FOR_ROW_VECS(OP, 1) CCA_FOR_ROW_VECS(OP, 2) \
  CCA_FOR_ROW_VECS(OP, 3) CCA_FOR_ROW_VECS(OP, 4) CCA_FOR_ROW_VECS(OP, 5)
  // clang-format on
  if constexpr (kAccumulate) {
#define CCA_INIT(i, v) \
  c##i##v = hn::Mul(hn::Load(d, c + i * kBlockM + v * N), hn::Load(d, col_scale + v * N))
    CCA_FOR_ALL(CCA_INIT)
#undef CCA_INIT
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * kBlockM;
    const VF b0 = hn::Load(d, bk);
    const VF b1 = kColVecs > 1 ? hn::Load(d, bk + N) : z;
    const VF b2 = kColVecs > 2 ? hn::Load(d, bk + 2 * N) : z;
    const VF b3 = kColVecs > 3 ? hn::Load(d, bk + 3 * N) : z;
    const float* ak = a + k * a_cs;
#define CCA_FMA(i, v) c##i##v = hn::MulAdd(a##i, b##v, c##i##v)
#define CCA_ROW(i)                            \
  if constexpr (Mr > i) {                     \
    const VF a##i = hn::Set(d, ak[i * a_rs]); \
    CCA_FOR_ROW_VECS(CCA_FMA, i)              \
  }
    CCA_ROW(0) CCA_ROW(1) CCA_ROW(2) CCA_ROW(3) CCA_ROW(4) CCA_ROW(5)
#undef CCA_ROW
#undef CCA_FMA
  }
#define CCA_STORE(i, v) hn::Store(c##i##v, d, c + i * kBlockM + v * N)
  CCA_FOR_ALL(CCA_STORE)
#undef CCA_STORE
#undef CCA_FOR_ALL
#undef CCA_FOR_ROW_VECS
}

// Rows [0, R) of C over every column strip of kColVecs vectors (one strip on AVX3: all 64
// columns; four on AVX2).
template <int R, bool kAccumulate>
HWY_INLINE void tile_strips(int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                            float* c, const float* col_scale) {
  const DF d;
  const int64_t W = kColVecs * int64_t(hn::Lanes(d));
  for (int64_t j = 0; j < kBlockM; j += W)
    tile_block<R, kAccumulate>(K, a, a_rs, a_cs, b + j, c + j,
                               kAccumulate ? col_scale + j : nullptr);
}

// C[M x kBlockM] (row stride kBlockM) = (kAccumulate ? C * col_scale : 0) + A * B for
// A(i, k) = a[i * a_rs + k * a_cs] (any strides, so K rows or V columns are read in place) and
// B [K x kBlockM] (row stride kBlockM): blocks of kRowBlock rows, then the last rows.
template <bool kAccumulate>
HWY_INLINE void tile_product_rows(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_cs,
                                  const float* b, float* c, const float* col_scale) {
  int64_t i = 0;
  for (; i + kRowBlock <= M; i += kRowBlock)
    tile_strips<kRowBlock, kAccumulate>(K, a + i * a_rs, a_rs, a_cs, b, c + i * kBlockM, col_scale);
  const float* ar = a + i * a_rs;
  float* cr = c + i * kBlockM;
  switch (M - i) {
    case 5:
      tile_strips<5, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    case 4:
      tile_strips<4, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    case 3:
      tile_strips<3, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    case 2:
      tile_strips<2, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    case 1:
      tile_strips<1, kAccumulate>(K, ar, a_rs, a_cs, b, cr, col_scale);
      break;
    default:
      break;
  }
}

}  // namespace cca::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard

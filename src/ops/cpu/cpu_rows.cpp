// The element-wise rows of the cpu ops (rms_norm, rope, swiglu), written with the CPU backend's
// vector layer (attn/cpu/simd-inl.h) and compiled per SIMD target like the attention kernels;
// cpu_ops.cpp runs the OpenMP loops and calls these through Highway's dynamic dispatch.
// foreach_target.h comes first: it re-includes this file once per target.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/cpu/cpu_rows.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>
// clang-format on

#include "ops/cpu/cpu_rows.hpp"

#include <algorithm>
#include <cmath>

#include "attn/cpu/simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace cca::ops::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using cca::cpu::HWY_NAMESPACE::DF;
using cca::cpu::HWY_NAMESPACE::VF;

// o = w * (x / sqrt(mean(x^2) + eps)), the sum of squares in float64 as before vectorising.
void rms_norm_row_impl(const float* HWY_RESTRICT x, const float* HWY_RESTRICT w, int64_t H,
                       float eps, float* HWY_RESTRICT o) {
  double ss = 0;
  int64_t i = 0;
#if HWY_HAVE_FLOAT64
  const hn::CappedTag<double, 8> dd;
  const hn::Rebind<float, decltype(dd)> dh;  // as many floats as doubles
  const int64_t Nd = int64_t(hn::Lanes(dd));
  auto acc0 = hn::Zero(dd), acc1 = hn::Zero(dd);
  for (; i + 2 * Nd <= H; i += 2 * Nd) {
    const auto a = hn::PromoteTo(dd, hn::LoadU(dh, x + i));
    const auto b = hn::PromoteTo(dd, hn::LoadU(dh, x + i + Nd));
    acc0 = hn::MulAdd(a, a, acc0);
    acc1 = hn::MulAdd(b, b, acc1);
  }
  ss = hn::GetLane(hn::SumOfLanes(dd, hn::Add(acc0, acc1)));
#endif
  for (; i < H; ++i) ss += double(x[i]) * x[i];
  const float inv = float(1.0 / std::sqrt(ss / double(H) + eps));
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const VF vinv = hn::Set(d, inv);
  i = 0;
  for (; i + N <= H; i += N)
    hn::StoreU(hn::Mul(hn::LoadU(d, w + i), hn::Mul(hn::LoadU(d, x + i), vinv)), d, o + i);
  for (; i < H; ++i) o[i] = w[i] * (x[i] * inv);
}

// Each of `heads` vectors of D = 2 half floats at x (contiguous) rotated in place: element i
// with element i + half by the angle whose cosine and sine are c[i], s[i].
void rope_row_impl(float* HWY_RESTRICT x, int64_t heads, int64_t half, const float* HWY_RESTRICT c,
                   const float* HWY_RESTRICT s) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * 2 * half;
    int64_t i = 0;
    for (; i + N <= half; i += N) {
      const VF a = hn::LoadU(d, v + i), b = hn::LoadU(d, v + i + half);
      const VF vc = hn::LoadU(d, c + i), vs = hn::LoadU(d, s + i);
      hn::StoreU(hn::Sub(hn::Mul(a, vc), hn::Mul(b, vs)), d, v + i);
      hn::StoreU(hn::Add(hn::Mul(b, vc), hn::Mul(a, vs)), d, v + i + half);
    }
    for (; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i] + a * s[i];
    }
  }
}

// o = g / (1 + e^-g) * u (SiLU of the gate times up). e^-g by Highway's Exp (1 ULP), its argument
// capped at 88 (e^88 is finite; the result is then below 1e-36 |g|).
void swiglu_row_impl(const float* HWY_RESTRICT g, const float* HWY_RESTRICT u,
                     float* HWY_RESTRICT o, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const VF one = hn::Set(d, 1.f), cap = hn::Set(d, 88.f);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const VF vg = hn::LoadU(d, g + i);
    const VF e = hn::Exp(d, hn::Min(hn::Neg(vg), cap));
    hn::StoreU(hn::Mul(hn::Div(vg, hn::Add(one, e)), hn::LoadU(d, u + i)), d, o + i);
  }
  for (; i < n; ++i) o[i] = g[i] / (1.f + std::exp(std::min(-g[i], 88.f))) * u[i];
}

}  // namespace cca::ops::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace cca::ops::cpu {
namespace {
HWY_EXPORT(rms_norm_row_impl);
HWY_EXPORT(rope_row_impl);
HWY_EXPORT(swiglu_row_impl);
}  // namespace

RowFns row_fns() {
  cca::cpu::init_simd_target();
  return {HWY_DYNAMIC_DISPATCH(rms_norm_row_impl), HWY_DYNAMIC_DISPATCH(rope_row_impl),
          HWY_DYNAMIC_DISPATCH(swiglu_row_impl)};
}

}  // namespace cca::ops::cpu
#endif  // HWY_ONCE

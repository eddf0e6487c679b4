// Run-time choice of the SIMD target (cpu_simd.hpp) and the dtype conversions of rows. Every
// per-target function of the CPU backend and of the CPU ops is called through Highway's dynamic
// dispatch (HWY_DYNAMIC_DISPATCH), which runs the best target in Highway's "supported" mask; here
// that mask is narrowed to the target named by CCA_CPU_TARGET or by select_simd_target().
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/cpu_simd.cpp"
#include "cpu_simd.hpp"

#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cctype>
#include <cstdlib>
#include <mutex>
#include <string>

#include "cca/error.hpp"
#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace cca::cpu::HWY_NAMESPACE {

int64_t this_target() { return HWY_TARGET; }
void to_float_row(const void* src, DType dt, int64_t n, float* dst) { load_row(src, dt, n, dst); }
void from_float_row(const float* src, int64_t n, void* dst, DType dt) {
  store_row(src, n, dst, dt);
}

}  // namespace cca::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace cca::cpu {
namespace {

HWY_EXPORT(this_target);
HWY_EXPORT(to_float_row);
HWY_EXPORT(from_float_row);

// The targets this CPU supports, read once before any narrowing (hwy::SupportedTargets() returns
// the narrowed mask afterwards).
int64_t cpu_targets() {
  static const int64_t targets = hwy::SupportedTargets();
  return targets;
}

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string compiled_names() {
  std::string names;
  for (int64_t t = HWY_TARGETS; t != 0; t &= t - 1)
    names += (names.empty() ? "" : ", ") + std::string(hwy::TargetName(t & -t));
  return names;
}

// Narrows Highway's mask to `name` and the targets below it ("" = no narrowing) and re-chooses.
// `source` names where the name came from, for errors.
void apply_target(const std::string& name, const std::string& source) {
  const int64_t cpu = cpu_targets();
  if (name.empty()) {
    hwy::SetSupportedTargetsForTest(0);  // back to what the CPU supports
  } else {
    int64_t bit = 0;
    for (int64_t t = HWY_TARGETS; t != 0; t &= t - 1)
      if (lower(hwy::TargetName(t & -t)) == lower(name)) bit = t & -t;
#if HWY_ARCH_X86
    if (lower(name) == "avx512") bit = HWY_AVX3 & HWY_TARGETS;
#endif
    check(bit != 0,
          source + name + ": not a SIMD target of this build (compiled: " + compiled_names() + ")");
    std::string runs;
    for (int64_t t = HWY_TARGETS & cpu; t != 0; t &= t - 1)
      runs += (runs.empty() ? "" : ", ") + std::string(hwy::TargetName(t & -t));
    check((cpu & bit) != 0, source + name + ": this CPU cannot run it (it runs " + runs + ")");
    // `bit` and every worse target (higher bits) the CPU has; the best of them is `bit`.
    hwy::SetSupportedTargetsForTest(cpu & ~(bit - 1));
  }
  hwy::GetChosenTarget().Update(hwy::SupportedTargets());
}

std::once_flag env_once;

}  // namespace

void init_simd_target() {
  std::call_once(env_once, [] {
    cpu_targets();
    const char* env = std::getenv("CCA_CPU_TARGET");
    if (env && *env) apply_target(env, "CCA_CPU_TARGET=");
  });
}

void select_simd_target(const std::string& name) {
  init_simd_target();
  if (!name.empty()) {
    apply_target(name, "SIMD target ");
    return;
  }
  const char* env = std::getenv("CCA_CPU_TARGET");
  apply_target(env ? env : "", "CCA_CPU_TARGET=");
}

std::string simd_target() {
  init_simd_target();
  return hwy::TargetName(HWY_DYNAMIC_DISPATCH(this_target)());
}

std::vector<SimdTarget> simd_targets() {
  std::vector<SimdTarget> list;
  for (int64_t t = HWY_TARGETS; t != 0; t &= t - 1)
    list.push_back({hwy::TargetName(t & -t), (cpu_targets() & (t & -t)) != 0});
  return list;
}

void row_to_float(const void* src, DType dt, int64_t n, float* dst) {
  init_simd_target();
  HWY_DYNAMIC_DISPATCH(to_float_row)(src, dt, n, dst);
}

void row_from_float(const float* src, int64_t n, void* dst, DType dt) {
  init_simd_target();
  HWY_DYNAMIC_DISPATCH(from_float_row)(src, n, dst, dt);
}

}  // namespace cca::cpu
#endif  // HWY_ONCE

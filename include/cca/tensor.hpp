// Tensor views: a pointer, a shape and int64 strides (in elements), no ownership.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace cca {

enum class DType : uint8_t { f32, f16, bf16 };
enum class Device : uint8_t { cpu, cuda };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "?";
}
inline int64_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

// IEEE binary16 and bfloat16 <-> float, round to nearest even (portable bit manipulation).
inline float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, absx = x & 0x7fffffff;
  if (absx > 0x7f800000u) return uint16_t(sign | 0x7e00);       // NaN
  if (absx >= 0x477ff000u) return uint16_t(sign | 0x7c00);      // overflow to inf
  if (absx < 0x38800000u) {                                     // subnormal or zero
    if (absx < 0x33000000u) return uint16_t(sign);
    uint32_t e = absx >> 23, man = (absx & 0x7fffff) | 0x800000, shift = 126 - e;
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t r = absx + 0xfff + ((absx >> 13) & 1) - (112u << 23);  // rebias, round to even
  return uint16_t(sign | (r >> 13));
}
inline float bf16_to_float(uint16_t b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffff) > 0x7f800000u) return uint16_t((x >> 16) | 0x40);  // quiet NaN
  return uint16_t((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

// A strided view of up to 4 dimensions. Attention tensors are [B, T, H, D] with stride[3] == 1.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};

  bool empty() const { return data == nullptr; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  // Element offset of index (i0, i1, i2, i3).
  int64_t offset(int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) const {
    return i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3];
  }
  void* ptr(int64_t elem_offset) const {
    return static_cast<char*>(data) + elem_offset * dtype_size(dtype);
  }
  float load(int64_t elem_offset) const {
    const void* p = ptr(elem_offset);
    switch (dtype) {
      case DType::f32: return *static_cast<const float*>(p);
      case DType::f16: return f16_to_float(*static_cast<const uint16_t*>(p));
      case DType::bf16: return bf16_to_float(*static_cast<const uint16_t*>(p));
    }
    return 0.f;
  }
  void store(int64_t elem_offset, float value) const {
    void* p = ptr(elem_offset);
    switch (dtype) {
      case DType::f32: *static_cast<float*>(p) = value; break;
      case DType::f16: *static_cast<uint16_t*>(p) = float_to_f16(value); break;
      case DType::bf16: *static_cast<uint16_t*>(p) = float_to_bf16(value); break;
    }
  }
  // Rows [begin, begin + count) of dimension `dim`.
  TensorView slice(int dim, int64_t begin, int64_t count) const {
    TensorView v = *this;
    v.data = data ? ptr(begin * stride[dim]) : nullptr;
    v.shape[dim] = count;
    return v;
  }
  std::string shape_string() const;
};

// A contiguous row-major view over `data` with the given shape.
TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                     Device device = Device::cpu);

}  // namespace cca

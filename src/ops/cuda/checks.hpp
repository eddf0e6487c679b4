// Host-side checks of the views the CUDA ops take. Each failure is a cca::Error naming the op, the
// view and the bad value.
#pragma once
#include <cstdint>
#include <string>

#include "cca/error.hpp"
#include "cca/tensor.hpp"

namespace cca::ops::cuda {

inline std::string where(const char* op, const char* name) {
  return std::string(op) + ": " + name;
}

// A 2-D view [rows, cols] in GPU memory, contiguous in its last dimension, with a row stride of
// at least cols (when it has more than one row).
inline void check_matrix(const TensorView& v, const char* op, const char* name) {
  check(v.ndim == 2, where(op, name) + " must be a 2-D view [rows, cols], got " +
                         std::to_string(v.ndim) + " dimensions");
  check(v.device == Device::cuda, where(op, name) + " must be in GPU memory (device cuda)");
  check(v.shape[0] >= 0 && v.shape[1] >= 0,
        where(op, name) + " has a negative size: shape " + v.shape_string());
  check(v.shape[1] <= 1 || v.stride[1] == 1,
        where(op, name) + " must be contiguous in its last dimension, stride[1] = " +
            std::to_string(v.stride[1]));
  check(v.shape[0] <= 1 || v.stride[0] >= v.shape[1],
        where(op, name) + " row stride " + std::to_string(v.stride[0]) + " is below its " +
            std::to_string(v.shape[1]) + " columns");
  check(v.numel() == 0 || v.data != nullptr, where(op, name) + " has no data");
}

// A contiguous vector of `length` elements in GPU memory: [length] or [1, length].
inline void check_vector(const TensorView& v, int64_t length, const char* op, const char* name) {
  check(v.device == Device::cuda, where(op, name) + " must be in GPU memory (device cuda)");
  const bool shape_ok = (v.ndim == 1 && v.shape[0] == length) ||
                        (v.ndim == 2 && v.shape[0] == 1 && v.shape[1] == length);
  check(shape_ok, where(op, name) + " must be a vector of " + std::to_string(length) +
                      " elements, got shape " + v.shape_string());
  check(length <= 1 || v.stride[v.ndim - 1] == 1,
        where(op, name) + " must be contiguous, stride " + std::to_string(v.stride[v.ndim - 1]));
  check(length == 0 || v.data != nullptr, where(op, name) + " has no data");
}

inline void check_dtype(const TensorView& v, DType want, const char* op, const char* name) {
  check(v.dtype == want, where(op, name) + " must be " + dtype_name(want) + ", got " +
                             dtype_name(v.dtype));
}

inline void check_shape(const TensorView& v, int64_t rows, int64_t cols, const char* op,
                        const char* name) {
  check(v.shape[0] == rows && v.shape[1] == cols,
        where(op, name) + " shape " + v.shape_string() + " must be [" + std::to_string(rows) +
            ", " + std::to_string(cols) + "]");
}

}  // namespace cca::ops::cuda

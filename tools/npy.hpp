// NumPy .npy files (format versions 1, 2 and 3): little-endian float32 ('<f4') and float16
// ('<f2') arrays in C order. Anything else is rejected with a cca::Error naming the file and the
// problem. Writes are atomic: a temporary file in the target's directory, renamed on success
// (model/output_file.hpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cca/tensor.hpp"

namespace cca {

// An array read from (or to be written to) a .npy file; owns its bytes.
struct NpyArray {
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  std::vector<std::byte> data;

  int64_t numel() const;
  std::string shape_string() const;  // "(2, 3)" as NumPy prints it
  // A contiguous view of the data; needs 1 to 4 dimensions.
  TensorView view();
};

// An array of `shape` filled with zeros; cca::Error when it would need more than half of the
// machine's memory.
NpyArray make_npy_array(DType dtype, std::vector<int64_t> shape);

// Parse the bytes of a .npy file; `name` labels errors (usually the path).
NpyArray parse_npy(std::span<const std::byte> bytes, const std::string& name);
NpyArray read_npy(const std::string& path);

// The bytes of a .npy file holding the contiguous host view `t` (float32 or float16; bfloat16
// has no NumPy dtype). Version 1 header unless the header needs more than 65535 bytes.
std::vector<std::byte> encode_npy(const TensorView& t);

// encode_npy, written through a model::PendingFile (atomic: a temporary file renamed into place).
void write_npy(const std::string& path, const TensorView& t);

}  // namespace cca

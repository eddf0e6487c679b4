// safetensors checkpoints, memory-mapped: one model.safetensors or shards listed by
// model.safetensors.index.json. Only F32, F16 and BF16 tensors are accepted; every header field
// is checked against the file before any tensor is used (file format: an 8-byte little-endian
// header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the data).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cca/tensor.hpp"

namespace cca::model {

struct TensorInfo {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // inside the file's mapping
  int64_t nbytes = 0;
  std::string file;  // path of the file that holds it
  int64_t numel() const;
  std::string shape_string() const;  // "[64, 128]"
};

// One mapped file. Throws cca::Error naming the file for a truncated file, a header length
// beyond the end, bad header JSON, an unsupported dtype (naming the tensor), offsets that do
// not match shape and dtype, or data past the end of the file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  int64_t size() const { return size_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  int64_t size_ = 0;
  std::vector<TensorInfo> tensors_;
};

// The tensors described by the bytes of a safetensors file (`base`, `size` bytes, `path` naming it
// in errors), with every header field checked against the file; what SafetensorsFile runs on
// its mapping. Tensor data pointers point into `base`.
std::vector<TensorInfo> parse_safetensors(const unsigned char* base, int64_t size,
                                          const std::string& path);

// The weight_map of model.safetensors.index.json text: tensor name -> shard file name (a plain
// file name in the same directory).
std::map<std::string, std::string> parse_safetensors_index(const std::string& json_text,
                                                           const std::string& source);

// Every tensor of a model directory, by name; keeps the files mapped while it lives.
class Checkpoint {
 public:
  // model.safetensors.index.json if present (every shard it names is opened and must hold the
  // tensors the index places in it), else model.safetensors, else the directory's only
  // *.safetensors file.
  static Checkpoint open(const std::string& model_dir);

  const TensorInfo* find(const std::string& name) const;
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::vector<std::string>& files() const { return files_; }
  int64_t total_bytes() const;  // of tensor data

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> mapped_;
  std::map<std::string, TensorInfo> tensors_;
  std::vector<std::string> files_;
};

// A tensor to write: raw little-endian bytes. `dtype` is the safetensors spelling ("F32", "F16",
// "BF16"; tests also write others to check they are rejected).
struct TensorBytes {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t nbytes = 0;
};

// Writes a safetensors file (header padded to 8 bytes, tensors in the given order), through a
// temporary file renamed into place.
void write_safetensors(const std::string& path, const std::vector<TensorBytes>& tensors);

const char* safetensors_dtype_name(DType t);  // "F32", "F16", "BF16"

}  // namespace cca::model

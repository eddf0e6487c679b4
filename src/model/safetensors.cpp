#include "model/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "cca/error.hpp"
#include "model/config.hpp"

namespace cca::model {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

constexpr int64_t kMaxHeaderBytes = int64_t(100) << 20;  // the format's own limit

bool parse_dtype(const std::string& s, DType* out) {
  if (s == "F32")
    *out = DType::f32;
  else if (s == "F16")
    *out = DType::f16;
  else if (s == "BF16")
    *out = DType::bf16;
  else
    return false;
  return true;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < shape.size(); ++i) o << (i ? ", " : "") << shape[i];
  o << "]";
  return o.str();
}

// Parses and checks the header; `base` is the mapping, `size` the file size.
std::vector<TensorInfo> parse_header(const std::string& path, const unsigned char* base,
                                     int64_t size) {
  check(size >= 8, path + ": truncated safetensors file (" + std::to_string(size) +
                       " bytes; the 8-byte header length is missing)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | base[i];  // little-endian
  check(n <= uint64_t(size - 8), path + ": bad safetensors header: header length " +
                                     std::to_string(n) + " goes beyond the end of the file (" +
                                     std::to_string(size) + " bytes; truncated?)");
  check(int64_t(n) <= kMaxHeaderBytes,
        path + ": bad safetensors header: header length " + std::to_string(n) + " over 100 MB");
  const int64_t data0 = 8 + int64_t(n);
  Json header;
  try {
    header = Json::parse(reinterpret_cast<const char*>(base) + 8,
                         reinterpret_cast<const char*>(base) + data0);
  } catch (const Json::parse_error& e) {
    throw Error(path + ": bad safetensors header: not valid JSON (" + e.what() + ")");
  }
  check(header.is_object(), path + ": bad safetensors header: not a JSON object");

  std::vector<TensorInfo> out;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string where = path + ": tensor " + it.key();
    const Json& e = it.value();
    check(e.is_object() && e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"),
          where + ": bad header entry (needs dtype, shape and data_offsets): " + e.dump());
    TensorInfo t;
    t.name = it.key();
    t.file = path;
    check(e["dtype"].is_string(), where + ": bad dtype " + e["dtype"].dump());
    const std::string dt = e["dtype"].get<std::string>();
    check(parse_dtype(dt, &t.dtype),
          where + " has unsupported dtype " + dt + " (supported: F32, F16, BF16)");
    check(e["shape"].is_array(), where + ": bad shape " + e["shape"].dump());
    for (const Json& d : e["shape"]) {
      check(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
            where + ": bad shape " + e["shape"].dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const Json& off = e["data_offsets"];
    check(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() &&
              off[1].is_number_unsigned(),
          where + ": bad data_offsets " + off.dump());
    const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    check(b <= en, where + ": bad data_offsets " + off.dump() + " (begin after end)");
    // Overflow-safe: each dimension and the element count stay below 2^62 bytes.
    int64_t numel = 1;
    for (int64_t d : t.shape) {
      check(d == 0 || numel <= (int64_t(1) << 61) / d,
            where + ": shape " + shape_str(t.shape) + " is too large");
      numel *= d;
    }
    const int64_t need = numel * dtype_size(t.dtype);
    check(en - b == uint64_t(need), where + ": data_offsets " + off.dump() + " hold " +
                                        std::to_string(en - b) + " bytes but shape " +
                                        shape_str(t.shape) + " of " + dt + " needs " +
                                        std::to_string(need));
    check(en <= uint64_t(size - data0),
          path + " is truncated: tensor " + t.name + " needs bytes up to " +
              std::to_string(data0 + int64_t(en)) + " but the file has " + std::to_string(size));
    t.data = base + data0 + b;
    t.nbytes = need;
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}
std::string TensorInfo::shape_string() const { return shape_str(shape); }

const char* safetensors_dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "F32";
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
  }
  return "?";
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  check(fd >= 0, "cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("cannot read " + path + ": not a regular file");
  }
  size_ = st.st_size;
  if (size_ > 0) {
    map_ = ::mmap(nullptr, size_t(size_), PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      throw Error("cannot map " + path + ": " + std::strerror(err));
    }
  } else {
    ::close(fd);
  }
  try {
    static const unsigned char kEmpty[1] = {0};
    tensors_ = parse_header(path, map_ ? static_cast<const unsigned char*>(map_) : kEmpty, size_);
  } catch (...) {
    if (map_) ::munmap(map_, size_t(size_));
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_t(size_));
}

const TensorInfo* Checkpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

int64_t Checkpoint::total_bytes() const {
  int64_t n = 0;
  for (const auto& [name, t] : tensors_) n += t.nbytes;
  return n;
}

Checkpoint Checkpoint::open(const std::string& model_dir) {
  std::error_code ec;
  check(fs::is_directory(model_dir, ec), "model directory not found: " + model_dir);
  const fs::path dir(model_dir);
  const fs::path index = dir / "model.safetensors.index.json";
  Checkpoint ck;
  std::map<std::string, std::string> placed;  // tensor -> shard, from the index

  if (fs::exists(index, ec)) {
    const std::string src = index.string();
    Json j;
    try {
      j = Json::parse(read_text_file(src, "safetensors index"));
    } catch (const Json::parse_error& e) {
      throw Error(src + ": not valid JSON: " + e.what());
    }
    check(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
          src + ": needs an object \"weight_map\" {tensor name: shard file}");
    std::set<std::string> shards;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      check(it.value().is_string(), src + ": weight_map entry " + it.key() + " is not a file name");
      const std::string f = it.value().get<std::string>();
      check(f.find('/') == std::string::npos && f != ".." && !f.empty(),
            src + ": weight_map entry " + it.key() + " names a file outside the directory: " + f);
      placed[it.key()] = f;
      shards.insert(f);
    }
    check(!shards.empty(), src + ": weight_map is empty");
    for (const std::string& f : shards) {
      const std::string p = (dir / f).string();
      check(fs::is_regular_file(p, ec), "shard " + f + " named in " + src + " not found");
      ck.files_.push_back(p);
    }
  } else if (fs::exists(dir / "model.safetensors", ec)) {
    ck.files_.push_back((dir / "model.safetensors").string());
  } else {
    std::vector<std::string> found;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().extension() == ".safetensors") found.push_back(e.path().string());
    check(!found.empty(), "no model.safetensors or model.safetensors.index.json in " + model_dir);
    check(found.size() == 1,
          "several .safetensors files but no model.safetensors.index.json in " + model_dir);
    ck.files_ = found;
  }

  for (const std::string& p : ck.files_) {
    auto file = std::make_shared<SafetensorsFile>(p);
    for (const TensorInfo& t : file->tensors()) {
      auto [it, fresh] = ck.tensors_.emplace(t.name, t);
      check(fresh, "tensor " + t.name + " appears in both " + it->second.file + " and " + p);
    }
    ck.mapped_.push_back(std::move(file));
  }
  for (const auto& [name, shard] : placed) {
    const TensorInfo* t = ck.find(name);
    check(t != nullptr && fs::path(t->file).filename() == shard,
          "the index places tensor " + name + " in " + shard + " but that file does not hold it");
  }
  return ck;
}

void write_safetensors(const std::string& path, const std::vector<TensorBytes>& tensors) {
  Json header = Json::object();
  int64_t offset = 0;
  for (const TensorBytes& t : tensors) {
    header[t.name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8,
           ' ');  // data starts 8-byte aligned, as the reference writer does
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(out.good(), "cannot write " + tmp);
    unsigned char len[8];
    uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(n >> (8 * i));
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(h.data(), std::streamsize(h.size()));
    for (const TensorBytes& t : tensors)
      out.write(static_cast<const char*>(t.data), std::streamsize(t.nbytes));
    out.flush();
    if (!out.good()) {
      out.close();
      std::remove(tmp.c_str());
      throw Error("error writing " + tmp);
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw Error("cannot rename " + tmp + " to " + path);
  }
}

}  // namespace cca::model

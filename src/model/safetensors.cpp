#include "model/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <sstream>

#include "cca/error.hpp"
#include "model/output_file.hpp"
#include "model/untrusted.hpp"

namespace cca::model {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

constexpr int64_t kMaxHeaderBytes = int64_t(100) << 20;  // the format's own limit
constexpr size_t kMaxDims = 16;          // Llama-family weights have 1 or 2
constexpr size_t kMaxNameBytes = 1024;   // real names are under 100 bytes

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

}  // namespace

std::vector<TensorInfo> parse_safetensors(const unsigned char* base, int64_t size,
                                          const std::string& path) {
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
  const Json header = parse_json(
      std::string_view(reinterpret_cast<const char*>(base) + 8, size_t(n)),
      path + ": bad safetensors header");
  check(header.is_object(), path + ": bad safetensors header: not a JSON object");

  std::vector<TensorInfo> out;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string where = path + ": tensor " + excerpt(it.key());
    // Names appear in later messages (missing, unexpected, mis-shaped tensors): keep them short.
    check(it.key().size() <= kMaxNameBytes, where + ": the name is longer than " +
                                                std::to_string(kMaxNameBytes) + " bytes");
    const Json& e = it.value();
    check(e.is_object() && e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"),
          where + ": bad header entry (needs dtype, shape and data_offsets): " + json_excerpt(e));
    TensorInfo t;
    t.name = it.key();
    t.file = path;
    const Json& dtype = e.at("dtype");
    check(dtype.is_string(), where + ": bad dtype " + json_excerpt(dtype));
    const std::string dt = dtype.get<std::string>();
    check(parse_dtype(dt, &t.dtype),
          where + " has unsupported dtype " + excerpt(dt) + " (supported: F32, F16, BF16)");
    const Json& shape = e.at("shape");
    check(shape.is_array() && shape.size() <= kMaxDims,
          where + ": bad shape " + json_excerpt(shape) + " (a list of at most " +
              std::to_string(kMaxDims) + " sizes)");
    // Overflow-safe: each dimension and the element count stay below 2^61.
    int64_t numel = 1;
    for (const Json& d : shape) {
      check(d.is_number_unsigned(), where + ": bad shape " + json_excerpt(shape));
      check(d.get<uint64_t>() <= uint64_t(1) << 61 &&
                (d == 0 || numel <= (int64_t(1) << 61) / d.get<int64_t>()),
            where + ": shape " + json_excerpt(shape) + " is too large");
      t.shape.push_back(d.get<int64_t>());
      numel *= t.shape.back();
    }
    const Json& off = e.at("data_offsets");
    check(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() &&
              off[1].is_number_unsigned(),
          where + ": bad data_offsets " + json_excerpt(off));
    const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    check(b <= en, where + ": bad data_offsets " + json_excerpt(off) + " (begin after end)");
    const int64_t need = numel * dtype_size(t.dtype);
    check(en - b == uint64_t(need), where + ": data_offsets " + json_excerpt(off) + " hold " +
                                        std::to_string(en - b) + " bytes but shape " +
                                        shape_str(t.shape) + " of " + dt + " needs " +
                                        std::to_string(need));
    check(en <= uint64_t(size - data0),
          path + " is truncated: tensor " + excerpt(t.name) + " needs bytes up to " +
              std::to_string(uint64_t(data0) + en) + " but the file has " + std::to_string(size));
    t.data = base + data0 + b;
    t.nbytes = need;
    out.push_back(std::move(t));
  }
  return out;
}

std::map<std::string, std::string> parse_safetensors_index(const std::string& text,
                                                           const std::string& source) {
  const Json j = parse_json(text, source);
  check(j.is_object() && j.contains("weight_map") && j.at("weight_map").is_object(),
        source + ": needs an object \"weight_map\" {tensor name: shard file}");
  std::map<std::string, std::string> placed;
  for (const auto& [name, file] : j.at("weight_map").items()) {
    check(file.is_string(),
          source + ": weight_map entry " + excerpt(name) + " is not a file name");
    const std::string f = file.get<std::string>();
    check(!f.empty() && f != "." && f != ".." && f.find('/') == std::string::npos &&
              f.find('\0') == std::string::npos,
          source + ": weight_map entry " + excerpt(name) +
              " names a file outside the directory: " + excerpt(f));
    placed[name] = f;
  }
  check(!placed.empty(), source + ": weight_map is empty");
  return placed;
}

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
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  check(fd >= 0, "cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("cannot read " + path +
                ": not a regular file (a FIFO, socket, device or directory is refused)");
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
    tensors_ =
        parse_safetensors(map_ ? static_cast<const unsigned char*>(map_) : kEmpty, size_, path);
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
    placed = parse_safetensors_index(read_text_file(src, "safetensors index", kMaxJsonFileBytes),
                                     src);
    std::set<std::string> shards;
    for (const auto& [name, f] : placed) shards.insert(f);
    for (const std::string& f : shards) {
      const std::string p = (dir / f).string();
      check(fs::exists(p, ec), "shard " + excerpt(f) + " named in " + src + " not found");
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
      check(fresh,
            "tensor " + excerpt(t.name) + " appears in both " + it->second.file + " and " + p);
    }
    ck.mapped_.push_back(std::move(file));
  }
  for (const auto& [name, shard] : placed) {
    const TensorInfo* t = ck.find(name);
    check(t != nullptr && fs::path(t->file).filename() == shard,
          "the index places tensor " + excerpt(name) + " in " + excerpt(shard) +
              " but that file does not hold it");
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
  unsigned char len[8];
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(n >> (8 * i));
  PendingFile out(path);
  out.write(std::as_bytes(std::span(len)));
  out.write(h);
  for (const TensorBytes& t : tensors)
    out.write(std::span(static_cast<const std::byte*>(t.data), size_t(t.nbytes)));
  out.commit();
}

}  // namespace cca::model

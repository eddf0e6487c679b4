// Writing outputs so that a failure never leaves a partial file and never touches the old one:
// everything goes to a temporary name next to the target, renamed into place only when complete
// (rename(2) within a directory is atomic). The one implementation of this for every file cca
// writes (.npy outputs, safetensors, random model directories).
#pragma once
#include <cstddef>
#include <span>
#include <string>
#include <string_view>

namespace cca::model {

// A file written to a temporary name next to `path`; commit() renames it into place. Destroyed
// without commit(), it removes the temporary file. cca::Error naming `path` when the temporary
// cannot be created, written or renamed.
class PendingFile {
 public:
  explicit PendingFile(const std::string& path);
  PendingFile(const std::string& path, std::span<const std::byte> bytes);  // one write
  ~PendingFile();
  PendingFile(PendingFile&&) noexcept;
  PendingFile(const PendingFile&) = delete;
  PendingFile& operator=(const PendingFile&) = delete;
  PendingFile& operator=(PendingFile&&) = delete;

  void write(std::span<const std::byte> bytes);
  void write(std::string_view text) { write(std::as_bytes(std::span(text.data(), text.size()))); }
  void commit();

 private:
  void discard();
  std::string path_, tmp_;
  int fd_ = -1;
};

// A directory filled under a temporary name next to `path`; commit() renames it to `path`, which
// must not exist or be an empty directory (rename(2) refuses to replace one with files in it).
// Destroyed without commit(), it removes the temporary directory and everything in it.
class PendingDir {
 public:
  explicit PendingDir(const std::string& path);
  ~PendingDir();
  PendingDir(const PendingDir&) = delete;
  PendingDir& operator=(const PendingDir&) = delete;

  const std::string& staging() const { return tmp_; }  // where to write the files
  void commit();

 private:
  std::string path_, tmp_;
};

}  // namespace cca::model

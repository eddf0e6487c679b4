#include "model/output_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <utility>

#include "cca/error.hpp"

namespace cca::model {
namespace {

namespace fs = std::filesystem;

std::string errno_text() { return std::strerror(errno); }

// "<dir>/.<name>.tmp-XXXXXX" next to `path` (a trailing slash names the directory before it).
std::string temp_template(const std::string& path) {
  fs::path p(path);
  if (!p.has_filename()) p = p.parent_path();
  const fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  return (dir / ("." + p.filename().string() + ".tmp-XXXXXX")).string();
}

}  // namespace

PendingFile::PendingFile(const std::string& path) : path_(path), tmp_(temp_template(path)) {
  fd_ = ::mkstemp(tmp_.data());
  if (fd_ < 0) {
    tmp_.clear();
    throw Error("cannot write '" + path + "': " + errno_text());
  }
  // mkstemp makes the file 0600; give it the mode a plain open() would.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::fchmod(fd_, 0666 & ~mask);
}

PendingFile::PendingFile(const std::string& path, std::span<const std::byte> bytes)
    : PendingFile(path) {
  write(bytes);
}

PendingFile::PendingFile(PendingFile&& o) noexcept
    : path_(std::move(o.path_)),
      tmp_(std::exchange(o.tmp_, std::string())),
      fd_(std::exchange(o.fd_, -1)) {}

PendingFile::~PendingFile() { discard(); }

void PendingFile::discard() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
  tmp_.clear();
}

void PendingFile::write(std::span<const std::byte> bytes) {
  check(fd_ >= 0, "PendingFile::write after commit for '" + path_ + "'");
  const std::byte* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    const ssize_t n = ::write(fd_, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string why = n < 0 ? errno_text() : "nothing written";
      discard();
      throw Error("cannot write '" + path_ + "': " + why);
    }
    p += n;
    left -= size_t(n);
  }
}

void PendingFile::commit() {
  check(fd_ >= 0, "PendingFile::commit called twice for '" + path_ + "'");
  const int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0 || ::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string why = errno_text();
    discard();
    throw Error("cannot write '" + path_ + "': " + why);
  }
  tmp_.clear();
}

PendingDir::PendingDir(const std::string& path) : path_(path), tmp_(temp_template(path)) {
  if (!::mkdtemp(tmp_.data())) {
    const std::string why = errno_text();
    tmp_.clear();
    throw Error("cannot create directory '" + path + "': " + why);
  }
}

PendingDir::~PendingDir() {
  std::error_code ec;
  if (!tmp_.empty()) fs::remove_all(tmp_, ec);
}

void PendingDir::commit() {
  check(!tmp_.empty(), "PendingDir::commit called twice for '" + path_ + "'");
  // mkdtemp makes the directory 0700; give it the mode a plain mkdir() would.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::chmod(tmp_.c_str(), 0777 & ~mask);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string why = errno == ENOTEMPTY || errno == EEXIST
                                ? "it exists and is not empty"
                                : errno_text();
    throw Error("cannot write the directory '" + path_ + "': " + why);
  }
  tmp_.clear();
}

}  // namespace cca::model

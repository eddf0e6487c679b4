#include "output_path.hpp"

#include <algorithm>
#include <filesystem>

#include "cca/error.hpp"

namespace cca {
namespace {

namespace fs = std::filesystem;

// Absolute, with symlinks of the existing part resolved and `.`/`..` removed.
fs::path resolved(const std::string& p) {
  std::error_code ec;
  fs::path r = fs::weakly_canonical(fs::absolute(p, ec), ec);
  if (ec) r = fs::absolute(p, ec).lexically_normal();
  return r;
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec;
  if (fs::equivalent(a, b, ec) && !ec) return true;  // both exist: same device and inode
  return resolved(a) == resolved(b);
}

// `p` lies under the directory `dir` (both resolved).
bool inside(const fs::path& p, const fs::path& dir) {
  auto [d, q] = std::mismatch(dir.begin(), dir.end(), p.begin(), p.end());
  return d == dir.end() && q != p.end();
}

std::string quoted(const PathArg& a) { return a.flag + " '" + a.path + "'"; }

// The directory that holds `p` ("." for a bare name; a trailing slash names the directory).
fs::path parent_of(const std::string& p) {
  fs::path f(p);
  if (!f.has_filename()) f = f.parent_path();
  return f.parent_path().empty() ? fs::path(".") : f.parent_path();
}

}  // namespace

void check_outputs(const std::vector<PathArg>& inputs, const std::vector<PathArg>& outputs) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const PathArg& out = outputs[i];
    if (out.path.empty()) continue;
    std::error_code ec;
    check(!fs::is_directory(out.path, ec), "cannot write " + quoted(out) + ": it is a directory");
    const fs::path dir = parent_of(out.path);
    check(fs::is_directory(dir, ec), "cannot write " + quoted(out) + ": the directory '" +
                                         dir.string() + "' does not exist");
    for (const PathArg& in : inputs) {
      if (in.path.empty()) continue;
      check(!same_file(out.path, in.path),
            quoted(out) + " is the same file as the input " + quoted(in) +
                ": refusing to overwrite an input");
      check(!(fs::is_directory(in.path, ec) && inside(resolved(out.path), resolved(in.path))),
            quoted(out) + " lies inside the input directory " + quoted(in) +
                ": refusing to write into an input");
    }
    for (size_t j = 0; j < i; ++j)
      check(outputs[j].path.empty() || !same_file(out.path, outputs[j].path),
            quoted(outputs[j]) + " and " + quoted(out) + " name the same file");
  }
}

void check_new_output_dir(const PathArg& dir) {
  std::error_code ec;
  const fs::path parent = parent_of(dir.path);
  check(fs::is_directory(parent, ec), "cannot write " + quoted(dir) + ": the directory '" +
                                          parent.string() + "' does not exist");
  if (!fs::exists(fs::symlink_status(dir.path, ec))) return;
  check(fs::is_directory(dir.path, ec), quoted(dir) + " exists and is not a directory");
  check(fs::is_empty(dir.path, ec) && !ec,
        quoted(dir) + " is a directory that is not empty: refusing to overwrite its files "
                      "(give a new or empty directory)");
}

}  // namespace cca

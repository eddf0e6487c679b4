// Output paths, checked before any work: an output must be writable where it is named and must
// never destroy an input. Outputs are written to a temporary file and renamed into place
// (model/output_file.hpp), so an output that named an input file would replace the user's data
// with the result; check_outputs refuses that.
#pragma once
#include <string>
#include <vector>

namespace cca {

struct PathArg {
  std::string flag;  // "--q", "--out": names the path in errors
  std::string path;
};

// Throws cca::Error naming the flags when an output is a directory, lies in a directory that
// does not exist, names the same file as an input or as another output, or lies inside an
// input directory. Paths are compared after resolving symlinks, `.` and `..`; existing files
// also by device and inode (hard links). Empty paths (options not given) are skipped.
void check_outputs(const std::vector<PathArg>& inputs, const std::vector<PathArg>& outputs);

// Throws cca::Error unless `dir` does not exist yet or is an empty directory, and its parent
// exists: for commands that write a directory of files, which must never overwrite an existing
// model or data.
void check_new_output_dir(const PathArg& dir);

}  // namespace cca

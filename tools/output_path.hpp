// Output paths that must not destroy inputs. Outputs are written to a temporary file and renamed
// into place (PendingFile), so an output that names an input file would replace the user's data
// with the result; these checks refuse that before any work is done.
#pragma once
#include <string>
#include <vector>

namespace cca {

struct PathArg {
  std::string flag;  // "--q", "--out": names the path in errors
  std::string path;
};

// Throws cca::Error naming both flags when an output names the same file as an input or as
// another output, or lies inside an input directory. Paths are compared after resolving
// symlinks, `.` and `..`; existing files also by device and inode (hard links). Empty paths
// (options not given) are skipped.
void check_outputs_distinct(const std::vector<PathArg>& inputs,
                            const std::vector<PathArg>& outputs);

// Throws cca::Error unless `dir` does not exist yet or is an empty directory: for commands
// that write a directory of files, which must never overwrite an existing model or data.
void check_new_output_dir(const PathArg& dir);

}  // namespace cca

// `cca compare A.npy B.npy`: max absolute and relative L2 difference of two arrays of the same
// shape (B is the reference); exit status 1 when the max abs difference exceeds --tol or the
// relative L2 difference exceeds --rtol.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <sstream>
#include <string>

#include "cca/cca.hpp"
#include "commands.hpp"
#include "npy.hpp"

namespace cca {
namespace {

struct CompareArgs {
  std::string a, b;
  double tol = 1e-4;
  double rtol = std::numeric_limits<double>::infinity();
};

std::string index_string(const std::vector<int64_t>& shape, int64_t flat) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    idx[d] = flat % shape[d];
    flat /= shape[d];
  }
  std::ostringstream o;
  o << "[";
  for (size_t d = 0; d < idx.size(); ++d) o << (d ? ", " : "") << idx[d];
  o << "]";
  return o.str();
}

void run_compare(const CompareArgs& args) {
  check(args.tol >= 0, "invalid --tol: must be >= 0");
  check(args.rtol >= 0, "invalid --rtol: must be >= 0");
  NpyArray a = read_npy(args.a), b = read_npy(args.b);
  check(a.shape == b.shape, "shape mismatch: '" + args.a + "' " + a.shape_string() + ", '" +
                                args.b + "' " + b.shape_string());
  check(!a.shape.empty() && a.shape.size() <= 4,
        "compare supports arrays of 1 to 4 dimensions, got " + a.shape_string());
  const TensorView av = a.view(), bv = b.view();
  const int64_t n = av.numel();
  double max_abs = 0, diff2 = 0, ref2 = 0;
  int64_t worst = -1, nonfinite = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = av.load(i), y = bv.load(i);
    if (!std::isfinite(x) || !std::isfinite(y)) {
      // Equal infinities, or NaN in both, agree; anything else is an infinite difference.
      const bool same = (std::isnan(x) && std::isnan(y)) || x == y;
      if (!same) {
        ++nonfinite;
        if (max_abs != INFINITY) worst = i;
        max_abs = INFINITY;
      }
      continue;
    }
    const double d = std::fabs(x - y);
    if (d > max_abs) max_abs = d, worst = i;
    diff2 += d * d;
    ref2 += y * y;
  }
  double rel = ref2 > 0 ? std::sqrt(diff2 / ref2) : (diff2 > 0 ? INFINITY : 0.0);
  if (nonfinite) rel = INFINITY;
  std::printf("max_abs_err %.6g  rel_l2_err %.6g  elements %lld", max_abs, rel, (long long)n);
  if (worst >= 0) std::printf("  worst at %s", index_string(a.shape, worst).c_str());
  if (nonfinite) std::printf("  non-finite mismatches %lld", (long long)nonfinite);
  std::printf("\n");
  std::fflush(stdout);
  std::ostringstream m;
  if (!(max_abs <= args.tol)) {
    m << "max abs difference " << max_abs << " exceeds --tol " << args.tol;
    throw Error(m.str());
  }
  if (!(rel <= args.rtol)) {
    m << "relative L2 difference " << rel << " exceeds --rtol " << args.rtol;
    throw Error(m.str());
  }
}

}  // namespace

void register_compare_command(CLI::App& app) {
  auto args = std::make_shared<CompareArgs>();
  CLI::App* cmd = app.add_subcommand(
      "compare",
      "Compare two .npy arrays: max abs and relative L2 difference (B is the reference)");
  cmd->add_option("a", args->a, "first array")->required();
  cmd->add_option("b", args->b, "second (reference) array")->required();
  cmd->add_option("--tol", args->tol, "fail (exit 1) if the max abs difference exceeds this")
      ->capture_default_str();
  cmd->add_option("--rtol", args->rtol, "fail (exit 1) if the relative L2 difference exceeds this");
  cmd->callback([args] { run_compare(*args); });
}

}  // namespace cca

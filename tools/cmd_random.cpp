// `cca random`: write a .npy array of normally distributed values, so demos and tests can make
// inputs without NumPy. The generator is fully specified (mt19937_64 + Box-Muller), so a seed
// gives the same file on every machine.
#include <CLI/CLI.hpp>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numbers>
#include <random>
#include <string>

#include "cca/cca.hpp"
#include "commands.hpp"
#include "npy.hpp"
#include "output_path.hpp"

namespace cca {
namespace {

struct RandomArgs {
  std::string shape, dtype = "float32", out;
  uint64_t seed = 0;
  double std = 1.0;
};

// "2,64,4,32" -> {2, 64, 4, 32}: 1 to 4 positive integers.
std::vector<int64_t> parse_shape(const std::string& s) {
  std::vector<int64_t> dims;
  const char* p = s.data();
  const char* end = s.data() + s.size();
  while (true) {
    int64_t d = 0;
    auto [next, ec] = std::from_chars(p, end, d);
    check(ec == std::errc() && next != p && d >= 1,
          "invalid --shape '" + s + "': expected 1 to 4 positive integers separated by commas");
    dims.push_back(d);
    p = next;
    if (p == end) break;
    check(*p == ',',
          "invalid --shape '" + s + "': expected 1 to 4 positive integers separated by commas");
    ++p;
  }
  check(dims.size() <= 4, "invalid --shape '" + s + "': at most 4 dimensions");
  return dims;
}

DType parse_file_dtype(const std::string& s) {
  if (s == "float32" || s == "f32") return DType::f32;
  if (s == "float16" || s == "f16") return DType::f16;
  throw Error("invalid --dtype '" + s + "' (expected float32 or float16)");
}

void run_random(const RandomArgs& a) {
  const std::vector<int64_t> shape = parse_shape(a.shape);
  const DType dtype = parse_file_dtype(a.dtype);
  check(std::isfinite(a.std) && a.std > 0,
        "invalid --std " + std::to_string(a.std) + ": must be finite and > 0");
  check_outputs({}, {{"--out", a.out}});
  NpyArray arr = make_npy_array(dtype, shape);
  TensorView view = arr.view();
  std::mt19937_64 gen(a.seed);
  // 53 random bits -> uniform in (0, 1]; Box-Muller gives two normals per pair.
  auto uniform = [&gen] { return (double(gen() >> 11) + 1.0) * 0x1.0p-53; };
  const int64_t n = view.numel();
  for (int64_t i = 0; i < n; i += 2) {
    const double r = std::sqrt(-2.0 * std::log(uniform())),
                 phi = 2.0 * std::numbers::pi * uniform();
    view.store(i, float(a.std * r * std::cos(phi)));
    if (i + 1 < n) view.store(i + 1, float(a.std * r * std::sin(phi)));
  }
  write_npy(a.out, view);
  std::printf("%s %s -> %s\n", arr.shape_string().c_str(), dtype_name(dtype), a.out.c_str());
}

}  // namespace

void register_random_command(CLI::App& app) {
  auto args = std::make_shared<RandomArgs>();
  CLI::App* cmd = app.add_subcommand(
      "random", "Write a .npy array of normal random values (inputs for demos and tests)");
  cmd->add_option("--shape", args->shape, "dimensions, e.g. 1,4096,8,64 for [B, T, H, D]")
      ->required();
  cmd->add_option("--dtype", args->dtype, "float32 or float16")->capture_default_str();
  cmd->add_option("--seed", args->seed, "random seed")->capture_default_str();
  cmd->add_option("--std", args->std, "standard deviation")->capture_default_str();
  cmd->add_option("--out", args->out, "output .npy file")->required();
  cmd->callback([args] { run_random(*args); });
}

}  // namespace cca

// The `cca` binary end to end: random inputs, attention in prefill / decode / chunked modes giving
// the same output, compare, and bad input (each: non-zero exit, a message naming the problem, and
// no output file written or touched).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cca/cca.hpp"
#include "npy.hpp"
#include "temp_dir.hpp"

namespace cca {
namespace {

struct CliResult {
  int status;          // exit status, or -1 if the process did not exit normally (a crash)
  std::string output;  // stdout and stderr
};

CliResult cca_run(const std::string& args) {
  const std::string cmd = std::string("'") + CCA_CLI_PATH + "' " + args + " 2>&1 </dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return {-1, "popen failed"};
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int st = ::pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}

// Max abs difference of two arrays of equal shape and dtype.
double max_abs_diff(const std::string& a_path, const std::string& b_path) {
  NpyArray a = read_npy(a_path), b = read_npy(b_path);
  EXPECT_EQ(a.shape, b.shape);
  EXPECT_EQ(a.dtype, b.dtype);
  if (a.shape != b.shape) return INFINITY;
  TensorView av = a.view(), bv = b.view();
  double m = 0;
  for (int64_t i = 0; i < av.numel(); ++i) {
    const double d = std::fabs(double(av.load(i)) - double(bv.load(i)));
    m = std::isnan(d) ? INFINITY : std::max(m, d);
  }
  return m;
}

class CliTest : public ::testing::Test {
 protected:
  // q [B, T, Hq, D], k and v [B, T, Hkv, D] of normal random values.
  void make_inputs(const std::string& shape_q, const std::string& shape_kv,
                   const std::string& dtype = "float32") {
    for (auto [name, shape, seed] : {std::tuple{"q", shape_q, 1}, std::tuple{"k", shape_kv, 2},
                                     std::tuple{"v", shape_kv, 3}}) {
      CliResult r = cca_run("random --shape " + shape + " --dtype " + dtype + " --seed " +
                            std::to_string(seed) + " --out " + f(std::string(name) + ".npy"));
      ASSERT_EQ(r.status, 0) << r.output;
    }
  }
  std::string f(const std::string& name) const { return dir_.file(name); }
  std::string qkv() const {
    return "--q " + f("q.npy") + " --k " + f("k.npy") + " --v " + f("v.npy");
  }

  test::TempDir dir_;
};

TEST_F(CliTest, VersionHelpAndUsageErrors) {
  CliResult r = cca_run("--version");
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.output.find("cca 0."), std::string::npos) << r.output;
  r = cca_run("attention --help");
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.output.find("--pool-heads"), std::string::npos) << r.output;
  r = cca_run("");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("cca: error:"), std::string::npos) << r.output;
  r = cca_run("frobnicate");
  EXPECT_EQ(r.status, 2) << r.output;
  r = cca_run("attention --q a.npy --k b.npy --v c.npy --out o.npy --bogus 3");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--bogus"), std::string::npos) << r.output;
  r = cca_run("attention --q a.npy --q b.npy --k b.npy --v c.npy --out o.npy");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--q"), std::string::npos) << r.output;
  r = cca_run("attention --k b.npy --v c.npy --out o.npy");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--q"), std::string::npos) << r.output;
}

TEST_F(CliTest, RandomIsDeterministicPerSeed) {
  ASSERT_EQ(cca_run("random --shape 3,5 --seed 7 --out " + f("a.npy")).status, 0);
  ASSERT_EQ(cca_run("random --shape 3,5 --seed 7 --out " + f("b.npy")).status, 0);
  ASSERT_EQ(cca_run("random --shape 3,5 --seed 8 --out " + f("c.npy")).status, 0);
  EXPECT_EQ(read_npy(f("a.npy")).data, read_npy(f("b.npy")).data);
  EXPECT_GT(max_abs_diff(f("a.npy"), f("c.npy")), 0.1);
  // Standard normal: mean ~0 and variance ~1 over 20000 draws.
  ASSERT_EQ(cca_run("random --shape 20000 --seed 1 --out " + f("n.npy")).status, 0);
  NpyArray n = read_npy(f("n.npy"));
  double sum = 0, sum2 = 0;
  for (int64_t i = 0; i < 20000; ++i)
    sum += n.view().load(i), sum2 += double(n.view().load(i)) * n.view().load(i);
  EXPECT_NEAR(sum / 20000, 0.0, 0.05);
  EXPECT_NEAR(sum2 / 20000, 1.0, 0.05);
  CliResult r = cca_run("random --shape 3,0 --out " + f("z.npy"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("invalid --shape '3,0'"), std::string::npos) << r.output;
}

// Decode (token by token through the KV cache) and chunked:7 reproduce the prefill output and
// LSE for every variant, with GQA (Hq = 4, Hkv = 2), B = 2 and T = 67 (not a multiple of g).
TEST_F(CliTest, DecodeAndChunkedReproducePrefill) {
  make_inputs("2,67,4,16", "2,67,2,16");
  const std::vector<std::string> variants = {
      "--variant cca --group 4 --window 8",
      "--variant cca --group 5 --window 9 --pool mean --pool-heads query",
      "--variant cca --group 3 --window 4 --pool max",
      "--variant full",
      "--variant sliding --window 9",
      "--variant streaming --sinks 3 --window 9",
      "--variant lminfinite --sinks 2 --window 7",
  };
  for (const std::string& variant : variants) {
    SCOPED_TRACE(variant);
    // One thread: ctest runs tests in parallel, and these tiny problems only pay for threads.
    for (const char* mode : {"prefill", "decode", "chunked:7"}) {
      std::string m = mode;
      CliResult r = cca_run("attention " + qkv() + " " + variant + " --threads 1 --mode " + m +
                            " --out " + f(m + ".o.npy") + " --lse " + f(m + ".l.npy"));
      ASSERT_EQ(r.status, 0) << r.output;
    }
    NpyArray o = read_npy(f("prefill.o.npy")), l = read_npy(f("prefill.l.npy"));
    EXPECT_EQ(o.shape, (std::vector<int64_t>{2, 67, 4, 16}));
    EXPECT_EQ(o.dtype, DType::f32);
    EXPECT_EQ(l.shape, (std::vector<int64_t>{2, 4, 67}));
    double norm = 0;
    for (int64_t i = 0; i < o.numel(); ++i) norm += std::fabs(o.view().load(i));
    EXPECT_GT(norm / double(o.numel()), 0.01) << "output looks empty";
    std::vector<std::string> modes = {"decode", "chunked:7"};
    if (variant == variants.front()) {  // and once with two threads
      CliResult r = cca_run("attention " + qkv() + " " + variant + " --threads 2 --mode chunked:5" +
                            " --out " + f("t2.o.npy") + " --lse " + f("t2.l.npy"));
      ASSERT_EQ(r.status, 0) << r.output;
      modes.push_back("t2");
    }
    for (const std::string& mode : modes) {
      EXPECT_LT(max_abs_diff(f(mode + ".o.npy"), f("prefill.o.npy")), 2e-5) << mode;
      EXPECT_LT(max_abs_diff(f(mode + ".l.npy"), f("prefill.l.npy")), 2e-5) << mode;
    }
    // The cpu backend agrees with the float64 reference.
    CliResult r = cca_run("attention " + qkv() + " " + variant +
                          " --backend ref --threads 1 --out " + f("ref.o.npy"));
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_LT(max_abs_diff(f("ref.o.npy"), f("prefill.o.npy")), 1e-4);
  }
}

TEST_F(CliTest, Float16InputsGiveFloat16OutputAndFloat32Lse) {
  make_inputs("1,40,2,32", "1,40,1,32", "float16");
  CliResult r = cca_run("attention " + qkv() + " --threads 1 --group 4 --window 8 --out " +
                        f("o.npy") + " --lse " + f("l.npy"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_npy(f("o.npy")).dtype, DType::f16);
  EXPECT_EQ(read_npy(f("l.npy")).dtype, DType::f32);
  r = cca_run("attention " + qkv() + " --threads 1 --group 4 --window 8 --mode chunked:9 --out " +
              f("c.npy"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_LT(max_abs_diff(f("c.npy"), f("o.npy")), 2e-3);  // a float16 rounding step at most
}

// --backend cuda copies the host arrays to the GPU and the results back; prefill, decode and
// chunked runs match the cpu backend.
TEST_F(CliTest, CudaBackendMatchesCpu) {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  if (!why.empty()) GTEST_SKIP() << "no CUDA GPU: " << why;
  make_inputs("2,300,4,64", "2,300,2,64", "float16");
  const std::string variant = " --variant cca --group 8 --window 40";
  CliResult r = cca_run("attention " + qkv() + variant + " --out " + f("cpu.o.npy") + " --lse " +
                        f("cpu.l.npy"));
  ASSERT_EQ(r.status, 0) << r.output;
  for (const std::string mode : {"prefill", "decode", "chunked:64"}) {
    r = cca_run("attention " + qkv() + variant + " --backend cuda --mode " + mode + " --out " +
                f("gpu.o.npy") + " --lse " + f("gpu.l.npy"));
    ASSERT_EQ(r.status, 0) << mode << ": " << r.output;
    EXPECT_EQ(read_npy(f("gpu.o.npy")).dtype, DType::f16);
    EXPECT_LT(max_abs_diff(f("gpu.o.npy"), f("cpu.o.npy")), 4e-3) << mode;
    EXPECT_LT(max_abs_diff(f("gpu.l.npy"), f("cpu.l.npy")), 2e-3) << mode;
  }
}

TEST_F(CliTest, CompareChecksTolerance) {
  make_inputs("1,16,2,8", "1,16,2,8");
  CliResult r = cca_run("compare " + f("q.npy") + " " + f("q.npy"));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("max_abs_err 0"), std::string::npos) << r.output;
  r = cca_run("compare " + f("q.npy") + " " + f("k.npy") + " --tol 1e-3");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("exceeds --tol"), std::string::npos) << r.output;
  r = cca_run("compare " + f("q.npy") + " " + f("k.npy") + " --tol 100 --rtol 0.5");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("exceeds --rtol"), std::string::npos) << r.output;
  ASSERT_EQ(cca_run("random --shape 1,16,1,8 --out " + f("s.npy")).status, 0);
  r = cca_run("compare " + f("q.npy") + " " + f("s.npy"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("shape mismatch"), std::string::npos) << r.output;
}

// Writes `bytes` to `path`.
void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}
std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A valid .npy header for `dict` followed by `data_bytes` zero bytes.
std::string npy_with_header(const std::string& dict, size_t data_bytes) {
  std::string header = dict;
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header.push_back('\n');
  std::string out = "\x93NUMPY";
  out += '\x01';
  out += '\x00';
  out += char(header.size() & 0xff);
  out += char(header.size() >> 8);
  return out + header + std::string(data_bytes, '\0');
}

struct BadCase {
  const char* name;
  std::function<void(CliTest&)> setup;  // makes the bad file(s) after good q/k/v exist
  std::string args;  // "--flag value": replaces that flag's default value, or is added
  const char* message;
  int status = 1;
};

// "attention" and the options of `defaults` with those named in `overrides` replaced (CLI11
// rejects a repeated option, so overrides cannot simply be appended).
std::string attention_args(std::vector<std::pair<std::string, std::string>> defaults,
                           const std::string& overrides) {
  std::istringstream in(overrides);
  std::string flag, value;
  while (in >> flag) {
    if (!(in >> value)) value.clear();
    auto it =
        std::find_if(defaults.begin(), defaults.end(), [&](auto& kv) { return kv.first == flag; });
    if (it != defaults.end())
      it->second = value;
    else
      defaults.emplace_back(flag, value);
  }
  std::string r = "attention";
  for (const auto& [k, v] : defaults) r += " " + k + " " + v;
  return r;
}

TEST_F(CliTest, BadInputFailsClearlyAndWritesNothing) {
  make_inputs("1,12,4,8", "1,12,2,8");
  const std::string good_q = read_bytes(f("q.npy"));
  std::vector<BadCase> cases = {
      {"missing file", nullptr, "--q " + f("absent.npy"), "absent.npy"},
      {"truncated npy",
       [&](CliTest&) { write_bytes(f("bad.npy"), good_q.substr(0, good_q.size() - 5)); },
       "--q " + f("bad.npy"), "truncated data"},
      {"trailing garbage", [&](CliTest&) { write_bytes(f("bad.npy"), good_q + "xx"); },
       "--q " + f("bad.npy"), "trailing bytes"},
      {"bad magic", [&](CliTest&) { write_bytes(f("bad.npy"), "PK\x03\x04 this is a zip"); },
       "--q " + f("bad.npy"), "not a .npy file"},
      {"fortran order",
       [&](CliTest&) {
         write_bytes(
             f("bad.npy"),
             npy_with_header("{'descr': '<f4', 'fortran_order': True, 'shape': (1, 12, 4, 8), }",
                             1536));
       },
       "--q " + f("bad.npy"), "Fortran-order"},
      {"float64",
       [&](CliTest&) {
         write_bytes(
             f("bad.npy"),
             npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1, 12, 4, 8), }",
                             3072));
       },
       "--q " + f("bad.npy"), "unsupported dtype '<f8'"},
      {"non-4D array",
       [&](CliTest&) {
         ASSERT_EQ(cca_run("random --shape 12,4,8 --out " + f("bad.npy")).status, 0);
       },
       "--q " + f("bad.npy"), "must be a 4-D array"},
      {"T mismatch q vs k",
       [&](CliTest&) {
         ASSERT_EQ(cca_run("random --shape 1,11,2,8 --out " + f("bad.npy")).status, 0);
       },
       "--k " + f("bad.npy"), "token count T mismatch"},
      {"Hq not a multiple of Hkv",
       [&](CliTest&) {
         ASSERT_EQ(cca_run("random --shape 1,12,3,8 --out " + f("bad.npy")).status, 0);
       },
       "--q " + f("bad.npy"), "Hq = 3 is not a multiple of Hkv = 2"},
      {"dtype mismatch",
       [&](CliTest&) {
         ASSERT_EQ(cca_run("random --shape 1,12,2,8 --dtype float16 --out " + f("bad.npy")).status,
                   0);
       },
       "--v " + f("bad.npy"), "dtype mismatch"},
      {"group 0", nullptr, "--group 0", "invalid group = 0"},
      {"window 0", nullptr, "--window 0", "invalid window = 0"},
      {"sliding window 0", nullptr, "--variant sliding --window 0", "invalid window = 0"},
      {"negative sinks", nullptr, "--variant streaming --sinks -1", "invalid sinks = -1"},
      {"scale nan", nullptr, "--scale nan", "invalid scale"},
      {"scale negative", nullptr, "--scale -0.5", "invalid scale = -0.5"},
      {"scale inf", nullptr, "--scale inf", "invalid scale"},
      {"scale text", nullptr, "--scale abc", "invalid scale 'abc'"},
      {"unknown variant", nullptr, "--variant banana", "unknown variant 'banana'"},
      {"unknown pool", nullptr, "--pool median", "unknown pool 'median'"},
      {"unknown backend", nullptr, "--backend tpu", "unknown backend 'tpu'"},
      {"chunked:0", nullptr, "--mode chunked:0", "chunked:0"},
      {"chunked:x", nullptr, "--mode chunked:x", "chunked:x"},
      {"chunked:", nullptr, "--mode chunked:", "chunked:"},
      {"unknown mode", nullptr, "--mode stream", "invalid --mode 'stream'"},
      {"negative threads", nullptr, "--threads -2", "invalid --threads -2"},
      {"output directory missing", nullptr, "--out " + f("nodir/o.npy"), "does not exist"},
      {"lse equals out", nullptr, "--lse " + f("o.npy"), "same file"},
      {"group not a number", nullptr, "--group x", "--group", 2},
      {"unknown flag", nullptr, "--bogus 1", "--bogus", 2},
  };
  if (!backend_unavailable_reason(BackendKind::cuda).empty())
    cases.push_back({"cuda without GPU", nullptr, "--backend cuda", "backend cuda unavailable"});

  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    std::filesystem::remove(f("bad.npy"));
    if (c.setup) c.setup(*this);
    CliResult r = cca_run(attention_args({{"--q", f("q.npy")},
                                          {"--k", f("k.npy")},
                                          {"--v", f("v.npy")},
                                          {"--out", f("o.npy")},
                                          {"--lse", f("l.npy")},
                                          {"--group", "2"},
                                          {"--window", "3"}},
                                         c.args));
    EXPECT_EQ(r.status, c.status) << r.output;
    EXPECT_NE(r.output.find("cca: error:"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << r.output;
    EXPECT_FALSE(std::filesystem::exists(f("o.npy")));
    EXPECT_FALSE(std::filesystem::exists(f("l.npy")));
    std::vector<std::string> want = {"k.npy", "q.npy", "v.npy"};
    if (std::filesystem::exists(f("bad.npy"))) want.insert(want.begin(), "bad.npy");
    EXPECT_EQ(dir_.entries(), want) << "no temporary or partial file may remain";
  }
}

TEST_F(CliTest, ExistingOutputIsUntouchedOnFailure) {
  make_inputs("1,12,2,8", "1,12,2,8");
  write_bytes(f("o.npy"), "precious");
  CliResult r = cca_run("attention " + qkv() + " --group 0 --out " + f("o.npy"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_EQ(read_bytes(f("o.npy")), "precious");
  // Success replaces it.
  r = cca_run("attention " + qkv() + " --threads 1 --group 2 --window 3 --out " + f("o.npy"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_npy(f("o.npy")).shape, (std::vector<int64_t>{1, 12, 2, 8}));
}

}  // namespace
}  // namespace cca

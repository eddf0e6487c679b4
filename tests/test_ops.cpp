// The ops layer (issue 8): every op on a device under test against the cpu ops, the float32
// oracle, on random inputs (fixed seeds, never zeros) with odd sizes and column-slice views (row
// strides above the column count). Outputs start poisoned (NaN bytes): every element must be
// written, and the gap columns of each row must keep their poison. The device under test is the
// GPU (bf16, f16 and float32 where the op takes them; skipped, saying why, where no CUDA GPU is
// usable) and the cpu itself (float32 only: a self-check of the tests and of the oracle's views
// that runs everywhere).
//
// Tolerances: u(dt) is the unit roundoff of one round-to-nearest, relative to the value: 2^-24
// (float32), 2^-11 (float16), 2^-8 (bfloat16), plus 2^-25 absolute in float16's subnormal range.
// Each op's bound is derived beside its test.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "cca/attention.hpp"
#include "ops/ops.hpp"
#include "test_util.hpp"

namespace cca::test {
namespace {

constexpr uint32_t kPoisonWord = 0xFFFFFFFFu;  // NaN in every dtype (test_util.hpp's kPoisonByte)

double unit_roundoff(DType dt) {
  switch (dt) {
    case DType::f32: return 0x1p-24;
    case DType::f16: return 0x1p-11;
    case DType::bf16: return 0x1p-8;
  }
  return 0;
}
// One rounding's error bound for a value of magnitude |v|.
double rounding(DType dt, double v) {
  return unit_roundoff(dt) * std::fabs(v) + (dt == DType::f16 ? 0x1p-25 : 0x1p-140);
}

// ---- host matrices and their copies on a context --------------------------------------------
// [rows, cols] with row stride ld >= cols in any dtype, born poisoned (gaps included).
struct HostMat {
  DType dtype;
  int64_t rows, cols, ld;
  std::vector<uint32_t> mem;  // 4-byte words keep float32 rows aligned

  HostMat(DType dt, int64_t r, int64_t c, int64_t pad = 0)
      : dtype(dt), rows(r), cols(c), ld(c + pad),
        mem(size_t((std::max<int64_t>(r * (c + pad), 1) * dtype_size(dt) + 3) / 4), kPoisonWord) {}
  int64_t bytes() const { return int64_t(mem.size()) * 4; }
  TensorView view() const {
    return ops::matrix(const_cast<uint32_t*>(mem.data()), dtype, rows, cols, ld, Device::cpu);
  }
  float at(int64_t r, int64_t c) const { return view().load(r * ld + c); }
  void set(int64_t r, int64_t c, float v) { view().store(r * ld + c, v); }
  const unsigned char* byte_ptr(int64_t r, int64_t c) const {
    return reinterpret_cast<const unsigned char*>(mem.data()) + (r * ld + c) * dtype_size(dtype);
  }
};

// stddev * normal values rounded to the dtype, in the view's elements only.
HostMat random_mat(DType dt, int64_t rows, int64_t cols, int64_t pad, Rng& rng,
                   double stddev = 1.0) {
  HostMat m(dt, rows, cols, pad);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) m.set(r, c, float(stddev * rng.normal()));
  return m;
}

// The same values in another dtype (exact when widening), or their magnitudes; gaps poisoned.
HostMat converted(const HostMat& h, DType dt, bool magnitude = false) {
  HostMat m(dt, h.rows, h.cols, h.ld - h.cols);
  for (int64_t r = 0; r < h.rows; ++r)
    for (int64_t c = 0; c < h.cols; ++c)
      m.set(r, c, magnitude ? std::fabs(h.at(r, c)) : h.at(r, c));
  return m;
}

// A copy of a host matrix in a context's memory (GPU memory for cuda, host memory for the cpu).
class DevMat {
 public:
  DevMat(const ops::Context& ctx, const HostMat& h) : ctx_(ctx), host_(h) {
    ptr_ = ctx.alloc(host_.bytes(), "a test matrix");
    ctx.upload(ptr_, host_.mem.data(), host_.bytes());  // host_ outlives the upload
  }
  DevMat(const DevMat&) = delete;
  DevMat& operator=(const DevMat&) = delete;
  ~DevMat() { ctx_.free(ptr_); }
  TensorView view() const {
    return ops::matrix(ptr_, host_.dtype, host_.rows, host_.cols, host_.ld, ctx_.device());
  }
  HostMat download() const {
    HostMat r = host_;
    ctx_.download(r.mem.data(), ptr_, r.bytes());
    return r;
  }

 private:
  const ops::Context& ctx_;
  HostMat host_;
  void* ptr_;
};

// An int32 array in a context's memory.
class DevInts {
 public:
  DevInts(const ops::Context& ctx, std::vector<int32_t> v) : ctx_(ctx), host_(std::move(v)) {
    const int64_t bytes = int64_t(host_.size()) * 4;
    ptr_ = static_cast<int32_t*>(ctx.alloc(bytes, "a test int32 array"));
    ctx.upload(ptr_, host_.data(), bytes);
  }
  explicit DevInts(const ops::Context& ctx, size_t n) : DevInts(ctx, std::vector<int32_t>(n, -7)) {}
  DevInts(const DevInts&) = delete;
  DevInts& operator=(const DevInts&) = delete;
  ~DevInts() { ctx_.free(ptr_); }
  int32_t* data() const { return ptr_; }
  std::vector<int32_t> download() const {
    std::vector<int32_t> r(host_.size());
    ctx_.download(r.data(), ptr_, int64_t(r.size()) * 4);
    return r;
  }

 private:
  const ops::Context& ctx_;
  std::vector<int32_t> host_;
  int32_t* ptr_;
};

// ---- comparisons ------------------------------------------------------------------------------
// The gap columns [cols, ld) of every row still hold poison: nothing was written outside the view.
void expect_gaps_poisoned(const HostMat& got) {
  int64_t bad = 0;
  for (int64_t r = 0; r < got.rows; ++r) {
    const unsigned char* p = got.byte_ptr(r, got.cols);
    const int64_t gap_bytes = (got.ld - got.cols) * dtype_size(got.dtype);
    for (int64_t b = 0; b < gap_bytes; ++b) bad += p[b] != 0xFF;
  }
  EXPECT_EQ(bad, 0) << "bytes written outside the view (gap columns)";
}

// |got - want| <= bound(r, c) for every element (a NaN fails: poison never overwritten), then
// the gaps. Reports the count and the first few failures, and prints the worst |got - want| /
// bound (for calibrating the bounds on new hardware).
template <class Bound>
void expect_within(const std::string& what, const HostMat& got, const HostMat& want,
                   Bound bound) {
  ASSERT_EQ(got.rows, want.rows);
  ASSERT_EQ(got.cols, want.cols);
  int64_t bad = 0;
  double worst = 0;
  for (int64_t r = 0; r < got.rows; ++r)
    for (int64_t c = 0; c < got.cols; ++c) {
      const double g = got.at(r, c), w = want.at(r, c), b = bound(r, c), d = std::fabs(g - w);
      if (d <= b) {
        if (b > 0) worst = std::max(worst, d / b);
        continue;
      }
      if (++bad <= 5)
        ADD_FAILURE() << "[" << r << ", " << c << "]: got " << g << ", want " << w << ", |diff| "
                      << d << " > bound " << b;
    }
  EXPECT_EQ(bad, 0) << "elements out of bounds, of " << got.rows * got.cols;
  std::printf("    %s: worst |got - want| / bound = %.3g\n", what.c_str(), worst);
  expect_gaps_poisoned(got);
}

// Bit-identical view elements, then the gaps.
void expect_same_bits(const HostMat& got, const HostMat& want) {
  ASSERT_EQ(got.dtype, want.dtype);
  int64_t bad = 0;
  for (int64_t r = 0; r < got.rows; ++r)
    for (int64_t c = 0; c < got.cols; ++c)
      if (std::memcmp(got.byte_ptr(r, c), want.byte_ptr(r, c), size_t(dtype_size(got.dtype)))) {
        if (++bad <= 5)
          ADD_FAILURE() << "[" << r << ", " << c << "]: got " << got.at(r, c) << ", want "
                        << want.at(r, c);
      }
  EXPECT_EQ(bad, 0) << "elements differ, of " << got.rows * got.cols;
  expect_gaps_poisoned(got);
}

// ---- the fixture: the cpu oracle and the device under test ----------------------------------
class Ops : public ::testing::TestWithParam<Device> {
 protected:
  void SetUp() override {
    if (on_gpu()) {
      const std::string why = backend_unavailable_reason(BackendKind::cuda);
      if (!why.empty()) GTEST_SKIP() << "no CUDA GPU: " << why;
      dut_ = std::make_unique<ops::Context>(ops::Context::cuda());
    }
    cpu_ = std::make_unique<ops::Context>(ops::Context::cpu(1));
  }
  bool on_gpu() const { return GetParam() == Device::cuda; }
  const ops::Context& oracle() const { return *cpu_; }
  const ops::Context& dut() const { return dut_ ? *dut_ : *cpu_; }
  // The dtypes the device's elementwise ops take (the cpu's: float32 only).
  std::vector<DType> dtypes() const {
    if (on_gpu()) return {DType::bf16, DType::f16, DType::f32};
    return {DType::f32};
  }

 private:
  std::unique_ptr<ops::Context> cpu_, dut_;
};

std::string tag(DType dt) { return dtype_name(dt); }

// ---- linear -------------------------------------------------------------------------------
struct LinearCase {
  int64_t n, in;
  std::vector<int64_t> outs;  // one weight part each, side by side in y
  DType x_dtype, y_dtype;
  bool bias, accumulate;
  int64_t x_pad, y_pad;  // row stride - columns
};

// Bound. Both sides sum in float32 the in products plus bias and the old y: each side's error
// is within gamma = (in + 2) 2^-24 times M = |x| |W|^T + |b| + |y_old|; the bound allows 4 gamma M
// (the two sides, and again 2x for tensor-core adders that may truncate). Then roundings to y's
// dtype: of the result, u(y) |want|, and where the result is a sum, possibly of its terms too.
// cuBLASLt's kernels with a 16-bit D were seen (H200, CUDA 13) to round the product before
// adding C (accumulate) or the bias, and to round P + C before adding the bias (the order of
// cuBLASLt's epilogue, and of the fallback bias kernel after a beta = 1 GEMM): so u(y) |P| for
// P = x W^T, and u(y) |P + y_old| when both a bias and the old y are added. A misplaced column, a
// lost bias or a lost y_old costs ~|b| or ~|y_old|, far beyond these.
TEST_P(Ops, Linear) {
  std::vector<LinearCase> cases;
  if (on_gpu()) {
    cases = {{1, 77, {45}, DType::bf16, DType::bf16, false, false, 0, 0},
             {1, 64, {40, 24, 7}, DType::bf16, DType::f32, true, true, 3, 5},
             {300, 96, {64, 19, 33}, DType::bf16, DType::bf16, true, false, 3, 5},
             {300, 129, {50}, DType::f16, DType::f32, true, true, 0, 2},
             {37, 64, {31, 17}, DType::f16, DType::f16, true, true, 8, 1},
             {300, 200, {128, 64}, DType::bf16, DType::bf16, false, true, 0, 0},
             {300, 64, {48}, DType::f16, DType::f16, false, false, 0, 0},
             {2, 256, {256}, DType::bf16, DType::f32, false, false, 0, 0},
             // Up to 2 rows with in % 8 == 0 and 16-byte rows run the matrix-vector kernel.
             {1, 512, {384, 64}, DType::bf16, DType::bf16, true, true, 0, 0},
             {2, 1024, {200}, DType::f16, DType::f16, true, false, 8, 0},
             {2, 4096, {96, 33}, DType::bf16, DType::f32, false, true, 0, 4},
             {2, 136, {1000}, DType::f16, DType::f32, false, false, 3, 0},  // x rows unaligned
             {1, 4104, {7, 5000}, DType::bf16, DType::bf16, true, true, 8, 3},
             {3, 512, {300}, DType::bf16, DType::f32, false, true, 0, 2},  // cuBLASLt again
             {8, 1024, {130, 70}, DType::f16, DType::f16, true, false, 0, 0}};
  } else {
    cases = {{1, 77, {45}, DType::f32, DType::f32, false, false, 0, 0},
             {1, 64, {40, 24, 7}, DType::f32, DType::f32, true, true, 3, 5},
             {300, 96, {64, 19, 33}, DType::f32, DType::f32, true, false, 3, 5},
             {37, 64, {31, 17}, DType::f32, DType::f32, true, true, 8, 1}};
  }
  for (const LinearCase& c : cases) {
    const std::string name = "linear n" + std::to_string(c.n) + " in" + std::to_string(c.in) +
                             " parts" + std::to_string(c.outs.size()) + " " + tag(c.x_dtype) +
                             "->" + tag(c.y_dtype) + (c.bias ? " bias" : "") +
                             (c.accumulate ? " accumulate" : "");
    SCOPED_TRACE(name);
    Rng rng(seed_of(name));
    int64_t cols = 0;
    for (int64_t o : c.outs) cols += o;
    // The bias is in y's dtype for a 16-bit y (cuBLASLt's epilogue), else in x's.
    const DType b_dtype = c.y_dtype == DType::f32 ? c.x_dtype : c.y_dtype;
    const HostMat x = random_mat(c.x_dtype, c.n, c.in, c.x_pad, rng);
    std::vector<HostMat> w, b;
    for (int64_t o : c.outs) {
      w.push_back(random_mat(c.x_dtype, o, c.in, 0, rng, 1.0 / std::sqrt(double(c.in))));
      b.push_back(random_mat(b_dtype, 1, o, 0, rng));
    }
    const HostMat y0 = c.accumulate ? random_mat(c.y_dtype, c.n, cols, c.y_pad, rng)
                                    : HostMat(c.y_dtype, c.n, cols, c.y_pad);

    // y = linear(x, w, b, y0) on ctx; on the oracle everything in float32 (or magnitudes), and
    // optionally without the bias or the old y (the intermediate sums).
    auto run = [&](const ops::Context& ctx, bool oracle_f32, bool magnitude, bool bias,
                   bool accumulate) {
      auto prep = [&](const HostMat& h) {
        return oracle_f32 || magnitude ? converted(h, DType::f32, magnitude) : h;
      };
      DevMat dx(ctx, prep(x)), dy(ctx, prep(y0));
      std::vector<std::unique_ptr<DevMat>> dw, db;
      std::vector<ops::LinearPart> parts;
      for (size_t i = 0; i < w.size(); ++i) {
        dw.push_back(std::make_unique<DevMat>(ctx, prep(w[i])));
        db.push_back(std::make_unique<DevMat>(ctx, prep(b[i])));
        parts.push_back({dw.back()->view(), bias ? db.back()->view() : TensorView{}});
      }
      ops::linear(ctx, dx.view(), parts, dy.view(), accumulate);
      return dy.download();
    };
    const HostMat got = run(dut(), false, false, c.bias, c.accumulate);
    const HostMat want = run(oracle(), true, false, c.bias, c.accumulate);
    const HostMat mag = run(oracle(), true, true, c.bias, c.accumulate);  // M
    const HostMat p = run(oracle(), true, false, false, false);             // x W^T
    const HostMat pc = run(oracle(), true, false, false, c.accumulate);     // x W^T + y_old
    const double gamma4 = 4.0 * double(c.in + 2) * 0x1p-24;
    expect_within(name, got, want, [&](int64_t r, int64_t col) {
      const double acc = gamma4 * mag.at(r, col);
      double bound = acc + rounding(c.y_dtype, std::fabs(want.at(r, col)) + acc);
      if (c.bias || c.accumulate) bound += rounding(c.y_dtype, std::fabs(p.at(r, col)) + acc);
      if (c.bias && c.accumulate) bound += rounding(c.y_dtype, std::fabs(pc.at(r, col)) + acc);
      return bound;
    });
  }
}

// ---- rms_norm -----------------------------------------------------------------------------
struct NormCase {
  int64_t n, H, x_pad;
  DType w_dtype, out_dtype;
  int64_t out_pad;
};

// Bound, relative (out is a product: no cancellation). The cpu sums x^2 in float64, the GPU in
// float32 (per-thread runs of H/256, then a tree of 8 levels): relative error below
// (H/256 + 8) 2^-24 in the sum, half that in its inverse square root, plus a few float32
// roundings (division, sqrt, two products): within (H/128 + 32) 2^-24 with a 2x margin, plus
// one rounding of out.
TEST_P(Ops, RmsNorm) {
  std::vector<NormCase> cases;
  if (on_gpu()) {
    cases = {{1, 64, 0, DType::bf16, DType::bf16, 0},
             {37, 999, 5, DType::bf16, DType::f32, 3},
             {300, 2048, 0, DType::f16, DType::f16, 7},
             {5, 4097, 1, DType::f32, DType::bf16, 0},
             {3, 130, 2, DType::f32, DType::f32, 2}};
  } else {
    cases = {{1, 64, 0, DType::f32, DType::f32, 0}, {37, 999, 5, DType::f32, DType::f32, 3}};
  }
  for (const NormCase& c : cases) {
    const std::string name = "rms_norm n" + std::to_string(c.n) + " H" + std::to_string(c.H) +
                             " w " + tag(c.w_dtype) + " out " + tag(c.out_dtype);
    SCOPED_TRACE(name);
    Rng rng(seed_of(name));
    const HostMat x = random_mat(DType::f32, c.n, c.H, c.x_pad, rng, 3.0);
    const HostMat w = random_mat(c.w_dtype, 1, c.H, 0, rng);
    const float eps = 1e-5f;
    auto run = [&](const ops::Context& ctx, DType w_dt, DType out_dt) {
      DevMat dx(ctx, x), dw(ctx, converted(w, w_dt));
      DevMat dout(ctx, HostMat(out_dt, c.n, c.H, c.out_pad));
      ops::rms_norm(ctx, dx.view(), dw.view(), eps, dout.view());
      return dout.download();
    };
    const HostMat got = run(dut(), c.w_dtype, c.out_dtype);
    const HostMat want = run(oracle(), DType::f32, DType::f32);
    const double rel = double(c.H / 128 + 32) * 0x1p-24;
    expect_within(name, got, want, [&](int64_t r, int64_t col) {
      const double v = std::fabs(want.at(r, col));
      return rel * v + rounding(c.out_dtype, v * (1 + rel));
    });
  }
}

// ---- rope ---------------------------------------------------------------------------------
struct RopeCase {
  int64_t n, heads, D, extra_cols, pad;  // x [n, heads * D + extra_cols], row stride + pad
  DType dtype;
};

// Bound. Both sides compute the same float32 angle (one IEEE product); cos and sin then differ by
// at most 2^-25 (the cpu: float64 functions rounded to float32) + 2 ulp = 2^-23 (CUDA's sincosf,
// full range) < 2^-22 absolute. With the products and the sum, |got - want| on the float32
// result stays below 2^-21 (|a| + |b|) for the pair (a, b); the bound allows 2^-20 (|a| + |b|),
// plus one rounding of the output. Columns past heads * D must be unchanged (bound 0).
TEST_P(Ops, Rope) {
  std::vector<RopeCase> cases;
  if (on_gpu()) {
    cases = {{1, 4, 64, 0, 0, DType::bf16},
             {37, 8, 128, 64, 3, DType::f16},
             {300, 2, 128, 0, 5, DType::f32},
             {16, 3, 2, 1, 0, DType::bf16},
             {7, 5, 96, 96, 8, DType::bf16}};
  } else {
    cases = {{1, 4, 64, 0, 0, DType::f32}, {37, 8, 128, 64, 3, DType::f32}};
  }
  for (const RopeCase& c : cases) {
    const std::string name = "rope n" + std::to_string(c.n) + " heads" + std::to_string(c.heads) +
                             " D" + std::to_string(c.D) + " " + tag(c.dtype);
    SCOPED_TRACE(name);
    Rng rng(seed_of(name));
    const int64_t half = c.D / 2, cols = c.heads * c.D + c.extra_cols;
    const HostMat x = random_mat(c.dtype, c.n, cols, c.pad, rng);
    // Llama-3's frequencies (theta 500,000), in float32 as model/rope.cpp computes them.
    HostMat inv_freq(DType::f32, 1, half);
    for (int64_t i = 0; i < half; ++i)
      inv_freq.set(0, i, 1.0f / std::pow(500000.0f, float(2 * i) / float(c.D)));
    // Positions up to 1,000,000 (angles of ~1e6 rad at the highest frequency).
    std::vector<int32_t> pos(size_t(c.n));
    for (int64_t r = 0; r < c.n; ++r) pos[size_t(r)] = int32_t(rng.uniform() * 1000001.0);
    pos[0] = 1000000;
    if (c.n > 1) pos[1] = 0;
    if (c.n > 2) pos[2] = 999999;
    auto run = [&](const ops::Context& ctx, DType dt) {
      DevMat dx(ctx, converted(x, dt)), df(ctx, inv_freq);
      DevInts dp(ctx, pos);
      ops::rope(ctx, dx.view(), c.heads, dp.data(), df.view());
      return dx.download();
    };
    const HostMat got = run(dut(), c.dtype);
    const HostMat want = run(oracle(), DType::f32);
    expect_within(name, got, want, [&](int64_t r, int64_t col) -> double {
      if (col >= c.heads * c.D) return 0;
      const int64_t i = col % c.D, partner = i < half ? col + half : col - half;
      const double pair = std::fabs(x.at(r, col)) + std::fabs(x.at(r, partner));
      return 0x1p-20 * pair + rounding(c.dtype, std::fabs(want.at(r, col)) + 0x1p-20 * pair);
    });
  }
}

// ---- swiglu -------------------------------------------------------------------------------
// Bound, relative: each side rounds exp (the cpu's expf within 1 ulp, CUDA's within 2), 1 + e,
// the division and the product: within 6 2^-24 each, 2^-19 together with margin; plus one
// rounding of out.
TEST_P(Ops, Swiglu) {
  struct Case {
    int64_t n, I, out_pad;
  };
  const std::vector<Case> cases = {{1, 77, 0}, {300, 512, 3}, {37, 1000, 0}, {5, 33, 1}};
  for (DType dt : dtypes())
    for (const Case& c : cases) {
      const std::string name = "swiglu n" + std::to_string(c.n) + " I" + std::to_string(c.I) +
                               " " + tag(dt);
      SCOPED_TRACE(name);
      Rng rng(seed_of(name));
      // gate and up: column slices of one [n, 2I] buffer (the fused gate/up product's output);
      // gates of stddev 3 reach both tails of silu.
      HostMat gu(dt, c.n, 2 * c.I);
      for (int64_t r = 0; r < c.n; ++r)
        for (int64_t i = 0; i < c.I; ++i) {
          gu.set(r, i, float(3.0 * rng.normal()));
          gu.set(r, c.I + i, float(rng.normal()));
        }
      auto run = [&](const ops::Context& ctx, DType as) {
        DevMat dgu(ctx, converted(gu, as)), dout(ctx, HostMat(as, c.n, c.I, c.out_pad));
        const TensorView all = dgu.view();
        ops::swiglu(ctx, all.slice(1, 0, c.I), all.slice(1, c.I, c.I), dout.view());
        return dout.download();
      };
      const HostMat got = run(dut(), dt);
      const HostMat want = run(oracle(), DType::f32);
      expect_within(name, got, want, [&](int64_t r, int64_t col) {
        const double v = std::fabs(want.at(r, col));
        return 0x1p-19 * v + rounding(dt, v * (1 + 0x1p-19));
      });
    }
}

// ---- embed, gather_rows, convert: exact -----------------------------------------------------
TEST_P(Ops, Embed) {
  struct Case {
    int64_t V, H, n, table_pad, out_pad;
  };
  const std::vector<Case> cases = {{1000, 96, 1, 0, 0}, {517, 333, 300, 3, 5}, {64, 8, 9, 1, 0}};
  for (DType dt : dtypes())
    for (const Case& c : cases) {
      const std::string name = "embed V" + std::to_string(c.V) + " H" + std::to_string(c.H) +
                               " n" + std::to_string(c.n) + " " + tag(dt);
      SCOPED_TRACE(name);
      Rng rng(seed_of(name));
      const HostMat table = random_mat(dt, c.V, c.H, c.table_pad, rng);
      std::vector<int32_t> ids(size_t(c.n));
      for (auto& id : ids) id = int32_t(rng.next() % uint64_t(c.V));
      ids[0] = int32_t(c.V - 1);
      if (c.n > 2) ids[1] = 0, ids[2] = 0;  // a repeat
      auto run = [&](const ops::Context& ctx, DType as) {
        DevMat dtab(ctx, converted(table, as)), dout(ctx, HostMat(DType::f32, c.n, c.H, c.out_pad));
        DevInts di(ctx, ids);
        ops::embed(ctx, di.data(), dtab.view(), dout.view());
        return dout.download();
      };
      expect_same_bits(run(dut(), dt), run(oracle(), DType::f32));  // widening is exact
    }
}

TEST_P(Ops, GatherRows) {
  struct Case {
    DType dtype;
    int64_t C, src_pad, dst_pad;  // 16-byte, 4-byte and 2-byte units on the GPU
  };
  const std::vector<Case> cases = {{DType::f32, 64, 0, 0},  {DType::bf16, 64, 8, 0},
                                   {DType::bf16, 33, 0, 1}, {DType::f16, 34, 2, 0},
                                   {DType::f32, 37, 3, 0},  {DType::f16, 1, 0, 0}};
  for (const Case& c : cases) {
    const std::string name = "gather_rows C" + std::to_string(c.C) + " " + tag(c.dtype) + " pad" +
                             std::to_string(c.src_pad) + "/" + std::to_string(c.dst_pad);
    SCOPED_TRACE(name);
    Rng rng(seed_of(name));
    const int64_t V = 91, m = 40;
    const HostMat src = random_mat(c.dtype, V, c.C, c.src_pad, rng);
    std::vector<int32_t> rows(static_cast<size_t>(m));
    for (auto& r : rows) r = int32_t(rng.next() % uint64_t(V));
    rows[0] = int32_t(V - 1);
    rows[1] = rows[2];
    auto run = [&](const ops::Context& ctx) {
      DevMat ds(ctx, src), dd(ctx, HostMat(c.dtype, m, c.C, c.dst_pad));
      DevInts dr(ctx, rows);
      ops::gather_rows(ctx, ds.view(), dr.data(), dd.view());
      return dd.download();
    };
    expect_same_bits(run(dut()), run(oracle()));
  }
}

// Every dtype pair (the cpu takes all of them too), with values that probe the rounding: ties
// to even in bfloat16 and float16, float16 overflow to inf and its subnormals.
TEST_P(Ops, Convert) {
  const DType all[] = {DType::f32, DType::f16, DType::bf16};
  for (DType from : all)
    for (DType to : all) {
      const std::string name = std::string("convert ") + tag(from) + "->" + tag(to);
      SCOPED_TRACE(name);
      Rng rng(seed_of(name));
      const int64_t n = 13, C = 71;
      HostMat src = random_mat(from, n, C, 3, rng, 10.0);
      const uint32_t probes[] = {0x3F808000u, 0x3F818000u, 0x3F800FFFu, 0x3F801000u,
                                 0x3F803000u, 0x47800000u, 0xC7FFF000u, 0x33800000u,
                                 0x37000000u, 0x80000000u, 0x7F800000u, 0x00000000u};
      for (size_t i = 0; i < std::size(probes); ++i) {
        float f;
        std::memcpy(&f, &probes[i], 4);
        src.set(int64_t(i) % n, int64_t(i) * 5 % C, f);  // rounded to `from` first
      }
      auto run = [&](const ops::Context& ctx) {
        DevMat ds(ctx, src), dd(ctx, HostMat(to, n, C, 2));
        ops::convert(ctx, ds.view(), dd.view());
        return dd.download();
      };
      expect_same_bits(run(dut()), run(oracle()));
    }
}

// ---- argmax_rows --------------------------------------------------------------------------
// Exact: ties (the lowest index wins, -0 == +0), NaN (below every number; an all-NaN row gives
// 0), infinities, the maximum first, last or in the middle.
TEST_P(Ops, ArgmaxRows) {
  const int64_t V = 50001, m = 12;
  Rng rng(seed_of("argmax_rows"));
  HostMat logits = random_mat(DType::f32, m, V, 3, rng, 4.0);
  const float nan = std::nanf(""), inf = INFINITY;
  auto fill = [&](int64_t r, float v) {
    for (int64_t c = 0; c < V; ++c) logits.set(r, c, v);
  };
  for (int64_t c : {777, 30000, 49999}) logits.set(1, c, 50.f);  // ties: the first
  fill(2, 1.5f);                                                  // all equal: 0
  fill(3, -1.f);                                                  // -0 == +0: the first
  logits.set(3, 4001, -0.f);
  logits.set(3, 4000, 0.f);
  logits.set(3, 9, -0.f);
  for (int64_t c : {0, 17, 3000}) logits.set(4, c, nan);  // NaN loses to numbers
  logits.set(4, 2000, 99.f);
  fill(5, nan);  // all NaN: 0
  fill(6, nan);  // -inf beats NaN
  logits.set(6, 40000, -inf);
  logits.set(6, 45000, -inf);
  logits.set(7, V - 1, 100.f);  // last
  logits.set(8, 0, 100.f);      // first
  logits.set(9, 5, inf);
  logits.set(9, 6, inf);
  logits.set(9, 1, nan);
  fill(10, -inf);  // all -inf: 0
  auto run = [&](const ops::Context& ctx) {
    DevMat dl(ctx, logits);
    DevInts out(ctx, size_t(m));
    ops::argmax_rows(ctx, dl.view(), out.data());
    return out.download();
  };
  const std::vector<int32_t> got = run(dut()), want = run(oracle());
  EXPECT_EQ(got, want);
  // The oracle itself, on the rows whose answer is known.
  const std::vector<std::pair<int64_t, int32_t>> known = {{1, 777}, {2, 0},     {3, 9},
                                                          {4, 2000}, {5, 0},    {6, 40000},
                                                          {7, int32_t(V - 1)}, {8, 0},
                                                          {9, 5},   {10, 0}};
  for (auto [r, idx] : known) EXPECT_EQ(got[size_t(r)], idx) << "row " << r;
}

// ---- errors ---------------------------------------------------------------------------------
// The GPU's own checks: dtypes cuBLASLt cannot take, and an allocation beyond the device.
TEST_P(Ops, GpuErrors) {
  if (!on_gpu()) GTEST_SKIP() << "GPU-only checks";
  Rng rng(seed_of("gpu errors"));
  const HostMat x32 = random_mat(DType::f32, 4, 16, 0, rng);
  const HostMat w32 = random_mat(DType::f32, 8, 16, 0, rng);
  DevMat dx(dut(), x32), dw(dut(), w32), dy(dut(), HostMat(DType::f32, 4, 8));
  const std::vector<ops::LinearPart> parts = {{dw.view(), {}}};
  try {
    ops::linear(dut(), dx.view(), parts, dy.view());
    ADD_FAILURE() << "linear took float32 x on the GPU";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bfloat16 or float16"), std::string::npos) << e.what();
  }
  try {
    dut().alloc(int64_t(1) << 50, "a 1 PiB test buffer");
    ADD_FAILURE() << "a 1 PiB allocation succeeded";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("a 1 PiB test buffer"), std::string::npos) << msg;
    EXPECT_NE(msg.find("GiB"), std::string::npos) << msg;
  }
  // The failed allocation left no error behind: the next op runs.
  DevMat ok(dut(), HostMat(DType::f32, 2, 2));
  EXPECT_NO_THROW(ok.download());
}

INSTANTIATE_TEST_SUITE_P(Devices, Ops, ::testing::Values(Device::cpu, Device::cuda),
                         [](const ::testing::TestParamInfo<Device>& p) {
                           return std::string(p.param == Device::cuda ? "cuda" : "cpu");
                         });

// Runs everywhere: without a usable GPU (or a CUDA build), Context::cuda() says so.
TEST(OpsContext, CudaWithoutGpuThrows) {
  const std::string why = backend_unavailable_reason(BackendKind::cuda);
  if (why.empty()) GTEST_SKIP() << "a CUDA GPU is usable here";
  try {
    ops::Context ctx = ops::Context::cuda();
    ADD_FAILURE() << "Context::cuda() returned without a GPU";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("no usable CUDA GPU"), std::string::npos) << msg;
    EXPECT_NE(msg.find(why), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace cca::test

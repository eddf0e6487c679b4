// Test helpers: owned tensors with poisoned memory, strided layouts (packed qkv, padded,
// [B,H,T,D]-transposed), deterministic random inputs, float64 comparison, and runners that call
// the public API on any backend (copying to and from the GPU for cuda) and check that every
// output element was written and nothing outside the output view was.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "cca/cca.hpp"
#include "cca/device.hpp"

namespace cca::test {

// ---- deterministic random numbers (splitmix64: identical inputs on every platform) ------------
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double normal() {                                              // Box-Muller
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  uint64_t state_;
};

inline uint64_t seed_of(const std::string& s) {  // FNV-1a
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// ---- owned tensors ------------------------------------------------------------------------------
// contiguous: row-major [B,T,H,D]; padded: gaps after every D row, T row and batch (rows start at
// odd element offsets, so no alignment can be assumed); transposed: memory [B,H,T,D] (the layout
// of a model that keeps heads outer); packed: q, k, v are slices of one [B,T,Hq+2Hkv,D] buffer.
enum class Layout { contiguous, padded, transposed, packed };

inline const char* layout_name(Layout l) {
  switch (l) {
    case Layout::contiguous:
      return "contig";
    case Layout::padded:
      return "padded";
    case Layout::transposed:
      return "bhtd";
    case Layout::packed:
      return "packed";
  }
  return "?";
}

constexpr uint8_t kPoisonByte = 0xFF;  // 0xFFFF.. is a NaN in float32, float16 and bfloat16

// A view plus the memory it points into (shared, so views of one buffer can coexist).
struct Tensor {
  std::shared_ptr<std::vector<uint32_t>> mem;  // 4-byte words keep float32 rows aligned
  TensorView view;

  int64_t words() const { return mem ? int64_t(mem->size()) : 0; }
  void poison() const { std::memset(mem->data(), kPoisonByte, mem->size() * 4); }
};

// Elements spanned by a view: 1 + max offset.
inline int64_t span_elems(const TensorView& v) {
  int64_t last = 0;
  for (int i = 0; i < v.ndim; ++i) last += (v.shape[i] - 1) * v.stride[i];
  return last + 1;
}

// A view over fresh poisoned memory holding `span` elements, strides given.
inline Tensor alloc_strided(DType dt, std::vector<int64_t> shape, std::vector<int64_t> stride) {
  Tensor t;
  t.view.dtype = dt;
  t.view.ndim = int(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    t.view.shape[i] = shape[i];
    t.view.stride[i] = stride[i];
  }
  const int64_t bytes = span_elems(t.view) * dtype_size(dt);
  t.mem = std::make_shared<std::vector<uint32_t>>(size_t((bytes + 3) / 4 + 1));
  t.view.data = t.mem->data();
  t.poison();
  return t;
}

// A [d0, d1, d2, d3] (or 3-d) tensor in `layout` (packed is treated as contiguous here).
inline Tensor alloc(DType dt, std::vector<int64_t> shape, Layout layout = Layout::contiguous) {
  const int n = int(shape.size());
  std::vector<int64_t> stride(size_t(n), 1);
  if (layout == Layout::padded) {  // pad 3, 5, 7 elements after each innermost row/plane/batch
    const int64_t pads[3] = {3, 5, 7};
    for (int d = n - 2, p = 0; d >= 0; --d, ++p)
      stride[size_t(d)] = stride[size_t(d + 1)] * shape[size_t(d + 1)] + pads[p];
  } else if (layout == Layout::transposed && n == 4) {  // memory [B, H, T, D]
    const int64_t T = shape[1], H = shape[2], D = shape[3];
    stride = {H * T * D, D, T * D, 1};
  } else {
    for (int d = n - 2; d >= 0; --d)
      stride[size_t(d)] = stride[size_t(d + 1)] * shape[size_t(d + 1)];
  }
  return alloc_strided(dt, std::move(shape), std::move(stride));
}

// Calls f(i0, i1, i2, i3, offset) for every element of a view of 1..4 dimensions, row-major.
template <class F>
void for_each(const TensorView& v, F f) {
  int64_t s[4] = {1, 1, 1, 1};
  for (int i = 0; i < v.ndim; ++i) s[i] = v.shape[i];
  for (int64_t a = 0; a < s[0]; ++a)
    for (int64_t b = 0; b < s[1]; ++b)
      for (int64_t c = 0; c < s[2]; ++c)
        for (int64_t d = 0; d < s[3]; ++d) {
          int64_t idx[4] = {a, b, c, d}, off = 0;
          for (int i = 0; i < v.ndim; ++i) off += idx[i] * v.stride[i];
          f(a, b, c, d, off);
        }
}

// Normal(0, stddev) values, rounded to the view's dtype by store(): whoever reads the view
// (reference or backend) sees the same rounded numbers. Never zeros.
inline void fill_normal(const TensorView& v, Rng& rng, double stddev = 1.0) {
  for_each(v, [&](int64_t, int64_t, int64_t, int64_t, int64_t off) {
    v.store(off, float(stddev * rng.normal()));
  });
}

// Logical row-major values as float64.
inline std::vector<double> to_f64(const TensorView& v) {
  std::vector<double> r;
  r.reserve(size_t(v.numel()));
  for_each(v, [&](int64_t, int64_t, int64_t, int64_t, int64_t off) { r.push_back(v.load(off)); });
  return r;
}

// A contiguous copy of `src` in dtype `dt` (exact when widening).
inline Tensor convert(const TensorView& src, DType dt, Layout layout = Layout::contiguous) {
  std::vector<int64_t> shape(src.shape, src.shape + src.ndim);
  Tensor t = alloc(dt, shape, layout);
  // Unused trailing strides are 0, so offset(a, b, c, d) serves 3-d views too.
  for_each(src, [&](int64_t a, int64_t b, int64_t c, int64_t d, int64_t off) {
    t.view.store(t.view.offset(a, b, c, d), src.load(off));
  });
  return t;
}

// One row (position) of a [B, T, H, D] view, with each head repeated heads_rep times
// (GQA -> MHA: new head h is old head h / heads_rep).
struct RowRef {
  const TensorView* src;
  int64_t row;
  int64_t heads_rep = 1;
};

// The rows stacked along dimension 1 into a new contiguous [B, rows.size(), H, D] tensor
// (bit-exact copies). All rows must give the same B, H * heads_rep, D and dtype.
inline Tensor stack_rows(const std::vector<RowRef>& rows) {
  const TensorView& s0 = *rows.at(0).src;
  const int64_t B = s0.shape[0], H = s0.shape[2] * rows[0].heads_rep, D = s0.shape[3];
  Tensor t = alloc(s0.dtype, {B, int64_t(rows.size()), H, D});
  const int64_t es = dtype_size(s0.dtype);
  for (size_t i = 0; i < rows.size(); ++i) {
    const TensorView& src = *rows[i].src;
    EXPECT_EQ(src.shape[2] * rows[i].heads_rep, H);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(t.view.ptr(t.view.offset(b, int64_t(i), h)),
                    src.ptr(src.offset(b, rows[i].row, h / rows[i].heads_rep)), size_t(D * es));
  }
  return t;
}

// Rows `rows` of one view, stacked (see stack_rows).
inline Tensor gather_rows(const TensorView& src, const std::vector<int64_t>& rows,
                          int64_t heads_rep = 1) {
  std::vector<RowRef> refs;
  for (int64_t r : rows) refs.push_back({&src, r, heads_rep});
  return stack_rows(refs);
}

// The same memory seen through another view (slices of a tensor keep their owner).
inline Tensor with_view(const Tensor& t, const TensorView& v) {
  Tensor r = t;
  r.view = v;
  return r;
}

inline std::vector<int64_t> range(int64_t begin, int64_t end) {
  std::vector<int64_t> r;
  for (int64_t i = begin; i < end; ++i) r.push_back(i);
  return r;
}

// q, k, v of one problem. With Layout::packed they are slices of one [B,T,Hq+2Hkv,D] buffer.
struct Qkv {
  Tensor q, k, v;
};

// Poisoned q, k, v (or dq, dk, dv) tensors in `layout`.
inline Qkv alloc_qkv(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, DType dt,
                     Layout layout) {
  Qkv r;
  if (layout == Layout::packed) {
    Tensor all = alloc(dt, {B, T, Hq + 2 * Hkv, D});
    r.q = r.k = r.v = all;
    r.q.view = all.view.slice(2, 0, Hq);
    r.k.view = all.view.slice(2, Hq, Hkv);
    r.v.view = all.view.slice(2, Hq + Hkv, Hkv);
  } else {
    r.q = alloc(dt, {B, T, Hq, D}, layout);
    r.k = alloc(dt, {B, T, Hkv, D}, layout);
    r.v = alloc(dt, {B, T, Hkv, D}, layout);
  }
  return r;
}

inline Qkv make_qkv(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, DType dt,
                    Layout layout, Rng& rng) {
  Qkv r = alloc_qkv(B, T, Hq, Hkv, D, dt, layout);
  fill_normal(r.q.view, rng);
  fill_normal(r.k.view, rng);
  fill_normal(r.v.view, rng);
  return r;
}

// ---- comparisons --------------------------------------------------------------------------------
struct Diff {
  double max_abs = 0;  // max |got - want|
  double rel_l2 = 0;   // ||got - want|| / ||want||
  int64_t worst = -1;  // flat index of max_abs
  int64_t nonfinite = 0;
};

inline Diff diff(const std::vector<double>& got, const std::vector<double>& want) {
  Diff r;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ++r.nonfinite;
      continue;
    }
    const double e = std::abs(got[i] - want[i]);
    if (e > r.max_abs || r.worst < 0) r.max_abs = std::max(r.max_abs, e), r.worst = int64_t(i);
    num += e * e;
    den += want[i] * want[i];
  }
  r.rel_l2 = std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
  return r;
}
inline Diff diff(const TensorView& got, const TensorView& want) {
  return diff(to_f64(got), to_f64(want));
}

// "(b, t, h, d)" of a flat row-major index into a view of this shape.
inline std::string index_string(const TensorView& v, int64_t flat) {
  std::vector<int64_t> idx(size_t(v.ndim));
  for (int i = v.ndim - 1; i >= 0; --i) idx[size_t(i)] = flat % v.shape[i], flat /= v.shape[i];
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < idx.size(); ++i) o << (i ? ", " : "") << idx[i];
  o << ")";
  return o.str();
}

// Worst errors per category over a run, printed at the end when CCA_TEST_REPORT is set
// (docs/numerics.md records them): max_abs, rel_l2 and the largest max_abs / bound.
struct ErrorLog {
  struct Worst {
    double max_abs = 0, rel_l2 = 0, ratio = 0;
    int64_t checks = 0;
  };
  static std::map<std::string, Worst>& table() {
    static std::map<std::string, Worst> t;
    return t;
  }
  static void add(const std::string& category, const Diff& d, double bound) {
    Worst& w = table()[category];
    w.max_abs = std::max(w.max_abs, d.max_abs);
    w.rel_l2 = std::max(w.rel_l2, d.rel_l2);
    w.ratio = std::max(w.ratio, bound > 0 ? d.max_abs / bound : 0.0);
    ++w.checks;
  }
};
class ErrorReport : public ::testing::Environment {
 public:
  void TearDown() override {
    if (!std::getenv("CCA_TEST_REPORT") || ErrorLog::table().empty()) return;
    std::printf("\nWorst errors by category:\n%-34s %8s %12s %12s %10s\n", "category", "checks",
                "max_abs", "rel_l2", "abs/bound");
    for (const auto& [key, w] : ErrorLog::table())
      std::printf("%-34s %8lld %12.3e %12.3e %10.3f\n", key.c_str(), (long long)w.checks, w.max_abs,
                  w.rel_l2, w.ratio);
  }
};
inline ::testing::Environment* const kErrorReport =
    ::testing::AddGlobalTestEnvironment(new ErrorReport);

// Fails unless got ~= want within the given bounds; `what` names the tensor in the message;
// a non-empty `category` logs the error (ErrorLog).
inline void expect_close(const TensorView& got, const TensorView& want, double max_abs,
                         double rel_l2, const std::string& what, const std::string& category = "") {
  const std::vector<double> g = to_f64(got), w = to_f64(want);
  const Diff d = diff(g, w);
  if (!category.empty()) ErrorLog::add(category, d, max_abs);
  EXPECT_EQ(d.nonfinite, 0) << what << ": non-finite elements";
  EXPECT_LE(d.max_abs, max_abs) << what << ": worst at " << index_string(got, d.worst) << " got "
                                << g[size_t(d.worst)] << " want " << w[size_t(d.worst)];
  EXPECT_LE(d.rel_l2, rel_l2) << what << ": relative L2 error";
}

// Every element of the view is finite (was written), and every byte of the tensor's memory
// outside the view still holds the poison (nothing was written outside it).
inline ::testing::AssertionResult fully_written(const Tensor& t) {
  const TensorView& v = t.view;
  const int64_t es = dtype_size(v.dtype);
  const int64_t n_elems = t.words() * 4 / es;
  std::vector<char> inside(size_t(n_elems), 0);
  const char* base = reinterpret_cast<const char*>(t.mem->data());
  const int64_t view0 = (static_cast<const char*>(v.data) - base) / es;
  int64_t bad = 0, first_bad = -1, flat = 0;
  for_each(v, [&](int64_t, int64_t, int64_t, int64_t, int64_t off) {
    inside[size_t(view0 + off)] = 1;
    if (!std::isfinite(v.load(off)) && bad++ == 0) first_bad = flat;
    ++flat;
  });
  if (bad)
    return ::testing::AssertionFailure()
           << bad << " of " << v.numel() << " elements not written (still NaN), first at "
           << index_string(v, first_bad);
  for (int64_t e = 0; e < n_elems; ++e) {
    if (inside[size_t(e)]) continue;
    for (int64_t byte = 0; byte < es; ++byte)
      if (uint8_t(base[e * es + byte]) != kPoisonByte)
        return ::testing::AssertionFailure() << "memory outside the view was written (element "
                                             << e - view0 << " relative to the view start)";
  }
  return ::testing::AssertionSuccess();
}

// Every byte of the tensor's memory still holds the poison.
inline bool untouched(const Tensor& t) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(t.mem->data());
  for (size_t i = 0; i < t.mem->size() * 4; ++i)
    if (p[i] != kPoisonByte) return false;
  return true;
}

// ---- running the public API on any backend ------------------------------------------------------
inline Device device_of(BackendKind b) {
  return b == BackendKind::cuda ? Device::cuda : Device::cpu;
}

// A host tensor mirrored in GPU memory for the duration of a call (the whole buffer, so strides
// and gaps are kept); on the host it is the tensor itself.
class OnDevice {
 public:
  OnDevice(const Tensor& t, Device dev) : host_(t), view_(t.view) {
    if (dev == Device::cpu || t.view.data == nullptr) return;
    const int64_t bytes = int64_t(t.mem->size()) * 4;
    dev_ = std::shared_ptr<void>(device_alloc(bytes), [](void* p) { device_free(p); });
    copy_to_device(dev_.get(), t.mem->data(), bytes);
    view_.data = static_cast<char*>(dev_.get()) +
                 (static_cast<char*>(t.view.data) - reinterpret_cast<char*>(t.mem->data()));
    view_.device = Device::cuda;
  }
  const TensorView& view() const { return view_; }
  // Copies the GPU memory back into the host tensor (outputs).
  void download() const {
    if (!dev_) return;
    device_synchronize();
    copy_to_host(host_.mem->data(), dev_.get(), int64_t(host_.mem->size()) * 4);
  }

 private:
  Tensor host_;
  TensorView view_;
  std::shared_ptr<void> dev_;
};

struct AttnOut {
  Tensor out, lse;
};

// attn_fwd on backend `be`; out (and lse) are fresh poisoned tensors in `out_layout`.
inline AttnOut run_attn(BackendKind be, const Tensor& q, const Tensor& k, const Tensor& v,
                        const VariantSpec& variant, Layout out_layout = Layout::contiguous,
                        int threads = 0) {
  const TensorView& qv = q.view;
  AttnOut r;
  r.out = alloc(qv.dtype, {qv.shape[0], qv.shape[1], qv.shape[2], qv.shape[3]},
                out_layout == Layout::packed ? Layout::contiguous : out_layout);
  r.lse = alloc(DType::f32, {qv.shape[0], qv.shape[2], qv.shape[1]},
                out_layout == Layout::padded ? Layout::padded : Layout::contiguous);
  const Device dev = device_of(be);
  OnDevice dq(q, dev), dk(k, dev), dv(v, dev), dout(r.out, dev), dlse(r.lse, dev);
  AttnFwdParams p;
  p.q = dq.view();
  p.k = dk.view();
  p.v = dv.view();
  p.out = dout.view();
  p.lse = dlse.view();
  p.variant = variant;
  p.run.backend = be;
  p.run.threads = threads;
  attn_fwd(p);
  dout.download();
  dlse.download();
  return r;
}

// attn_bwd on backend `be` from the forward's out and lse: fresh poisoned gradients of dtype
// `grad_dtype` in `layout` (packed is taken as contiguous, as for run_attn's out).
inline Qkv run_attn_bwd(BackendKind be, const Qkv& in, const AttnOut& fwd, const Tensor& dout,
                        const VariantSpec& variant, DType grad_dtype,
                        Layout layout = Layout::contiguous, int threads = 0,
                        bool deterministic = false) {
  const TensorView &qv = in.q.view, &kv = in.k.view;
  Qkv g = alloc_qkv(qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2], qv.shape[3], grad_dtype,
                    layout == Layout::packed ? Layout::contiguous : layout);
  const Device dev = device_of(be);
  OnDevice q(in.q, dev), k(in.k, dev), v(in.v, dev), out(fwd.out, dev), lse(fwd.lse, dev),
      gout(dout, dev), dq(g.q, dev), dk(g.k, dev), dv(g.v, dev);
  AttnBwdParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.out = out.view();
  p.lse = lse.view();
  p.dout = gout.view();
  p.dq = dq.view();
  p.dk = dk.view();
  p.dv = dv.view();
  p.variant = variant;
  p.run.backend = be;
  p.run.threads = threads;
  p.deterministic = deterministic;
  attn_bwd(p);
  dq.download();
  dk.download();
  dv.download();
  return g;
}

struct PoolOut {
  Tensor k_core, v_core;
};

// cca_pool of the first m groups on backend `be`.
inline PoolOut run_pool(BackendKind be, const Tensor& q, const Tensor& k, const Tensor& v,
                        const VariantSpec& variant, int64_t m, int threads = 0) {
  const TensorView& qv = q.view;
  const int64_t Hc = variant.core_heads(qv.shape[2], k.view.shape[2]);
  PoolOut r;
  r.k_core = alloc(qv.dtype, {qv.shape[0], m, Hc, qv.shape[3]});
  r.v_core = alloc(qv.dtype, {qv.shape[0], m, Hc, qv.shape[3]});
  const Device dev = device_of(be);
  OnDevice dq(q, dev), dk(k, dev), dv(v, dev), dkc(r.k_core, dev), dvc(r.v_core, dev);
  PoolParams p;
  p.q = dq.view();
  p.k = dk.view();
  p.v = dv.view();
  p.k_core = dkc.view();
  p.v_core = dvc.view();
  p.variant = variant;
  p.run.backend = be;
  p.run.threads = threads;
  cca_pool(p);
  dkc.download();
  dvc.download();
  return r;
}

// A readable name of a variant for test names: letters, digits and underscores only.
inline std::string variant_tag(const VariantSpec& v) {
  std::ostringstream o;
  o << variant_name(v.kind);
  switch (v.kind) {
    case VariantKind::full:
      break;
    case VariantKind::sliding:
      o << "_w" << v.window;
      break;
    case VariantKind::streaming:
    case VariantKind::lminfinite:
      o << "_n" << v.sinks << "_w" << v.window;
      break;
    case VariantKind::cca:
      o << "_g" << v.group << "_s" << v.window << "_" << pool_name(v.pool) << "_"
        << pool_heads_name(v.pool_heads);
      break;
  }
  if (!std::isnan(v.scale)) o << "_scaled";
  return o.str();
}

inline const char* dtype_tag(DType d) {
  return d == DType::f32 ? "f32" : d == DType::f16 ? "f16" : "bf16";
}

// Every variant configuration the suites sweep, for a cca group g and window s: the baselines
// (sliding/lminfinite windows s, streaming with 2 sinks) and cca with every pool and pool_heads.
inline std::vector<VariantSpec> all_variants(int64_t g, int64_t s) {
  std::vector<VariantSpec> r = {VariantSpec::full(), VariantSpec::sliding(s),
                                VariantSpec::streaming(2, s), VariantSpec::lminfinite(3, s + 1)};
  for (PoolMode pool : {PoolMode::cca, PoolMode::mean, PoolMode::max})
    for (PoolHeads heads : {PoolHeads::kv, PoolHeads::query})
      r.push_back(VariantSpec::cca(g, s, pool, heads));
  return r;
}

}  // namespace cca::test

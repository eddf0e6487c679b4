// The cpu ops: float32 on the host, matrix products through OpenBLAS, loops on OpenMP threads,
// element-wise rows on the CPU backend's vector layer (cpu_rows.cpp). The oracle the cuda ops are
// tested against.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attn/cpu/cpu_simd.hpp"
#include "cca/error.hpp"
#include "ops/cpu/cpu_rows.hpp"
#include "ops/impl.hpp"

namespace cca::ops::cpu {
namespace {

const float* f32(const TensorView& t) { return static_cast<const float*>(t.data); }
float* f32_mut(const TensorView& t) { return static_cast<float*>(t.data); }

void require_f32(const TensorView& t, const char* op, const char* name) {
  check(t.dtype == DType::f32,
        std::string(op) + " on the cpu: " + name + " must be float32, got " + dtype_name(t.dtype));
}

// Columns [c0, c1) of one part: y[:, col0 + c] = x W^T (+ b), or += when accumulating.
// OpenBLAS sgemm (sgemv for one row).
void part_columns(const float* x, int64_t ldx, int64_t n, const LinearPart& p, float* y,
                  int64_t ldy, bool accumulate, int64_t c0, int64_t c1) {
  const int64_t cols = c1 - c0, in = p.w.shape[1];
  if (cols <= 0) return;
  const float beta = accumulate ? 1.f : 0.f;
  const float* w = f32(p.w) + c0 * in;
  if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, int(cols), int(in), 1.f, w, int(in), x, 1, beta,
                y + c0, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(cols), int(in), 1.f, x,
                int(ldx), w, int(in), beta, y + c0, int(ldy));
  }
  if (p.b.data) {
    const float* b = f32(p.b);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = c0; i < c1; ++i) y[r * ldy + i] += b[i];
  }
}

}  // namespace

// OpenBLAS's thread-pool teardown (exported by every OpenBLAS build, declared in no header).
extern "C" int blas_thread_shutdown_(void);

int resolve_threads(int threads) {
  // 0: OpenMP's default (OMP_NUM_THREADS, else all cores), read before the first override.
  static const int kDefault = omp_get_max_threads();
  return threads > 0 ? threads : kDefault;
}

void set_threads(int threads) {
  // Parallelism comes from OpenMP (see linear): OpenBLAS runs single-threaded, and its idle
  // pool, started at load, would otherwise spin on a core for a while.
  static const bool kBlasSerial = [] {
    openblas_set_num_threads(1);
    blas_thread_shutdown_();
    return true;
  }();
  (void)kBlasSerial;
  omp_set_num_threads(resolve_threads(threads));
}

// Parts that share the input x, in one OpenMP region. OpenBLAS itself runs single-threaded
// inside: one thread pool for the whole forward (the attention backend uses OpenMP too), since
// OpenBLAS's own spinning pthreads and OpenMP's fight over the cores when both are active.
// Prefill chunks are split by rows (each thread a full-width sgemm on its rows: measured a few
// percent faster than column splits on 2 cores), single tokens by output columns.
void linear(const Context& ctx, const TensorView& x, std::span<const LinearPart> parts,
            const TensorView& y, bool accumulate) {
  require_f32(x, "linear", "x");
  require_f32(y, "linear", "y");
  for (const LinearPart& p : parts) {
    require_f32(p.w, "linear", "weight");
    if (p.b.data) require_f32(p.b, "linear", "bias");
  }
  constexpr int64_t kMinWorkPerThread = 1 << 16;  // multiply-adds; below this threads cost more
  constexpr int64_t kMinRowsPerThread = 16;
  constexpr int64_t kColAlign = 16;
  const int64_t n = x.shape[0], ldx = x.stride[0], ldy = y.stride[0];
  int64_t work = 0;
  for (const LinearPart& p : parts) work += n * p.w.shape[0] * p.w.shape[1];
  const int threads = int(std::clamp<int64_t>(work / kMinWorkPerThread, 1, ctx.threads()));
  const bool by_rows = n >= kMinRowsPerThread * threads;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t col0 = 0;
    for (const LinearPart& p : parts) {
      const int64_t out = p.w.shape[0];
      float* yp = f32_mut(y) + col0;
      if (by_rows) {
        const int64_t per = (n + nt - 1) / nt, r0 = std::min(n, per * t),
                      r1 = std::min(n, per * (t + 1));
        part_columns(f32(x) + r0 * ldx, ldx, r1 - r0, p, yp + r0 * ldy, ldy, accumulate, 0, out);
      } else {
        const int64_t per = (out + nt - 1) / nt;
        auto edge = [&](int i) {
          return i == nt ? out : std::min(out, (per * i + kColAlign - 1) / kColAlign * kColAlign);
        };
        part_columns(f32(x), ldx, n, p, yp, ldy, accumulate, edge(t), edge(t + 1));
      }
      col0 += out;
    }
  }
}

void rms_norm(const Context& ctx, const TensorView& x, const TensorView& w, float eps,
              const TensorView& out) {
  require_f32(w, "rms_norm", "weight");
  require_f32(out, "rms_norm", "out");
  const int64_t n = x.shape[0], H = x.shape[1];
  const auto row = row_fns().rms_norm;
#pragma omp parallel for schedule(static) if (n > 16) num_threads(ctx.threads())
  for (int64_t r = 0; r < n; ++r)
    row(f32(x) + r * x.stride[0], f32(w), H, eps, f32_mut(out) + r * out.stride[0]);
}

void rope(const Context& ctx, const TensorView& x, int64_t heads, const int32_t* positions,
          const TensorView& inv_freq) {
  require_f32(x, "rope", "x");
  const int64_t n = x.shape[0], half = inv_freq.numel();
  const float* freq = f32(inv_freq);
  const auto row = row_fns().rope;
#pragma omp parallel if (n > 16) num_threads(ctx.threads())
  {
    std::vector<float> cs(size_t(2 * half));  // this row's cos and sin
    float* c = cs.data();
    float* s = c + half;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      const float pos = float(positions[r]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = freq[i] * pos;  // float32 product, as Hugging Face's matmul
        c[i] = float(std::cos(double(angle)));
        s[i] = float(std::sin(double(angle)));
      }
      row(f32_mut(x) + r * x.stride[0], heads, half, c, s);
    }
  }
}

void swiglu(const Context& ctx, const TensorView& gate, const TensorView& up,
            const TensorView& out) {
  require_f32(gate, "swiglu", "gate");
  const int64_t n = gate.shape[0], I = gate.shape[1];
  const auto row = row_fns().swiglu;
#pragma omp parallel for schedule(static) if (n * I > (1 << 16)) num_threads(ctx.threads())
  for (int64_t r = 0; r < n; ++r)
    row(f32(gate) + r * gate.stride[0], f32(up) + r * up.stride[0],
        f32_mut(out) + r * out.stride[0], I);
}

void embed(const Context& ctx, const int32_t* ids, const TensorView& table, const TensorView& out) {
  require_f32(table, "embed", "table");
  const int64_t H = table.shape[1];
  for (int64_t r = 0; r < out.shape[0]; ++r)
    std::memcpy(f32_mut(out) + r * out.stride[0], f32(table) + int64_t(ids[r]) * table.stride[0],
                size_t(H) * sizeof(float));
}

void gather_rows(const Context& ctx, const TensorView& src, const int32_t* rows,
                 const TensorView& dst) {
  const int64_t row_bytes = src.shape[1] * dtype_size(src.dtype);
  for (int64_t r = 0; r < dst.shape[0]; ++r)
    std::memcpy(dst.ptr(r * dst.stride[0]), src.ptr(int64_t(rows[r]) * src.stride[0]),
                size_t(row_bytes));
}

void argmax_rows(const Context& ctx, const TensorView& logits, int32_t* out) {
  const int64_t V = logits.shape[1];
  for (int64_t r = 0; r < logits.shape[0]; ++r) {
    const float* row = f32(logits) + r * logits.stride[0];
    int64_t best = 0;
    for (int64_t v = 1; v < V; ++v)
      if (row[v] > row[best] || (std::isnan(row[best]) && !std::isnan(row[v]))) best = v;
    out[r] = int32_t(best);
  }
}

// The largest key t with sum over keys >= t of weight(i) >= need (weights >= 0), by bisection
// over the 32-bit key space: the threshold of top-k (weights 1) and top-p (probabilities).
template <class Weight>
uint32_t threshold_key(const std::vector<uint32_t>& keys, Weight weight, double need) {
  uint32_t lo = 0, hi = 0xFFFFFFFFu;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2 + 1;
    double sum = 0;
    for (size_t i = 0; i < keys.size(); ++i)
      if (keys[i] >= mid) sum += weight(i);
    if (sum >= need)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

void sample_rows(const Context& ctx, const TensorView& logits, const SampleParams* params,
                 const int32_t* counters, int32_t* out) {
  const int64_t V = logits.shape[1];
  std::vector<uint32_t> keys(static_cast<size_t>(V));
  std::vector<double> e(static_cast<size_t>(V));
  for (int64_t r = 0; r < logits.shape[0]; ++r) {
    const SampleParams p = params[r];
    const float* row = f32(logits) + r * logits.stride[0];
    float m = -INFINITY;
    for (int64_t i = 0; i < V; ++i) {
      const float z = row[i] / p.temperature;
      keys[size_t(i)] = order_key(z);
      m = std::max(m, z);
    }
    const uint32_t tk = p.top_k > 0 && p.top_k < V
                            ? threshold_key(
                                  keys, [](size_t) { return 1.0; }, double(p.top_k))
                            : 0;
    double total = 0;
    for (int64_t i = 0; i < V; ++i) {
      e[size_t(i)] =
          keys[size_t(i)] >= tk ? std::exp(double(row[i] / p.temperature) - double(m)) : 0.0;
      total += e[size_t(i)];
    }
    const uint32_t tp = p.top_p < 1.f
                            ? threshold_key(
                                  keys, [&](size_t i) { return e[i]; }, double(p.top_p) * total)
                            : 0;
    const uint32_t t = std::max(tk, tp);
    double kept = 0;
    int64_t last = 0;
    for (int64_t i = 0; i < V; ++i)
      if (keys[size_t(i)] >= t) kept += e[size_t(i)], last = i;
    const double target = uniform01(p.seed, counters[r]) * kept;
    double acc = 0;
    int64_t pick = last;
    for (int64_t i = 0; i < V; ++i) {
      if (keys[size_t(i)] < t) continue;
      acc += e[size_t(i)];
      if (acc > target) {
        pick = i;
        break;
      }
    }
    out[r] = int32_t(pick);
  }
}

void convert(const Context& ctx, const TensorView& src, const TensorView& dst) {
  const int64_t n = src.shape[0], C = src.shape[1];
  if (src.dtype != DType::f32 && dst.dtype != DType::f32) {  // 16-bit to 16-bit: rare
#pragma omp parallel for schedule(static) if (n * C > (1 << 16)) num_threads(ctx.threads())
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < C; ++c)
        dst.store(r * dst.stride[0] + c, src.load(r * src.stride[0] + c));
    return;
  }
  // float32 <-> float16/bfloat16 (the KV cache's dtype): the vector conversions, rounded as
  // TensorView::store.
#pragma omp parallel for schedule(static) if (n * C > (1 << 16)) num_threads(ctx.threads())
  for (int64_t r = 0; r < n; ++r) {
    const void* s = src.ptr(r * src.stride[0]);
    void* d = dst.ptr(r * dst.stride[0]);
    if (src.dtype == DType::f32)
      cca::cpu::row_from_float(static_cast<const float*>(s), C, d, dst.dtype);
    else
      cca::cpu::row_to_float(s, src.dtype, C, static_cast<float*>(d));
  }
}

}  // namespace cca::ops::cpu

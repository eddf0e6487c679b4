#include "model/transformer.hpp"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cca/error.hpp"

namespace cca::model {
namespace {

// One product of a group: y [n, out] = x [n, in] W^T + b, or y += ... when `accumulate` (the
// residual adds).
struct Product {
  const Linear* L;
  float* y;
  bool accumulate;
};

// Columns [c0, c1) of one product: OpenBLAS sgemm (sgemv for one row), then the bias.
void product_columns(const float* x, int64_t n, const Product& p, int64_t c0, int64_t c1) {
  const Linear& L = *p.L;
  const int64_t cols = c1 - c0;
  if (cols <= 0) return;
  const float beta = p.accumulate ? 1.f : 0.f;
  const float* w = L.w + c0 * L.in;
  if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, int(cols), int(L.in), 1.f, w, int(L.in), x, 1, beta,
                p.y + c0, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(cols), int(L.in), 1.f, x,
                int(L.in), w, int(L.in), beta, p.y + c0, int(L.out));
  }
  if (L.b)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = c0; i < c1; ++i) p.y[r * L.out + i] += L.b[i];
}

// silu(gate) * up into gate, elements [begin, end).
void swiglu(float* gate, const float* up, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.f + std::exp(-g)) * up[i];
  }
}

// Products that share the input x [n, in], in one OpenMP region. OpenBLAS itself runs
// single-threaded inside: one thread pool for the whole forward (the attention backend uses
// OpenMP too), since OpenBLAS's own spinning pthreads and OpenMP's fight over the cores when both
// are active. Prefill chunks are split by rows (each thread a full-width sgemm on its rows:
// measured a few percent faster than column splits on 2 cores), single tokens by output columns.
// With `swiglu_up`, products[0] is the gate and products[1] the up projection, and each thread
// then turns its part of the gate into silu(gate) * up (no barrier: the part is its own).
void products(const float* x, int64_t n, std::initializer_list<Product> list,
              const float* swiglu_up = nullptr) {
  constexpr int64_t kMinWorkPerThread = 1 << 16;  // multiply-adds; below this threads cost more
  constexpr int64_t kMinRowsPerThread = 16;
  constexpr int64_t kColAlign = 16;
  int64_t work = 0;
  for (const Product& p : list) work += n * p.L->out * p.L->in;
  const int threads = int(std::clamp<int64_t>(work / kMinWorkPerThread, 1, omp_get_max_threads()));
  const bool by_rows = n >= kMinRowsPerThread * threads;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    if (by_rows) {
      const int64_t per = (n + nt - 1) / nt, r0 = std::min(n, per * t),
                    r1 = std::min(n, per * (t + 1));
      for (const Product& p : list) {
        Product mine = p;
        mine.y = p.y + r0 * p.L->out;
        product_columns(x + r0 * p.L->in, r1 - r0, mine, 0, p.L->out);
      }
      if (swiglu_up) {
        const int64_t out = list.begin()->L->out;
        swiglu(list.begin()->y, swiglu_up, r0 * out, r1 * out);
      }
    } else {
      for (const Product& p : list) {
        const int64_t out = p.L->out, per = (out + nt - 1) / nt;
        auto edge = [&](int i) {
          return i == nt ? out : std::min(out, (per * i + kColAlign - 1) / kColAlign * kColAlign);
        };
        const int64_t c0 = edge(t), c1 = edge(t + 1);
        product_columns(x, n, p, c0, c1);
        if (swiglu_up && &p == list.begin() + 1)
          for (int64_t r = 0; r < n; ++r)
            swiglu(list.begin()->y, swiglu_up, r * out + c0, r * out + c1);
      }
    }
  }
}

// out [n, H] = x * rsqrt(mean(x^2) + eps) * w, row by row.
void rms_norm(const float* x, int64_t n, int64_t H, const float* w, double eps, float* out) {
#pragma omp parallel for schedule(static) if (n > 16)
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * H;
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += double(xr[i]) * xr[i];
    const float inv = float(1.0 / std::sqrt(ss / double(H) + eps));
    float* o = out + r * H;
    for (int64_t i = 0; i < H; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

}  // namespace

// OpenBLAS's thread-pool teardown (exported by every OpenBLAS build, declared in no header).
extern "C" int blas_thread_shutdown_(void);

void set_compute_threads(int threads) {
  // 0: OpenMP's default (OMP_NUM_THREADS, else all cores), read before the first override.
  static const int kDefault = omp_get_max_threads();
  // Parallelism comes from OpenMP (see products): OpenBLAS runs single-threaded, and its idle
  // pool, started at load, would otherwise spin on a core for a while.
  static const bool kBlasSerial = [] {
    openblas_set_num_threads(1);
    blas_thread_shutdown_();
    return true;
  }();
  (void)kBlasSerial;
  omp_set_num_threads(threads > 0 ? threads : kDefault);
}

Model::Model(const std::string& dir)
    : dir_(dir), cfg_(load_model_config(dir)), rope_(cfg_.rope, cfg_.head_dim) {
  weights_ = std::make_unique<Weights>(Checkpoint::open(dir), cfg_);
}

Session::Session(const Model& model, const SessionOptions& opt) : model_(&model), opt_(opt) {
  const ModelConfig& c = model.config();
  opt_.variant.validate();
  check(opt_.chunk >= 1, "chunk size must be >= 1, got " + std::to_string(opt_.chunk));
  check(opt_.threads >= 0,
        "threads must be >= 0 (0 = all cores), got " + std::to_string(opt_.threads));
  set_compute_threads(opt_.threads);
  RunOptions run;
  run.backend = BackendKind::cpu;
  run.threads = opt_.threads;
  caches_.reserve(size_t(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l)
    caches_.emplace_back(opt_.variant, 1, c.num_heads, c.num_kv_heads, c.head_dim, DType::f32, run);
  const size_t n = size_t(opt_.chunk);
  x_.resize(n * c.hidden_size);
  h_.resize(n * c.hidden_size);
  q_.resize(n * c.num_heads * c.head_dim);
  att_.resize(n * c.num_heads * c.head_dim);
  k_.resize(n * c.num_kv_heads * c.head_dim);
  v_.resize(n * c.num_kv_heads * c.head_dim);
  gate_.resize(n * c.intermediate_size);
  up_.resize(n * c.intermediate_size);
  cos_.resize(n * c.head_dim / 2);
  sin_.resize(n * c.head_dim / 2);
}

Session::~Session() = default;

// One chunk of n <= opt.chunk tokens: B = 1, T = n, Hq/Hkv heads of D.
void Session::run_chunk(const int32_t* ids, int64_t n) {
  const ModelConfig& c = model_->config();
  const Weights& w = model_->weights();
  const int64_t H = c.hidden_size, Hq = c.num_heads, Hkv = c.num_kv_heads, D = c.head_dim;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t id = ids[r];
    check(id >= 0 && id < c.vocab_size, "token id " + std::to_string(id) +
                                            " is out of range for vocab_size " +
                                            std::to_string(c.vocab_size));
    std::memcpy(&x_[size_t(r * H)], w.embed + id * H, size_t(H) * sizeof(float));
  }
  model_->rope().tables(pos_, n, cos_.data(), sin_.data());
  const TensorView qv = make_view(q_.data(), DType::f32, {1, n, Hq, D});
  const TensorView kv = make_view(k_.data(), DType::f32, {1, n, Hkv, D});
  const TensorView vv = make_view(v_.data(), DType::f32, {1, n, Hkv, D});
  const TensorView ov = make_view(att_.data(), DType::f32, {1, n, Hq, D});

  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    rms_norm(x_.data(), n, H, L.attn_norm, c.rms_norm_eps, h_.data());
    products(h_.data(), n,
             {{&L.q, q_.data(), false}, {&L.k, k_.data(), false}, {&L.v, v_.data(), false}});
    model_->rope().apply(q_.data(), n, Hq, Hq * D, cos_.data(), sin_.data());
    model_->rope().apply(k_.data(), n, Hkv, Hkv * D, cos_.data(), sin_.data());
    caches_[l].append(qv, kv, vv, ov);
    products(att_.data(), n, {{&L.o, x_.data(), true}});

    rms_norm(x_.data(), n, H, L.mlp_norm, c.rms_norm_eps, h_.data());
    products(h_.data(), n, {{&L.gate, gate_.data(), false}, {&L.up, up_.data(), false}},
             up_.data());
    products(gate_.data(), n, {{&L.down, x_.data(), true}});
  }
  rms_norm(x_.data(), n, H, w.final_norm, c.rms_norm_eps, h_.data());
  pos_ += n;
}

void Session::forward(const int32_t* ids, int64_t n, const HiddenFn& on_hidden) {
  for (int64_t r0 = 0; r0 < n; r0 += opt_.chunk) {
    const int64_t rows = std::min(opt_.chunk, n - r0);
    run_chunk(ids + r0, rows);
    if (on_hidden) on_hidden(r0, rows, h_.data());
  }
}

void Session::logits(const float* hidden, int64_t rows, float* out) const {
  const ModelConfig& c = model_->config();
  Linear head;
  head.w = model_->weights().lm_head;
  head.out = c.vocab_size;
  head.in = c.hidden_size;
  products(hidden, rows, {{&head, out, false}});
}

std::vector<float> Session::forward_last(const int32_t* ids, int64_t n,
                                         const std::function<void(int64_t)>& on_chunk) {
  check(n >= 1, "forward_last needs at least one token");
  std::vector<float> out(size_t(model_->config().vocab_size));
  forward(ids, n, [&](int64_t row0, int64_t rows, const float* hidden) {
    if (row0 + rows == n) logits(hidden + (rows - 1) * model_->config().hidden_size, 1, out.data());
    if (on_chunk) on_chunk(row0 + rows);
  });
  return out;
}

int64_t Session::kv_bytes() const {
  int64_t b = 0;
  for (const KvCache& c : caches_) b += c.memory_bytes();
  return b;
}

int64_t Session::full_kv_bytes() const {
  int64_t b = 0;
  for (const KvCache& c : caches_) b += c.full_cache_bytes();
  return b;
}

}  // namespace cca::model

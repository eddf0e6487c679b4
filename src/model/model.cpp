#include "model/model.hpp"

#include <algorithm>

#include "cca/error.hpp"

namespace cca::model {
namespace {

// [B, n, H, D] view of heads [h0, h0 + H) of rows [row0, row0 + n) of a [rows, cols] matrix,
// one batch row per sequence (B = 1), or one per row (n = 1) for a batch of single tokens.
TensorView heads_view(const TensorView& m, int64_t row0, int64_t B, int64_t n, int64_t h0,
                      int64_t H, int64_t D) {
  TensorView v;
  v.data = m.ptr(row0 * m.stride[0] + h0 * D);
  v.dtype = m.dtype;
  v.device = m.device;
  v.ndim = 4;
  const int64_t ld = m.stride[0];
  v.shape[0] = B, v.shape[1] = n, v.shape[2] = H, v.shape[3] = D;
  v.stride[0] = n * ld, v.stride[1] = ld, v.stride[2] = D, v.stride[3] = 1;
  return v;
}

// ops::linear as one region of the context's profile, with its FLOPs for a rate.
void linear(const ops::Context& ctx, const char* region, const TensorView& x,
            std::span<const ops::LinearPart> parts, const TensorView& y, bool accumulate = false) {
  double out = 0;
  for (const ops::LinearPart& p : parts) out += double(p.w.shape[0]);
  const ops::Timed t(ctx.profile(), region, 2.0 * double(x.shape[0]) * double(x.shape[1]) * out);
  ops::linear(ctx, x, parts, y, accumulate);
}

}  // namespace

Model::Model(const std::string& dir, const ops::Context& ctx, DType dtype)
    : dir_(dir), cfg_(load_model_config(dir)), ctx_(&ctx) {
  weights_ = std::make_unique<Weights>(Checkpoint::open(dir), cfg_, ctx, dtype);
  const Rope rope(cfg_.rope, cfg_.head_dim);
  const int64_t half = int64_t(rope.inv_freq().size());
  inv_freq_mem_ = ctx.alloc(half * 4, "the rotary frequencies");
  ctx.upload(inv_freq_mem_, rope.inv_freq().data(), half * 4);
  ctx.synchronize();
  inv_freq_ = ops::matrix(inv_freq_mem_, DType::f32, 1, half, half, ctx.device());
}

Model::~Model() {
  weights_.reset();
  if (inv_freq_mem_) ctx_->free(inv_freq_mem_);
}

// The buffers, in one list so that bytes() and the constructor cannot disagree.
namespace {
struct Buffer {
  TensorView* view;
  DType dtype;
  int64_t rows, cols;
};
}  // namespace

int64_t Activations::bytes(const ModelConfig& c, DType dt, int64_t R, int64_t L, DType kv) {
  const int64_t qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, qd = c.num_heads * c.head_dim;
  int64_t b = R * c.hidden_size * (4 + dtype_size(dt)) + R * (qkv + qd + 2 * c.intermediate_size) *
                                                              dtype_size(dt);
  if (kv != dt) b += R * (qkv + qd) * dtype_size(kv);
  b += L * c.hidden_size * (4 + dtype_size(dt)) + L * c.vocab_size * 4;
  b += decode_workspace_bytes(L, c.num_heads, c.head_dim);
  b += L * int64_t(sizeof(ops::SampleParams) + 4);
  return b + 4 * (2 * R + L) + 16 * 256;  // ids, positions, rows; alignment
}

Activations::Activations(const Model& m, int64_t R, int64_t L, DType kv)
    : m_(&m), rows_(R), logit_rows_(L) {
  check(R >= 1 && L >= 1, "activations need at least one row");
  const ModelConfig& c = m.config();
  const DType dt = m.dtype();
  const int64_t qkv_cols = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim,
                qd = c.num_heads * c.head_dim;
  std::vector<Buffer> list = {{&x, DType::f32, R, c.hidden_size},
                              {&h, dt, R, c.hidden_size},
                              {&qkv, dt, R, qkv_cols},
                              {&att, dt, R, qd},
                              {&gate_up, dt, R, 2 * c.intermediate_size},
                              {&sel_x, DType::f32, L, c.hidden_size},
                              {&sel_h, dt, L, c.hidden_size},
                              {&logits, DType::f32, L, c.vocab_size}};
  if (kv != dt) {
    list.push_back({&kv_qkv, kv, R, qkv_cols});
    list.push_back({&kv_att, kv, R, qd});
  }
  const ops::Context& ctx = m.context();
  try {
    for (const Buffer& b : list) {
      void* p = ctx.alloc(b.rows * b.cols * dtype_size(b.dtype), "activations");
      mem_.push_back(p);
      *b.view = ops::matrix(p, b.dtype, b.rows, b.cols, b.cols, ctx.device());
    }
    for (int32_t** a : {&ids, &positions}) {
      mem_.push_back(ctx.alloc(R * 4, "token ids and positions"));
      *a = static_cast<int32_t*>(mem_.back());
    }
    mem_.push_back(ctx.alloc(L * 4, "logits rows"));
    sel = static_cast<int32_t*>(mem_.back());
    mem_.push_back(ctx.alloc(L * int64_t(sizeof(ops::SampleParams)), "sampling parameters"));
    sample_params = static_cast<ops::SampleParams*>(mem_.back());
    mem_.push_back(ctx.alloc(L * 4, "sampling counters"));
    sample_counters = static_cast<int32_t*>(mem_.back());
    // Decode steps of up to L sequences attend with this scratch (fixed: graphs replay it).
    attn_workspace_bytes = decode_workspace_bytes(L, c.num_heads, c.head_dim);
    if (attn_workspace_bytes > 0) {
      mem_.push_back(ctx.alloc(attn_workspace_bytes, "the attention workspace"));
      attn_workspace = mem_.back();
    }
    auto host = [&](int64_t bytes) {
      host_mem_.push_back(ctx.alloc_host(bytes, "step staging"));
      return host_mem_.back();
    };
    host_ids = static_cast<int32_t*>(host(R * 4));
    host_pos = static_cast<int32_t*>(host(R * 4));
    host_sel = static_cast<int32_t*>(host(L * 4));
    host_next = static_cast<int32_t*>(host(L * 4));
    host_logits = static_cast<float*>(host(L * c.vocab_size * 4));
    host_params = static_cast<ops::SampleParams*>(host(L * int64_t(sizeof(ops::SampleParams))));
    host_counters = static_cast<int32_t*>(host(L * 4));
  } catch (...) {
    for (void* p : mem_) ctx.free(p);
    for (void* p : host_mem_) ctx.free_host(p);
    throw;
  }
}

Activations::~Activations() {
  for (void* p : mem_) m_->context().free(p);
  for (void* p : host_mem_) m_->context().free_host(p);
}

void Activations::stage_tokens(const int32_t* id, const int32_t* pos, int64_t n) {
  check(n >= 1 && n <= rows_, "a step of " + std::to_string(n) + " tokens does not fit the " +
                                  std::to_string(rows_) + " rows of its buffers");
  const int64_t V = m_->config().vocab_size;
  for (int64_t r = 0; r < n; ++r)
    check(id[r] >= 0 && id[r] < V, "token id " + std::to_string(id[r]) +
                                       " is out of range for vocab_size " + std::to_string(V));
  std::copy(id, id + n, host_ids);
  std::copy(pos, pos + n, host_pos);
}

void Activations::upload_tokens(int64_t n) {
  m_->context().upload(ids, host_ids, n * 4);
  m_->context().upload(positions, host_pos, n * 4);
}

void Activations::set_tokens(const int32_t* id, const int32_t* pos, int64_t n) {
  stage_tokens(id, pos, n);
  upload_tokens(n);
}

void Activations::set_logit_rows(const int32_t* r, int64_t m) {
  check(m >= 1 && m <= logit_rows_, "logits of " + std::to_string(m) + " rows do not fit the " +
                                        std::to_string(logit_rows_) + " rows of their buffer");
  std::copy(r, r + m, host_sel);
  m_->context().upload(sel, host_sel, m * 4);
}

void forward(Activations& a, std::span<const StepSlice> slices, int64_t n,
             bool device_positions) {
  const Model& m = a.model();
  const ops::Context& ctx = m.context();
  const ModelConfig& c = m.config();
  const Weights& w = m.weights();
  const int64_t Hq = c.num_heads, Hkv = c.num_kv_heads, D = c.head_dim, I = c.intermediate_size;
  const float eps = float(c.rms_norm_eps);
  auto rows = [n](const TensorView& t) { return t.slice(0, 0, n); };
  const TensorView x = rows(a.x), h = rows(a.h), qkv = rows(a.qkv), att = rows(a.att),
                   gu = rows(a.gate_up);
  const TensorView gate = gu.slice(1, 0, I), up = gu.slice(1, I, I);
  // q|k|v and the attention output in the caches' dtype.
  const bool kv_convert = !a.kv_qkv.empty();
  const TensorView kv_qkv = kv_convert ? rows(a.kv_qkv) : qkv;
  const TensorView kv_att = kv_convert ? rows(a.kv_att) : att;
  // The one-token slices at the front (a step's decode tokens, ahead of any prompt chunk) attend
  // in one batched call; the other slices one by one.
  size_t ones = 0;
  while (ones < slices.size() && slices[ones].rows == 1 && slices[ones].row0 == int64_t(ones))
    ++ones;
  check(!device_positions || ones == slices.size(),
        "device-held positions need one token per sequence");
  const bool batched = device_positions || ones > 1;

  ops::Profile& prof = ctx.profile();
  {
    const ops::Timed t(prof, "embed");
    ops::embed(ctx, a.ids, w.embed, x);
  }
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    {
      const ops::Timed t(prof, "norm");
      ops::rms_norm(ctx, x, L.attn_norm, eps, h);
    }
    linear(ctx, "gemm qkv", h, L.qkv, qkv);
    {
      const ops::Timed t(prof, "rope");
      ops::rope(ctx, qkv, Hq + Hkv, a.positions, m.inv_freq());  // q and k heads are adjacent
    }
    if (kv_convert) {
      const ops::Timed t(prof, "convert");
      ops::convert(ctx, qkv, kv_qkv);
    }
    // The caches time their own phases (kv copy, pool, attend) on the same profile.
    if (batched) {
      std::vector<KvCache*> caches;
      for (size_t i = 0; i < ones; ++i) caches.push_back(&(*slices[i].caches)[l]);
      const int64_t S = int64_t(ones);
      const TensorView q = heads_view(kv_qkv, 0, S, 1, 0, Hq, D),
                       k = heads_view(kv_qkv, 0, S, 1, Hq, Hkv, D),
                       v = heads_view(kv_qkv, 0, S, 1, Hq + Hkv, Hkv, D),
                       o = heads_view(kv_att, 0, S, 1, 0, Hq, D);
      if (device_positions)
        kv_cache_decode_step(caches, q, k, v, o, a.positions);
      else
        kv_cache_append_batch(caches, q, k, v, o);
    }
    for (size_t i = batched ? ones : 0; i < slices.size(); ++i) {
      const StepSlice& s = slices[i];
      (*s.caches)[l].append(heads_view(kv_qkv, s.row0, 1, s.rows, 0, Hq, D),
                            heads_view(kv_qkv, s.row0, 1, s.rows, Hq, Hkv, D),
                            heads_view(kv_qkv, s.row0, 1, s.rows, Hq + Hkv, Hkv, D),
                            heads_view(kv_att, s.row0, 1, s.rows, 0, Hq, D));
    }
    if (kv_convert) {
      const ops::Timed t(prof, "convert");
      ops::convert(ctx, kv_att, att);
    }
    linear(ctx, "gemm o", att, L.o, x, /*accumulate=*/true);

    {
      const ops::Timed t(prof, "norm");
      ops::rms_norm(ctx, x, L.mlp_norm, eps, h);
    }
    linear(ctx, "gemm gate_up", h, L.gate_up, gu);
    {
      const ops::Timed t(prof, "swiglu");
      ops::swiglu(ctx, gate, up, gate);  // in place: the down projection reads the gate columns
    }
    linear(ctx, "gemm down", gate, L.down, x, /*accumulate=*/true);
  }
}

void warm_up(Activations& a) {
  const Model& m = a.model();
  const ops::Context& ctx = m.context();
  const LayerWeights& L = m.weights().layers.front();
  const int64_t I = m.config().intermediate_size;
  ops::tune_linear(ctx, a.h, L.qkv, a.qkv);
  ops::tune_linear(ctx, a.att, L.o, a.x, /*accumulate=*/true);
  ops::tune_linear(ctx, a.h, L.gate_up, a.gate_up);
  ops::tune_linear(ctx, a.gate_up.slice(1, 0, I), L.down, a.x, /*accumulate=*/true);
  ctx.synchronize();
}

void compute_logits(Activations& a, int64_t m) {
  const Model& mo = a.model();
  const ops::Context& ctx = mo.context();
  const TensorView sx = a.sel_x.slice(0, 0, m), sh = a.sel_h.slice(0, 0, m),
                   lg = a.logits.slice(0, 0, m);
  {
    const ops::Timed t(ctx.profile(), "norm");
    ops::gather_rows(ctx, a.x, a.sel, sx);
    ops::rms_norm(ctx, sx, mo.weights().final_norm, float(mo.config().rms_norm_eps), sh);
  }
  const ops::LinearPart head{mo.weights().lm_head, {}};
  linear(ctx, "gemm lm_head", sh, std::span(&head, 1), lg);
}

std::vector<KvCache> make_caches(const Model& m, const VariantSpec& v, DType kv_dtype,
                                 int64_t max_tokens, int64_t max_chunk, void* workspace,
                                 int64_t workspace_bytes) {
  const ModelConfig& c = m.config();
  RunOptions run;
  run.backend = m.context().device() == Device::cuda ? BackendKind::cuda : BackendKind::cpu;
  run.threads = m.context().threads();
  run.stream = m.context().stream();
  run.workspace = workspace;
  run.workspace_bytes = workspace_bytes;
  run.timer = &m.context().profile();
  std::vector<KvCache> caches;
  caches.reserve(size_t(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l)
    caches.emplace_back(v, 1, c.num_heads, c.num_kv_heads, c.head_dim, kv_dtype, run,
                        KvCacheCapacity{max_tokens, max_chunk});
  return caches;
}

}  // namespace cca::model

// The per-layer decode cache (docs/design.md, "Cache layout"). Three stores per layer:
//   core  [B, cap, Hc, D]  core tokens 0 .. n_core-1, append-only          (cca only)
//   sink  [B, cap, Hkv, D] raw positions 0 .. n_sink-1                     (streaming, lminfinite)
//   raw   [B, cap, Hkv, D] raw positions raw_begin .. n-1 at rows raw_off ..  (every variant)
// All memory goes through the backend (host or device), so the same code drives every backend.
#include "cca/kv_cache.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <sstream>

#include "backend.hpp"
#include "cca/error.hpp"

namespace cca {
namespace {
// A phase of an append, told to the caller's PhaseTimer (if any) around its launches.
class Phase {
 public:
  Phase(PhaseTimer* t, const char* name) : t_(t) {
    if (t_) t_->begin(name);
  }
  ~Phase() {
    if (t_) t_->end();
  }
  Phase(const Phase&) = delete;
  Phase& operator=(const Phase&) = delete;

 private:
  PhaseTimer* t_;
};
}  // namespace

namespace {

// A [B, cap, H, D] buffer in the backend's memory: owned when it grows, a view into its cache's
// one allocation when its capacity is fixed (attach_fixed).
class Store {
 public:
  Store(const Backend& be, int64_t B, int64_t H, int64_t D, DType dt, void* stream)
      : be_(&be), B_(B), H_(H), D_(D), dtype_(dt), stream_(stream) {}
  ~Store() { release(); }
  Store(Store&& o) noexcept { *this = std::move(o); }
  Store& operator=(Store&& o) noexcept {
    if (this != &o) {
      release();
      be_ = o.be_, B_ = o.B_, H_ = o.H_, D_ = o.D_, dtype_ = o.dtype_, stream_ = o.stream_, cap_ = o.cap_,
      data_ = o.data_, fixed_ = o.fixed_;
      o.data_ = nullptr;
      o.cap_ = 0;
    }
    return *this;
  }

  // Rows [row0, row0 + rows) as a [B, rows, H, D] view.
  TensorView rows(int64_t row0, int64_t count) const {
    TensorView v = make_view(data_, dtype_, {B_, cap_, H_, D_}, be_->device());
    return v.slice(1, row0, count);
  }
  int64_t capacity() const { return cap_; }
  int64_t bytes() const { return row_bytes() * cap_; }
  int64_t row_bytes() const { return B_ * H_ * D_ * dtype_size(dtype_); }

  // `cap` rows at `data` (not owned: the cache's allocation); the store then never grows.
  void attach_fixed(void* data, int64_t cap) {
    release();
    cap_ = cap;
    fixed_ = true;
    data_ = cap > 0 ? data : nullptr;
  }

  // Makes room for `needed` rows, keeping rows [keep0, keep0 + keep) which move to row 0 when
  // the buffer is reallocated. Returns the new row of the first kept row.
  // A fixed store (allocate_fixed) never reallocates: it moves the kept rows to row 0 within
  // the buffer, which its capacity (twice the most rows it holds) keeps free of overlap.
  int64_t reserve(int64_t needed, int64_t keep0, int64_t keep) {
    if (keep0 + needed <= cap_) return keep0;
    if (fixed_) {
      check(needed <= cap_ && keep <= keep0,
            "KvCache: " + std::to_string(needed) + " rows do not fit the fixed capacity of " +
                std::to_string(cap_) + " rows (a longer sequence or chunk than the cache was "
                "made for)");
      if (keep > 0) be_->copy_tensor(rows(0, keep), rows(keep0, keep), stream_);
      return 0;
    }
    const int64_t cap = std::max<int64_t>(16, 2 * needed);
    void* data = be_->alloc(B_ * cap * H_ * D_ * dtype_size(dtype_));
    Store fresh(*be_, B_, H_, D_, dtype_, stream_);
    fresh.data_ = data;
    fresh.cap_ = cap;
    if (keep > 0) be_->copy_tensor(fresh.rows(0, keep), rows(keep0, keep), stream_);
    *this = std::move(fresh);
    return 0;
  }

 private:
  void release() {
    if (data_ && !fixed_) be_->free(data_);  // a fixed store's memory is its cache's
    data_ = nullptr;
  }
  const Backend* be_ = nullptr;
  int64_t B_ = 0, H_ = 0, D_ = 0;
  DType dtype_ = DType::f32;
  void* stream_ = nullptr;  // copies are ordered with the cache's kernels
  int64_t cap_ = 0;
  void* data_ = nullptr;
  bool fixed_ = false;
};

// Rows each store of a fixed-capacity cache needs: core, sink, raw.
struct StoreRows {
  int64_t core, sink, raw;
};
StoreRows fixed_rows(const VariantSpec& v, const KvCacheCapacity& c) {
  const int64_t chunk = c.max_chunk > 0 ? std::min(c.max_chunk, c.max_tokens) : c.max_tokens;
  StoreRows r;
  r.core = v.has_core() ? c.max_tokens / v.group : 0;
  r.sink = v.has_sinks() ? std::min(v.sinks, c.max_tokens) : 0;
  // The raw window keeps at most window + group - 1 positions (cca; window for the others), and
  // full attention keeps everything. Twice the most live rows lets the window slide with one
  // non-overlapping move (Store::reserve).
  const int64_t live = v.kind == VariantKind::full ? c.max_tokens : v.window + v.group + chunk;
  r.raw = v.kind == VariantKind::full ? c.max_tokens : std::min(2 * live, 2 * c.max_tokens);
  return r;
}

// A fixed-capacity cache's stores (core k, core v, sink k, sink v, raw k, raw v) in one
// allocation, each at a 256-byte boundary: one allocation per cache instead of six, since the
// device's allocator rounds every one up (cudaMalloc: to 2 MiB).
struct FixedLayout {
  int64_t rows[6], offset[6];
  int64_t total;
};
FixedLayout fixed_layout(const StoreRows& r, int64_t core_row_bytes, int64_t row_bytes) {
  FixedLayout l{{r.core, r.core, r.sink, r.sink, r.raw, r.raw}, {}, 0};
  for (int i = 0; i < 6; ++i) {
    l.offset[i] = l.total;
    l.total += (l.rows[i] * (i < 2 ? core_row_bytes : row_bytes) + 255) / 256 * 256;
  }
  return l;
}

// A decode step's appends and pools of all its sequences, launched together before its attend.
struct DeviceAppends {
  std::vector<CopyAt> copies;
  std::vector<PoolProblem> pools;
  void run(const Backend& be, const RunOptions& run) const {
    {
      const Phase copy_phase(run.timer, "kv copy");
      be.copy_tensor_at(copies, run.stream);
    }
    if (!pools.empty()) {
      const Phase pool_phase(run.timer, "pool");
      be.pool_batch(pools);
    }
  }
};

}  // namespace

struct KvCache::Impl {
  VariantSpec variant;
  int64_t B, Hq, Hkv, D, Hc;
  DType dtype;
  RunOptions run;
  const Backend* be;
  // The stores' one allocation when the capacity is fixed (declared first: freed last).
  std::unique_ptr<void, std::function<void(void*)>> fixed_block;
  Store core_k, core_v, sink_k, sink_v, raw_k, raw_v;
  int64_t n = 0;          // tokens appended
  int64_t n_core = 0;     // core tokens held
  int64_t n_sink = 0;     // sink positions held
  int64_t raw_begin = 0;  // first raw position held in the window
  int64_t raw_off = 0;    // its row in raw_k / raw_v

  KvCacheCapacity capacity;

  Impl(const VariantSpec& v, int64_t b, int64_t hq, int64_t hkv, int64_t d, DType dt,
       RunOptions r, const Backend& backend)
      : variant(v), B(b), Hq(hq), Hkv(hkv), D(d), Hc(v.core_heads(hq, hkv)), dtype(dt), run(r),
        be(&backend), core_k(backend, b, Hc, d, dt, r.stream), core_v(backend, b, Hc, d, dt, r.stream),
        sink_k(backend, b, hkv, d, dt, r.stream), sink_v(backend, b, hkv, d, dt, r.stream),
        raw_k(backend, b, hkv, d, dt, r.stream), raw_v(backend, b, hkv, d, dt, r.stream) {}

  int64_t raw_rows() const { return n - raw_begin; }
  KvSegment raw_segment(int64_t rows) const {
    return KvSegment{raw_k.rows(raw_off, rows), raw_v.rows(raw_off, rows), raw_begin};
  }

  // The stores' places in the one allocation of a fixed `capacity`.
  FixedLayout layout() const {
    return fixed_layout(fixed_rows(variant, capacity), core_k.row_bytes(), raw_k.row_bytes());
  }
  void allocate_fixed(const KvCacheCapacity& c) {
    capacity = c;
    const FixedLayout l = layout();
    const Backend* b = be;
    fixed_block = {l.total > 0 ? be->alloc(l.total) : nullptr, [b](void* p) {
                     if (p) b->free(p);
                   }};
    char* base = static_cast<char*>(fixed_block.get());
    Store* stores[6] = {&core_k, &core_v, &sink_k, &sink_v, &raw_k, &raw_v};
    for (int i = 0; i < 6; ++i) stores[i]->attach_fixed(base + l.offset[i], l.rows[i]);
  }

  void check_chunk(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse) const {
    check_qkv(q, k, v);
    if (capacity.max_tokens > 0) {
      const int64_t c = q.shape[1];
      check(n + c <= capacity.max_tokens,
            "KvCache: " + std::to_string(n + c) + " tokens exceed the cache's capacity of " +
                std::to_string(capacity.max_tokens));
      check(capacity.max_chunk <= 0 || c <= capacity.max_chunk,
            "KvCache: a chunk of " + std::to_string(c) + " tokens exceeds the cache's limit of " +
                std::to_string(capacity.max_chunk) + " per append");
    }
    check_attn_out(q, out, lse);
    std::ostringstream want;
    want << "this cache holds B = " << B << ", Hq = " << Hq << ", Hkv = " << Hkv << ", D = " << D
         << "; got q " << q.shape_string() << ", k " << k.shape_string();
    check(q.shape[0] == B && q.shape[2] == Hq && k.shape[2] == Hkv && q.shape[3] == D,
          want.str());
    check(q.dtype == dtype, std::string("this cache holds ") + dtype_name(dtype) + ", got " +
                                dtype_name(q.dtype));
    check(q.device == be->device(), std::string("backend ") + backend_name(be->kind()) +
                                        " needs tensors in " +
                                        (be->device() == Device::cuda ? "GPU" : "host") + " memory");
  }

  // The attention of queries q at positions n.. over core rows [0, core_rows), sink rows
  // [0, sink_rows) and the raw segment `local`.
  AttendProblem attend_problem(const TensorView& q, const TensorView& out, const TensorView& lse,
                               int64_t core_rows, int64_t sink_rows, const KvSegment& local) const {
    AttendProblem a;
    a.q = q;
    a.q_pos0 = n;
    if (core_rows > 0) a.core = KvSegment{core_k.rows(0, core_rows), core_v.rows(0, core_rows), 0};
    if (sink_rows > 0) a.sink = KvSegment{sink_k.rows(0, sink_rows), sink_v.rows(0, sink_rows), 0};
    a.local = local;
    a.out = out;
    a.lse = lse;
    a.variant = variant;
    a.scale = variant.scale_for(D);
    a.threads = run.threads;
    a.stream = run.stream;
    a.workspace = run.workspace;
    a.workspace_bytes = run.workspace_bytes;
    return a;
  }

  // An append split in two around its attention, so that several caches can attend in one
  // batched backend call: prepare() stores and pools the chunk and returns the attention to run;
  // commit() then advances the cache. Until commit() the cache's visible state is unchanged.
  struct Pending {
    AttendProblem attend;
    int64_t chunk, core_end, sink_end;
  };

  // q [B, c, Hq, D], k/v [B, c, Hkv, D] at positions n .. n+c-1; checked by check_chunk().
  Pending prepare(const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView& out, const TensorView& lse) {
    const int64_t c = q.shape[1];
    const float scale = variant.scale_for(D);

    // 1. The chunk's raw keys and values join the window (and the sinks, while they fill).
    std::optional<Phase> phase(std::in_place, run.timer, "kv copy");
    const int64_t live = raw_rows();
    const int64_t old_off = raw_off;  // both stores grow together, so they share raw_off
    raw_off = raw_k.reserve(live + c, old_off, live);
    raw_v.reserve(live + c, old_off, live);
    be->copy_tensor(raw_k.rows(raw_off + live, c), k, run.stream);
    be->copy_tensor(raw_v.rows(raw_off + live, c), v, run.stream);
    int64_t sink_end = n_sink;
    if (variant.has_sinks() && n < variant.sinks) {
      sink_end = std::min(variant.sinks, n + c);
      sink_k.reserve(sink_end, 0, n_sink);
      sink_v.reserve(sink_end, 0, n_sink);
      const int64_t rows = sink_end - n;  // n_sink == n while the sinks fill
      be->copy_tensor(sink_k.rows(n, rows), k.slice(1, 0, rows), run.stream);
      be->copy_tensor(sink_v.rows(n, rows), v.slice(1, 0, rows), run.stream);
    }
    const KvSegment raw = raw_segment(live + c);
    phase.reset();

    // 2. Pool every group that completes in this chunk; its last query is in the chunk and its
    //    raw keys are still in the window (group start >= j(t)*g for its last position t).
    const int64_t core_end = variant.has_core() ? (n + c) / variant.group : 0;
    if (core_end > n_core) {
      core_k.reserve(core_end, 0, n_core);
      core_v.reserve(core_end, 0, n_core);
      PoolProblem pp;
      pp.q = q;
      pp.q_pos0 = n;
      pp.raw = raw;
      pp.group_begin = n_core;
      pp.group_end = core_end;
      pp.k_core = core_k.rows(n_core, core_end - n_core);
      pp.v_core = core_v.rows(n_core, core_end - n_core);
      pp.variant = variant;
      pp.scale = scale;
      pp.threads = run.threads;
      pp.stream = run.stream;
      const Phase pool_phase(run.timer, "pool");
      be->pool(pp);
    }

    // 3. The attention over the three stores, run by the caller.
    const AttendProblem a = attend_problem(q, out, lse, core_end, sink_end, raw);
    return Pending{a, c, core_end, sink_end};
  }

  bool replayable() const {
    if (capacity.max_tokens <= 0 || be->device() != Device::cuda || n + 1 > capacity.max_tokens)
      return false;
    if (variant.has_sinks() && n < variant.sinks) return false;
    return raw_off + raw_rows() + 1 <= raw_k.capacity();
  }

  // prepare() of one token whose position the kernels read from `pos` (device int32): the raw
  // store is passed whole, with row r holding position raw_begin - raw_off + r (constant while
  // the window does not move), and the core store whole (the kernels take the core count from
  // the position), so every launch argument is the same from step to step. The appends of the
  // new key and value and the pooling are queued in `dev`, to run for all the sequences of a
  // step at once (DeviceAppends::run).
  Pending prepare_at(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const int32_t* pos, DeviceAppends& dev) {
    check(replayable(), "KvCache: this step cannot run from device-held positions (the cache "
                        "window moves, the sinks fill, or the cache has no fixed capacity)");
    const float scale = variant.scale_for(D);
    const int64_t pos0 = raw_begin - raw_off;
    const TensorView sk = raw_k.rows(0, raw_k.capacity()), sv = raw_v.rows(0, raw_v.capacity());
    dev.copies.push_back({sk, pos0, pos, k});
    dev.copies.push_back({sv, pos0, pos, v});
    const KvSegment raw{sk, sv, pos0};
    const int64_t core_end = variant.has_core() ? (n + 1) / variant.group : 0;
    const int64_t core_rows = core_k.capacity();
    if (variant.has_core() && core_rows > 0) {
      PoolProblem pp;
      pp.q = q;
      pp.q_pos0 = n;
      pp.raw = raw;
      pp.k_core = core_k.rows(0, core_rows);
      pp.v_core = core_v.rows(0, core_rows);
      pp.variant = variant;
      pp.scale = scale;
      pp.stream = run.stream;
      pp.pos_device = pos;
      dev.pools.push_back(pp);
    }
    AttendProblem a = attend_problem(q, out, {}, core_rows, n_sink, raw);
    a.q_pos_device = pos;
    return Pending{a, 1, core_end, n_sink};
  }

  // 4. Advance, then evict raw positions no later query sees raw (below j(last) * g for cca).
  void commit(const Pending& p) {
    n += p.chunk;
    n_core = p.core_end;
    n_sink = p.sink_end;
    const int64_t keep_from = visible_keys(variant, n - 1).local_begin;
    raw_off += keep_from - raw_begin;
    raw_begin = keep_from;
  }

  void append(const TensorView& q, const TensorView& k, const TensorView& v,
              const TensorView& out, const TensorView& lse) {
    check_chunk(q, k, v, out, lse);
    const Pending p = prepare(q, k, v, out, lse);
    {
      const Phase attend_phase(run.timer, "attend");
      be->attend(p.attend);  // 3. each query sees what the variant's policy says
    }
    commit(p);
  }
};

KvCache::KvCache(const VariantSpec& variant, int64_t batch, int64_t hq, int64_t hkv,
                 int64_t head_dim, DType dtype, RunOptions run, const KvCacheCapacity& capacity) {
  variant.validate();
  std::ostringstream bad;
  bad << "KvCache: batch = " << batch << ", Hq = " << hq << ", Hkv = " << hkv
      << ", D = " << head_dim << ": each must be >= 1 and Hq a multiple of Hkv";
  check(batch >= 1 && hq >= 1 && hkv >= 1 && head_dim >= 1 && hq % hkv == 0, bad.str());
  const Backend& be =
      get_backend(run.backend, run.backend == BackendKind::cuda ? Device::cuda : Device::cpu);
  impl_ = std::make_unique<Impl>(variant, batch, hq, hkv, head_dim, dtype, run, be);
  check(capacity.max_tokens >= 0 && capacity.max_chunk >= 0,
        "KvCache: capacity must be >= 0 (0 = growing stores)");
  if (capacity.max_tokens > 0) impl_->allocate_fixed(capacity);
}

int64_t kv_cache_capacity_bytes(const VariantSpec& variant, int64_t batch, int64_t hq,
                                int64_t hkv, int64_t head_dim, DType dtype,
                                const KvCacheCapacity& capacity, int64_t granularity) {
  check(granularity >= 1, "kv_cache_capacity_bytes: granularity must be >= 1");
  const int64_t row = batch * head_dim * dtype_size(dtype);  // one head's
  const int64_t total =
      fixed_layout(fixed_rows(variant, capacity), row * variant.core_heads(hq, hkv), row * hkv)
          .total;
  return (total + granularity - 1) / granularity * granularity;
}
KvCache::~KvCache() = default;
KvCache::KvCache(KvCache&&) noexcept = default;
KvCache& KvCache::operator=(KvCache&&) noexcept = default;

void KvCache::append(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const TensorView& lse) {
  impl_->append(q, k, v, out, lse);
}
int64_t KvCache::length() const { return impl_->n; }
int64_t KvCache::core_tokens() const { return impl_->n_core; }
int64_t KvCache::raw_tokens() const { return impl_->raw_rows() + impl_->n_sink; }
int64_t KvCache::memory_bytes() const {
  const Impl& m = *impl_;
  return 2 * m.B * m.D * dtype_size(m.dtype) * (m.n_core * m.Hc + raw_tokens() * m.Hkv);
}
int64_t KvCache::full_cache_bytes() const {
  const Impl& m = *impl_;
  return 2 * m.B * m.D * dtype_size(m.dtype) * m.n * m.Hkv;
}
const VariantSpec& KvCache::variant() const { return impl_->variant; }
DType KvCache::dtype() const { return impl_->dtype; }
bool KvCache::next_step_replayable() const { return impl_->replayable(); }
void KvCache::advance_replayed() {
  Impl& m = *impl_;
  check(m.replayable(), "KvCache: advance_replayed() on a step that could not be replayed");
  m.commit(Impl::Pending{{}, 1, m.variant.has_core() ? (m.n + 1) / m.variant.group : 0, m.n_sink});
}
int64_t KvCache::allocated_bytes() const {
  const Impl& m = *impl_;
  if (m.capacity.max_tokens > 0) return m.layout().total;
  int64_t b = 0;
  for (const Store* s : {&m.core_k, &m.core_v, &m.sink_k, &m.sink_v, &m.raw_k, &m.raw_v})
    b += s->bytes();
  return b;
}

static bool same_variant(const VariantSpec& a, const VariantSpec& b) {
  const bool same_scale = a.scale == b.scale || (std::isnan(a.scale) && std::isnan(b.scale));
  return a.kind == b.kind && a.group == b.group && a.window == b.window && a.sinks == b.sinks &&
         a.pool == b.pool && a.pool_heads == b.pool_heads && same_scale;
}

namespace {

// The checks and the prepare / one batched attend / commit sequence of a batched step;
// `prepare(impl, s, q, k, v, out, lse)` prepares sequence s.
// `before_attend()` runs after every sequence is prepared.
template <class Prepare, class BeforeAttend>
void append_batch(const std::vector<KvCache::Impl*>& impls, const TensorView& q,
                  const TensorView& k, const TensorView& v, const TensorView& out,
                  const TensorView& lse, Prepare prepare, BeforeAttend before_attend) {
  const int64_t S = int64_t(impls.size());
  // Row s of every tensor is sequence s; all are checked before any cache changes.
  auto row = [](const TensorView& t, int64_t s) { return t.data ? t.slice(0, s, 1) : t; };
  for (int64_t s = 0; s < S; ++s)
    impls[size_t(s)]->check_chunk(row(q, s), row(k, s), row(v, s), row(out, s), row(lse, s));
  std::vector<KvCache::Impl::Pending> pending;
  std::vector<AttendProblem> problems;
  for (int64_t s = 0; s < S; ++s) {
    pending.push_back(
        prepare(*impls[size_t(s)], s, row(q, s), row(k, s), row(v, s), row(out, s), row(lse, s)));
    problems.push_back(pending.back().attend);
  }
  before_attend();
  {
    const Phase attend_phase(impls.front()->run.timer, "attend");
    impls.front()->be->attend_batch(problems);
  }
  for (int64_t s = 0; s < S; ++s) impls[size_t(s)]->commit(pending[size_t(s)]);
}

// Checks that `impls` (of the caches of a batched call) are distinct batch-1 caches of one kind
// that match the tensors.
void check_batch(const char* what, const std::vector<KvCache::Impl*>& impls, const TensorView& q,
                 const TensorView& k, const TensorView& v, const TensorView& out,
                 const TensorView& lse);

template <class C>
std::vector<KvCache::Impl*> impls_of(const std::vector<KvCache*>& caches, C impl) {
  std::vector<KvCache::Impl*> r;
  for (KvCache* c : caches) r.push_back(c ? impl(*c) : nullptr);
  return r;
}

}  // namespace

void kv_cache_append_batch(const std::vector<KvCache*>& caches, const TensorView& q,
                           const TensorView& k, const TensorView& v, const TensorView& out,
                           const TensorView& lse) {
  const auto impls = impls_of(caches, [](KvCache& c) { return c.impl_.get(); });
  check_batch("kv_cache_append_batch", impls, q, k, v, out, lse);
  append_batch(impls, q, k, v, out, lse,
               [](KvCache::Impl& m, int64_t, const TensorView& qs, const TensorView& ks,
                  const TensorView& vs, const TensorView& os, const TensorView& ls) {
                 return m.prepare(qs, ks, vs, os, ls);
               },
               [] {});
}

void kv_cache_decode_step(const std::vector<KvCache*>& caches, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& out,
                          const int32_t* positions) {
  const auto impls = impls_of(caches, [](KvCache& c) { return c.impl_.get(); });
  check_batch("kv_cache_decode_step", impls, q, k, v, out, {});
  check(q.shape[1] == 1, "kv_cache_decode_step: one token per sequence, got q " +
                             q.shape_string());
  check(positions != nullptr, "kv_cache_decode_step: positions missing");
  DeviceAppends dev;
  append_batch(
      impls, q, k, v, out, {},
      [positions, &dev](KvCache::Impl& m, int64_t s, const TensorView& qs, const TensorView& ks,
                        const TensorView& vs, const TensorView& os, const TensorView&) {
        return m.prepare_at(qs, ks, vs, os, positions + s, dev);
      },
      [&] { dev.run(*impls.front()->be, impls.front()->run); });
}

namespace {
void check_batch(const char* what, const std::vector<KvCache::Impl*>& all, const TensorView& q,
                 const TensorView& k, const TensorView& v, const TensorView& out,
                 const TensorView& lse) {
  check(!all.empty(), std::string(what) + ": no caches given");
  check_qkv(q, k, v);
  check_attn_out(q, out, lse);
  const int64_t S = int64_t(all.size());
  check(q.shape[0] == S, std::string(what) + ": q " + q.shape_string() + " has " +
                             std::to_string(q.shape[0]) + " rows for " + std::to_string(S) +
                             " caches");
  std::vector<KvCache::Impl*> impls;
  for (int64_t s = 0; s < S; ++s) {
    KvCache::Impl* m = all[size_t(s)];
    check(m != nullptr, std::string(what) + ": cache " + std::to_string(s) + " is null");
    check(m->B == 1, std::string(what) + ": cache " + std::to_string(s) + " holds batch " +
                         std::to_string(m->B) + "; each sequence needs its own batch-1 cache");
    for (const KvCache::Impl* other : impls)
      check(other != m, std::string(what) + ": cache " + std::to_string(s) + " appears twice");
    const KvCache::Impl& first = impls.empty() ? *m : *impls.front();
    check(same_variant(m->variant, first.variant) && m->be == first.be && m->dtype == first.dtype,
          std::string(what) + ": cache " + std::to_string(s) + " (" + m->variant.describe() +
              ", backend " + backend_name(m->be->kind()) + ", " + dtype_name(m->dtype) +
              ") differs from cache 0 (" + first.variant.describe() + ", backend " +
              backend_name(first.be->kind()) + ", " + dtype_name(first.dtype) + ")");
    impls.push_back(m);
  }
}

}  // namespace

}  // namespace cca

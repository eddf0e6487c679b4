// Split-KV decode: few query rows (decode steps, small chunks) over long key ranges, for one
// problem or a ragged batch of them (sequences of different lengths, each from its own cache) in
// one launch. A block takes one slice of the visible keys for all query rows that share a KV
// head (K and V are read once per KV head, not once per query head), streams it through a
// kStages-deep cp.async pipeline in 64-key tiles and ends with a partial softmax state. The
// rows (queries x heads of the group, <= 16) are the M dimension of mma.sync m16n8k16, so the
// GQA group costs no more issue slots than one row: the kernel stays bound by reading K and V.
// Where a row group has several slices, a merge kernel combines their float32 states from a
// workspace. On Hopper both kernels use programmatic dependent launch.
#include <algorithm>
#include <cstdlib>

#include "attend_args.cuh"
#include "cuda_check.hpp"
#include "pdl.cuh"
#include "device_utils.cuh"
#include "kernels.hpp"
#include "tile_config.hpp"

namespace cca::cuda {
namespace {

// One problem of a launch. Its row groups (batch row b, query heads h0 .. h0+G-1) are the
// launch's row groups group0 .. group0 + B * Hq/G - 1; each has `splits` key slices (blocks
// x < splits of the row group's gridDim.x blocks; the others leave at once).
struct DecodeProblem {
  AttendArgs a;
  int G;           // query heads per block (sharing one KV head in every segment)
  int splits;      // key slices per row group, <= gridDim.x
  int64_t group0;  // first row group
  int64_t row0;    // first output row (b, h, query) in the launch, for the merge kernel
  int64_t slot0;   // first workspace slot: row (row0 + i) slice s is slot0 + i * splits + s
};

// The launch: up to kCap problems, passed by value (__grid_constant__, no copy to global).
template <int kCap>
struct DecodeBatch {
  int count;
  int64_t groups;  // row groups in all problems
  float* part_o;   // workspace (slices > 1): [slots, D] unnormalised outputs
  float* part_ml;  // [slots, 2] (m, l) in the log2 domain
  DecodeProblem p[kCap];
};
constexpr int kBatchCap = 32;  // problems per launch of a batch: 15 KB of kernel parameters
static_assert(sizeof(DecodeBatch<kBatchCap>) < 32000, "kernel parameters over the 32 KB limit");

template <int kCap, typename F>
__device__ __forceinline__ int find_problem(const DecodeBatch<kCap>& d, int64_t x, F key) {
  int i = 0;
  while (i + 1 < d.count && key(d.p[i + 1]) <= x) ++i;
  return i;
}

template <typename X>
__device__ __forceinline__ X sel3(int s, X x0, X x1, X x2) {  // no run-time-indexed arrays
  return s == 0 ? x0 : (s == 1 ? x1 : x2);
}

// Output element (batch b, query qi, head h, column c) and, at c = 0, its LSE from the merged
// state of the row.
template <typename T>
__device__ __forceinline__ void store_final(const AttendArgs& a, int b, int h, int qi, int c,
                                            float o, const SoftmaxState& st) {
  T* out = static_cast<T*>(a.out) + b * a.o_sb + int64_t(qi) * a.o_st + h * a.o_sh;
  out[c] = from_float<T>(st.l > 0.f ? o / st.l : 0.f);
  if (a.lse && c == 0) a.lse[b * a.l_sb + h * a.l_sh + qi * a.l_st] = st.lse();
}

// Each problem's q is [B, n, Hq, D] with n * G <= 16 rows. Grid (slices, row groups): blockIdx.x
// is the slice, blockIdx.y + gridDim.y * blockIdx.z the row group. Keys are numbered across the
// segments (core, then sink, then local); the block owns numbers [v_begin, v_end).
template <typename T, int D, int kCap>
__global__ void __launch_bounds__(DecodeTile::kThreads)
    attend_decode_kernel(const __grid_constant__ DecodeBatch<kCap> d) {
  constexpr int kWarps = DecodeTile::kWarps, kN = DecodeTile::kBlockN;
  constexpr int kStages = DecodeTile::kStages, kRows = DecodeTile::kMaxRows;
  constexpr int kThreads = DecodeTile::kThreads, kChunks = D / 8;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kRows][D]
  T* sK = sQ + kRows * D;                  // [kStages][kN][D]
  T* sV = sK + kStages * kN * D;           // [kStages][kN][D]
  __shared__ int64_t s_rng[kRows][3][2];   // per query: [lo, hi) of each segment
  __shared__ float s_ml[kWarps][kRows][2];

  pdl_wait_and_release();
  const int64_t group = int64_t(blockIdx.z) * gridDim.y + blockIdx.y;
  if (group >= d.groups) return;  // past the end in the grid's last z slice
  const DecodeProblem& pr =
      d.p[find_problem(d, group, [](const DecodeProblem& x) { return x.group0; })];
  const AttendArgs& a = pr.a;
  const int G = pr.G, splits = pr.splits, split = blockIdx.x;
  if (split >= splits) return;  // a shorter problem of a ragged batch
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t local_group = group - pr.group0;
  const int h0 = int(local_group % (a.Hq / G)) * G, b = int(local_group / (a.Hq / G));
  const int R = a.n * G;

  const int64_t q_pos0 = a.q_pos_dev ? int64_t(*a.q_pos_dev) : a.q_pos0;
  const Visible vf = visible_keys(a.variant, q_pos0);
  const Visible vl = visible_keys(a.variant, q_pos0 + a.n - 1);
  int64_t lo[3], len[3], full_lo[3], full_hi[3];
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    int64_t hi;
    seg_range(vf, s, lo[s], full_hi[s]);
    seg_range(vl, s, full_lo[s], hi);
    len[s] = hi > lo[s] ? hi - lo[s] : 0;
  }
  if (tid < a.n * 3) {
    const int qi = tid / 3, s = tid % 3;
    seg_range(visible_keys(a.variant, q_pos0 + qi), s, s_rng[qi][s][0], s_rng[qi][s][1]);
  }
  const int64_t off1 = len[0], off2 = len[0] + len[1], total = off2 + len[2];
  const int64_t per_split = (total + splits - 1) / splits;
  const int64_t v_begin = min(total, int64_t(split) * per_split);
  const int64_t v_end = min(total, v_begin + per_split);
  const int ntiles = int((v_end - v_begin + kN - 1) / kN);

  // Query rows r = qi * G + (h - h0), zero past R; one cp.async group.
  const T* q = static_cast<const T*>(a.q);
  for (int i = tid; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = r < R;
    const int64_t src = ok ? b * a.q_sb + (r / G) * a.q_st + (h0 + r % G) * a.q_sh + c * 8 : 0;
    cp_async_16(smem_addr(sQ + swz<D>(r, c)), q + src, ok);
  }
  cp_async_commit();

  // Per-segment row pointers with the position offset folded in: key number v of segment s is
  // position v + delta[s], row (position - pos0).
  const int lc = tid % kChunks, lr = tid / kChunks;
  constexpr int kRowStep = kThreads / kChunks;
  const T* kb[3];
  const T* vb[3];
  int64_t kst[3], vst[3], delta[3];
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    const SegArgs& sg = a.seg[s];
    const int kvh = h0 / (a.Hq / sg.heads);
    kb[s] = static_cast<const T*>(sg.k) + b * sg.k_sb + kvh * sg.k_sh - sg.pos0 * sg.k_st + lc * 8;
    vb[s] = static_cast<const T*>(sg.v) + b * sg.v_sb + kvh * sg.v_sh - sg.pos0 * sg.v_st + lc * 8;
    kst[s] = sg.k_st;
    vst[s] = sg.v_st;
  }
  delta[0] = lo[0];
  delta[1] = lo[1] - off1;
  delta[2] = lo[2] - off2;

  auto load_tile = [&](int t, int stage) {
    const int64_t v0 = v_begin + int64_t(t) * kN;
    T* dK = sK + stage * kN * D;
    T* dV = sV + stage * kN * D;
#pragma unroll
    for (int it = 0; it < kN / kRowStep; ++it) {
      const int r = lr + it * kRowStep;
      const int64_t v = v0 + r;
      const bool ok = v < v_end;
      const int s = v < off1 ? 0 : (v < off2 ? 1 : 2);
      const int64_t pos = ok ? v + sel3(s, delta[0], delta[1], delta[2]) : 0;
      const T* kp = ok ? sel3(s, kb[0], kb[1], kb[2]) + pos * sel3(s, kst[0], kst[1], kst[2]) : q;
      const T* vp = ok ? sel3(s, vb[0], vb[1], vb[2]) + pos * sel3(s, vst[0], vst[1], vst[2]) : q;
      cp_async_16(smem_addr(dK + swz<D>(r, lc)), kp, ok);
      cp_async_16(smem_addr(dV + swz<D>(r, lc)), vp, ok);
    }
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < ntiles) load_tile(t, t);
    cp_async_commit();  // empty groups keep the group count aligned with tiles
  }
  cp_async_wait<kStages - 1>();  // the query group
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qf[kk], smem_addr(sQ + swz<D>(lane & 15, 2 * kk + (lane >> 4))));

  // This thread's accumulator rows ra, rb = ra + 8 (rows >= R compute on zero queries and are
  // never stored; their range lookups use the last real row).
  const int ra = lane >> 2, rb = ra + 8;
  const int qa = min(ra, R - 1) / G, qb = min(rb, R - 1) / G;
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile t is in; every warp is done with the stage loaded next
    if (t + kStages - 1 < ntiles) load_tile(t + kStages - 1, (t + kStages - 1) % kStages);
    cp_async_commit();
    const T* cK = sK + (t % kStages) * kN * D;
    const T* cV = sV + (t % kStages) * kN * D;

    // S = Q K^T for 16 rows x this warp's 16 keys.
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kf[4];
      ldmatrix_x4(kf, smem_addr(cK + swz<D>(warp * 16 + (lane & 7) + ((lane >> 4) << 3),
                                             2 * kk + ((lane >> 3) & 1))));
      mma_16816<T>(sc[0], qf[kk], kf[0], kf[1]);
      mma_16816<T>(sc[1], qf[kk], kf[2], kf[3]);
    }
    const int64_t vbase = v_begin + int64_t(t) * kN + warp * 16 + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t v = vbase + nt * 8 + j;
        bool ok_a = v < v_end, ok_b = ok_a;
        if (ok_a) {
          const int s = v < off1 ? 0 : (v < off2 ? 1 : 2);
          const int64_t pos = v + sel3(s, delta[0], delta[1], delta[2]);
          if (!(pos >= sel3(s, full_lo[0], full_lo[1], full_lo[2]) &&
                pos < sel3(s, full_hi[0], full_hi[1], full_hi[2]))) {  // some row misses it
            ok_a = pos >= s_rng[qa][s][0] && pos < s_rng[qa][s][1];
            ok_b = pos >= s_rng[qb][s][0] && pos < s_rng[qb][s][1];
          }
        }
        sc[nt][j] = ok_a ? sc[nt][j] * a.scale_log2 : -INFINITY;
        sc[nt][2 + j] = ok_b ? sc[nt][2 + j] * a.scale_log2 : -INFINITY;
      }

    online_softmax_step(sc, acc, m_a, m_b, l_a, l_b);  // over this warp's keys
    // O += P V over this warp's 16 keys.
    const uint32_t pf[4] = {pack2<T>(sc[0][0], sc[0][1]), pack2<T>(sc[0][2], sc[0][3]),
                            pack2<T>(sc[1][0], sc[1][1]), pack2<T>(sc[1][2], sc[1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t vf4[4];
      const int vr = warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
      ldmatrix_x4_trans(vf4, smem_addr(cV + swz<D>(vr, 2 * dp + (lane >> 4))));
      mma_16816<T>(acc[2 * dp], pf, vf4[0], vf4[1]);
      mma_16816<T>(acc[2 * dp + 1], pf, vf4[2], vf4[3]);
    }
  }

  // Merge the 4 warps' states (disjoint keys) through shared memory (the stage buffers).
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
  }
  cp_async_wait<0>();
  __syncthreads();
  float* s_o = reinterpret_cast<float*>(sK);  // [kWarps][kRows][D], 32 KB at D = 128
  {
    float* oa = s_o + (warp * kRows + ra) * D + 2 * (lane & 3);
    float* ob = s_o + (warp * kRows + rb) * D + 2 * (lane & 3);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<float2*>(oa + dt * 8) = make_float2(acc[dt][0], acc[dt][1]);
      *reinterpret_cast<float2*>(ob + dt * 8) = make_float2(acc[dt][2], acc[dt][3]);
    }
    if ((lane & 3) == 0) {
      s_ml[warp][ra][0] = m_a;
      s_ml[warp][ra][1] = l_a;
      s_ml[warp][rb][0] = m_b;
      s_ml[warp][rb][1] = l_b;
    }
  }
  __syncthreads();
  // The block's state per (row, column), merged over the warps: the output, or a partial.
  for (int idx = tid; idx < R * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    SoftmaxState st;
    const float o = merge_partials(
        kWarps, [&](int w) { return make_float2(s_ml[w][r][0], s_ml[w][r][1]); },
        [&](int w) { return s_o[(w * kRows + r) * D + c]; }, st);
    const int qi = r / G, h = h0 + r % G;
    if (splits == 1) {
      store_final<T>(a, b, h, qi, c, o, st);
    } else {
      const int64_t slot = pr.slot0 + ((int64_t(b) * a.Hq + h) * a.n + qi) * splits + split;
      d.part_o[slot * D + c] = o;
      if (c == 0) {
        d.part_ml[slot * 2] = st.m;
        d.part_ml[slot * 2 + 1] = st.l;
      }
    }
  }
}

// Merges the key slices of each row (b, h, query) from the workspace: one block of D threads
// per row of the launch; rows of problems with one slice were final already.
template <typename T, int D, int kCap>
__global__ void __launch_bounds__(D)
    decode_merge_kernel(const __grid_constant__ DecodeBatch<kCap> d) {
  pdl_wait_and_release();
  const int64_t row = blockIdx.x;
  const DecodeProblem& pr =
      d.p[find_problem(d, row, [](const DecodeProblem& x) { return x.row0; })];
  if (pr.splits == 1) return;
  const AttendArgs& a = pr.a;
  const int64_t i = row - pr.row0;  // (b * Hq + h) * n + qi
  const int qi = int(i % a.n), h = int((i / a.n) % a.Hq), b = int(i / (int64_t(a.n) * a.Hq));
  const int c = threadIdx.x;
  const float* ml = d.part_ml + (pr.slot0 + i * pr.splits) * 2;
  const float* po = d.part_o + (pr.slot0 + i * pr.splits) * D + c;
  SoftmaxState st;
  const float o = merge_partials(
      pr.splits, [&](int s) { return make_float2(ml[2 * s], ml[2 * s + 1]); },
      [&](int s) { return po[int64_t(s) * D]; }, st);
  store_final<T>(a, b, h, qi, c, o, st);
}

// Query heads per block: those that share a KV head in every segment present.
int heads_per_block(const AttendProblem& p) {
  int64_t max_heads = 1;
  for (const KvSegment* s : {&p.core, &p.sink, &p.local})
    if (s->rows() > 0) max_heads = std::max<int64_t>(max_heads, s->k.shape[2]);
  return int(p.q.shape[2] / max_heads);
}

// Keys any query of `p` sees (the union over its rows, numbered across the segments).
int64_t visible_union(const AttendProblem& p) {
  const Visible vf = visible_keys(p.variant, p.q_pos0);
  const Visible vl = visible_keys(p.variant, p.q_pos0 + p.q.shape[1] - 1);
  int64_t total = 0;
  for (int s = 0; s < 3; ++s) {
    int64_t lo, hi, lo2, hi2;
    seg_range(vf, s, lo, hi2);
    seg_range(vl, s, lo2, hi);
    total += std::max<int64_t>(0, hi - lo);
  }
  return total;
}

int sm_count() {
  static const int n = [] {
    int dev = 0, v = 0;
    CCA_CUDA_CHECK(cudaGetDevice(&dev));
    CCA_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return n;
}

// The slicing's two parameters, DecodeTile's unless CCA_DECODE_BLOCKS_PER_SM or
// CCA_DECODE_MIN_KEYS (positive integers) override them: A/B sweeps on a GPU (bench/).
int env_positive(const char* name, int fallback) {
  const char* e = std::getenv(name);
  const int v = e ? std::atoi(e) : 0;
  return v > 0 ? v : fallback;
}
int blocks_per_sm() {
  static const int v = env_positive("CCA_DECODE_BLOCKS_PER_SM", DecodeTile::kBlocksPerSm);
  return v;
}
int min_keys_per_split() {
  static const int v = env_positive("CCA_DECODE_MIN_KEYS", DecodeTile::kMinKeysPerSplit);
  return v;
}

// One launch (and, where a problem has several slices, a merge launch) for problems [0, count),
// count <= kCap. Slices: one wave of kBlocksPerSm blocks per SM, shared between the problems in
// proportion to their key counts (a long sequence of a ragged batch gets more slices), none
// under kMinKeysPerSplit keys.
template <typename T, int D, int kCap>
void launch_batch(const AttendProblem* ps, int count, cudaStream_t stream, int force_splits) {
  DecodeBatch<kCap> d{};
  d.count = count;
  int64_t keys[kCap], work = 0;
  for (int i = 0; i < count; ++i) {
    DecodeProblem& x = d.p[i];
    x.a = make_attend_args(ps[i]);
    x.G = heads_per_block(ps[i]);
    check(int64_t(x.a.n) * x.G <= DecodeTile::kMaxRows,
          "decode kernel: too many query rows per KV head");
    keys[i] = visible_union(ps[i]);
    work += int64_t(x.a.B) * (x.a.Hq / x.G) * keys[i];
  }
  const double keys_per_block = double(work) / (blocks_per_sm() * sm_count());
  int max_splits = 1;
  int64_t rows = 0, slots = 0;
  for (int i = 0; i < count; ++i) {
    DecodeProblem& x = d.p[i];
    int64_t s = force_splits;
    if (s <= 0)
      s = std::clamp<int64_t>(std::llround(double(keys[i]) / keys_per_block), 1,
                              std::max<int64_t>(1, keys[i] / min_keys_per_split()));
    x.splits = int(s);
    x.group0 = d.groups;
    x.row0 = rows;
    x.slot0 = slots;
    d.groups += int64_t(x.a.B) * (x.a.Hq / x.G);
    rows += int64_t(x.a.B) * x.a.Hq * x.a.n;
    slots += int64_t(x.a.B) * x.a.Hq * x.a.n * x.splits;
    max_splits = std::max(max_splits, x.splits);
  }
  // The caller's workspace when it is large enough (a CUDA graph replays the same pointer), else
  // scratch from the pool.
  const int64_t need = max_splits > 1 ? slots * (D + 2) * 4 : 0;
  const bool own = need > 0 && ps[0].workspace && ps[0].workspace_bytes >= need;
  void* ws = need == 0 ? nullptr : own ? ps[0].workspace : scratch_alloc(need, stream);
  d.part_o = static_cast<float*>(ws);
  d.part_ml = ws ? d.part_o + slots * D : nullptr;

  constexpr int kSmem = DecodeTile::smem_bytes<D>();
  auto kernel = attend_decode_kernel<T, D, kCap>;
  static const bool smem_set = [&] {  // once per instantiation
    CCA_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    return true;
  }();
  (void)smem_set;
  constexpr int64_t kMaxY = 65535;
  const dim3 grid(unsigned(max_splits), unsigned(std::min(d.groups, kMaxY)),
                  unsigned((d.groups + kMaxY - 1) / kMaxY));
  pdl_launch(kernel, grid, dim3(DecodeTile::kThreads), kSmem, stream, d);
  if (ws) {
    pdl_launch(decode_merge_kernel<T, D, kCap>, dim3(unsigned(rows)), dim3(D), 0, stream, d);
    if (!own) scratch_free(ws, stream);
  }
}

}  // namespace

int64_t decode_rows(const AttendProblem& p) { return p.q.shape[1] * heads_per_block(p); }

// Slots of a launch are at most (its blocks + one per row group) x kMaxRows: the slice counts
// are rounded shares of kBlocksPerSm blocks per SM, at least one per problem.
int64_t decode_workspace_bound(int64_t sequences, int64_t hq, int64_t head_dim) {
  const int64_t blocks = int64_t(DecodeTile::kBlocksPerSm) * sm_count();
  return (blocks + sequences * hq) * DecodeTile::kMaxRows * (head_dim + 2) * 4 * 2;
}

void launch_attend_decode(const std::vector<AttendProblem>& problems, cudaStream_t stream,
                          int force_splits) {
  if (problems.empty()) return;
  const AttendProblem& p0 = problems.front();
  for (const AttendProblem& p : problems)
    check(p.q.dtype == p0.q.dtype && p.q.shape[3] == p0.q.shape[3],
          "decode batch: every problem needs the dtype and head dim of the first");
  dispatch_dtype_dim(p0.q.dtype, p0.q.shape[3], [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    if (problems.size() == 1) {  // small kernel parameters for the common single problem
      launch_batch<T, kD, 1>(problems.data(), 1, stream, force_splits);
      return;
    }
    for (size_t i = 0; i < problems.size(); i += kBatchCap) {
      const int n = int(std::min<size_t>(kBatchCap, problems.size() - i));
      launch_batch<T, kD, kBatchCap>(problems.data() + i, n, stream, force_splits);
    }
  });
}

}  // namespace cca::cuda

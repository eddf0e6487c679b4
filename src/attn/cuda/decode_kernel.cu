// Split-KV decode: few query rows (decode steps, small chunks) over long key ranges. A block
// takes one slice of the visible keys for all query rows that share a KV head (K and V are read
// once per KV head, not once per query head), streams it through a kStages-deep cp.async
// pipeline in 64-key tiles and writes a partial SoftmaxState; a second kernel merges the
// slices (skipped when there is one slice). The rows (queries x heads of the group, <= 16) are
// the M dimension of mma.sync m16n8k16, so the GQA group costs no more issue slots than one
// row: the kernel stays bound by reading K and V.
#include "attend_args.cuh"
#include "cuda_check.hpp"
#include "device_utils.cuh"
#include "kernels.hpp"
#include "tile_config.hpp"

namespace cca::cuda {
namespace {

struct DecodeArgs {
  AttendArgs a;
  int G;           // query heads per block (sharing one KV head in every segment)
  int splits;      // key slices per (batch, head group)
  float* part_o;   // [B, Hq, n, splits, D] unnormalised outputs (splits > 1)
  float* part_ml;  // [B, Hq, n, splits, 2] (m, l) in the log2 domain
};

template <int D>
__device__ __forceinline__ int dswz(int r, int c) {  // as the tile kernel: conflict-free ldmatrix
  return r * D + ((c ^ (r & 7)) << 3);
}

template <typename X>
__device__ __forceinline__ X sel3(int s, X x0, X x1, X x2) {  // no run-time-indexed arrays
  return s == 0 ? x0 : (s == 1 ? x1 : x2);
}

// q [B, n, Hq, D] with n * G <= 16 rows; grid (splits, Hq / G, B). Keys are numbered across the
// segments (core, then sink, then local); the block owns numbers [v_begin, v_end).
template <typename T, int D>
__global__ void __launch_bounds__(DecodeTile::kThreads) attend_decode_kernel(const DecodeArgs d) {
  constexpr int kWarps = DecodeTile::kWarps, kN = DecodeTile::kBlockN;
  constexpr int kStages = DecodeTile::kStages, kRows = DecodeTile::kMaxRows;
  constexpr int kThreads = DecodeTile::kThreads, kChunks = D / 8;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kRows][D]
  T* sK = sQ + kRows * D;                  // [kStages][kN][D]
  T* sV = sK + kStages * kN * D;           // [kStages][kN][D]
  __shared__ int64_t s_rng[kRows][3][2];   // per query: [lo, hi) of each segment
  __shared__ float s_ml[kWarps][kRows][2];

  const AttendArgs& a = d.a;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, h0 = blockIdx.y * d.G, b = blockIdx.z;
  const int R = a.n * d.G;

  const Visible vf = visible_keys(a.variant, a.q_pos0);
  const Visible vl = visible_keys(a.variant, a.q_pos0 + a.n - 1);
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
    seg_range(visible_keys(a.variant, a.q_pos0 + qi), s, s_rng[qi][s][0], s_rng[qi][s][1]);
  }
  const int64_t off1 = len[0], off2 = len[0] + len[1], total = off2 + len[2];
  const int64_t per_split = (total + d.splits - 1) / d.splits;
  const int64_t v_begin = min(total, int64_t(split) * per_split);
  const int64_t v_end = min(total, v_begin + per_split);
  const int ntiles = int((v_end - v_begin + kN - 1) / kN);

  // Query rows r = qi * G + (h - h0), zero past R; one cp.async group.
  const T* q = static_cast<const T*>(a.q);
  for (int i = tid; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = r < R;
    const int64_t src = ok ? b * a.q_sb + (r / d.G) * a.q_st + (h0 + r % d.G) * a.q_sh + c * 8 : 0;
    cp_async_16(smem_addr(sQ + dswz<D>(r, c)), q + src, ok);
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
      cp_async_16(smem_addr(dK + dswz<D>(r, lc)), kp, ok);
      cp_async_16(smem_addr(dV + dswz<D>(r, lc)), vp, ok);
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
    ldmatrix_x4(qf[kk], smem_addr(sQ + dswz<D>(lane & 15, 2 * kk + (lane >> 4))));

  // This thread's accumulator rows ra, rb = ra + 8 (rows >= R compute on zero queries and are
  // never stored; their range lookups use the last real row).
  const int ra = lane >> 2, rb = ra + 8;
  const int qa = min(ra, R - 1) / d.G, qb = min(rb, R - 1) / d.G;
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
      ldmatrix_x4(kf, smem_addr(cK + dswz<D>(warp * 16 + (lane & 7) + ((lane >> 4) << 3),
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

    // Online softmax over this warp's keys; rows are spread over the 4 lanes of a quad.
    float mx_a = fmaxf(m_a, fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1])));
    float mx_b = fmaxf(m_b, fmaxf(fmaxf(sc[0][2], sc[0][3]), fmaxf(sc[1][2], sc[1][3])));
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
    }
    const float base_a = mx_a == -INFINITY ? 0.f : mx_a;  // no key yet: keep zeros, no NaN
    const float base_b = mx_b == -INFINITY ? 0.f : mx_b;
    const float corr_a = exp2f(m_a - base_a), corr_b = exp2f(m_b - base_b);
    m_a = mx_a;
    m_b = mx_b;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      sc[nt][0] = exp2f(sc[nt][0] - base_a);
      sc[nt][1] = exp2f(sc[nt][1] - base_a);
      sc[nt][2] = exp2f(sc[nt][2] - base_b);
      sc[nt][3] = exp2f(sc[nt][3] - base_b);
    }
    l_a = l_a * corr_a + sc[0][0] + sc[0][1] + sc[1][0] + sc[1][1];
    l_b = l_b * corr_b + sc[0][2] + sc[0][3] + sc[1][2] + sc[1][3];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      acc[dt][0] *= corr_a;
      acc[dt][1] *= corr_a;
      acc[dt][2] *= corr_b;
      acc[dt][3] *= corr_b;
    }
    // O += P V over this warp's 16 keys.
    const uint32_t pf[4] = {pack2<T>(sc[0][0], sc[0][1]), pack2<T>(sc[0][2], sc[0][3]),
                            pack2<T>(sc[1][0], sc[1][1]), pack2<T>(sc[1][2], sc[1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t vf4[4];
      const int vr = warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
      ldmatrix_x4_trans(vf4, smem_addr(cV + dswz<D>(vr, 2 * dp + (lane >> 4))));
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
  for (int idx = tid; idx < R * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    SoftmaxState st;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      float self_scale, other_scale, m_new;
      st.merge_scales(s_ml[w][r][0], self_scale, other_scale, m_new);
      o = o * self_scale + s_o[(w * kRows + r) * D + c] * other_scale;
      st.l = st.l * self_scale + s_ml[w][r][1] * other_scale;
      st.m = m_new;
    }
    const int qi = r / d.G, h = h0 + r % d.G;
    if (d.splits == 1) {  // the whole row: final output
      T* out = static_cast<T*>(a.out) + b * a.o_sb + int64_t(qi) * a.o_st + h * a.o_sh;
      out[c] = from_float<T>(st.l > 0.f ? o / st.l : 0.f);
      if (a.lse && c == 0) a.lse[b * a.l_sb + h * a.l_sh + qi * a.l_st] = st.lse();
    } else {
      const int64_t slot = ((int64_t(b) * a.Hq + h) * a.n + qi) * d.splits + split;
      d.part_o[slot * D + c] = o;
      if (c == 0) {
        d.part_ml[slot * 2] = st.m;
        d.part_ml[slot * 2 + 1] = st.l;
      }
    }
  }
}

// Merges the key slices of each (b, h, query): out [B, n, Hq, D], lse [B, Hq, n]. One block of
// D threads per row; grid B * Hq * n. The maximum comes first so the slices' loads are
// independent (in flight together) rather than a chain of dependent rescales.
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_merge_kernel(const DecodeArgs d) {
  const AttendArgs& a = d.a;
  const int64_t row = blockIdx.x;  // (b * Hq + h) * n + qi
  const int qi = int(row % a.n), h = int((row / a.n) % a.Hq), b = int(row / (int64_t(a.n) * a.Hq));
  const int c = threadIdx.x;
  const float* ml = d.part_ml + row * d.splits * 2;
  const float* po = d.part_o + row * d.splits * D + c;
  float m = -INFINITY;
#pragma unroll 8
  for (int s = 0; s < d.splits; ++s) m = fmaxf(m, ml[2 * s]);
  const float base = m == -INFINITY ? 0.f : m;
  float o = 0.f, l = 0.f;
#pragma unroll 8
  for (int s = 0; s < d.splits; ++s) {
    const float w = exp2f(ml[2 * s] - base);
    l += w * ml[2 * s + 1];
    o += w * po[int64_t(s) * D];
  }
  T* out = static_cast<T*>(a.out) + b * a.o_sb + int64_t(qi) * a.o_st + h * a.o_sh;
  out[c] = from_float<T>(l > 0.f ? o / l : 0.f);
  if (a.lse && c == 0) a.lse[b * a.l_sb + h * a.l_sh + qi * a.l_st] = SoftmaxState{m, l}.lse();
}

// Query heads per block: those that share a KV head in every segment present.
int heads_per_block(const AttendProblem& p) {
  int64_t max_heads = 1;
  for (const KvSegment* s : {&p.core, &p.sink, &p.local})
    if (s->rows() > 0) max_heads = std::max<int64_t>(max_heads, s->k.shape[2]);
  return int(p.q.shape[2] / max_heads);
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

}  // namespace

int64_t decode_rows(const AttendProblem& p) { return p.q.shape[1] * heads_per_block(p); }

void launch_attend_decode(const AttendProblem& p, cudaStream_t stream, int splits) {
  DecodeArgs d;
  d.a = make_attend_args(p);
  d.G = heads_per_block(p);
  const int64_t R = int64_t(d.a.n) * d.G;
  check(R <= DecodeTile::kMaxRows, "decode kernel: too many query rows per KV head");
  const int64_t blocks = int64_t(d.a.B) * (d.a.Hq / d.G);
  if (splits <= 0) {
    // One wave of kBlocksPerSm resident blocks per SM (each streams its slice through the
    // pipeline), but no slice under kMinKeysPerSplit keys.
    const Visible vf = visible_keys(p.variant, p.q_pos0);
    const Visible vl = visible_keys(p.variant, p.q_pos0 + d.a.n - 1);
    int64_t total = 0;
    for (int s = 0; s < 3; ++s) {
      int64_t lo, hi, lo2, hi2;
      seg_range(vf, s, lo, hi2);
      seg_range(vl, s, lo2, hi);
      total += std::max<int64_t>(0, hi - lo);
    }
    const int64_t want =
        std::max<int64_t>(1, DecodeTile::kBlocksPerSm * int64_t(sm_count()) / blocks);
    const int64_t cap = std::max<int64_t>(1, total / DecodeTile::kMinKeysPerSplit);
    splits = int(std::min(want, cap));
  }
  d.splits = splits;
  const int64_t D = p.q.shape[3];
  void* ws = nullptr;
  if (splits > 1) {
    const int64_t slots = int64_t(d.a.B) * d.a.Hq * d.a.n * splits;
    CCA_CUDA_CHECK(cudaMallocAsync(&ws, size_t(slots * (D + 2) * 4), stream));
    d.part_o = static_cast<float*>(ws);
    d.part_ml = d.part_o + slots * D;
  } else {
    d.part_o = d.part_ml = nullptr;
  }
  dispatch_dtype_dim(p.q.dtype, D, [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    constexpr int kSmem = DecodeTile::smem_bytes<kD>();
    auto kernel = attend_decode_kernel<T, kD>;
    static bool configured = false;  // per instantiation
    if (!configured) {
      CCA_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
      configured = true;
    }
    const dim3 grid(unsigned(splits), unsigned(d.a.Hq / d.G), unsigned(d.a.B));
    kernel<<<grid, DecodeTile::kThreads, kSmem, stream>>>(d);
    CCA_CUDA_CHECK_LAUNCH("attend_decode_kernel");
    if (splits > 1) {
      decode_merge_kernel<T, kD><<<unsigned(int64_t(d.a.B) * d.a.Hq * d.a.n), kD, 0, stream>>>(d);
      CCA_CUDA_CHECK_LAUNCH("decode_merge_kernel");
    }
  });
  if (ws) CCA_CUDA_CHECK(cudaFreeAsync(ws, stream));
}

}  // namespace cca::cuda

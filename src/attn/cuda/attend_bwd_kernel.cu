// Attention backward on mma.sync m16n8k16 (sm_80+), FlashAttention-2 style without its dQ
// atomics, so deterministic by construction: every output element is written by one thread of
// one block, in a fixed order.
//   delta kernel: delta = rowsum(dO * O), one warp per (batch, query, head).
//   dK/dV kernel: a block owns a key tile (64 keys: 16 per warp) of one head of the core tokens
//     or of the raw keys, and walks the query tiles that see some of its keys (for every query
//     head that reads that key head: GQA sums inside the block): S^T = K Q^T, dP^T = V dO^T,
//     P^T = exp2(S^T scale log2 e - lse log2 e), dS^T = P^T (dP^T - delta), dV += P^T dO,
//     dK += dS^T Q. The warps own disjoint keys, so they never exchange partial sums.
//   dQ kernel: the forward's layout (a block owns 64 query rows of one head, 16 per warp) over
//     the same key blocks as the forward: S = Q K^T, dP = dO V^T, dS = P (dP - delta),
//     dQ += dS K.
// P and dS are rounded to the input dtype for their tensor-core products, as the forward's P.
#include "attend_args.cuh"
#include "attend_bwd_args.cuh"
#include "cuda_check.hpp"
#include "device_utils.cuh"
#include "kernels.hpp"
#include "tile_config.hpp"

namespace cca::cuda {
namespace {

// Rows [0, kRows) of a [kRows][D] shared tile, swizzled: row r is src + r * stride for
// r < valid, zeros after. Every thread of the block takes part; one cp.async group is left open.
template <int D, int kRows, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int valid,
                                          int tid) {
  constexpr int kChunks = D / 8;
  static_assert(kRows * kChunks % kThreads == 0, "tile rows must spread evenly over the threads");
#pragma unroll
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int i = tid + it * kThreads, r = i / kChunks, c = i % kChunks;
    const bool ok = r < valid;
    cp_async_16(smem_addr(dst + swz<D>(r, c)), src + (ok ? r * stride : 0) + c * 8, ok);
  }
}

// delta[b, h, t] = sum_d dout[b, t, h, d] out[b, t, h, d]; one warp per (b, t, h).
template <typename T>
__global__ void bwd_delta_kernel(const BwdArgs a, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= int64_t(a.B) * a.T * a.Hq) return;
  const int64_t h = row % a.Hq, t = (row / a.Hq) % a.T, b = row / (a.Hq * a.T);
  const T* o = reinterpret_cast<const T*>(a.out.at(b, t, h));
  const T* g = reinterpret_cast<const T*>(a.dout.at(b, t, h));
  float s = 0.f;
  for (int d = lane; d < D; d += 32) s = fmaf(to_float(o[d]), to_float(g[d]), s);
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) a.delta.at(b, h, t) = s;
}

// dK, dV of one key tile; grid (core tiles x Hc + raw tiles x Hkv, B): the core-token tiles
// first, then the raw-key tiles, each in increasing key order, so that the tiles that the most
// queries see start first.
template <typename T, int D>
__global__ void __launch_bounds__(AttendBwdTile<D>::kKvThreads, 2)
    bwd_dkdv_kernel(const BwdArgs a, int core_tiles) {
  using Tile = AttendBwdTile<D>;
  constexpr int kN = Tile::kKvBlockN, kM = Tile::kKvBlockM, kThreads = Tile::kKvThreads;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [kN][D], the block's keys
  T* sV = sK + kN * D;                     // [kN][D]
  T* sQ = sV + kN * D;                     // [2][kM][D], a step's queries
  T* sO = sQ + 2 * kM * D;                 // [2][kM][D], their output gradients
  // Per stage and query: lse log2 e, delta, and the keys of this tile's segment the query sees,
  // [0, below) and [lo, hi) (core tokens: [0, n_core); raw keys: [0, sink_end) and
  // [local_begin, t + 1); nothing for the padding rows past T).
  float* s_lse2 = reinterpret_cast<float*>(sO + 2 * kM * D);  // [2][kM]
  float* s_delta = s_lse2 + 2 * kM;                            // [2][kM]
  int* s_vis = reinterpret_cast<int*>(s_delta + 2 * kM);       // [2][3][kM]: below, lo, hi
  int* s_full = s_vis + 2 * 3 * kM;                            // [2]: every query sees every key

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.y;
  int x = blockIdx.x;
  const bool core = x < core_tiles * a.seg[0].heads;
  if (!core) x -= core_tiles * a.seg[0].heads;
  const SegArgs sg = core ? a.seg[0] : a.seg[2];
  const Rows<float> out_k = core ? a.dk_core : a.dk, out_v = core ? a.dv_core : a.dv;
  const int head = x % sg.heads;
  const int k0 = (x / sg.heads) * kN, k1 = int(min_i64(k0 + kN, sg.rows));
  const int r = a.Hq / sg.heads, h_begin = head * r;  // the query heads that read this head
  const int64_t n_q = a.T;

  // The query tiles that see some key of the tile, each for the r query heads.
  const QueryTiles tiles = query_tiles_seeing(a.variant, n_q, kM, core, k0, k1);
  const int nsteps = int(tiles.count()) * r;

  // Step s: query tile s / r (of the two intervals) of query head h_begin + s % r.
  const T* q_b = reinterpret_cast<const T*>(a.q.at(b, 0, 0));
  const T* o_b = reinterpret_cast<const T*>(a.dout.at(b, 0, 0));
  auto load_step = [&](int s, int stage) {
    const int h = h_begin + s % r;
    const int64_t t0 = tiles.tile(s / r) * kM;
    const int valid = int(min_i64(kM, n_q - t0));
    load_tile<D, kM, kThreads>(sQ + stage * kM * D, q_b + h * a.q.sh + t0 * a.q.st, a.q.st, valid,
                               tid);
    load_tile<D, kM, kThreads>(sO + stage * kM * D, o_b + h * a.dout.sh + t0 * a.dout.st,
                               a.dout.st, valid, tid);
    cp_async_commit();
    for (int j = tid; j < kM; j += kThreads) {
      const int64_t t = t0 + j;
      float lse2 = 0.f, delta = 0.f;
      int below = 0, lo = 0, hi = 0;
      if (t < n_q) {
        lse2 = a.lse.at(b, h, t) * kLog2e;
        delta = a.delta.at(b, h, t);
        const Visible v = visible_keys(a.variant, t);
        below = int(core ? v.n_core : v.sink_end);
        lo = core ? 0 : int(v.local_begin);
        hi = core ? 0 : int(t + 1);
      }
      s_lse2[stage * kM + j] = lse2;
      s_delta[stage * kM + j] = delta;
      s_vis[(stage * 3 + 0) * kM + j] = below;
      s_vis[(stage * 3 + 1) * kM + j] = lo;
      s_vis[(stage * 3 + 2) * kM + j] = hi;
    }
    if (tid == 0)
      s_full[stage] =
          valid == kM && k1 - k0 == kN && sees_all(a.variant, core, k0, k1, t0, t0 + valid - 1);
  };

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  if (nsteps > 0) {
    load_tile<D, kN, kThreads>(sK, reinterpret_cast<const T*>(sg.k) + b * sg.k_sb + head * sg.k_sh +
                                       int64_t(k0) * sg.k_st,
                               sg.k_st, k1 - k0, tid);
    load_tile<D, kN, kThreads>(sV, reinterpret_cast<const T*>(sg.v) + b * sg.v_sb + head * sg.v_sh +
                                       int64_t(k0) * sg.v_st,
                               sg.v_st, k1 - k0, tid);
    cp_async_commit();
    load_step(0, 0);
  }
  const int key_a = warp * 16 + (lane >> 2);  // this thread's two key rows: key_a, key_a + 8
  for (int s = 0; s < nsteps; ++s) {
    const int stage = s & 1;
    if (s + 1 < nsteps) {
      load_step(s + 1, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cQ = sQ + stage * kM * D;
    const T* cO = sO + stage * kM * D;

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x kM queries per warp.
    float st[kM / 8][4], dpt[kM / 8][4];
#pragma unroll
    for (int i = 0; i < kM / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kf[4], vf[4];
      ldmatrix_x4(kf, smem_addr(sK + swz<D>(warp * 16 + (lane & 15), 2 * kk + (lane >> 4))));
      ldmatrix_x4(vf, smem_addr(sV + swz<D>(warp * 16 + (lane & 15), 2 * kk + (lane >> 4))));
#pragma unroll
      for (int np = 0; np < kM / 16; ++np) {
        const int rr = np * 16 + (lane & 7) + ((lane >> 4) << 3), cc = 2 * kk + ((lane >> 3) & 1);
        uint32_t qb[4], ob[4];
        ldmatrix_x4(qb, smem_addr(cQ + swz<D>(rr, cc)));
        ldmatrix_x4(ob, smem_addr(cO + swz<D>(rr, cc)));
        mma_16816<T>(st[2 * np], kf, qb[0], qb[1]);
        mma_16816<T>(st[2 * np + 1], kf, qb[2], qb[3]);
        mma_16816<T>(dpt[2 * np], vf, ob[0], ob[1]);
        mma_16816<T>(dpt[2 * np + 1], vf, ob[2], ob[3]);
      }
    }

    // P^T and dS^T in place. Fragment nt, element e: query 8 nt + 2 (lane % 4) + (e & 1) of the
    // step, key k0 + key_a + 8 (e >> 1).
    const bool full = s_full[stage] != 0;
    const float* lse2 = s_lse2 + stage * kM;
    const float* delta = s_delta + stage * kM;
    const int* below = s_vis + stage * 3 * kM;
#pragma unroll
    for (int nt = 0; nt < kM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = nt * 8 + 2 * (lane & 3) + (e & 1), key = k0 + key_a + 8 * (e >> 1);
        const bool sees =
            full || key < below[j] || (key >= below[kM + j] && key < below[2 * kM + j]);
        const float p = sees ? exp2f(st[nt][e] * a.scale_log2 - lse2[j]) : 0.f;
        st[nt][e] = p;
        dpt[nt][e] = p * (dpt[nt][e] - delta[j]);
      }

    // dV += P^T dO and dK += dS^T Q: the accumulators of two query octets are an A fragment.
#pragma unroll
    for (int kk = 0; kk < kM / 16; ++kk) {
      const uint32_t pf[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]),
                              pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                              pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                              pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      const uint32_t sf[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]),
                              pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                              pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                              pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
      const int rr = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t ob[4], qb[4];
        ldmatrix_x4_trans(ob, smem_addr(cO + swz<D>(rr, 2 * dp + (lane >> 4))));
        mma_16816<T>(dv[2 * dp], pf, ob[0], ob[1]);
        mma_16816<T>(dv[2 * dp + 1], pf, ob[2], ob[3]);
        ldmatrix_x4_trans(qb, smem_addr(cQ + swz<D>(rr, 2 * dp + (lane >> 4))));
        mma_16816<T>(dk[2 * dp], sf, qb[0], qb[1]);
        mma_16816<T>(dk[2 * dp + 1], sf, qb[2], qb[3]);
      }
    }
    __syncthreads();  // the stage is refilled by the next step's load
  }

  // Every key row of the tile is written, zeros where no query sees it.
  const int col = 2 * (lane & 3);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = k0 + key_a + 8 * half;
    if (key >= k1) continue;
    float* gk = out_k.at(b, key, head);
    float* gv = out_v.at(b, key, head);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      gk[dt * 8 + col] = a.scale * dk[dt][2 * half];
      gk[dt * 8 + col + 1] = a.scale * dk[dt][2 * half + 1];
      gv[dt * 8 + col] = dv[dt][2 * half];
      gv[dt * 8 + col + 1] = dv[dt][2 * half + 1];
    }
  }
}

// dQ of one query tile of one head; grid (query tiles, Hq, B), the latest tiles first.
template <typename T, int D>
__global__ void __launch_bounds__(AttendBwdTile<D>::kDqThreads) bwd_dq_kernel(const BwdArgs a) {
  using Tile = AttendBwdTile<D>;
  constexpr int kM = Tile::kDqBlockM, kN = Tile::kDqBlockN, kThreads = Tile::kDqThreads;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kM][D]
  T* sO = sQ + kM * D;                     // [kM][D]
  T* sK = sO + kM * D;                     // [2][kN][D]
  T* sV = sK + 2 * kN * D;                 // [2][kN][D]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = gridDim.x - 1 - blockIdx.x;  // the longest rows (latest tiles) start first
  const int h = blockIdx.y, b = blockIdx.z;
  const int64_t row0 = int64_t(tile) * kM;
  const int rows_here = int(min_i64(kM, a.T - row0));
  const int64_t t_first = row0, t_last = row0 + rows_here - 1;

  load_tile<D, kM, kThreads>(sQ, reinterpret_cast<const T*>(a.q.at(b, row0, h)), a.q.st,
                             rows_here, tid);
  load_tile<D, kM, kThreads>(sO, reinterpret_cast<const T*>(a.dout.at(b, row0, h)), a.dout.st,
                             rows_here, tid);
  cp_async_commit();

  // This thread's two rows ra and ra + 8 of its warp's 16 (m16n8 layout). Rows past the end of
  // q behave as the last row (zero q and dO; their dq is not stored).
  const int ra = warp * 16 + (lane >> 2), rb = ra + 8;
  const int64_t ta = min(t_first + ra, t_last), tb = min(t_first + rb, t_last);
  const float lse2_a = a.lse.at(b, h, ta) * kLog2e, lse2_b = a.lse.at(b, h, tb) * kLog2e;
  const float delta_a = a.delta.at(b, h, ta), delta_b = a.delta.at(b, h, tb);

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  cp_async_wait<0>();
  __syncthreads();

  for (int s = 0; s < 3; ++s) {
    // As the forward: the tile's union range is [lo(first), hi(last)), the keys every row sees
    // [lo(last), hi(first)).
    int64_t lo, hi, full_lo, full_hi;
    seg_range(visible_keys(a.variant, t_first), s, lo, full_hi);
    seg_range(visible_keys(a.variant, t_last), s, full_lo, hi);
    if (hi <= lo) continue;
    const SegArgs sg = s == 0 ? a.seg[0] : a.seg[2];  // sink and local are both the raw keys
    const int kvh = h / (a.Hq / sg.heads);
    const T* kbase = reinterpret_cast<const T*>(sg.k) + b * sg.k_sb + kvh * sg.k_sh;
    const T* vbase = reinterpret_cast<const T*>(sg.v) + b * sg.v_sb + kvh * sg.v_sh;
    const int nblocks = int((hi - lo + kN - 1) / kN);
    auto load_block = [&](int j, int stage) {
      const int64_t p0 = lo + int64_t(j) * kN;
      const int valid = int(min_i64(kN, hi - p0));
      load_tile<D, kN, kThreads>(sK + stage * kN * D, kbase + p0 * sg.k_st, sg.k_st, valid, tid);
      load_tile<D, kN, kThreads>(sV + stage * kN * D, vbase + p0 * sg.v_st, sg.v_st, valid, tid);
      cp_async_commit();
    };

    load_block(0, 0);
    for (int j = 0; j < nblocks; ++j) {
      const int stage = j & 1;
      if (j + 1 < nblocks) {
        load_block(j + 1, stage ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const int64_t p0 = lo + int64_t(j) * kN;
      const T* cK = sK + stage * kN * D;
      const T* cV = sV + stage * kN * D;

      // S = Q K^T and dP = dO V^T: 16 rows x kN keys per warp.
      float sc[kN / 8][4], dp[kN / 8][4];
#pragma unroll
      for (int i = 0; i < kN / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[i][e] = dp[i][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qf[4], of[4];
        ldmatrix_x4(qf, smem_addr(sQ + swz<D>(warp * 16 + (lane & 15), 2 * kk + (lane >> 4))));
        ldmatrix_x4(of, smem_addr(sO + swz<D>(warp * 16 + (lane & 15), 2 * kk + (lane >> 4))));
#pragma unroll
        for (int np = 0; np < kN / 16; ++np) {
          const int rr = np * 16 + (lane & 7) + ((lane >> 4) << 3), cc = 2 * kk + ((lane >> 3) & 1);
          uint32_t kf[4], vf[4];
          ldmatrix_x4(kf, smem_addr(cK + swz<D>(rr, cc)));
          ldmatrix_x4(vf, smem_addr(cV + swz<D>(rr, cc)));
          mma_16816<T>(sc[2 * np], qf, kf[0], kf[1]);
          mma_16816<T>(sc[2 * np + 1], qf, kf[2], kf[3]);
          mma_16816<T>(dp[2 * np], of, vf[0], vf[1]);
          mma_16816<T>(dp[2 * np + 1], of, vf[2], vf[3]);
        }
      }

#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nt][e] *= a.scale_log2;
      if (!(p0 >= full_lo && p0 + kN <= full_hi)) {  // some row of the tile misses some key
        int64_t a_lo, a_hi, b_lo, b_hi;
        seg_range(visible_keys(a.variant, ta), s, a_lo, a_hi);
        seg_range(visible_keys(a.variant, tb), s, b_lo, b_hi);
        mask_rows(sc, p0, lane, a_lo, a_hi, b_lo, b_hi);
      }
      // dS = P (dP - delta), in sc (masked keys: P = 2^-inf = 0).
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        sc[nt][0] = exp2f(sc[nt][0] - lse2_a) * (dp[nt][0] - delta_a);
        sc[nt][1] = exp2f(sc[nt][1] - lse2_a) * (dp[nt][1] - delta_a);
        sc[nt][2] = exp2f(sc[nt][2] - lse2_b) * (dp[nt][2] - delta_b);
        sc[nt][3] = exp2f(sc[nt][3] - lse2_b) * (dp[nt][3] - delta_b);
      }

      // dQ += dS K.
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        const uint32_t sf[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]),
                                pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                                pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
        const int rr = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
        for (int dq = 0; dq < D / 16; ++dq) {
          uint32_t kf[4];
          ldmatrix_x4_trans(kf, smem_addr(cK + swz<D>(rr, 2 * dq + (lane >> 4))));
          mma_16816<T>(acc[2 * dq], sf, kf[0], kf[1]);
          mma_16816<T>(acc[2 * dq + 1], sf, kf[2], kf[3]);
        }
      }
      __syncthreads();  // the stage is overwritten by the load issued next iteration
    }
  }

  store_dq_rows<D>(a, b, h, row0, ra, rb, rows_here, lane, acc);
}

template <typename K>
void set_smem(K kernel, int bytes) {
  if (bytes > 48 * 1024)
    CCA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

}  // namespace

void launch_attend_bwd_delta(const AttendBwdProblem& p, cudaStream_t stream) {
  const BwdArgs a = make_bwd_args(p, 0);
  const int64_t rows = int64_t(a.B) * a.T * a.Hq;
  constexpr int kWarps = 8;
  const unsigned blocks = unsigned((rows + kWarps - 1) / kWarps);
  const int D = int(p.q.shape[3]);
  dispatch_dtype_dim(p.q.dtype, D, [&](auto type_tag, auto) {
    using T = typename decltype(type_tag)::type;
    bwd_delta_kernel<T><<<blocks, 32 * kWarps, 0, stream>>>(a, D);
    CCA_CUDA_CHECK_LAUNCH("bwd_delta_kernel");
  });
}

void launch_attend_bwd(const AttendBwdProblem& p, int64_t m, cudaStream_t stream) {
  const BwdArgs a = make_bwd_args(p, m);
  const int64_t Hkv = p.k.shape[2], Hc = m > 0 ? p.k_core.shape[2] : 0;
  // dK/dV and dQ on Hopper's wgmma where they apply (attend_bwd_wgmma.cu; CCA_CUDA_BWD=mma:
  // never), else on the kernels below.
  const bool wgmma_dkdv = launch_attend_bwd_dkdv_wgmma(p, m, stream);
  const bool wgmma_dq = launch_attend_bwd_dq_wgmma(p, m, stream);
  dispatch_dtype_dim(p.q.dtype, p.q.shape[3], [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int D = decltype(dim_tag)::value;
    using Tile = AttendBwdTile<D>;
    auto dkdv = bwd_dkdv_kernel<T, D>;
    auto dq = bwd_dq_kernel<T, D>;
    static bool configured = false;  // per instantiation
    if (!configured) {
      set_smem(dkdv, Tile::kKvSmemBytes);
      set_smem(dq, Tile::kDqSmemBytes);
      configured = true;
    }
    const int64_t core_tiles = (m + Tile::kKvBlockN - 1) / Tile::kKvBlockN;
    const int64_t raw_tiles = (a.T + Tile::kKvBlockN - 1) / Tile::kKvBlockN;
    const dim3 kv_grid(unsigned(core_tiles * Hc + raw_tiles * Hkv), unsigned(a.B));
    if (!wgmma_dkdv) {
      dkdv<<<kv_grid, Tile::kKvThreads, Tile::kKvSmemBytes, stream>>>(a, int(core_tiles));
      CCA_CUDA_CHECK_LAUNCH("bwd_dkdv_kernel");
    }
    const dim3 q_grid(unsigned((a.T + Tile::kDqBlockM - 1) / Tile::kDqBlockM), unsigned(a.Hq),
                      unsigned(a.B));
    if (!wgmma_dq) {
      dq<<<q_grid, Tile::kDqThreads, Tile::kDqSmemBytes, stream>>>(a);
      CCA_CUDA_CHECK_LAUNCH("bwd_dq_kernel");
    }
  });
}

}  // namespace cca::cuda

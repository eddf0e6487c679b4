// attend for many query rows: FlashAttention-2-style tiles on mma.sync m16n8k16 (sm_80+).
// One online softmax runs over the key ranges the variant policy gives (core, sink, local
// segments); key blocks no query of the tile sees are never visited, and only blocks that
// some query of the tile sees partly are masked.
#include "attend_args.cuh"
#include "attend_epilogue.cuh"
#include "cuda_check.hpp"
#include "device_utils.cuh"
#include "kernels.hpp"
#include "tile_config.hpp"

namespace cca::cuda {
namespace {

// q [B, n, Hq, D] at positions q_pos0.. over segments [B, *, H, D]; grid (n/kBlockM, Hq, B).
template <typename T, int D>
__global__ void __launch_bounds__(AttendTile<D>::kThreads) attend_tiles_kernel(const AttendArgs a) {
  using Tile = AttendTile<D>;
  constexpr int kM = Tile::kBlockM, kN = Tile::kBlockN, kChunks = D / 8;
  constexpr int kThreads = Tile::kThreads;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kM * D;                  // [kStages][kN][D]
  T* sV = sK + Tile::kStages * kN * D;  // [kStages][kN][D]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = gridDim.x - 1 - blockIdx.x;  // the longest rows (latest tiles) start first
  const int h = blockIdx.y, b = blockIdx.z;
  const int row0 = tile * kM;
  const int rows_here = min(kM, a.n - row0);
  const int64_t t_first = a.q_pos0 + row0, t_last = t_first + rows_here - 1;

  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
#pragma unroll
  for (int it = 0; it < kM * kChunks / kThreads; ++it) {
    const int i = tid + it * kThreads, r = i / kChunks, c = i % kChunks;
    const bool ok = r < rows_here;
    cp_async_16(smem_addr(sQ + swz<D>(r, c)), q + (ok ? int64_t(row0 + r) * a.q_st : 0) + c * 8,
                ok);
  }
  cp_async_commit();

  // This thread's two accumulator rows (m16n8 layout): ra and ra + 8 of its warp's 16. Rows
  // past the end of q behave as the last row (their outputs are not stored).
  const int ra = warp * 16 + (lane >> 2), rb = ra + 8;
  const int64_t ta = min(t_first + ra, t_last), tb = min(t_first + rb, t_last);

  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qf[kk], smem_addr(sQ + swz<D>(warp * 16 + (lane & 15), 2 * kk + (lane >> 4))));

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;

  for (int s = 0; s < 3; ++s) {
    // Ranges grow monotonically with t: the union over the tile is [lo(first), hi(last)), the
    // keys every row sees are [lo(last), hi(first)).
    int64_t lo, hi, full_lo, full_hi;
    seg_range(visible_keys(a.variant, t_first), s, lo, full_hi);
    seg_range(visible_keys(a.variant, t_last), s, full_lo, hi);
    if (hi <= lo) continue;
    const SegArgs& sg = a.seg[s];
    const int kvh = h / (a.Hq / sg.heads);
    const T* kbase = static_cast<const T*>(sg.k) + b * sg.k_sb + kvh * sg.k_sh;
    const T* vbase = static_cast<const T*>(sg.v) + b * sg.v_sb + kvh * sg.v_sh;
    const int nblocks = int((hi - lo + kN - 1) / kN);

    // Each thread copies one 16-byte chunk column of kN / kRowStep key rows.
    constexpr int kRowStep = kThreads / kChunks;
    const int lr = tid / kChunks, lc = tid % kChunks;
    const T* kthr = kbase + lc * 8;
    const T* vthr = vbase + lc * 8;
    auto load_block = [&](int j, int stage) {
      const int64_t p0 = lo + int64_t(j) * kN;
      T* dK = sK + stage * kN * D;
      T* dV = sV + stage * kN * D;
#pragma unroll
      for (int it = 0; it < kN / kRowStep; ++it) {
        const int r = lr + it * kRowStep;
        const int64_t pos = p0 + r, row = pos - sg.pos0;
        const bool ok = pos < hi && row >= 0 && row < sg.rows;
        const int64_t rr = ok ? row : 0;
        cp_async_16(smem_addr(dK + swz<D>(r, lc)), kthr + rr * sg.k_st, ok);
        cp_async_16(smem_addr(dV + swz<D>(r, lc)), vthr + rr * sg.v_st, ok);
      }
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

      // S = Q K^T for 16 rows x kN keys per warp.
      float sc[kN / 8][4];
#pragma unroll
      for (int i = 0; i < kN / 8; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < kN / 16; ++np) {
          uint32_t kf[4];
          ldmatrix_x4(kf, smem_addr(cK + swz<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                2 * kk + ((lane >> 3) & 1))));
          mma_16816<T>(sc[2 * np], qf[kk], kf[0], kf[1]);
          mma_16816<T>(sc[2 * np + 1], qf[kk], kf[2], kf[3]);
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

      online_softmax_step(sc, acc, m_a, m_b, l_a, l_b);

      // O += P V: the S accumulators of two adjacent key octets are an A fragment as they are.
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        const uint32_t pf[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]),
                                pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                                pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t vf[4];
          ldmatrix_x4_trans(vf,
                            smem_addr(cV + swz<D>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                  2 * dp + (lane >> 4))));
          mma_16816<T>(acc[2 * dp], pf, vf[0], vf[1]);
          mma_16816<T>(acc[2 * dp + 1], pf, vf[2], vf[3]);
        }
      }
      __syncthreads();  // the stage is overwritten by the load issued next iteration
    }
  }

  store_attend_rows<T, D>(a, b, h, row0, ra, rb, rows_here, lane, acc, m_a, l_a, m_b, l_b);
}

}  // namespace

void launch_attend_tiles(const AttendProblem& p, cudaStream_t stream) {
  const AttendArgs args = make_attend_args(p);
  dispatch_dtype_dim(p.q.dtype, p.q.shape[3], [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int D = decltype(dim_tag)::value;
    using Tile = AttendTile<D>;
    auto kernel = attend_tiles_kernel<T, D>;
    static bool configured = false;  // per instantiation
    if (!configured) {
      CCA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          Tile::kSmemBytes));
      configured = true;
    }
    const dim3 grid(unsigned((args.n + Tile::kBlockM - 1) / Tile::kBlockM), unsigned(args.Hq),
                    unsigned(args.B));
    kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(args);
    CCA_CUDA_CHECK_LAUNCH("attend_tiles_kernel");
  });
}

}  // namespace cca::cuda

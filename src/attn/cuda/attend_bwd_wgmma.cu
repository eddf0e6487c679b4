// Attention backward on Hopper (sm_90a): FlashAttention-3-style dK/dV and dQ kernels on the
// semantics of the mma.sync backward (attend_bwd_kernel.cu, which keeps the delta kernel and
// is the fallback). Both deterministic: every gradient element is summed by one thread of one
// block in a fixed order (no atomics), as in the mma.sync kernels.
//
// dK/dV: a block owns kBlockN = 128 keys of one head of the core tokens or of the raw keys (the
// same grid and order as bwd_dkdv_kernel: core-token tiles first, then raw-key tiles, in key
// order) and walks the query tiles that see some of its keys, 64 queries per step, for every
// query head that reads its key head (GQA sums inside the block). 384 threads: warpgroups 0
// and 1 are consumers and own keys 64 wg .. 64 wg + 63 of the tile with their float32 dK and
// dV accumulators (64 + 64 registers per thread at D = 128); warpgroup 2 is the producer: its
// first warp streams each step's Q and dO tiles with bulk tensor copies (TMA, 128-byte swizzle,
// rows past T zero-filled) into a kStages-deep full/empty mbarrier pipeline and writes the
// step's per-query table (lse log2 e, delta, the visible key ranges of the tile's segment) next
// to them; setmaxnreg moves its registers to the consumers. Per step, each consumer warpgroup:
//   S^T  = K Q^T    wgmma m64n64k16, K and Q from shared memory (K-major)
//   dP^T = V dO^T   wgmma m64n64k16, V and dO from shared memory
//   P^T  = exp2(S^T scale log2 e - lse log2 e) (masked), dS^T = P^T (dP^T - delta)  (registers)
//   dV  += P^T dO   wgmma m64n{D}k16, P^T from registers (rounded to T), dO N-major
//   dK  += dS^T Q   wgmma m64n{D}k16, dS^T from registers (rounded to T), Q N-major
// with dV issued before dS^T is computed (it runs under that arithmetic); the two consumer
// warpgroups run independently (one's exponentials under the other's products).
// dQ: see bwd_dq_wgmma_kernel (the forward's layout plus dP = dO V^T and dQ += dS K; block i's
// S and dP issued right behind block i - 1's dQ).
// Each needs sm_90a device code on a 9.0 GPU, D 64/128, 16-bit inputs and tensor maps the
// driver accepts; otherwise its launcher returns false and the mma.sync kernel runs.
// CCA_CUDA_BWD=mma forces the mma.sync kernels (bwd_env); CCA_CUDA_BWD_OVERLAP=0 the dQ kernel's
// plain loop.
#include <cuda.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "attend_args.cuh"
#include "attend_bwd_args.cuh"
#include "cuda_check.hpp"
#include "device_utils.cuh"
#include "kernels.hpp"
#include "tensor_map.hpp"
#include "tile_config.hpp"
#include "wgmma.cuh"

namespace cca::cuda {
namespace {

template <int D, int Stages>
struct WgBwdTile {
  static constexpr int kBlockN = 128;  // keys per block: 2 consumer warpgroups x 64
  static constexpr int kBlockM = 64;   // queries per step (launch_attend_bwd_dkdv_wgmma's boxes)
  static constexpr int kStages = Stages;
  static constexpr int kThreads = 384;   // warpgroups 0, 1 consumers, 2 producer (one warp)
  static constexpr int kAtoms = D / 64;  // 128-byte swizzle atoms (64 elements) along D
  static constexpr int kKvBytes = kBlockN * D * 2;   // the K tile, and the V tile
  static constexpr int kStepBytes = kBlockM * D * 2;  // a step's Q tile, and its dO tile
  // Per stage: lse log2 e and delta (float), below, lo, hi (int) per query, the full flag.
  static constexpr int kTableWords = 5 * kBlockM + 4;
  static constexpr int kSmemBytes =
      1024 + 2 * kKvBytes + 2 * kStages * kStepBytes + kStages * kTableWords * 4;
};

struct BwdMaps {
  CUtensorMap q, dout, k[2], v[2];  // k, v: [0] core tokens, [1] raw keys
};

#ifdef CCA_SM90A
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

// grid (core tiles x Hc + raw tiles x Hkv, B), tiles of 128 keys.
template <typename T, int D, int kStagesT>
__global__ void __launch_bounds__(384, 1)
    bwd_dkdv_wgmma_kernel(const __grid_constant__ BwdMaps maps, const __grid_constant__ BwdArgs a,
                          int core_tiles) {
#ifdef CCA_SM90A
  using Tile = WgBwdTile<D, kStagesT>;
  constexpr int kN = Tile::kBlockN, kM = Tile::kBlockM, kStages = Tile::kStages;
  constexpr int kAtoms = Tile::kAtoms;
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t bars[2 * kStages + 1];  // full[s], empty[s], kv
  // 1024-byte aligned base: the 128-byte swizzle repeats every 8 rows of 128 bytes.
  const uint32_t s0 = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t sK = s0;                               // [kAtoms][kN][64]
  const uint32_t sV = sK + Tile::kKvBytes;              // [kAtoms][kN][64]
  const uint32_t sQ = sV + Tile::kKvBytes;              // [kStages][kAtoms][kM][64]
  const uint32_t sO = sQ + kStages * Tile::kStepBytes;  // [kStages][kAtoms][kM][64]
  float* const tables = reinterpret_cast<float*>(smem_raw + (s0 - smem_addr(smem_raw)) +
                                                 2 * Tile::kKvBytes +
                                                 2 * kStages * Tile::kStepBytes);
  // Stage s's table: [0, kM) lse log2 e, [kM, 2 kM) delta, then int32 [2 kM, 3 kM) below,
  // [3 kM, 4 kM) lo, [4 kM, 5 kM) hi (query j sees the keys of the tile's segment in [0, below)
  // and [lo, hi)), [5 kM] every query of the step sees every key of the tile.
  auto table = [&](int s) { return tables + s * Tile::kTableWords; };
  const uint32_t bar0 = smem_addr(bars);
  auto full_bar = [&](int s) { return bar0 + 8 * s; };
  auto empty_bar = [&](int s) { return bar0 + 8 * (kStages + s); };
  const uint32_t kv_bar = bar0 + 8 * (2 * kStages);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.y;
  int x = blockIdx.x;
  const bool core = x < core_tiles * a.seg[0].heads;
  if (!core) x -= core_tiles * a.seg[0].heads;
  const int heads = core ? a.seg[0].heads : a.seg[2].heads;
  const int64_t seg_rows = core ? a.seg[0].rows : a.seg[2].rows;
  const int head = x % heads;
  const int k0 = (x / heads) * kN, k1 = int(min_i64(k0 + kN, seg_rows));
  const int r = a.Hq / heads, h_begin = head * r;  // the query heads that read this head
  const int64_t n_q = a.T;
  // The query tiles that see some key of the tile, each for the r query heads; step s takes
  // sr = nsteps - 1 - s: query tile sr / r (of the two intervals) of query head h_begin + sr % r.
  const QueryTiles tiles = query_tiles_seeing(a.variant, n_q, kM, core, k0, k1);
  const int nsteps = int(tiles.count()) * r;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_bar(s), 1 + 32);  // the copies' expect_tx, then the table's 32 writers
      mbar_init(empty_bar(s), 2);      // one arrive per consumer warpgroup
    }
    mbar_init(kv_bar, 1);
    mbar_init_fence();
  }
  __syncthreads();

  // Registers: the block holds 3 x 168 per thread-slot; setmaxnreg moves them, it cannot add
  // any: 24 + 2 x 240 = 504 = 3 x 168 (ptxas, sm_90a: no spills; at 40/232 the consumers spill
  // and their wgmma are serialised).
  if (warp >= 8) {  // producer warpgroup: warp 8 fills the stages
    setmaxnreg_dec<24>();
    if (warp == 8) {
      const CUtensorMap* mk = core ? &maps.k[0] : &maps.k[1];
      const CUtensorMap* mv = core ? &maps.v[0] : &maps.v[1];
      if (lane == 0 && nsteps > 0) {
        mbar_arrive_expect_tx(kv_bar, 2 * Tile::kKvBytes);
#pragma unroll
        for (int at = 0; at < kAtoms; ++at) {
          tma_load_4d(sK + at * kN * 128, mk, kv_bar, at * 64, k0, head, b);
          tma_load_4d(sV + at * kN * 128, mv, kv_bar, at * 64, k0, head, b);
        }
      }
      for (int s = 0; s < nsteps; ++s) {
        const int stage = s % kStages;
        mbar_wait(empty_bar(stage), ((s / kStages) & 1) ^ 1);
        // Latest query tiles first: the core-token tiles of a head that run together (the grid
        // interleaves heads) then start at the same query tile and read each Q/dO tile at about
        // the same time, from L2; walking forward, each starts 32 query tiles past the previous.
        const int sr = nsteps - 1 - s;
        const int h = h_begin + sr % r;
        const int t0 = int(tiles.tile(sr / r) * kM);
        if (lane == 0) {
          mbar_arrive_expect_tx(full_bar(stage), 2 * Tile::kStepBytes);
#pragma unroll
          for (int at = 0; at < kAtoms; ++at) {
            tma_load_4d(sQ + stage * Tile::kStepBytes + at * kM * 128, &maps.q, full_bar(stage),
                        at * 64, t0, h, b);
            tma_load_4d(sO + stage * Tile::kStepBytes + at * kM * 128, &maps.dout,
                        full_bar(stage), at * 64, t0, h, b);
          }
        }
        float* tb = table(stage);
        int* ti = reinterpret_cast<int*>(tb + 2 * kM);
        for (int j = lane; j < kM; j += 32) {
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
          tb[j] = lse2;
          tb[kM + j] = delta;
          ti[j] = below;
          ti[kM + j] = lo;
          ti[2 * kM + j] = hi;
        }
        if (lane == 0) {
          const int valid = int(min_i64(kM, n_q - t0));
          ti[3 * kM] =
              valid == kM && k1 - k0 == kN && sees_all(a.variant, core, k0, k1, t0, t0 + valid - 1);
        }
        mbar_arrive(full_bar(stage));  // release: the table's writes are visible to the waiters
      }
    }
  } else {
    setmaxnreg_inc<240>();
    // Consumers: warpgroup wg owns keys k0 + 64 wg .. + 63; this thread keys key_a and
    // key_a + 8 (the m16n8 accumulator layout per warp: rows 16 w + lane / 4 and + 8, columns
    // 8 i + 2 (lane % 4) + {0, 1}).
    const int wg = warp >> 2;
    const int key_a = k0 + wg * 64 + (warp & 3) * 16 + (lane >> 2);
    const float scale_log2 = a.scale_log2;
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

    if (nsteps > 0) mbar_wait(kv_bar, 0);
    for (int s = 0; s < nsteps; ++s) {
      const int stage = s % kStages;
      mbar_wait(full_bar(stage), (s / kStages) & 1);
      const uint32_t cQ = sQ + stage * Tile::kStepBytes, cO = sO + stage * Tile::kStepBytes;

      // S^T = K Q^T and dP^T = V dO^T: 64 keys x 64 queries, D / 16 steps of k = 16 (32 bytes
      // inside a swizzle atom); two groups, S^T first.
      float st[kM / 8][4], dpt[kM / 8][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t da =
            gmma_desc_sw128(sK + (kk / 4) * kN * 128 + wg * 64 * 128 + (kk % 4) * 32, 16, 1024);
        const uint64_t db = gmma_desc_sw128(cQ + (kk / 4) * kM * 128 + (kk % 4) * 32, 16, 1024);
        wgmma_ss_n64<T>(st, da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t da =
            gmma_desc_sw128(sV + (kk / 4) * kN * 128 + wg * 64 * 128 + (kk % 4) * 32, 16, 1024);
        const uint64_t db = gmma_desc_sw128(cO + (kk / 4) * kM * 128 + (kk % 4) * 32, 16, 1024);
        wgmma_ss_n64<T>(dpt, da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();

      // P^T in place while dP^T runs. Fragment nt, element e: query 8 nt + 2 (lane % 4) +
      // (e & 1) of the step, key key_a + 8 (e >> 1).
      const float* tb = table(stage);
      const int* vis = reinterpret_cast<const int*>(tb + 2 * kM);
      const bool full = vis[3 * kM] != 0;
      wgmma_wait<1>();
      reg_fence(st);
      if (full) {
#pragma unroll
        for (int nt = 0; nt < kM / 8; ++nt) {
          const float2 l2 = *reinterpret_cast<const float2*>(tb + nt * 8 + 2 * (lane & 3));
          st[nt][0] = fast_exp2(fmaf(st[nt][0], scale_log2, -l2.x));
          st[nt][1] = fast_exp2(fmaf(st[nt][1], scale_log2, -l2.y));
          st[nt][2] = fast_exp2(fmaf(st[nt][2], scale_log2, -l2.x));
          st[nt][3] = fast_exp2(fmaf(st[nt][3], scale_log2, -l2.y));
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < kM / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = nt * 8 + 2 * (lane & 3) + (e & 1), key = key_a + 8 * (e >> 1);
            const bool sees =
                key < vis[j] || (key >= vis[kM + j] && key < vis[2 * kM + j]);
            st[nt][e] = sees ? fast_exp2(fmaf(st[nt][e], scale_log2, -tb[j])) : 0.f;
          }
      }
      // P^T re-packed as A fragments (two query octets each); dV += P^T dO is issued at once
      // and runs while dS^T is computed. k = 16 queries per product (2048 bytes of dO rows),
      // N = D over D / 64 atoms (LBO = one atom's kM rows).
      uint32_t pf[kM / 16][4], sf[kM / 16][4];
#pragma unroll
      for (int kk = 0; kk < kM / 16; ++kk) {
        pf[kk][0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
        pf[kk][1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
        pf[kk][2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
        pf[kk][3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kM / 16; ++kk) {
        const uint64_t db = gmma_desc_sw128(cO + kk * 16 * 128, kM * 128, 1024);
        if constexpr (D == 128)
          wgmma_rs_n128_tn<T>(dv, pf[kk], db);
        else
          wgmma_rs_n64_tn<T>(dv, pf[kk], db);
      }
      wgmma_commit();
      // dS^T = P^T (dP^T - delta) once dP^T is done (groups complete in order: dP^T, then dV).
      wgmma_wait<1>();
      reg_fence(dpt);
#pragma unroll
      for (int nt = 0; nt < kM / 8; ++nt) {
        const float2 dl = *reinterpret_cast<const float2*>(tb + kM + nt * 8 + 2 * (lane & 3));
        dpt[nt][0] = st[nt][0] * (dpt[nt][0] - dl.x);
        dpt[nt][1] = st[nt][1] * (dpt[nt][1] - dl.y);
        dpt[nt][2] = st[nt][2] * (dpt[nt][2] - dl.x);
        dpt[nt][3] = st[nt][3] * (dpt[nt][3] - dl.y);
      }
#pragma unroll
      for (int kk = 0; kk < kM / 16; ++kk) {
        sf[kk][0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
        sf[kk][1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
        sf[kk][2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        sf[kk][3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      }
      // dK += dS^T Q (Q N-major, as dO above).
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kM / 16; ++kk) {
        const uint64_t db = gmma_desc_sw128(cQ + kk * 16 * 128, kM * 128, 1024);
        if constexpr (D == 128)
          wgmma_rs_n128_tn<T>(dk, sf[kk], db);
        else
          wgmma_rs_n64_tn<T>(dk, sf[kk], db);
      }
      wgmma_commit();
      wgmma_wait<0>();
      reg_fence(dv);
      reg_fence(dk);
      reg_fence(pf);  // the A fragments stay put until the products have read them
      reg_fence(sf);
      if ((tid & 127) == 0) mbar_arrive(empty_bar(stage));
    }

    // Every key row of the tile is written, zeros where no query sees it.
    float* const dk_p = core ? a.dk_core.p : a.dk.p;
    float* const dv_p = core ? a.dv_core.p : a.dv.p;
    const int64_t dk_sb = core ? a.dk_core.sb : a.dk.sb, dk_st = core ? a.dk_core.st : a.dk.st,
                  dk_sh = core ? a.dk_core.sh : a.dk.sh;
    const int64_t dv_sb = core ? a.dv_core.sb : a.dv.sb, dv_st = core ? a.dv_core.st : a.dv.st,
                  dv_sh = core ? a.dv_core.sh : a.dv.sh;
    const int col = 2 * (lane & 3);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key_a + 8 * half;
      if (key >= k1) continue;
      float* gk = dk_p + b * dk_sb + int64_t(key) * dk_st + head * dk_sh;
      float* gv = dv_p + b * dv_sb + int64_t(key) * dv_st + head * dv_sh;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        gk[dt * 8 + col] = a.scale * dk[dt][2 * half];
        gk[dt * 8 + col + 1] = a.scale * dk[dt][2 * half + 1];
        gv[dt * 8 + col] = dv[dt][2 * half];
        gv[dt * 8 + col + 1] = dv[dt][2 * half + 1];
      }
    }
  }  // consumers
#else
  __trap();  // never launched: the host checks for sm_90a device code first
#endif
}

// ---- dQ -----------------------------------------------------------------------------------------
// The forward's layout (attend_wgmma.cu): a block owns 128 query rows of one (batch, head), two
// consumer warpgroups of 64 rows; the producer streams kBlockN-key K/V blocks of the policy's
// segments (core, sink, local: one flattened sequence, blocks no row sees skipped) through a
// kStages-deep pipeline. Per block: S = Q K^T, dP = dO V^T (wgmma, Q/dO and K/V from shared
// memory, K-major), dS = P (dP - delta) with P = exp2(S scale log2 e - lse log2 e) (masked on
// boundary blocks only), dQ += dS K (wgmma, dS from registers rounded to T, K N-major).
template <int D, int Stages>
struct WgDqTile {
  static constexpr int kBlockM = 128;              // 2 consumer warpgroups x 64 rows
  static constexpr int kBlockN = D == 128 ? 64 : 128;  // keys per block (registers at D = 128)
  static constexpr int kStages = Stages;
  static constexpr int kThreads = 384;
  static constexpr int kAtoms = D / 64;
  static constexpr int kRowsBytes = kBlockM * D * 2;  // the Q tile, and the dO tile
  static constexpr int kKvBytes = kBlockN * D * 2;    // a K block, and a V block
  static constexpr int kSmemBytes = 1024 + 2 * kRowsBytes + kStages * 2 * kKvBytes;
};

struct DqMaps {
  CUtensorMap q, dout, k[2], v[2];  // k, v: [0] core tokens, [1] raw keys
};

// q [B, T, Hq, D]; grid (ceil(T / 128), Hq, B), the latest query tiles first.
template <typename T, int D, int kStagesT, bool kOverlap>
__global__ void __launch_bounds__(384, 1)
    bwd_dq_wgmma_kernel(const __grid_constant__ DqMaps maps, const __grid_constant__ BwdArgs a) {
#ifdef CCA_SM90A
  using Tile = WgDqTile<D, kStagesT>;
  constexpr int kM = Tile::kBlockM, kN = Tile::kBlockN, kStages = Tile::kStages;
  constexpr int kAtoms = Tile::kAtoms;
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t bars[2 * kStages + 1];  // full[s], empty[s], q
  const uint32_t s0 = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t sQ = s0;                                  // [kAtoms][kM][64]
  const uint32_t sO = sQ + Tile::kRowsBytes;               // [kAtoms][kM][64]
  const uint32_t sK = sO + Tile::kRowsBytes;               // [kStages][kAtoms][kN][64]
  const uint32_t sV = sK + kStages * Tile::kKvBytes;       // [kStages][kAtoms][kN][64]
  const uint32_t bar0 = smem_addr(bars);
  auto full_bar = [&](int s) { return bar0 + 8 * s; };
  auto empty_bar = [&](int s) { return bar0 + 8 * (kStages + s); };
  const uint32_t q_bar = bar0 + 8 * (2 * kStages);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = gridDim.x - 1 - blockIdx.x;  // the longest rows (latest tiles) start first
  const int h = blockIdx.y, b = blockIdx.z;
  const int row0 = tile * kM;
  const int rows_here = int(min_i64(kM, a.T - row0));
  const int64_t t_first = row0, t_last = t_first + rows_here - 1;

  // Segment ranges (monotone in t): the union over the tile is [lo(first), hi(last)), the keys
  // every row sees [lo(last), hi(first)).
  int64_t lo[3], hi[3], full_lo[3], full_hi[3];
  int nb[3];
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    seg_range(visible_keys(a.variant, t_first), s, lo[s], full_hi[s]);
    seg_range(visible_keys(a.variant, t_last), s, full_lo[s], hi[s]);
    nb[s] = hi[s] > lo[s] ? int((hi[s] - lo[s] + kN - 1) / kN) : 0;
  }
  const int nb01 = nb[0] + nb[1], nbt = nb01 + nb[2];

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_bar(s), 1);
      mbar_init(empty_bar(s), 2);  // one arrive per consumer warpgroup
    }
    mbar_init(q_bar, 1);
    mbar_init_fence();
  }
  __syncthreads();

  if (warp >= 8) {  // producer warpgroup: one thread issues the copies
    setmaxnreg_dec<24>();  // 24 + 2 x 240 = 504 = 3 x 168, as the forward
    if (warp == 8 && lane == 0 && nbt > 0) {  // (every query sees itself: nbt >= 1)
      mbar_arrive_expect_tx(q_bar, 2 * Tile::kRowsBytes);
#pragma unroll
      for (int at = 0; at < kAtoms; ++at) {
        tma_load_4d(sQ + at * kM * 128, &maps.q, q_bar, at * 64, row0, h, b);
        tma_load_4d(sO + at * kM * 128, &maps.dout, q_bar, at * 64, row0, h, b);
      }
      for (int i = 0; i < nbt; ++i) {
        const int stage = i % kStages;
        mbar_wait(empty_bar(stage), ((i / kStages) & 1) ^ 1);
        const int s = i < nb[0] ? 0 : (i < nb01 ? 1 : 2);
        const int j = i - (s == 0 ? 0 : (s == 1 ? nb[0] : nb01));
        const int64_t p0 = (s == 0 ? lo[0] : (s == 1 ? lo[1] : lo[2])) + int64_t(j) * kN;
        const int heads = s == 0 ? a.seg[0].heads : a.seg[2].heads;
        const int64_t pos0 = s == 0 ? a.seg[0].pos0 : a.seg[2].pos0;
        const int row = int(p0 - pos0), kvh = h / (a.Hq / heads);
        const CUtensorMap* mk = s == 0 ? &maps.k[0] : &maps.k[1];
        const CUtensorMap* mv = s == 0 ? &maps.v[0] : &maps.v[1];
        mbar_arrive_expect_tx(full_bar(stage), 2 * Tile::kKvBytes);
#pragma unroll
        for (int at = 0; at < kAtoms; ++at) {
          tma_load_4d(sK + stage * Tile::kKvBytes + at * kN * 128, mk, full_bar(stage), at * 64,
                      row, kvh, b);
          tma_load_4d(sV + stage * Tile::kKvBytes + at * kN * 128, mv, full_bar(stage), at * 64,
                      row, kvh, b);
        }
      }
    }
  } else {
    setmaxnreg_inc<240>();
    // Consumers: warpgroup wg owns rows 64 wg .. 64 wg + 63; this thread rows ra and rb = ra + 8
    // (m16n8 layout per warp). Rows past the end of q behave as the last row (not stored).
    const int wg = warp >> 2;
    const int ra = wg * 64 + (warp & 3) * 16 + (lane >> 2), rb = ra + 8;
    const int64_t ta = min_i64(t_first + ra, t_last), tb = min_i64(t_first + rb, t_last);
    const float lse2_a = a.lse.at(b, h, ta) * kLog2e, lse2_b = a.lse.at(b, h, tb) * kLog2e;
    const float delta_a = a.delta.at(b, h, ta), delta_b = a.delta.at(b, h, tb);
    const float scale_log2 = a.scale_log2;

    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float sc[kN / 8][4], dp[kN / 8][4];
    uint32_t sf[kN / 16][4];
    // S = Q K^T and dP = dO V^T of block i (two groups, S first), once its stage is full.
    auto issue_sdp = [&](int i) {
      const int stage = i % kStages;
      mbar_wait(full_bar(stage), (i / kStages) & 1);
      const uint32_t cK = sK + stage * Tile::kKvBytes, cV = sV + stage * Tile::kKvBytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t da =
            gmma_desc_sw128(sQ + (kk / 4) * kM * 128 + wg * 64 * 128 + (kk % 4) * 32, 16, 1024);
        const uint64_t db = gmma_desc_sw128(cK + (kk / 4) * kN * 128 + (kk % 4) * 32, 16, 1024);
        if constexpr (kN == 128)
          wgmma_ss_n128<T>(sc, da, db, kk > 0 ? 1 : 0);
        else
          wgmma_ss_n64<T>(sc, da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t da =
            gmma_desc_sw128(sO + (kk / 4) * kM * 128 + wg * 64 * 128 + (kk % 4) * 32, 16, 1024);
        const uint64_t db = gmma_desc_sw128(cV + (kk / 4) * kN * 128 + (kk % 4) * 32, 16, 1024);
        if constexpr (kN == 128)
          wgmma_ss_n128<T>(dp, da, db, kk > 0 ? 1 : 0);
        else
          wgmma_ss_n64<T>(dp, da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
    };
    // P of block i in sc: scaled logits (log2 domain), -inf where masked, exponentials.
    auto probs = [&](int i) {
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nt][e] *= scale_log2;
      const int s = i < nb[0] ? 0 : (i < nb01 ? 1 : 2);
      const int j = i - (s == 0 ? 0 : (s == 1 ? nb[0] : nb01));
      const int64_t p0 = (s == 0 ? lo[0] : (s == 1 ? lo[1] : lo[2])) + int64_t(j) * kN;
      const int64_t f_lo = s == 0 ? full_lo[0] : (s == 1 ? full_lo[1] : full_lo[2]);
      const int64_t f_hi = s == 0 ? full_hi[0] : (s == 1 ? full_hi[1] : full_hi[2]);
      if (!(p0 >= f_lo && p0 + kN <= f_hi)) {  // some row of the tile misses some key
        int64_t a_lo, a_hi, b_lo, b_hi;
        seg_range(visible_keys(a.variant, ta), s, a_lo, a_hi);
        seg_range(visible_keys(a.variant, tb), s, b_lo, b_hi);
        mask_rows(sc, p0, lane, a_lo, a_hi, b_lo, b_hi);
      }
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        sc[nt][0] = fast_exp2(sc[nt][0] - lse2_a);
        sc[nt][1] = fast_exp2(sc[nt][1] - lse2_a);
        sc[nt][2] = fast_exp2(sc[nt][2] - lse2_b);
        sc[nt][3] = fast_exp2(sc[nt][3] - lse2_b);
      }
    };
    // dS = P (dP - delta), re-packed as A fragments (two key octets each).
    auto pack_ds = [&]() {
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        sf[kk][0] = pack2<T>(sc[2 * kk][0] * (dp[2 * kk][0] - delta_a),
                             sc[2 * kk][1] * (dp[2 * kk][1] - delta_a));
        sf[kk][1] = pack2<T>(sc[2 * kk][2] * (dp[2 * kk][2] - delta_b),
                             sc[2 * kk][3] * (dp[2 * kk][3] - delta_b));
        sf[kk][2] = pack2<T>(sc[2 * kk + 1][0] * (dp[2 * kk + 1][0] - delta_a),
                             sc[2 * kk + 1][1] * (dp[2 * kk + 1][1] - delta_a));
        sf[kk][3] = pack2<T>(sc[2 * kk + 1][2] * (dp[2 * kk + 1][2] - delta_b),
                             sc[2 * kk + 1][3] * (dp[2 * kk + 1][3] - delta_b));
      }
    };
    // dQ += dS K of block i: k = 16 keys per product (2048 bytes of K rows), N = D over D / 64
    // atoms (LBO = one atom's kN rows); one group.
    auto issue_dq = [&](int i) {
      const uint32_t cK = sK + (i % kStages) * Tile::kKvBytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        const uint64_t db = gmma_desc_sw128(cK + kk * 16 * 128, kN * 128, 1024);
        if constexpr (D == 128)
          wgmma_rs_n128_tn<T>(acc, sf[kk], db);
        else
          wgmma_rs_n64_tn<T>(acc, sf[kk], db);
      }
      wgmma_commit();
    };
    auto release = [&](int i) {
      if ((tid & 127) == 0) mbar_arrive(empty_bar(i % kStages));
    };

    if (nbt > 0) mbar_wait(q_bar, 0);
    if constexpr (kOverlap) {
      // Block i's S and dP are issued right behind block i - 1's dQ, so the tensor cores run
      // the three back to back while this warpgroup waits. Block 0 is peeled so that every
      // wait sees the same groups in flight on every path (dQ(i - 1) at the loop's top).
      if (nbt > 0) {
        issue_sdp(0);
        wgmma_wait<1>();  // S(0)
        reg_fence(sc);
        probs(0);
        wgmma_wait<0>();  // dP(0)
        reg_fence(dp);
        pack_ds();
        issue_dq(0);
        for (int i = 1; i < nbt; ++i) {
          issue_sdp(i);     // sc and dp are consumed (dS(i - 1) is in sf)
          wgmma_wait<1>();  // dQ(i - 1) and S(i); dP(i) may still run
          reg_fence(sc);
          reg_fence(acc);
          reg_fence(sf);  // dQ(i - 1) has read its dS: sf may be rewritten
          release(i - 1);
          probs(i);
          wgmma_wait<0>();  // dP(i)
          reg_fence(dp);
          pack_ds();
          issue_dq(i);
        }
        wgmma_wait<0>();
        reg_fence(acc);
        reg_fence(sf);
        release(nbt - 1);
      }
    } else {
      for (int i = 0; i < nbt; ++i) {
        issue_sdp(i);
        wgmma_wait<1>();  // S(i); P runs under dP(i)
        reg_fence(sc);
        probs(i);
        wgmma_wait<0>();
        reg_fence(dp);
        pack_ds();
        issue_dq(i);
        wgmma_wait<0>();
        reg_fence(acc);
        reg_fence(sf);
        release(i);
      }
    }

    store_dq_rows<D>(a, b, h, row0, ra, rb, rows_here, lane, acc);
  }  // consumers
#else
  __trap();  // never launched: the host checks for sm_90a device code first
#endif
}

std::atomic<int64_t> g_wgmma_launches{0};

// Whether `kernel` can run here: the loaded image is sm_90a code (binaryVersion 90) on a 9.0
// device; then its dynamic shared memory is raised to `smem` bytes.
template <typename K>
bool usable_on_sm90a(K kernel, int smem) {
  int dev = 0, major = 0, minor = 0;
  cudaFuncAttributes fa{};
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
      cudaFuncGetAttributes(&fa, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0 || fa.binaryVersion != 90) return false;
  CCA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  return true;
}

template <typename T, int D, int kStages, bool kOverlap>
bool launch_dq(const DqMaps& maps, const BwdArgs& args, cudaStream_t stream) {
  using Tile = WgDqTile<D, kStages>;
  static_assert(Tile::kAtoms * 64 == D && Tile::kSmemBytes + 8 * (2 * kStages + 1) <= 227 * 1024,
                "the pipeline must fit the 227 KB of shared memory a block can have");
  auto kernel = bwd_dq_wgmma_kernel<T, D, kStages, kOverlap>;
  static const bool usable = usable_on_sm90a(kernel, Tile::kSmemBytes);
  if (!usable) return false;
  const dim3 grid(unsigned((args.T + Tile::kBlockM - 1) / Tile::kBlockM), unsigned(args.Hq),
                  unsigned(args.B));
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(maps, args);
  CCA_CUDA_CHECK_LAUNCH("bwd_dq_wgmma_kernel");
  g_wgmma_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

template <typename T, int D, int kStages>
bool launch_dkdv(const BwdMaps& maps, const BwdArgs& args, int64_t m, int64_t Hc, int64_t Hkv,
                 cudaStream_t stream) {
  using Tile = WgBwdTile<D, kStages>;
  static_assert(Tile::kAtoms * 64 == D && Tile::kSmemBytes + 8 * (2 * kStages + 1) <= 227 * 1024,
                "the pipeline must fit the 227 KB of shared memory a block can have");
  auto kernel = bwd_dkdv_wgmma_kernel<T, D, kStages>;
  static const bool usable = usable_on_sm90a(kernel, Tile::kSmemBytes);
  if (!usable) return false;
  const int64_t core_tiles = (m + Tile::kBlockN - 1) / Tile::kBlockN;
  const int64_t raw_tiles = (args.T + Tile::kBlockN - 1) / Tile::kBlockN;
  const dim3 grid(unsigned(core_tiles * Hc + raw_tiles * Hkv), unsigned(args.B));
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(maps, args, int(core_tiles));
  CCA_CUDA_CHECK_LAUNCH("bwd_dkdv_wgmma_kernel");
  g_wgmma_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace

// CCA_CUDA_BWD: "mma" the mma.sync kernels for both, "dkdv" wgmma for dK/dV only, "dq" wgmma
// for dQ only (A/B timing, bisecting); unset or anything else: wgmma for both where it applies.
// Read at every call (tests switch it).
static int bwd_env() {  // 0 both, 1 mma, 2 dkdv only, 3 dq only
  const char* e = std::getenv("CCA_CUDA_BWD");
  if (!e) return 0;
  if (std::strcmp(e, "mma") == 0) return 1;
  if (std::strcmp(e, "dkdv") == 0) return 2;
  if (std::strcmp(e, "dq") == 0) return 3;
  return 0;
}

// CCA_CUDA_BWD_OVERLAP=0: the dQ kernel waits for each block's dQ product before issuing the
// next block's S and dP (A/B timing, and a fallback should the overlapped loop misbehave).
static bool overlap_on() {
  const char* e = std::getenv("CCA_CUDA_BWD_OVERLAP");
  return !(e && std::strcmp(e, "0") == 0);
}

bool attend_bwd_forced_mma() { return bwd_env() == 1; }

int64_t attend_bwd_wgmma_launches() { return g_wgmma_launches.load(std::memory_order_relaxed); }

bool launch_attend_bwd_dkdv_wgmma(const AttendBwdProblem& p, int64_t m, cudaStream_t stream) {
  const int env = bwd_env();
  if (env == 1 || env == 3) return false;
  const int64_t D = p.q.shape[3];
  if (D != 64 && D != 128) return false;
  if (p.q.dtype != DType::bf16 && p.q.dtype != DType::f16) return false;
  if (p.q.shape[1] >= (int64_t(1) << 30)) return false;  // TMA coordinates and int keys
  const BwdArgs args = make_bwd_args(p, m);
  BwdMaps maps;
  std::memset(&maps, 0, sizeof(maps));
  constexpr int kM = 64, kN = 128;  // WgBwdTile's kBlockM, kBlockN (the boxes of the copies)
  if (!encode_tensor_map(maps.q, p.q, kM) || !encode_tensor_map(maps.dout, p.dout, kM))
    return false;
  if (!encode_tensor_map(maps.k[1], p.k, kN) || !encode_tensor_map(maps.v[1], p.v, kN))
    return false;
  if (m > 0 && (!encode_tensor_map(maps.k[0], p.k_core.slice(1, 0, m), kN) ||
                !encode_tensor_map(maps.v[0], p.v_core.slice(1, 0, m), kN)))
    return false;
  const int64_t Hkv = p.k.shape[2], Hc = m > 0 ? p.k_core.shape[2] : 0;
  bool launched = false;
  dispatch_dtype_dim(p.q.dtype, D, [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    launched = launch_dkdv<T, kD, kD == 128 ? 3 : 4>(maps, args, m, Hc, Hkv, stream);
  });
  return launched;
}

bool launch_attend_bwd_dq_wgmma(const AttendBwdProblem& p, int64_t m, cudaStream_t stream) {
  const int env = bwd_env();
  if (env == 1 || env == 2) return false;
  const int64_t D = p.q.shape[3];
  if (D != 64 && D != 128) return false;
  if (p.q.dtype != DType::bf16 && p.q.dtype != DType::f16) return false;
  if (p.q.shape[1] >= (int64_t(1) << 30)) return false;  // TMA coordinates are 32-bit
  const BwdArgs args = make_bwd_args(p, m);
  DqMaps maps;
  std::memset(&maps, 0, sizeof(maps));
  const int kN = D == 128 ? 64 : 128;  // WgDqTile's kBlockN
  if (!encode_tensor_map(maps.q, p.q, 128) || !encode_tensor_map(maps.dout, p.dout, 128))
    return false;
  if (!encode_tensor_map(maps.k[1], p.k, kN) || !encode_tensor_map(maps.v[1], p.v, kN))
    return false;
  if (m > 0 && (!encode_tensor_map(maps.k[0], p.k_core.slice(1, 0, m), kN) ||
                !encode_tensor_map(maps.v[0], p.v_core.slice(1, 0, m), kN)))
    return false;
  bool launched = false;
  dispatch_dtype_dim(p.q.dtype, D, [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    if (overlap_on())
      launched = launch_dq<T, kD, 4, true>(maps, args, stream);
    else
      launched = launch_dq<T, kD, 4, false>(maps, args, stream);
  });
  return launched;
}

}  // namespace cca::cuda

// attend on Hopper (sm_90a): FlashAttention-3-style tiles. A block owns 128 query rows of one
// (batch, head): two consumer warpgroups of 64 rows each run S = Q K^T (wgmma, Q and K from
// shared memory) and O += P V (wgmma, P from registers, V from shared memory, N-major), and a
// producer warpgroup (one thread) streams K/V tiles with bulk tensor copies (TMA, 128-byte
// swizzle) through a kStages-deep mbarrier pipeline; setmaxnreg moves the producer's registers
// to the consumers. Default (kOverlap, 3 stages): each consumer issues block i's Q K^T and then
// block i - 1's P V, and runs block i's softmax under that P V (FA3's intra-warpgroup
// pipelining); with kPingPong the two warpgroups also take turns issuing their products (named
// barriers), which keeps one's softmax under the other's products. Without kOverlap the next
// Q K^T is issued right behind the P V and the softmax waits for both.
// The key loop is the tile kernel's: the policy's segments (core, sink, local) flattened into
// one sequence of 128-key blocks, blocks no row sees skipped, only boundary blocks masked.
// Needs sm_90a device code, a positive softmax scale and tensor maps the driver accepts;
// otherwise launch_attend_wgmma returns false and the portable tile kernel runs.
#include <cuda.h>

#include <cstdlib>
#include <cstring>

#include "attend_args.cuh"
#include "attend_epilogue.cuh"
#include "cuda_check.hpp"
#include "device_utils.cuh"
#include "kernels.hpp"
#include "tensor_map.hpp"
#include "tile_config.hpp"
#include "wgmma.cuh"

namespace cca::cuda {
namespace {

template <int D, int Stages>
struct WgTile {
  static constexpr int kBlockM = 128;  // 2 consumer warpgroups x 64 rows
  static constexpr int kBlockN = 128;
  static constexpr int kStages = Stages;  // K/V pipeline depth (3 at D = 128: 225 KB)
  static constexpr int kThreads = 384;  // warpgroups 0, 1 consumers, 2 producer (one thread)
  static constexpr int kAtoms = D / 64;  // 128-byte swizzle atoms (64 elements) along D
  static constexpr int kTileBytes = kBlockN * D * 2;
  static constexpr int kSmemBytes = kBlockM * D * 2 + kStages * 2 * kTileBytes + 1024;
};

struct WgMaps {
  CUtensorMap q, k[3], v[3];
};

// 2^x on the special-function unit, denormal results flushed to 0 (probabilities < 2^-126
// change nothing); exp2f adds a denormal-range fix-up around the same instruction.
#ifdef CCA_SM90A
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

// q [B, n, Hq, D]; grid (ceil(n / 128), Hq, B). kOverlap: FA3's intra-warpgroup pipelining
// (see the key loop); kStagesT: K/V pipeline depth.
template <typename T, int D, bool kPingPong, bool kOverlap, int kStagesT>
__global__ void __launch_bounds__(384, 1)
    attend_wgmma_kernel(const __grid_constant__ WgMaps maps, const AttendArgs a) {
#ifdef CCA_SM90A
  using Tile = WgTile<D, kStagesT>;
  constexpr int kM = Tile::kBlockM, kN = Tile::kBlockN, kStages = Tile::kStages;
  constexpr int kAtoms = Tile::kAtoms;
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t bars[2 * kStages + 1];  // full[s], empty[s], q
  // 1024-byte aligned base: the 128-byte swizzle repeats every 8 rows of 128 bytes.
  const uint32_t s0 = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t sQ = s0;                                   // [kAtoms][kM][64]
  const uint32_t sK = sQ + kM * D * 2;                      // [kStages][kAtoms][kN][64]
  const uint32_t sV = sK + kStages * Tile::kTileBytes;      // [kStages][kAtoms][kN][64]
  const uint32_t bar0 = smem_addr(bars);
  auto full_bar = [&](int s) { return bar0 + 8 * s; };
  auto empty_bar = [&](int s) { return bar0 + 8 * (kStages + s); };
  const uint32_t q_bar = bar0 + 8 * (2 * kStages);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = gridDim.x - 1 - blockIdx.x;  // the longest rows (latest tiles) start first
  const int h = blockIdx.y, b = blockIdx.z;
  const int row0 = tile * kM;
  const int rows_here = min(kM, a.n - row0);
  const int64_t t_first = a.q_pos0 + row0, t_last = t_first + rows_here - 1;

  // Segment ranges (monotone in t): the union over the tile is [lo(first), hi(last)), the keys
  // every row sees [lo(last), hi(first)). Blocks of all segments form one sequence.
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
    setmaxnreg_dec<24>();
    if (warp == 8 && lane == 0) {
      mbar_arrive_expect_tx(q_bar, kM * D * 2);
#pragma unroll
      for (int at = 0; at < kAtoms; ++at)
        tma_load_4d(sQ + at * kM * 128, &maps.q, q_bar, at * 64, row0, h, b);
      for (int i = 0; i < nbt; ++i) {
        const int stage = i % kStages;
        mbar_wait(empty_bar(stage), ((i / kStages) & 1) ^ 1);
        const int s = i < nb[0] ? 0 : (i < nb01 ? 1 : 2);
        const int j = i - (s == 0 ? 0 : (s == 1 ? nb[0] : nb01));
        const int64_t p0 = (s == 0 ? lo[0] : (s == 1 ? lo[1] : lo[2])) + int64_t(j) * kN;
        const SegArgs& sg = a.seg[s];
        const int row = int(p0 - sg.pos0), kvh = h / (a.Hq / sg.heads);
        mbar_arrive_expect_tx(full_bar(stage), 2 * Tile::kTileBytes);
#pragma unroll
        for (int at = 0; at < kAtoms; ++at) {
          tma_load_4d(sK + stage * Tile::kTileBytes + at * kN * 128, &maps.k[s], full_bar(stage),
                      at * 64, row, kvh, b);
          tma_load_4d(sV + stage * Tile::kTileBytes + at * kN * 128, &maps.v[s], full_bar(stage),
                      at * 64, row, kvh, b);
        }
      }
    }
  } else {
  setmaxnreg_inc<240>();
  // Consumers: warpgroup wg owns rows 64 wg .. 64 wg + 63; this thread rows ra and rb = ra + 8
  // (m16n8 layout per warp). Rows past the end of q behave as the last row (not stored).
  const int wg = warp >> 2;
  const int ra = wg * 64 + (warp & 3) * 16 + (lane >> 2), rb = ra + 8;
  const int64_t ta = min(t_first + ra, t_last), tb = min(t_first + rb, t_last);

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
  float corr_a = 1.f, corr_b = 1.f;  // rescale of acc owed by the last softmax
  uint32_t pf[kN / 16][4];
  float sc[kN / 8][4];
  const float scale = a.scale_log2;  // > 0 (the host checks): max commutes with the scaling

  // S = Q K^T of the block in `stage`: 64 rows x kN keys, D / 16 steps of k = 16 (32 bytes
  // inside a swizzle atom).
  auto issue_qk = [&](int stage) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t dq =
          gmma_desc_sw128(sQ + (kk / 4) * kM * 128 + wg * 64 * 128 + (kk % 4) * 32, 16, 1024);
      const uint64_t dk = gmma_desc_sw128(
          sK + stage * Tile::kTileBytes + (kk / 4) * kN * 128 + (kk % 4) * 32, 16, 1024);
      wgmma_ss_n128<T>(sc, dq, dk, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
  };
  // O += P V: k = 16 keys per step (2048 bytes of V rows); N = D over D / 64 atoms (LBO).
  auto issue_pv = [&](int stage) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint64_t dv =
          gmma_desc_sw128(sV + stage * Tile::kTileBytes + kk * 16 * 128, kN * 128, 1024);
      if constexpr (D == 128)
        wgmma_rs_n128_tn<T>(acc, pf[kk], dv);
      else
        wgmma_rs_n64_tn<T>(acc, pf[kk], dv);
    }
    wgmma_commit();
  };
  // acc *= the owed correction; skipped (warp-uniformly) when no row's maximum moved, which
  // is most blocks once a row has seen a few.
  auto rescale = [&]() {
    if (__any_sync(0xffffffffu, corr_a != 1.f || corr_b != 1.f)) {
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        acc[dt][0] *= corr_a;
        acc[dt][1] *= corr_a;
        acc[dt][2] *= corr_b;
        acc[dt][3] *= corr_b;
      }
    }
  };
  // Online softmax of block i in sc (raw logits in, probabilities out; log2 domain, the scale
  // folded into the exponent's FFMA); sets the owed correction.
  auto softmax = [&](int i) {
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
    float mx_a, mx_b;
    quad_row_max(sc, mx_a, mx_b);
    mx_a = fmaxf(m_a, mx_a * scale);
    mx_b = fmaxf(m_b, mx_b * scale);
    const float base_a = mx_a == -INFINITY ? 0.f : mx_a;  // no key yet: keep zeros, no NaN
    const float base_b = mx_b == -INFINITY ? 0.f : mx_b;
    corr_a = fast_exp2(m_a - base_a);
    corr_b = fast_exp2(m_b - base_b);
    m_a = mx_a;
    m_b = mx_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      sc[nt][0] = fast_exp2(fmaf(sc[nt][0], scale, -base_a));
      sc[nt][1] = fast_exp2(fmaf(sc[nt][1], scale, -base_a));
      sc[nt][2] = fast_exp2(fmaf(sc[nt][2], scale, -base_b));
      sc[nt][3] = fast_exp2(fmaf(sc[nt][3], scale, -base_b));
      sum_a += sc[nt][0] + sc[nt][1];
      sum_b += sc[nt][2] + sc[nt][3];
    }
    l_a = l_a * corr_a + sum_a;
    l_b = l_b * corr_b + sum_b;
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      pf[kk][0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
      pf[kk][1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
      pf[kk][2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pf[kk][3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
  };

  // Ping-pong: warpgroup w waits on barrier 1 + w before issuing its products and then lets
  // the other go; warpgroup 1 opens warpgroup 0's first turn and skips its own last hand-over,
  // so every barrier sees as many arrivals as syncs.
  if (kPingPong && wg == 1) named_bar_arrive(1, 256);
  mbar_wait(q_bar, 0);
  auto turn_begin = [&](int i) {
    mbar_wait(full_bar(i % kStages), (i / kStages) & 1);
    if (kPingPong) named_bar_sync(1 + wg, 256);
  };
  auto turn_end = [&](int i) {
    if (kPingPong && !(wg == 1 && i == nbt - 1)) named_bar_arrive(2 - wg, 256);
  };
  if constexpr (kOverlap) {
    // Intra-warpgroup pipelining (FA3): block i's Q K^T runs while this warpgroup rescales acc
    // and issues block i - 1's P V; block i's softmax then runs under that P V. Block 0 is
    // peeled so that every wait sees the same groups in flight on every path.
    if (nbt > 0) {
      turn_begin(0);
      issue_qk(0);
      turn_end(0);
      wgmma_wait<0>();
      reg_fence(sc);
      softmax(0);
      pack_p();
      for (int i = 1; i < nbt; ++i) {
        turn_begin(i);
        issue_qk(i % kStages);
        rescale();  // acc is idle: the last P V completed at the previous wait<0>
        issue_pv((i - 1) % kStages);
        turn_end(i);
        wgmma_wait<1>();  // this S (committed first); the P V may still run
        reg_fence(sc);
        softmax(i);
        wgmma_wait<0>();  // P V of block i - 1: its stage and pf are free
        reg_fence(acc);
        if ((tid & 127) == 0) mbar_arrive(empty_bar((i - 1) % kStages));
        pack_p();
      }
      rescale();
      issue_pv((nbt - 1) % kStages);
    }
  } else {
    // The next Q K^T is issued right behind the previous P V; softmax waits for both.
    for (int i = 0; i < nbt; ++i) {
      turn_begin(i);
      issue_qk(i % kStages);
      turn_end(i);
      wgmma_wait<0>();  // this S and the previous P V
      reg_fence(sc);
      reg_fence(acc);
      if (i > 0 && (tid & 127) == 0) mbar_arrive(empty_bar((i - 1) % kStages));
      softmax(i);
      rescale();
      pack_p();
      issue_pv(i % kStages);
    }
  }
  wgmma_wait<0>();
  reg_fence(acc);

  store_attend_rows<T, D>(a, b, h, row0, ra, rb, rows_here, lane, acc, m_a, l_a, m_b, l_b);
  }  // consumers
#else
  __trap();  // never launched: the host checks for sm_90a device code first
#endif
}

// CCA_CUDA_WGMMA=0 turns the path off, CCA_CUDA_PINGPONG=0 the warpgroup ping-pong (and with it
// the overlap), CCA_CUDA_OVERLAP=0 the intra-warpgroup pipelining, CCA_CUDA_STAGES=2 a 2-deep
// pipeline without overlap (A/B timing, debugging); anything else leaves them on.
bool env_on(const char* name) {
  const char* e = std::getenv(name);
  return !(e && std::strcmp(e, "0") == 0);
}
bool wgmma_enabled() {
  static const bool on = env_on("CCA_CUDA_WGMMA");
  return on;
}
// 0: ping-pong + overlap, 3 stages (default); 1: ping-pong, 3 stages; 2: ping-pong, 2 stages;
// 3: neither, 2 stages.
int wgmma_config() {
  static const int c = [] {
    if (!env_on("CCA_CUDA_PINGPONG")) return 3;
    if (env_on("CCA_CUDA_OVERLAP")) return 0;
    const char* st = std::getenv("CCA_CUDA_STAGES");
    return st && std::strcmp(st, "2") == 0 ? 2 : 1;
  }();
  return c;
}

template <typename T, int D, bool kPingPong, bool kOverlap, int kStages>
bool launch_config(const WgMaps& maps, const AttendArgs& args, cudaStream_t stream) {
  using Tile = WgTile<D, kStages>;
  static_assert(Tile::kAtoms * 64 == D &&
                    Tile::kSmemBytes + 8 * (2 * kStages + 1) <= 227 * 1024,
                "the pipeline must fit the 227 KB of shared memory a block can have");
  auto kernel = attend_wgmma_kernel<T, D, kPingPong, kOverlap, kStages>;
  // Only where the loaded image is sm_90a code (binaryVersion 90) on a 9.0 device.
  static const bool usable = [&] {
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
    CCA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Tile::kSmemBytes));
    return true;
  }();
  if (!usable) return false;
  const dim3 grid(unsigned((args.n + Tile::kBlockM - 1) / Tile::kBlockM), unsigned(args.Hq),
                  unsigned(args.B));
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(maps, args);
  CCA_CUDA_CHECK_LAUNCH("attend_wgmma_kernel");
  return true;
}

}  // namespace

bool launch_attend_wgmma(const AttendProblem& p, cudaStream_t stream) {
  if (!wgmma_enabled()) return false;
  const int64_t D = p.q.shape[3];
  if (D != 64 && D != 128) return false;
  if (p.q.dtype != DType::bf16 && p.q.dtype != DType::f16) return false;
  const AttendArgs args = make_attend_args(p);
  if (!(args.scale_log2 > 0.f)) return false;  // the kernel takes row maxima of raw logits
  for (const SegArgs& s : args.seg)
    if (s.rows > (int64_t(1) << 30)) return false;  // TMA coordinates are 32-bit
  WgMaps maps;
  std::memset(&maps, 0, sizeof(maps));
  if (!encode_tensor_map(maps.q, p.q, 128)) return false;
  const KvSegment* segs[3] = {&p.core, &p.sink, &p.local};
  for (int s = 0; s < 3; ++s) {
    if (segs[s]->rows() == 0) continue;
    if (!encode_tensor_map(maps.k[s], segs[s]->k, 128) ||
        !encode_tensor_map(maps.v[s], segs[s]->v, 128))
      return false;
  }
  bool launched = false;
  const int cfg = wgmma_config();
  dispatch_dtype_dim(p.q.dtype, D, [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    if (cfg == 0)
      launched = launch_config<T, kD, true, true, 3>(maps, args, stream);
    else if (cfg == 1)
      launched = launch_config<T, kD, true, false, 3>(maps, args, stream);
    else if (cfg == 2)
      launched = launch_config<T, kD, true, false, 2>(maps, args, stream);
    else
      launched = launch_config<T, kD, false, false, 2>(maps, args, stream);
  });
  return launched;
}

}  // namespace cca::cuda

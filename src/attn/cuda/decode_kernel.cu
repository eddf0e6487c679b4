// Split-KV decode: few query rows (decode steps, small chunks) over long key ranges. Each block
// takes one slice of the visible keys for all query rows that share a KV head, reads every key
// once (16-byte loads, D/8 lanes per key) and writes a partial SoftmaxState; a second kernel
// merges the slices. Tensor cores would idle here: the work is bounded by reading K and V.
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
  float* part_o;   // [B, Hq, n, splits, D] unnormalised outputs
  float* part_ml;  // [B, Hq, n, splits, 2] (m, l) in the log2 domain
};

// q [B, n, Hq, D] with n * G <= kMaxRows; grid (splits, Hq / G, B).
template <typename T, int D, int kMaxRows>
__global__ void __launch_bounds__(DecodeTile::kThreads) attend_decode_kernel(const DecodeArgs d) {
  constexpr int kWarps = DecodeTile::kWarps, kU = DecodeTile::kUnroll;
  constexpr int kL = D / 8, kGroups = 32 / kL;  // lanes per key, keys per warp step
  const AttendArgs& a = d.a;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kg = lane / kL, e = (lane % kL) * 8;
  const int split = blockIdx.x, hg = blockIdx.y, b = blockIdx.z, h0 = hg * d.G;
  const int R = a.n * d.G;

  __shared__ int64_t s_rng[kMaxRows][3][2];  // per query: [lo, hi) of each segment
  __shared__ float s_o[kWarps][kMaxRows][D];
  __shared__ float s_ml[kWarps][kMaxRows][2];
  __shared__ __align__(16) float s_q[kMaxRows][D];  // query rows, scaled to the log2 domain

  const int64_t t_first = a.q_pos0, t_last = a.q_pos0 + a.n - 1;
  const Visible vf = visible_keys(a.variant, t_first), vl = visible_keys(a.variant, t_last);
  int64_t lo[3], len[3], full_lo[3], full_hi[3];
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    int64_t hi;
    seg_range(vf, s, lo[s], full_hi[s]);
    seg_range(vl, s, full_lo[s], hi);
    len[s] = hi > lo[s] ? hi - lo[s] : 0;
  }
  if (threadIdx.x < a.n * 3) {
    const int qi = threadIdx.x / 3, s = threadIdx.x % 3;
    seg_range(visible_keys(a.variant, a.q_pos0 + qi), s, s_rng[qi][s][0], s_rng[qi][s][1]);
  }
  // Keys are numbered across the segments: core, then sink, then local.
  const int64_t total = len[0] + len[1] + len[2];
  const int64_t per_split = (total + d.splits - 1) / d.splits;
  const int64_t v_begin = min(total, int64_t(split) * per_split);
  const int64_t v_end = min(total, v_begin + per_split);

  const T* kb[3];
  const T* vb[3];
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    const SegArgs& sg = a.seg[s];
    const int kvh = h0 / (a.Hq / sg.heads);
    kb[s] = static_cast<const T*>(sg.k) + b * sg.k_sb + kvh * sg.k_sh - sg.pos0 * sg.k_st + e;
    vb[s] = static_cast<const T*>(sg.v) + b * sg.v_sb + kvh * sg.v_sh - sg.pos0 * sg.v_st + e;
  }

  for (int idx = threadIdx.x; idx < R * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D, qi = r / d.G, h = h0 + r % d.G;
    s_q[r][c] = to_float(static_cast<const T*>(a.q)[b * a.q_sb + qi * a.q_st + h * a.q_sh + c]) *
                a.scale_log2;
  }
  float o[kMaxRows][8], m[kMaxRows], l[kMaxRows];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[r][i] = 0.f;
  }
  __syncthreads();

  constexpr int kStep = kWarps * kGroups * kU;
  for (int64_t base = v_begin; base < v_end; base += kStep) {
    uint4 kr[kU], vr[kU];
    int seg[kU];
    int64_t pos[kU];
    bool valid[kU], full[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t v = base + (u * kWarps + warp) * kGroups + kg;
      valid[u] = v < v_end;
      seg[u] = v < len[0] ? 0 : (v < len[0] + len[1] ? 1 : 2);
      pos[u] = seg[u] == 0 ? lo[0] + v
                           : (seg[u] == 1 ? lo[1] + v - len[0] : lo[2] + v - len[0] - len[1]);
      const int s = seg[u];
      full[u] = pos[u] >= (s == 0   ? full_lo[0]
                           : s == 1 ? full_lo[1]
                                    : full_lo[2]) &&
                pos[u] < (s == 0   ? full_hi[0]
                          : s == 1 ? full_hi[1]
                                   : full_hi[2]);
      const T* kp = s == 0 ? kb[0] : (s == 1 ? kb[1] : kb[2]);
      const T* vp = s == 0 ? vb[0] : (s == 1 ? vb[1] : vb[2]);
      const int64_t kst = s == 0 ? a.seg[0].k_st : (s == 1 ? a.seg[1].k_st : a.seg[2].k_st);
      const int64_t vst = s == 0 ? a.seg[0].v_st : (s == 1 ? a.seg[1].v_st : a.seg[2].v_st);
      if (valid[u]) {
        kr[u] = __ldg(reinterpret_cast<const uint4*>(kp + pos[u] * kst));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(vp + pos[u] * vst));
      } else {
        kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= R) break;
      const int qi = r / d.G;
      float sc[kU];
      float cmax = -INFINITY;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        float kf[8];
        unpack8<T>(kr[u], kf);
        const float4 q0 = *reinterpret_cast<const float4*>(&s_q[r][e]);
        const float4 q1 = *reinterpret_cast<const float4*>(&s_q[r][e + 4]);
        float x = q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] + q1.x * kf[4] +
                  q1.y * kf[5] + q1.z * kf[6] + q1.w * kf[7];
#pragma unroll
        for (int off = 1; off < kL; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
        bool ok = valid[u];
        if (ok && !full[u]) {
          const int s = seg[u];
          ok = pos[u] >= s_rng[qi][s][0] && pos[u] < s_rng[qi][s][1];
        }
        sc[u] = ok ? x : -INFINITY;
        cmax = fmaxf(cmax, sc[u]);
      }
#pragma unroll
      for (int off = kL; off < 32; off <<= 1)
        cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, off));
      const float m_new = fmaxf(m[r], cmax);
      const float base_m = m_new == -INFINITY ? 0.f : m_new;
      const float corr = exp2f(m[r] - base_m);
      m[r] = m_new;
      l[r] *= corr;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[r][i] *= corr;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const float pr = exp2f(sc[u] - base_m);
        l[r] += pr;
        float vf[8];
        unpack8<T>(vr[u], vf);
#pragma unroll
        for (int i = 0; i < 8; ++i) o[r][i] = fmaf(pr, vf[i], o[r][i]);
      }
    }
  }

  // Reduce over key groups (same m across the warp), then over warps through shared memory.
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= R) break;
#pragma unroll
    for (int off = kL; off < 32; off <<= 1) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], off);
#pragma unroll
      for (int i = 0; i < 8; ++i) o[r][i] += __shfl_xor_sync(0xffffffffu, o[r][i], off);
    }
    if (kg == 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i) s_o[warp][r][e + i] = o[r][i];
      if (lane == 0) {
        s_ml[warp][r][0] = m[r];
        s_ml[warp][r][1] = l[r];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D;
    SoftmaxState st;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      float self_scale, other_scale, m_new;
      st.merge_scales(s_ml[w][r][0], self_scale, other_scale, m_new);
      acc = acc * self_scale + s_o[w][r][c] * other_scale;
      st.l = st.l * self_scale + s_ml[w][r][1] * other_scale;
      st.m = m_new;
    }
    const int qi = r / d.G, h = h0 + r % d.G;
    const int64_t slot = ((int64_t(b) * a.Hq + h) * a.n + qi) * d.splits + split;
    d.part_o[slot * D + c] = acc;
    if (c == 0) {
      d.part_ml[slot * 2] = st.m;
      d.part_ml[slot * 2 + 1] = st.l;
    }
  }
}

// Merges the key slices of each (b, h, query): out [B, n, Hq, D], lse [B, Hq, n]. One block
// of D threads per row; grid B * Hq * n.
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_merge_kernel(const DecodeArgs d) {
  const AttendArgs& a = d.a;
  const int64_t row = blockIdx.x;  // (b * Hq + h) * n + qi
  const int qi = int(row % a.n), h = int((row / a.n) % a.Hq), b = int(row / (int64_t(a.n) * a.Hq));
  const int c = threadIdx.x;
  SoftmaxState st;
  float acc = 0.f;
  for (int s = 0; s < d.splits; ++s) {
    const int64_t slot = row * d.splits + s;
    float self_scale, other_scale, m_new;
    st.merge_scales(d.part_ml[slot * 2], self_scale, other_scale, m_new);
    acc = acc * self_scale + d.part_o[slot * D + c] * other_scale;
    st.l = st.l * self_scale + d.part_ml[slot * 2 + 1] * other_scale;
    st.m = m_new;
  }
  T* out = static_cast<T*>(a.out) + b * a.o_sb + int64_t(qi) * a.o_st + h * a.o_sh;
  out[c] = from_float<T>(st.l > 0.f ? acc / st.l : 0.f);
  if (a.lse && c == 0) a.lse[b * a.l_sb + h * a.l_sh + qi * a.l_st] = st.lse();
}

// Query heads per block: those that share a KV head in every segment present.
int heads_per_block(const AttendProblem& p) {
  int64_t max_heads = 1;
  for (const KvSegment* s : {&p.core, &p.sink, &p.local})
    if (s->rows() > 0) max_heads = std::max<int64_t>(max_heads, s->k.shape[2]);
  return int(p.q.shape[2] / max_heads);
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
    // Enough blocks for ~4 per SM, but no slice under kMinKeysPerSplit keys.
    static int sms = [] {
      int dev = 0, n = 0;
      CCA_CUDA_CHECK(cudaGetDevice(&dev));
      CCA_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
      return n;
    }();
    const Visible vf = visible_keys(p.variant, p.q_pos0);
    const Visible vl = visible_keys(p.variant, p.q_pos0 + d.a.n - 1);
    int64_t total = 0;
    for (int s = 0; s < 3; ++s) {
      int64_t lo, hi, lo2, hi2;
      seg_range(vf, s, lo, hi2);
      seg_range(vl, s, lo2, hi);
      total += std::max<int64_t>(0, hi - lo);
    }
    const int64_t want = (4 * int64_t(sms) + blocks - 1) / blocks;
    const int64_t cap = std::max<int64_t>(1, total / DecodeTile::kMinKeysPerSplit);
    splits = int(std::max<int64_t>(1, std::min(want, cap)));
  }
  d.splits = splits;
  const int64_t slots = int64_t(d.a.B) * d.a.Hq * d.a.n * splits;
  const int64_t D = p.q.shape[3];
  void* ws = nullptr;
  CCA_CUDA_CHECK(cudaMallocAsync(&ws, size_t(slots * (D + 2) * 4), stream));
  d.part_o = static_cast<float*>(ws);
  d.part_ml = d.part_o + slots * D;
  dispatch_dtype_dim(p.q.dtype, D, [&](auto type_tag, auto dim_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    const dim3 grid(unsigned(splits), unsigned(d.a.Hq / d.G), unsigned(d.a.B));
    if (R <= 2)
      attend_decode_kernel<T, kD, 2><<<grid, DecodeTile::kThreads, 0, stream>>>(d);
    else
      attend_decode_kernel<T, kD, DecodeTile::kMaxRows>
          <<<grid, DecodeTile::kThreads, 0, stream>>>(d);
    CCA_CUDA_CHECK_LAUNCH("attend_decode_kernel");
    decode_merge_kernel<T, kD><<<unsigned(int64_t(d.a.B) * d.a.Hq * d.a.n), kD, 0, stream>>>(d);
    CCA_CUDA_CHECK_LAUNCH("decode_merge_kernel");
  });
  CCA_CUDA_CHECK(cudaFreeAsync(ws, stream));
}

}  // namespace cca::cuda

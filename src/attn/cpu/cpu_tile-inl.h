// The per-target pieces of the CPU attention shared by the forward (cpu_attend.cpp) and the
// backward (cpu_attend_bwd.cpp): rows of a segment as float32 blocks, the key blocks a tile of
// kBlockM queries visits in each segment with the mask of each block, the transposed query
// tile. Per-target header (see simd-inl.h).
#if defined(CCA_CPU_TILE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef CCA_CPU_TILE_INL_H_
#undef CCA_CPU_TILE_INL_H_
#else
#define CCA_CPU_TILE_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_tile.hpp"
#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace cca::cpu::HWY_NAMESPACE {

// Float32 rows [pos, pos + n) of one tensor of a segment: in place for float32, else converted
// into `buf` [n][D]. Returns the row pointer and sets `stride`.
inline const float* block_rows(const char* base, DType dt, int64_t row_stride, int64_t row,
                               int64_t n, int64_t D, float* buf, int64_t& stride) {
  const int64_t esize = dtype_size(dt);
  if (dt == DType::f32) {
    stride = row_stride;
    return reinterpret_cast<const float*>(base + row * row_stride * esize);
  }
  for (int64_t j = 0; j < n; ++j)
    load_row(base + (row + j) * row_stride * esize, dt, D, buf + j * D);
  stride = D;
  return buf;
}

// Asks for rows [row, row + n) of a segment's keys and values to be brought into L2 while the
// current block computes: rows of one head are H*D elements apart, too far apart for the
// hardware prefetchers once K and V outgrow L2 (full attention at long T). Always inlined: as a
// function of its own GCC 12 finds it free of side effects (prefetches do not count) and deletes
// its calls, as it did from this function's first version (9454b06) until the Highway port.
HWY_INLINE void prefetch_rows(const SegmentRows& seg, int64_t pos, int64_t n, int64_t D) {
  const int64_t kb = dtype_size(seg.k_dtype), vb = dtype_size(seg.v_dtype);
  for (int64_t j = 0; j < n; ++j) {
    const char* kr = seg.k + (pos - seg.pos0 + j) * seg.k_stride * kb;
    const char* vr = seg.v + (pos - seg.pos0 + j) * seg.v_stride * vb;
    for (int64_t off = 0; off < D * kb; off += 64) prefetch_l2(kr + off);
    for (int64_t off = 0; off < D * vb; off += 64) prefetch_l2(vr + off);
  }
}

// For a tile of nq queries that see vis[0..nq) (the rest of the kBlockM columns are padding),
// calls f(rows, k0, nk, masked, lo, hi) for every key block [k0, k0 + nk) of every segment s
// that the union of the queries' ranges covers, in increasing k0; lo/hi [kBlockM] are each
// query's range in segment s (empty for padding), `masked` says the block is not inside every
// query's range. `head` of query head h: h / group_size, or h for per-query-head core tokens.
template <class F>
void for_each_key_block(const KvSegment* const segs[kSegments], const VariantSpec& variant,
                        const Visible* vis, int64_t nq, int64_t b, int64_t h, int64_t group_size,
                        int64_t D, F&& f) {
  for (int s = 0; s < kSegments; ++s) {
    int64_t lo[kBlockM], hi[kBlockM];
    int64_t union_lo = INT64_MAX, union_hi = INT64_MIN, all_lo = INT64_MIN, all_hi = INT64_MAX;
    for (int i = 0; i < kBlockM; ++i) {
      if (i < nq) {
        segment_range(vis[i], s, lo[i], hi[i]);
      } else {
        lo[i] = hi[i] = 0;  // padding columns see nothing
        continue;
      }
      if (hi[i] <= lo[i]) {  // this query sees nothing here: every block needs the mask
        all_lo = INT64_MAX;
        continue;
      }
      union_lo = std::min(union_lo, lo[i]);
      union_hi = std::max(union_hi, hi[i]);
      all_lo = std::max(all_lo, lo[i]);
      all_hi = std::min(all_hi, hi[i]);
    }
    if (union_hi <= union_lo) continue;
    const int64_t head = (s == 0 && variant.pool_heads == PoolHeads::query) ? h : h / group_size;
    const SegmentRows rows(*segs[s], b, head);
    for (int64_t k0 = union_lo; k0 < union_hi; k0 += kBlockN) {
      const int64_t nk = std::min<int64_t>(kBlockN, union_hi - k0);
      // Padding columns (nq < kBlockM) need no mask: their results are never written out.
      const bool masked = k0 < all_lo || k0 + nk > all_hi;
      const int64_t next = k0 + nk;
      prefetch_rows(rows, next, std::min<int64_t>(kBlockN, union_hi - next), D);
      f(rows, k0, nk, masked, lo, hi);
    }
  }
}

// dst [D][kBlockM] = scale * rows r0 .. r0 + n - 1 of (batch b, head h) of `t` [B, T, H, D],
// transposed; columns n .. kBlockM - 1 are zero.
inline void load_transposed(const TensorView& t, int64_t b, int64_t r0, int64_t n, int64_t h,
                            float scale, float* dst) {
  const int64_t D = t.shape[3];
  for (int64_t x = 0; x < D * kBlockM; ++x) dst[x] = 0.f;
  float row[1024];  // D <= 1024, checked by the callers
  for (int64_t i = 0; i < n; ++i) {
    load_row(t.ptr(t.offset(b, r0 + i, h)), t.dtype, D, row);
    for (int64_t d = 0; d < D; ++d) dst[d * kBlockM + i] = row[d] * scale;
  }
}

// st [nk][kBlockM] (keys k0.. by query columns): -inf where key k0 + j is outside [lo[i], hi[i]).
inline void mask_block(float* st, int64_t k0, int64_t nk, const int64_t* lo, const int64_t* hi) {
  const DF d;
  const hn::RebindToSigned<DF> di;
  const int64_t N = int64_t(hn::Lanes(d));
  HWY_ALIGN int32_t lo_rel[kBlockM], hi_rel[kBlockM];
  for (int i = 0; i < kBlockM; ++i) {
    lo_rel[i] = int32_t(std::clamp<int64_t>(lo[i] - k0, 0, nk));
    hi_rel[i] = int32_t(std::clamp<int64_t>(hi[i] - k0, 0, nk));
  }
  const VF neg_inf = hn::Set(d, -INFINITY);
  for (int64_t c = 0; c < kBlockM; c += N) {
    const auto l = hn::Load(di, lo_rel + c), h = hn::Load(di, hi_rel + c);
    for (int32_t j = 0; j < int32_t(nk); ++j) {
      const auto vj = hn::Set(di, j);
      const auto in = hn::AndNot(hn::Lt(vj, l), hn::Lt(vj, h));  // l <= j < h
      float* sj = st + j * kBlockM + c;
      hn::Store(hn::IfThenElse(hn::RebindMask(d, in), hn::Load(d, sj), neg_inf), d, sj);
    }
  }
}

}  // namespace cca::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard

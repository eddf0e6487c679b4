// The per-layer decode cache for one variant: compressed for cca (core tokens + a raw window of
// at most s + g - 1 tokens), sinks + window for sliding/streaming/lminfinite, everything for full.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "cca/attention.hpp"

namespace cca {

// Fixed capacity of a cache: tokens in all, and tokens per append.
struct KvCacheCapacity {
  int64_t max_tokens = 0;  // 0: no fixed capacity (the stores grow)
  int64_t max_chunk = 0;   // tokens per append; 0 = max_tokens
};

// Bytes a cache of fixed `capacity` allocates (keys and values), without allocating: its stores
// (up to six: core, sink and raw keys and values) are one allocation, each at a 256-byte
// boundary, rounded up to a multiple of `granularity` bytes, the allocator's unit (cudaMalloc's
// is 2 MiB: kCudaAllocGranularity).
int64_t kv_cache_capacity_bytes(const VariantSpec& variant, int64_t batch, int64_t hq,
                                int64_t hkv, int64_t head_dim, DType dtype,
                                const KvCacheCapacity& capacity, int64_t granularity = 1);
// The unit in which cudaMalloc hands out device memory. With a cudaMalloc per store, the stores
// of a Llama-3-8B cca model's 128K-token caches took 3.50 GiB for 3.25 GiB of rows (H200,
// 2026-11-29, docs/perf.md); in one allocation per layer they come to 3.31 GiB (computed).
constexpr int64_t kCudaAllocGranularity = int64_t(2) << 20;

class KvCache {
 public:
  // A cache for `batch` sequences that advance together. Inputs given to append() must have
  // this dtype; the cache stores keys and values in it.
  // With `capacity` (max_tokens > 0) every store is allocated once, here, at the size the
  // variant bounds it to (cca: floor(max_tokens/g) core tokens and a raw window of 2(s + g +
  // max_chunk) rows), and append() never allocates: it refuses a sequence past max_tokens or a
  // chunk longer than max_chunk. Without it the stores grow as tokens arrive.
  KvCache(const VariantSpec& variant, int64_t batch, int64_t hq, int64_t hkv, int64_t head_dim,
          DType dtype, RunOptions run = {}, const KvCacheCapacity& capacity = {});
  ~KvCache();
  KvCache(KvCache&&) noexcept;
  KvCache& operator=(KvCache&&) noexcept;

  // Append a chunk of n >= 1 tokens: q [B, n, Hq, D], k and v [B, n, Hkv, D] (post-RoPE) at
  // positions length() .. length()+n-1. Writes out [B, n, Hq, D] (and lse [B, Hq, n] float32 if
  // given): exactly the rows a one-shot prefill of the whole sequence would give.
  void append(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
              const TensorView& lse = {});

  int64_t length() const;       // tokens appended so far
  int64_t core_tokens() const;  // core tokens held
  int64_t raw_tokens() const;   // raw tokens held (window and sinks)
  int64_t memory_bytes() const; // bytes of keys and values held
  int64_t allocated_bytes() const;  // bytes of the stores as allocated
  DType dtype() const;
  // Bytes a full (uncompressed) cache would hold for the same tokens.
  int64_t full_cache_bytes() const;
  const VariantSpec& variant() const;

  // CUDA-graph decode (kv_cache_decode_step): true when the next one-token step can run with the
  // same launch arguments as the one before it: a fixed-capacity cache on the cuda backend whose
  // raw window will not move and whose sinks are full.
  bool next_step_replayable() const;
  // The host bookkeeping of one token appended by a replay of a captured kv_cache_decode_step
  // (launches nothing). Requires next_step_replayable().
  void advance_replayed();

  struct Impl;  // opaque: kv_cache.cpp

 private:
  std::unique_ptr<Impl> impl_;
  friend void kv_cache_append_batch(const std::vector<KvCache*>& caches, const TensorView& q,
                                    const TensorView& k, const TensorView& v,
                                    const TensorView& out, const TensorView& lse);
  friend void kv_cache_decode_step(const std::vector<KvCache*>& caches, const TensorView& q,
                                   const TensorView& k, const TensorView& v,
                                   const TensorView& out, const int32_t* positions);
};

// One step for several sequences at different lengths, each in its own cache (batch 1; all with
// the same variant, heads, head dim, dtype and backend): row s of q [S, n, Hq, D] and k, v
// [S, n, Hkv, D] is appended to caches[s], and out [S, n, Hq, D] (lse [S, Hq, n] if given) gets
// exactly what caches[s]->append would write. The attention of all S sequences runs as one
// batched backend call (on the GPU, one split-KV launch that splits long sequences further).
void kv_cache_append_batch(const std::vector<KvCache*>& caches, const TensorView& q,
                           const TensorView& k, const TensorView& v, const TensorView& out,
                           const TensorView& lse = {});

// kv_cache_append_batch for one token per sequence (n = 1) whose kernels read sequence s's
// position from positions[s] (device int32, equal to caches[s]->length()) instead of taking it
// as an argument: the copy of the new key and value, the pooling of a group the token completes
// and the attention are launched with the same arguments at every step while each cache's
// next_step_replayable() holds, so the step can be captured in a CUDA graph once and replayed
// (then advance_replayed() on each cache). Needs that condition now.
void kv_cache_decode_step(const std::vector<KvCache*>& caches, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& out,
                          const int32_t* positions);

}  // namespace cca

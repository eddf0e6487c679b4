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

// Bytes a cache of fixed `capacity` allocates (keys and values), without allocating.
int64_t kv_cache_capacity_bytes(const VariantSpec& variant, int64_t batch, int64_t hq,
                                int64_t hkv, int64_t head_dim, DType dtype,
                                const KvCacheCapacity& capacity);

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

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  friend void kv_cache_append_batch(const std::vector<KvCache*>& caches, const TensorView& q,
                                    const TensorView& k, const TensorView& v,
                                    const TensorView& out, const TensorView& lse);
};

// One step for several sequences at different lengths, each in its own cache (batch 1; all with
// the same variant, heads, head dim, dtype and backend): row s of q [S, n, Hq, D] and k, v
// [S, n, Hkv, D] is appended to caches[s], and out [S, n, Hq, D] (lse [S, Hq, n] if given) gets
// exactly what caches[s]->append would write. The attention of all S sequences runs as one
// batched backend call (on the GPU, one split-KV launch that splits long sequences further).
void kv_cache_append_batch(const std::vector<KvCache*>& caches, const TensorView& q,
                           const TensorView& k, const TensorView& v, const TensorView& out,
                           const TensorView& lse = {});

}  // namespace cca

/* The C API of the cca library: attention forward and backward and the decode cache over plain
 * C types, so that any language can bind to libcca.so (the Python package does, through ctypes).
 * It is a thin layer over the C++ API (attention.hpp, kv_cache.hpp); docs/python.md describes it.
 *
 * Conventions:
 * - Every function that can fail returns a cca_status. On failure nothing was written to any
 *   output, and cca_last_error() gives a message naming the bad value (per thread, valid until
 *   the next failing call on that thread).
 * - Attention tensors are [B, T, H, D] with strides in elements and a contiguous last dimension;
 *   lse is float32 [B, Hq, T]. A NULL tensor pointer, or one with data == NULL, means "absent"
 *   where an argument is optional.
 * - Device tensors (CCA_DEVICE_CUDA) run on the cuda backend, in cca_run.stream (a cudaStream_t;
 *   NULL = the default stream) on the calling thread's current CUDA device.
 */
#ifndef CCA_C_API_H
#define CCA_C_API_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define CCA_API __attribute__((visibility("default")))
#else
#define CCA_API
#endif

/* Bumped when a struct layout or a signature below changes. */
#define CCA_C_API_VERSION 1

typedef enum {
  CCA_OK = 0,
  CCA_ERROR_INVALID = 1,       /* bad argument, or a backend that cannot run it here */
  CCA_ERROR_OUT_OF_MEMORY = 2, /* host or device allocation failed */
  CCA_ERROR_INTERNAL = 3       /* any other failure (a bug: please report the message) */
} cca_status;

typedef enum { CCA_DTYPE_F32 = 0, CCA_DTYPE_F16 = 1, CCA_DTYPE_BF16 = 2 } cca_dtype;
typedef enum { CCA_DEVICE_CPU = 0, CCA_DEVICE_CUDA = 1 } cca_device;
typedef enum {
  CCA_VARIANT_FULL = 0,
  CCA_VARIANT_SLIDING = 1,
  CCA_VARIANT_STREAMING = 2,
  CCA_VARIANT_LMINFINITE = 3,
  CCA_VARIANT_CCA = 4
} cca_variant_kind;
typedef enum { CCA_POOL_CCA = 0, CCA_POOL_MEAN = 1, CCA_POOL_MAX = 2 } cca_pool_mode;
typedef enum { CCA_POOL_HEADS_KV = 0, CCA_POOL_HEADS_QUERY = 1 } cca_pool_heads;
typedef enum {
  CCA_BACKEND_AUTO = 0, /* cuda for device tensors, else cpu */
  CCA_BACKEND_REF = 1,
  CCA_BACKEND_CPU = 2,
  CCA_BACKEND_CUDA = 3
} cca_backend;

/* A strided view of up to 4 dimensions; enum-typed fields are int32_t for a fixed layout. */
typedef struct {
  void* data;
  int32_t dtype;  /* cca_dtype */
  int32_t device; /* cca_device */
  int32_t ndim;
  int32_t reserved; /* 0 */
  int64_t shape[4];
  int64_t stride[4]; /* in elements */
} cca_tensor;

/* The attention variant (docs/semantics.md); fields a variant does not use are ignored. */
typedef struct {
  int32_t kind;       /* cca_variant_kind */
  int32_t pool;       /* cca_pool_mode (cca only) */
  int32_t pool_heads; /* cca_pool_heads (cca only) */
  int32_t reserved;   /* 0 */
  int64_t group;      /* g (cca) */
  int64_t window;     /* s for cca, the window of sliding/streaming/lminfinite */
  int64_t sinks;      /* streaming sinks, lminfinite global branch */
  double scale;       /* softmax scale; NaN = 1/sqrt(D) */
} cca_variant;

typedef struct {
  int32_t backend;       /* cca_backend */
  int32_t threads;       /* CPU threads; 0 = all */
  int32_t deterministic; /* backward: bit-identical gradients for identical inputs */
  int32_t reserved;      /* 0 */
  void* stream;          /* cudaStream_t for the cuda backend, NULL = default stream */
} cca_run;

CCA_API int32_t cca_c_api_version(void);
/* The message of the last failing call on this thread ("" if none). */
CCA_API const char* cca_last_error(void);
/* CCA_OK if `backend` (cca_backend) can run here; else CCA_ERROR_INVALID and the reason in
 * cca_last_error() (e.g. a build without CUDA, no GPU). */
CCA_API cca_status cca_backend_available(int32_t backend);

/* Prefill forward: out [B, T, Hq, D] = attention of q [B, T, Hq, D] over k, v [B, T, Hkv, D];
 * lse (optional) float32 [B, Hq, T]. `run` may be NULL (defaults). */
CCA_API cca_status cca_attn_fwd(const cca_tensor* q, const cca_tensor* k, const cca_tensor* v,
                                const cca_tensor* out, const cca_tensor* lse,
                                const cca_variant* variant, const cca_run* run);

/* Backward of cca_attn_fwd: from q, k, v, the forward's out and lse and the output gradient
 * dout, writes dq, dk, dv (shapes of q, k, v). */
CCA_API cca_status cca_attn_bwd(const cca_tensor* q, const cca_tensor* k, const cca_tensor* v,
                                const cca_tensor* out, const cca_tensor* lse,
                                const cca_tensor* dout, const cca_tensor* dq,
                                const cca_tensor* dk, const cca_tensor* dv,
                                const cca_variant* variant, const cca_run* run);

/* The per-layer decode cache (kv_cache.hpp): compressed for cca (core tokens + a raw window of
 * at most s + g - 1 tokens). `batch` sequences advance together; keys and values are stored in
 * `dtype` on `device`. `run` (may be NULL) is kept for every append (backend, threads, stream). */
typedef struct cca_kv_cache cca_kv_cache;
CCA_API cca_status cca_kv_cache_create(const cca_variant* variant, int64_t batch, int64_t hq,
                                       int64_t hkv, int64_t head_dim, int32_t dtype,
                                       int32_t device, const cca_run* run,
                                       cca_kv_cache** cache);
/* Appends n >= 1 tokens: q [B, n, Hq, D], k, v [B, n, Hkv, D] (post-RoPE) at positions
 * length() .. length()+n-1; writes out [B, n, Hq, D] (and lse [B, Hq, n] if given): the rows a
 * one-shot prefill of the whole sequence would give. */
CCA_API cca_status cca_kv_cache_append(cca_kv_cache* cache, const cca_tensor* q,
                                       const cca_tensor* k, const cca_tensor* v,
                                       const cca_tensor* out, const cca_tensor* lse);
/* Tokens appended so far; core tokens and raw tokens held; bytes of keys and values held; the
 * bytes a full (uncompressed) cache would hold. -1 for a NULL cache. */
CCA_API int64_t cca_kv_cache_length(const cca_kv_cache* cache);
CCA_API int64_t cca_kv_cache_core_tokens(const cca_kv_cache* cache);
CCA_API int64_t cca_kv_cache_raw_tokens(const cca_kv_cache* cache);
CCA_API int64_t cca_kv_cache_memory_bytes(const cca_kv_cache* cache);
CCA_API int64_t cca_kv_cache_full_bytes(const cca_kv_cache* cache);
/* Frees the cache (NULL is allowed). */
CCA_API void cca_kv_cache_free(cca_kv_cache* cache);

#ifdef __cplusplus
}
#endif
#endif /* CCA_C_API_H */

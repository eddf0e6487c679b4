// The C API (include/cca/cca.h) over the C++ API: converts the plain structs, and turns every
// exception into a status code and a per-thread message, since none may cross the C boundary.
#include "cca/cca.h"

#include <cmath>
#include <exception>
#include <new>
#include <string>

#include "cca/attention.hpp"
#include "cca/error.hpp"
#include "cca/kv_cache.hpp"

struct cca_kv_cache {
  cca::KvCache cache;
};

namespace {

thread_local std::string last_error;

// Runs `body`, mapping what it throws to a status and recording the message.
template <class F>
cca_status guarded(F&& body) {
  try {
    body();
    last_error.clear();
    return CCA_OK;
  } catch (const cca::Error& e) {
    last_error = e.what();
    return CCA_ERROR_INVALID;
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
    return CCA_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    last_error = std::string("internal error: ") + e.what();
    return CCA_ERROR_INTERNAL;
  } catch (...) {
    last_error = "internal error: unknown exception";
    return CCA_ERROR_INTERNAL;
  }
}

// An enum value read from a C int, with an error naming the field when out of range.
template <class E>
E enum_field(int32_t value, int32_t count, const char* name) {
  cca::check(value >= 0 && value < count,
             std::string("invalid ") + name + " = " + std::to_string(value) + " (expected 0.." +
                 std::to_string(count - 1) + ")");
  return static_cast<E>(value);
}

cca::TensorView view(const cca_tensor* t, const char* name, bool optional = false) {
  cca::TensorView v;
  if (t == nullptr || t->data == nullptr) {
    cca::check(optional, std::string(name) + " is missing (null)");
    return v;
  }
  cca::check(t->ndim >= 1 && t->ndim <= 4, std::string(name) + ": ndim = " +
                                               std::to_string(t->ndim) + " (expected 1..4)");
  v.data = t->data;
  v.dtype = enum_field<cca::DType>(t->dtype, 3, (std::string(name) + ".dtype").c_str());
  v.device = enum_field<cca::Device>(t->device, 2, (std::string(name) + ".device").c_str());
  v.ndim = t->ndim;
  for (int i = 0; i < t->ndim; ++i) {
    v.shape[i] = t->shape[i];
    v.stride[i] = t->stride[i];
  }
  return v;
}

cca::VariantSpec variant_spec(const cca_variant* c) {
  cca::check(c != nullptr, "variant is missing (null)");
  cca::VariantSpec v;
  v.kind = enum_field<cca::VariantKind>(c->kind, 5, "variant kind");
  v.pool = enum_field<cca::PoolMode>(c->pool, 3, "pool");
  v.pool_heads = enum_field<cca::PoolHeads>(c->pool_heads, 2, "pool_heads");
  v.group = c->group;
  v.window = c->window;
  v.sinks = c->sinks;
  v.scale = c->scale;
  v.validate();
  return v;
}

cca::RunOptions run_options(const cca_run* c, int32_t* deterministic = nullptr) {
  cca::RunOptions r;
  if (deterministic) *deterministic = 0;
  if (c == nullptr) return r;
  r.backend = enum_field<cca::BackendKind>(c->backend, 4, "backend");
  cca::check(c->threads >= 0, "invalid threads = " + std::to_string(c->threads) +
                                  " (expected >= 0; 0 = all)");
  r.threads = c->threads;
  r.stream = c->stream;
  if (deterministic) *deterministic = c->deterministic;
  return r;
}

}  // namespace

extern "C" {

int32_t cca_c_api_version(void) { return CCA_C_API_VERSION; }

const char* cca_last_error(void) { return last_error.c_str(); }

cca_status cca_backend_available(int32_t backend) {
  return guarded([&] {
    const auto b = enum_field<cca::BackendKind>(backend, 4, "backend");
    const std::string why = cca::backend_unavailable_reason(b);
    cca::check(why.empty(), std::string("backend ") + cca::backend_name(b) + ": " + why);
  });
}

cca_status cca_attn_fwd(const cca_tensor* q, const cca_tensor* k, const cca_tensor* v,
                        const cca_tensor* out, const cca_tensor* lse, const cca_variant* variant,
                        const cca_run* run) {
  return guarded([&] {
    cca::AttnFwdParams p;
    p.q = view(q, "q");
    p.k = view(k, "k");
    p.v = view(v, "v");
    p.out = view(out, "out");
    p.lse = view(lse, "lse", true);
    p.variant = variant_spec(variant);
    p.run = run_options(run);
    cca::attn_fwd(p);
  });
}

cca_status cca_attn_bwd(const cca_tensor* q, const cca_tensor* k, const cca_tensor* v,
                        const cca_tensor* out, const cca_tensor* lse, const cca_tensor* dout,
                        const cca_tensor* dq, const cca_tensor* dk, const cca_tensor* dv,
                        const cca_variant* variant, const cca_run* run) {
  return guarded([&] {
    cca::AttnBwdParams p;
    p.q = view(q, "q");
    p.k = view(k, "k");
    p.v = view(v, "v");
    p.out = view(out, "out");
    p.lse = view(lse, "lse");
    p.dout = view(dout, "dout");
    p.dq = view(dq, "dq");
    p.dk = view(dk, "dk");
    p.dv = view(dv, "dv");
    p.variant = variant_spec(variant);
    int32_t deterministic = 0;
    p.run = run_options(run, &deterministic);
    p.deterministic = deterministic != 0;
    cca::attn_bwd(p);
  });
}

cca_status cca_kv_cache_create(const cca_variant* variant, int64_t batch, int64_t hq,
                               int64_t hkv, int64_t head_dim, int32_t dtype, int32_t device,
                               const cca_run* run, cca_kv_cache** cache) {
  return guarded([&] {
    cca::check(cache != nullptr, "cache output pointer is missing (null)");
    *cache = nullptr;
    const cca::VariantSpec spec = variant_spec(variant);
    const auto dt = enum_field<cca::DType>(dtype, 3, "dtype");
    const auto dev = enum_field<cca::Device>(device, 2, "device");
    cca::RunOptions r = run_options(run);
    // The cache picks its backend from the options alone: automatic means "where the data is".
    if (r.backend == cca::BackendKind::automatic)
      r.backend = dev == cca::Device::cuda ? cca::BackendKind::cuda : cca::BackendKind::cpu;
    *cache = new cca_kv_cache{cca::KvCache(spec, batch, hq, hkv, head_dim, dt, r)};
  });
}

cca_status cca_kv_cache_append(cca_kv_cache* cache, const cca_tensor* q, const cca_tensor* k,
                               const cca_tensor* v, const cca_tensor* out, const cca_tensor* lse) {
  return guarded([&] {
    cca::check(cache != nullptr, "cache is missing (null)");
    cache->cache.append(view(q, "q"), view(k, "k"), view(v, "v"), view(out, "out"),
                        view(lse, "lse", true));
  });
}

int64_t cca_kv_cache_length(const cca_kv_cache* c) { return c ? c->cache.length() : -1; }
int64_t cca_kv_cache_core_tokens(const cca_kv_cache* c) { return c ? c->cache.core_tokens() : -1; }
int64_t cca_kv_cache_raw_tokens(const cca_kv_cache* c) { return c ? c->cache.raw_tokens() : -1; }
int64_t cca_kv_cache_memory_bytes(const cca_kv_cache* c) {
  return c ? c->cache.memory_bytes() : -1;
}
int64_t cca_kv_cache_full_bytes(const cca_kv_cache* c) {
  return c ? c->cache.full_cache_bytes() : -1;
}

void cca_kv_cache_free(cca_kv_cache* cache) { delete cache; }

}  // extern "C"

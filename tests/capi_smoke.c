/* The C API used from C (include/cca/cca.h is plain C): a forward whose answer is known, an
 * error that names the bad value and leaves the output untouched, and the decode cache. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cca/cca.h"

static int failures = 0;
#define EXPECT(cond, ...)                           \
  do {                                              \
    if (!(cond)) {                                  \
      fprintf(stderr, "FAILED %s: ", #cond);        \
      fprintf(stderr, __VA_ARGS__);                 \
      fprintf(stderr, "\n");                        \
      ++failures;                                   \
    }                                               \
  } while (0)

/* A contiguous float32 [1, T, H, D] host tensor. */
static cca_tensor tensor(float* data, int64_t T, int64_t H, int64_t D) {
  cca_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = CCA_DTYPE_F32;
  t.device = CCA_DEVICE_CPU;
  t.ndim = 4;
  t.shape[0] = 1, t.shape[1] = T, t.shape[2] = H, t.shape[3] = D;
  t.stride[0] = T * H * D, t.stride[1] = H * D, t.stride[2] = D, t.stride[3] = 1;
  return t;
}

int main(void) {
  enum { T = 6, D = 4 };
  float q[T * D], k[T * D], v[T * D], out[T * D];
  for (int i = 0; i < T * D; ++i) {
    q[i] = (float)sin(i), k[i] = (float)cos(i), v[i] = (float)(i % 7) - 3.f;
    out[i] = NAN;
  }
  cca_tensor tq = tensor(q, T, 1, D), tk = tensor(k, T, 1, D), tv = tensor(v, T, 1, D),
             to = tensor(out, T, 1, D);
  cca_variant var = {CCA_VARIANT_CCA, CCA_POOL_CCA, CCA_POOL_HEADS_KV, 0, 2, 3, 0, NAN};
  cca_run run = {CCA_BACKEND_CPU, 1, 0, 0, NULL};

  EXPECT(cca_c_api_version() == CCA_C_API_VERSION, "version %d", cca_c_api_version());

  /* Bad input: an error naming the value, and nothing written. */
  var.group = 0;
  EXPECT(cca_attn_fwd(&tq, &tk, &tv, &to, NULL, &var, &run) == CCA_ERROR_INVALID, "group 0");
  EXPECT(strstr(cca_last_error(), "group = 0") != NULL, "message: %s", cca_last_error());
  EXPECT(isnan(out[0]), "output written on error");
  var.group = 2;
  var.kind = 9;
  EXPECT(cca_attn_fwd(&tq, &tk, &tv, &to, NULL, &var, &run) == CCA_ERROR_INVALID, "kind 9");
  EXPECT(strstr(cca_last_error(), "variant kind = 9") != NULL, "message: %s", cca_last_error());
  var.kind = CCA_VARIANT_CCA;
  EXPECT(cca_attn_fwd(NULL, &tk, &tv, &to, NULL, &var, &run) == CCA_ERROR_INVALID, "null q");
  EXPECT(strstr(cca_last_error(), "q is missing") != NULL, "message: %s", cca_last_error());

  /* Position 0 sees only itself: its output is v[0]. */
  EXPECT(cca_attn_fwd(&tq, &tk, &tv, &to, NULL, &var, &run) == CCA_OK, "%s", cca_last_error());
  for (int d = 0; d < D; ++d) EXPECT(out[d] == v[d], "out[0][%d] = %g, v = %g", d, out[d], v[d]);

  /* The decode cache, token by token, gives the prefill's rows. */
  cca_kv_cache* cache = NULL;
  EXPECT(cca_kv_cache_create(&var, 1, 1, 1, D, CCA_DTYPE_F32, CCA_DEVICE_CPU, &run, &cache) ==
             CCA_OK, "%s", cca_last_error());
  float step[D];
  for (int t = 0; t < T && cache; ++t) {
    cca_tensor sq = tensor(q + t * D, 1, 1, D), sk = tensor(k + t * D, 1, 1, D),
               sv = tensor(v + t * D, 1, 1, D), so = tensor(step, 1, 1, D);
    EXPECT(cca_kv_cache_append(cache, &sq, &sk, &sv, &so, NULL) == CCA_OK, "%s",
           cca_last_error());
    for (int d = 0; d < D; ++d)
      EXPECT(fabsf(step[d] - out[t * D + d]) < 1e-5f, "t %d d %d: %g vs %g", t, d, step[d],
             out[t * D + d]);
  }
  EXPECT(cca_kv_cache_length(cache) == T, "length %lld", (long long)cca_kv_cache_length(cache));
  EXPECT(cca_kv_cache_core_tokens(cache) == T / 2, "core tokens");
  cca_kv_cache_free(cache);
  EXPECT(cca_kv_cache_length(NULL) == -1, "null cache");

  if (failures == 0) printf("capi_smoke: all checks passed\n");
  return failures == 0 ? 0 : 1;
}

// The attention variants: which keys a query sees (see docs/semantics.md).
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

namespace cca {

enum class VariantKind : uint8_t { full, sliding, streaming, lminfinite, cca };
enum class PoolMode : uint8_t { cca, mean, max };
enum class PoolHeads : uint8_t { kv, query };

// A variant and its parameters. Fields a variant does not use are ignored.
//   full                       keys 0..t
//   sliding(window)            keys t-window+1..t
//   streaming(sinks, window)   keys 0..sinks-1 and t-window+1..t   (StreamingLLM)
//   lminfinite(sinks, window)  the same mask: global branch `sinks`, local branch `window`
//   cca(group, window, pool, pool_heads)  core tokens of groups before the local window + raw
//                              keys of the local window (about `window` tokens)
struct VariantSpec {
  VariantKind kind = VariantKind::cca;
  int64_t group = 16;    // g, cca only
  int64_t window = 1024; // s for cca, the window for sliding/streaming/lminfinite
  int64_t sinks = 4;     // streaming sinks, lminfinite global branch
  PoolMode pool = PoolMode::cca;
  PoolHeads pool_heads = PoolHeads::kv;
  double scale = NAN;    // softmax scale; NaN means 1/sqrt(D)

  static VariantSpec full() { return VariantSpec{VariantKind::full}; }
  static VariantSpec sliding(int64_t w) { VariantSpec v{VariantKind::sliding}; v.window = w; return v; }
  static VariantSpec streaming(int64_t n_sink, int64_t w) {
    VariantSpec v{VariantKind::streaming}; v.sinks = n_sink; v.window = w; return v;
  }
  static VariantSpec lminfinite(int64_t n_global, int64_t n_local) {
    VariantSpec v{VariantKind::lminfinite}; v.sinks = n_global; v.window = n_local; return v;
  }
  static VariantSpec cca(int64_t g, int64_t s, PoolMode pool = PoolMode::cca,
                         PoolHeads heads = PoolHeads::kv) {
    VariantSpec v{VariantKind::cca}; v.group = g; v.window = s; v.pool = pool; v.pool_heads = heads;
    return v;
  }

  bool has_core() const { return kind == VariantKind::cca; }
  bool has_sinks() const { return kind == VariantKind::streaming || kind == VariantKind::lminfinite; }
  // Softmax scale for head dim `head_dim`.
  float scale_for(int64_t head_dim) const {
    return std::isnan(scale) ? float(1.0 / std::sqrt(double(head_dim))) : float(scale);
  }
  // Heads of the core tokens: Hkv, or Hq with pool_heads = query.
  int64_t core_heads(int64_t hq, int64_t hkv) const {
    return pool_heads == PoolHeads::query ? hq : hkv;
  }
  // Throws cca::Error naming the first bad parameter.
  void validate() const;
  std::string describe() const;
};

const char* variant_name(VariantKind k);
const char* pool_name(PoolMode p);
const char* pool_heads_name(PoolHeads h);
// Parse names as the CLI spells them; throw cca::Error listing the choices.
VariantKind parse_variant(const std::string& s);
PoolMode parse_pool(const std::string& s);
PoolHeads parse_pool_heads(const std::string& s);

}  // namespace cca

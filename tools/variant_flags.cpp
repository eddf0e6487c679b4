#include "variant_flags.hpp"

#include <CLI/CLI.hpp>

namespace cca {

VariantSpec VariantFlags::spec_for(VariantKind kind) const {
  VariantSpec v;  // a variant ignores the parameters it does not use
  v.kind = kind;
  v.group = group;
  v.window = window;
  v.sinks = sinks;
  v.pool = parse_pool(pool);
  v.pool_heads = parse_pool_heads(pool_heads);
  v.validate();
  return v;
}

VariantSpec VariantFlags::spec() const { return spec_for(parse_variant(variant)); }

void add_variant_flags(CLI::App* cmd, VariantFlags& f, bool with_variant) {
  if (with_variant)
    f.variant_opt =
        cmd->add_option("--variant", f.variant,
                        "attention: full, sliding, streaming, lminfinite or cca")
            ->capture_default_str();
  f.group_opt = cmd->add_option("--group", f.group, "cca group size g")->capture_default_str();
  f.window_opt =
      cmd->add_option("--window", f.window,
                      "cca local window s; the window of sliding/streaming; lminfinite's local "
                      "branch")
          ->capture_default_str();
  f.sinks_opt = cmd->add_option("--sinks", f.sinks, "streaming sinks; lminfinite's global branch")
                    ->capture_default_str();
  f.pool_opt =
      cmd->add_option("--pool", f.pool, "cca pooling: cca, mean or max")->capture_default_str();
  f.pool_heads_opt =
      cmd->add_option("--pool-heads", f.pool_heads, "cca pooling per kv head or per query head")
          ->capture_default_str();
}

}  // namespace cca

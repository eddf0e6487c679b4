// The attention-variant flags every subcommand shares: --variant --group --window --sinks --pool
// --pool-heads, and their translation into a validated VariantSpec.
#pragma once
#include <cstdint>
#include <string>

#include "cca/variant.hpp"

namespace CLI {
class App;
class Option;
}

namespace cca {

struct VariantFlags {
  std::string variant = variant_name(VariantSpec{}.kind);
  int64_t group = VariantSpec{}.group;
  int64_t window = VariantSpec{}.window;
  int64_t sinks = VariantSpec{}.sinks;
  std::string pool = pool_name(VariantSpec{}.pool);
  std::string pool_heads = pool_heads_name(VariantSpec{}.pool_heads);

  VariantSpec spec() const;                      // the --variant, validated
  VariantSpec spec_for(VariantKind kind) const;  // another variant with these parameters

  // The flags as parsed (add_variant_flags sets them; null where a command lacks the flag):
  // what was given on the command line wins over a checkpoint's defaults.
  const CLI::Option *variant_opt = nullptr, *group_opt = nullptr, *window_opt = nullptr,
                    *sinks_opt = nullptr, *pool_opt = nullptr, *pool_heads_opt = nullptr;
};

// Adds --group --window --sinks --pool --pool-heads, and --variant when `with_variant`.
void add_variant_flags(CLI::App* cmd, VariantFlags& f, bool with_variant);

}  // namespace cca

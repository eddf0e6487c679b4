// Placeholder for attn_bwd until branch bwd10 (issue 10, part 1) is merged: it lets libcca.so
// link and reports clearly that this build has no backward. The merge deletes this file.
#include "cca/attention.hpp"
#include "cca/error.hpp"

namespace cca {

void attn_bwd(const AttnBwdParams&) {
  throw Error("attn_bwd: this build has no attention backward yet (issue 10, branch bwd10)");
}

}  // namespace cca

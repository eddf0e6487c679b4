// The policy's inverse for the backward over key tiles (policy.hpp: query_tiles_seeing,
// sees_all), which the cuda dK/dV kernel uses to pick and mask its steps, against brute force
// over the reference's dense masks (ref_math.hpp, written from the contract independently of
// policy.hpp): every variant, core tokens and raw keys, tile sizes that divide T and that do
// not, windows and sink counts smaller and larger than a tile.
#include <gtest/gtest.h>

#include <vector>

#include "policy.hpp"
#include "ref/ref_math.hpp"
#include "test_util.hpp"

namespace cca::test {
namespace {

// Whether query t sees key x of the core tokens (core) or of the raw keys, by the contract.
bool sees(const VariantSpec& v, bool core, int64_t t, int64_t x) {
  return core ? x < ref::core_visible(v, t) : ref::raw_visible(v, t, x);
}

TEST(Policy, QueryTilesSeeingKeyTilesMatchTheMasks) {
  std::vector<VariantSpec> variants = all_variants(4, 8);
  for (const VariantSpec& v : all_variants(3, 70)) variants.push_back(v);
  variants.push_back(VariantSpec::streaming(70, 30));   // sinks past a key tile
  variants.push_back(VariantSpec::lminfinite(5, 100));  // window past a query tile
  variants.push_back(VariantSpec::cca(1, 1));
  int checked_all = 0;
  for (const VariantSpec& v : variants)
    for (int64_t T : {1, 5, 63, 64, 65, 200, 333})
      for (int64_t kM : {32, 64})
        for (int64_t kN : {16, 64})
          for (bool core : {false, true}) {
            SCOPED_TRACE(variant_tag(v) + " T " + std::to_string(T) + " kM " +
                         std::to_string(kM) + " kN " + std::to_string(kN) +
                         (core ? " core" : " raw"));
            const int64_t keys = core ? ref::core_visible(v, T - 1) : T;
            const int64_t n = (T + kM - 1) / kM;
            for (int64_t k0 = 0; k0 < keys; k0 += kN) {
              const int64_t k1 = std::min(k0 + kN, keys);
              const QueryTiles got = query_tiles_seeing(v, T, kM, core, k0, k1);
              ASSERT_TRUE(0 <= got.lo0 && got.lo0 <= got.hi0 && got.hi0 <= got.lo1 &&
                          got.lo1 <= got.hi1 && got.hi1 == n)
                  << "k0 " << k0 << ": [" << got.lo0 << ", " << got.hi0 << ") [" << got.lo1
                  << ", " << got.hi1 << ")";
              std::vector<int64_t> listed;
              for (int64_t j = 0; j < got.count(); ++j) listed.push_back(got.tile(j));
              std::vector<int64_t> want;
              for (int64_t i = 0; i < n; ++i) {
                const int64_t t0 = i * kM, t1 = std::min(T, t0 + kM) - 1;
                bool any = false, all = true;
                for (int64_t t = t0; t <= t1; ++t)
                  for (int64_t x = k0; x < k1; ++x) {
                    const bool s = sees(v, core, t, x);
                    any = any || s;
                    all = all && s;
                  }
                if (any) want.push_back(i);
                // sees_all may say no where every pair is visible (the step is then masked,
                // which costs time only), never yes where one is not.
                if (sees_all(v, core, k0, k1, t0, t1)) {
                  EXPECT_TRUE(all) << "k0 " << k0 << " query tile " << i;
                  ++checked_all;
                }
              }
              EXPECT_EQ(listed, want) << "k0 " << k0;
            }
          }
  EXPECT_GT(checked_all, 1000);  // the unmasked fast path is exercised
}

}  // namespace
}  // namespace cca::test

// The backend-consistency driver's cases and checks (test_consistency.cpp), shared with the
// GPU suites that run the same checks on larger shapes (test_cuda_backward.cpp).
#pragma once
#include <ostream>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace cca::test {

struct Case {
  VariantSpec variant;
  int64_t B, T, Hq, Hkv, D;
  DType dtype;
  Layout layout;
  int threads;
  std::string name;
};

inline void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// A name of the case's parameters (letters, digits, underscores), also its random seed.
std::string case_name(const Case& c);

// The grid of test_consistency.cpp: every variant, pool and pool_heads crossed with lengths and
// dtypes, other axes cycling pairwise (350 cases).
std::vector<Case> make_grid();

// attn_fwd of case `c` on every backend of `backends` (ref excepted) against the float64
// reference; `ran` counts the backends that ran it (a backend whose unsupported() declines the
// case is noted and skipped).
void check_case(const Case& c, const std::vector<BackendKind>& backends, int& ran);

// The same for attn_bwd: dq, dk and dv against the reference's (grad mode).
void check_grad_case(const Case& c, const std::vector<BackendKind>& backends, int& ran);

}  // namespace cca::test

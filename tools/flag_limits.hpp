// Bounds on numeric flags that size work: a value far beyond any machine is refused by name
// instead of starting thousands of threads or allocating for it.
#pragma once
#include <string>

#include "cca/error.hpp"

namespace cca {

constexpr int kMaxThreadsFlag = 4096;

// --threads: 0 (all cores) to kMaxThreadsFlag.
inline void check_threads_flag(int threads) {
  check(threads >= 0 && threads <= kMaxThreadsFlag,
        "invalid --threads " + std::to_string(threads) + ": must be in [0, " +
            std::to_string(kMaxThreadsFlag) + "] (0 = all cores)");
}

}  // namespace cca

// libFuzzer entry point for one target of fuzz/targets.hpp, chosen at compile time
// (CCA_FUZZ_TARGET=npy builds fuzz_npy); see scripts/fuzz.sh and docs/reliability.md.
#include "targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return cca::fuzz::CCA_FUZZ_TARGET(data, size);
}

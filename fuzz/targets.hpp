// The fuzz targets: one function per parser of untrusted bytes. Each runs one input through the
// parser and checks what a successful parse promises; a cca::Error (a refused input) is the
// expected way to fail. Anything else (another exception, a sanitizer report, abort() on a
// broken promise) is a bug. fuzz/harness.cpp turns each into a libFuzzer binary fuzz_<name>;
// tests/test_reliability.cpp replays tests/data/fuzz/<name>/* through them in every build.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace cca::fuzz {

int npy(const uint8_t* data, size_t size);                // a .npy file
int safetensors(const uint8_t* data, size_t size);        // a .safetensors file
int safetensors_index(const uint8_t* data, size_t size);  // model.safetensors.index.json
int config(const uint8_t* data, size_t size);             // config.json
int generation_config(const uint8_t* data, size_t size);  // generation_config.json
// tokenizer.json, optionally followed by a NUL byte and a text to encode.
int tokenizer(const uint8_t* data, size_t size);
int tokenizer_config(const uint8_t* data, size_t size);   // beside a fixed tokenizer.json
int token_ids(const uint8_t* data, size_t size);          // a --ids file
// A cca serve request body: the first byte picks the endpoint (odd: chat, rendered with a fixed
// template), the rest is the body.
int server_request(const uint8_t* data, size_t size);

struct Target {
  const char* name;
  int (*run)(const uint8_t*, size_t);
};
const std::vector<Target>& targets();

}  // namespace cca::fuzz

// Reading files that come from outside: model directories downloaded from the internet, arrays
// and prompts a user points cca at. One reader that refuses anything but a regular file of
// bounded size, JSON parsing with bounded nesting, and excerpts that keep untrusted values short
// in error messages. docs/reliability.md lists the limits and what the fuzzers found.
#pragma once
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>

namespace cca::model {

// Limits on what is read. Real files are far below them: a config.json is a few KB, the largest
// tokenizer.json files about 35 MB.
constexpr int64_t kMaxConfigBytes = int64_t(16) << 20;    // config.json, generation_config.json
constexpr int64_t kMaxJsonFileBytes = int64_t(512) << 20;  // tokenizer(_config).json, the index
constexpr int64_t kMaxTextFileBytes = int64_t(1) << 30;    // prompts, token-id files
constexpr int kMaxJsonDepth = 64;                          // nesting of arrays and objects

// The whole regular file at `path`. cca::Error naming `what` and the path when it does not
// exist, is not a regular file (a directory; a FIFO or a device, whose reads may block forever
// or never end), is larger than `max_bytes`, or cannot be read.
std::string read_text_file(const std::string& path, const std::string& what,
                           int64_t max_bytes = kMaxTextFileBytes);

// Parses untrusted JSON. cca::Error "<source>: ..." for invalid JSON (the parser's message,
// shortened), nesting deeper than kMaxJsonDepth (checked before the document is built: copying,
// comparing and printing a JSON value recurse once per level), or a number out of range (1e400).
nlohmann::json parse_json(std::string_view text, const std::string& source);

// `s` for an error message: control bytes escaped as \xNN, at most `max_bytes` of that (cut at a
// character boundary) and, when cut, the length of `s` appended: "abc... (12345 bytes)".
std::string excerpt(std::string_view s, size_t max_bytes = 80);
// A JSON value for an error message: its compact text through excerpt().
std::string json_excerpt(const nlohmann::json& v, size_t max_bytes = 80);

}  // namespace cca::model

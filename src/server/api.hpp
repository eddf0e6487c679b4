// The OpenAI-compatible request and response JSON of cca serve: requests of /v1/completions and
// /v1/chat/completions checked field by field into a Request (an ApiError naming the field
// otherwise), and the response, stream-chunk and error bodies. No HTTP and no engine here.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "model/sampler.hpp"

namespace cca::server {

using Json = nlohmann::ordered_json;

// A refused request: the HTTP status and OpenAI's error object ({"error": {message, type,
// param, code}}).
struct ApiError : std::runtime_error {
  ApiError(int status, std::string message, std::string param = {}, std::string code = {},
           std::string type = {});
  int status;
  std::string type, param, code;
  Json body() const;
};

enum class Endpoint : uint8_t { completions, chat };

struct Request {
  Endpoint endpoint = Endpoint::completions;
  std::string model;
  std::string prompt;                            // completions: the prompt text
  std::optional<std::vector<int32_t>> prompt_ids;  // completions: a prompt of token ids
  Json messages;                                 // chat: [{role, content (a string)}, ...]
  std::optional<int64_t> max_tokens;             // max_tokens / max_completion_tokens
  model::SamplingRequest sampling;
  bool seed_given = false;
  std::vector<std::string> stop;
  bool stream = false, include_usage = false;
  bool ignore_eos = false;
  int top_logprobs = -1;  // -1: no logprobs; else the chosen token's and this many others'
};

// Limits on a request (besides the HTTP layer's body size).
constexpr size_t kMaxStops = 16;
constexpr size_t kMaxStopBytes = 1024;
constexpr int kMaxTopLogprobs = 20;

// Parses and checks a request body. Unknown fields are ignored; known OpenAI fields are
// checked for their type, and those this server does not implement (n > 1, tools, penalties,
// logit_bias, echo, ...) are refused when they ask for something.
Request parse_request(Endpoint endpoint, std::string_view body);

// OpenAI's finish_reason for an engine stop reason ("stop token", "stop string",
// "max new tokens", "max context").
const char* finish_reason(const std::string& stop_reason);

// One generated token's log-probability entry, as the response shapes need it.
struct TokenInfo {
  std::string text;  // the token alone, decoded
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;
};

struct Completion {
  std::string id, model;
  int64_t created = 0;
  std::string text;
  std::string finish_reason;  // "" while streaming
  int64_t prompt_tokens = 0, completion_tokens = 0;
  std::vector<TokenInfo> logprobs;  // with Request::top_logprobs >= 0
  size_t text_offset = 0;           // completions' logprobs.text_offset base
};

// The whole (non-streaming) response.
Json response_body(const Request& r, const Completion& c);
// A stream chunk carrying `delta` (text since the last chunk) and the logprobs of the tokens
// since then; `first` adds the chat role; `finish` the finish_reason.
Json chunk_body(const Request& r, const Completion& c, const std::string& delta,
                const std::vector<TokenInfo>& lps, bool first, const std::string& finish);
// The final usage chunk (stream_options.include_usage).
Json usage_chunk(const Request& r, const Completion& c);

}  // namespace cca::server

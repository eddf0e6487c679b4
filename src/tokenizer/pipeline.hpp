// The stages of a tokenizer.json pipeline around the model: normalizers, pre-tokenizers,
// decoders and post-processors, each parsed from its JSON object. The semantics follow the
// Hugging Face tokenizers crate; unsupported component types are refused by name.
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace cca::tok::detail {

using Json = nlohmann::json;

// JSON access that throws cca::Error("tokenizer.json: <where>: ...") on a missing or mistyped
// field.
const Json& require(const Json& obj, const char* key, const std::string& where);
std::string get_string(const Json& obj, const char* key, const std::string& where);
bool get_bool(const Json& obj, const char* key, bool fallback, const std::string& where);
int64_t get_int(const Json& obj, const char* key, const std::string& where);
[[noreturn]] void fail(const std::string& where, const std::string& what);

// A piece of the input on its way through the pipeline: text still to be tokenized, or an added
// token already recognised (id >= 0).
struct Piece {
  std::string text;
  int32_t id = -1;
  bool at_start = false;  // begins at byte 0 of the input (Metaspace's prepend_scheme "first")
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& s) const = 0;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Splits (and may rewrite) every piece that is not an added token; the rest pass through.
  virtual void pre_tokenize(std::vector<Piece>& pieces) const = 0;
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Adds the special tokens of a single sequence where add_special is true.
  virtual void process(std::vector<int32_t>& ids, bool add_special) const = 0;
  // The special token placed before a single sequence (the bos token), if any.
  virtual std::optional<int32_t> leading_special() const { return std::nullopt; }
  // Every id process() may add.
  virtual std::vector<int32_t> special_ids() const { return {}; }
};

// Null JSON gives nullptr. `where` names the field in error messages.
std::unique_ptr<Normalizer> parse_normalizer(const Json& j, const std::string& where);
std::unique_ptr<PreTokenizer> parse_pre_tokenizer(const Json& j, const std::string& where);
std::unique_ptr<Decoder> parse_decoder(const Json& j, const std::string& where);
std::unique_ptr<PostProcessor> parse_post_processor(const Json& j, const std::string& where);

// The ByteLevel alphabet: byte -> the UTF-8 of its printable stand-in, and back (-1: not one).
const std::string& byte_to_unicode(uint8_t b);
int byte_from_unicode(char32_t cp);

}  // namespace cca::tok::detail

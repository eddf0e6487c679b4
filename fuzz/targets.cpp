#include "targets.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "cca/error.hpp"
#include "engine/engine.hpp"
#include "model/config.hpp"
#include "model/safetensors.hpp"
#include "npy.hpp"
#include "server/api.hpp"
#include "server/chat_template.hpp"
#include "tokenizer/tokenizer.hpp"

namespace cca::fuzz {
namespace {

// A broken promise of a successful parse: report it and abort, which libFuzzer records as a
// crash and the replay test as a death.
[[noreturn]] void broken(const char* what) {
  std::fprintf(stderr, "fuzz target: broken promise: %s\n", what);
  std::abort();
}
void expect(bool ok, const char* what) {
  if (!ok) broken(what);
}

constexpr size_t kMaxMessageBytes = 1000;

std::string_view text_of(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Runs `f`; a cca::Error is a refused input, the expected way to fail. Its message quotes
// untrusted values only as short excerpts, so it stays short whatever the input.
template <class F>
int refusing(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    if (std::strlen(e.what()) >= kMaxMessageBytes) {
      std::fprintf(stderr, "message: %.2000s\n", e.what());
      broken("a refusal's message is 1,000 bytes or longer");
    }
  }
  return 0;
}

// A small tokenizer for the tokenizer_config target: BPE with one merge and two special tokens.
constexpr const char* kTinyTokenizer = R"({
  "version": "1.0",
  "added_tokens": [
    {"id": 3, "content": "<s>", "special": true},
    {"id": 4, "content": "</s>", "special": true}],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [3], "tokens": ["<s>"]}}},
  "decoder": {"type": "ByteLevel"},
  "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}
})";

// Encodes and decodes with a loaded tokenizer; every id it gives must be one of its tokens.
void exercise(const tok::Tokenizer& t, std::string_view text) {
  for (const bool special : {true, false}) {
    std::vector<int32_t> ids;
    try {
      ids = t.encode(text, special);
    } catch (const Error&) {  // text that is not UTF-8
      return;
    }
    for (const int32_t id : ids) {
      expect(id >= 0 && id < t.vocab_size(), "an encoded id is outside vocab_size()");
      try {
        t.id_to_token(id);
      } catch (const Error&) {
        broken("an encoded id is not a token of the tokenizer");
      }
    }
    t.decode(ids, special);
  }
}

}  // namespace

int npy(const uint8_t* data, size_t size) {
  return refusing([&] {
    NpyArray a = parse_npy(std::as_bytes(std::span(data, size)), "fuzz.npy");
    expect(int64_t(a.data.size()) == a.numel() * dtype_size(a.dtype), "data size != shape");
    if (a.shape.empty() || a.shape.size() > 4) return;
    // What is read can be written back and reads the same.
    const std::vector<std::byte> bytes = encode_npy(a.view());
    const NpyArray b = parse_npy(bytes, "round-trip.npy");
    expect(b.shape == a.shape && b.dtype == a.dtype && b.data == a.data, "round trip differs");
  });
}

int safetensors(const uint8_t* data, size_t size) {
  return refusing([&] {
    for (const model::TensorInfo& t : model::parse_safetensors(data, int64_t(size), "fuzz")) {
      const auto* p = static_cast<const uint8_t*>(t.data);
      expect(p >= data && t.nbytes >= 0 && p + t.nbytes <= data + size, "tensor outside file");
      expect(t.nbytes == t.numel() * dtype_size(t.dtype), "nbytes != shape");
      if (t.nbytes > 0) expect(p[0] + p[t.nbytes - 1] >= 0, "unreachable");  // ASan checks reads
      t.shape_string();
    }
  });
}

int safetensors_index(const uint8_t* data, size_t size) {
  return refusing([&] {
    const auto placed = model::parse_safetensors_index(std::string(text_of(data, size)), "fuzz");
    for (const auto& [name, file] : placed)
      expect(!file.empty() && file.find('/') == std::string::npos && file != "..",
             "shard file outside the directory");
  });
}

int config(const uint8_t* data, size_t size) {
  return refusing([&] {
    const model::ModelConfig c = model::parse_model_config(std::string(text_of(data, size)), "fuzz");
    c.describe();
    try {
      c.validate();
    } catch (const Error&) {
      broken("a parsed config does not validate");
    }
  });
}

int generation_config(const uint8_t* data, size_t size) {
  return refusing([&] {
    const model::GenerationConfig g =
        model::parse_generation_config(std::string(text_of(data, size)), "fuzz");
    expect(g.temperature >= 0 && g.top_k >= 0 && g.top_p >= 0 && g.top_p <= 1,
           "a sampling value out of range");
    for (const int64_t id : g.eos_token_ids) expect(id >= 0, "negative eos id");
  });
}

int tokenizer(const uint8_t* data, size_t size) {
  const std::string_view all = text_of(data, size);
  const size_t nul = all.find('\0');
  const std::string_view json = all.substr(0, nul);
  const std::string_view text =
      nul == std::string_view::npos ? "Hello world! 123 <s> ünïcödé  tabs\tand\nlines" :
                                      all.substr(nul + 1);
  return refusing([&] {
    const tok::Tokenizer t = tok::Tokenizer::from_json(json);
    exercise(t, text);
  });
}

int tokenizer_config(const uint8_t* data, size_t size) {
  return refusing([&] {
    const tok::Tokenizer t = tok::Tokenizer::from_json(kTinyTokenizer, text_of(data, size));
    if (t.bos_id()) t.id_to_token(*t.bos_id());
    if (t.eos_id()) t.id_to_token(*t.eos_id());
    exercise(t, "abba ab");
  });
}

int token_ids(const uint8_t* data, size_t size) {
  return refusing([&] {
    constexpr int64_t kVocab = 128256;  // Llama 3's
    const model::TokenIds ids =
        engine::parse_token_ids(std::string(text_of(data, size)), "fuzz", kVocab);
    expect(!ids.empty(), "no ids");
    for (const int32_t id : ids) expect(id >= 0 && id < kVocab, "an id outside the vocabulary");
  });
}

int server_request(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool chat = data[0] & 1;
  const std::string_view body = text_of(data + 1, size - 1);
  try {
    const server::Request r =
        server::parse_request(chat ? server::Endpoint::chat : server::Endpoint::completions, body);
    expect(!r.max_tokens || *r.max_tokens >= 1, "max_tokens below 1");
    expect(r.stop.size() <= server::kMaxStops, "too many stop strings");
    for (const std::string& st : r.stop)
      expect(!st.empty() && st.size() <= server::kMaxStopBytes, "a stop string out of bounds");
    expect(r.top_logprobs >= -1 && r.top_logprobs <= server::kMaxTopLogprobs, "top_logprobs");
    expect(!r.sampling.temperature || (*r.sampling.temperature >= 0 && *r.sampling.temperature <= 100),
           "temperature out of range");
    expect(!r.sampling.top_p || (*r.sampling.top_p > 0 && *r.sampling.top_p <= 1), "top_p out of range");
    if (chat) {
      expect(r.messages.is_array() && !r.messages.empty(), "no messages");
      static const server::ChatTemplate tpl = server::ChatTemplate::from_text(
          "{% for m in messages %}{% if loop.first and m.role != 'system' %}<|sys|>{% endif %}"
          "<|{{ m['role'] }}|>{{ m.content | trim }}{% if m.name is defined %}({{ m.name }}){% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
          "fuzz template", {{"bos_token", "<s>"}});
      tpl.render(r.messages);
    }
  } catch (const server::ApiError& e) {
    expect(e.status >= 400 && e.status < 600, "an error status outside 4xx/5xx");
    if (std::strlen(e.what()) >= kMaxMessageBytes) {
      std::fprintf(stderr, "message: %.2000s\n", e.what());
      broken("a refusal's message is 1,000 bytes or longer");
    }
  }
  return 0;
}

const std::vector<Target>& targets() {
  static const std::vector<Target> all = {
      {"npy", npy},
      {"safetensors", safetensors},
      {"safetensors_index", safetensors_index},
      {"config", config},
      {"generation_config", generation_config},
      {"tokenizer", tokenizer},
      {"tokenizer_config", tokenizer_config},
      {"token_ids", token_ids},
      {"server_request", server_request},
  };
  return all;
}

}  // namespace cca::fuzz

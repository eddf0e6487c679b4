// A Hugging Face tokenizer.json tokenizer, without Python: BPE models with byte-level
// pre-tokenization (GPT-2, Llama-3, Qwen2 split regexes) or SentencePiece-style pieces
// (Metaspace, byte fallback, as in Llama-2), added and special tokens, post-processing templates
// and decoding. Ids match the `tokenizers` crate on the supported components; a component it does
// not implement is refused by name with cca::Error, never ignored.
//
// Supported components:
//   model          BPE (vocab, merges as "a b" or ["a", "b"], unk_token, fuse_unk, byte_fallback,
//                  ignore_merges, continuing_subword_prefix, end_of_word_suffix; no dropout)
//   normalizer     NFC, Prepend, Replace, Strip, Sequence
//   pre_tokenizer  Split (String/Regex, all behaviors, invert), ByteLevel, Metaspace, Digits,
//                  Sequence
//   post_processor TemplateProcessing (single sequence), ByteLevel, BertProcessing,
//                  RobertaProcessing, Sequence
//   decoder        ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence
// "truncation" and "padding" are ignored, as transformers ignores them for single encodes.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace cca::tok {

class Tokenizer {
 public:
  // Reads tokenizer.json. Where a tokenizer_config.json sits beside it, its "bos_token" and
  // "eos_token" name bos_id() and eos_id() (as in transformers). Throws cca::Error naming the
  // file and the field on a missing file, malformed JSON or an unsupported component.
  static Tokenizer from_file(const std::filesystem::path& path);
  // The same from the texts of tokenizer.json and, optionally, tokenizer_config.json.
  static Tokenizer from_json(std::string_view json,
                             std::optional<std::string_view> config_json = std::nullopt);

  // Token ids of UTF-8 `text`; add_special applies the post-processor (e.g. the bos token).
  // Added/special token strings in the text are always recognised. Invalid UTF-8 throws.
  // Thread-safe.
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;

  // Text of `ids`; unknown ids are skipped (as the tokenizers crate does); skip_special drops
  // special tokens. Incomplete UTF-8 from byte tokens comes out as U+FFFD.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  // Id of a token (added tokens first, then the model vocabulary), or -1 when there is none.
  int32_t token_to_id(std::string_view token) const;
  // The token with this id; throws cca::Error when no token has it.
  std::string id_to_token(int32_t id) const;
  bool is_special(int32_t id) const;
  bool has_token(int32_t id) const;  // some token has this id

  // One past the largest id (model vocabulary and added tokens).
  int64_t vocab_size() const;

  // bos: the special token the post-processor puts first, unless tokenizer_config.json says
  // otherwise. eos: tokenizer_config.json's eos_token, else the first special token among
  // </s>, <|end_of_text|>, <|endoftext|>, <eos>.
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

}  // namespace cca::tok

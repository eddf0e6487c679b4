// The BPE model of tokenizer.json: vocabulary, ranked merges, unknown-token and byte-fallback
// handling, and a per-word cache. Merging follows the tokenizers crate's Word::merge_all.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace cca::tok::detail {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  // `model` is tokenizer.json's "model" object; errors name the field (`where`).
  static BpeModel from_json(const nlohmann::json& model, const std::string& where);

  // Appends the ids of one pre-tokenized word. Thread-safe.
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  const std::string* id_to_token(int32_t id) const;  // nullptr when no token has this id
  int32_t max_id() const { return static_cast<int32_t>(vocab_r_.size()) - 1; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  struct Cache;

  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
  int32_t unk_id() const;

  StringMap<int32_t> vocab_;
  std::vector<std::string> vocab_r_;  // by id; gaps hold ""
  std::vector<bool> has_id_;
  std::unordered_map<uint64_t, Merge> merges_;  // (left id << 32 | right id) -> rank, result
  std::optional<std::string> unk_token_;
  std::string continuing_subword_prefix_, end_of_word_suffix_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  std::vector<int32_t> byte_ids_;  // id of <0xNN> per byte, -1 where absent
  std::shared_ptr<Cache> cache_;
};

}  // namespace cca::tok::detail

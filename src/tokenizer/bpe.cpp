// BPE model: loading from tokenizer.json and merging one word at a time.
#include "tokenizer/bpe.hpp"

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <queue>

#include "cca/error.hpp"
#include "model/untrusted.hpp"
#include "tokenizer/pipeline.hpp"
#include "tokenizer/unicode.hpp"

namespace cca::tok::detail {

namespace {

constexpr size_t kMaxCachedWordBytes = 256;  // the tokenizers crate caches shorter words only
constexpr size_t kMaxCacheEntries = size_t{1} << 17;

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

std::optional<std::string> optional_string(const Json& j, const char* key,
                                           const std::string& where) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) fail(where + "." + key, "expected a string or null");
  return it->get<std::string>();
}

}  // namespace

struct BpeModel::Cache {
  std::mutex mutex;
  StringMap<std::vector<int32_t>> words;
};

BpeModel BpeModel::from_json(const Json& model, const std::string& where) {
  if (!model.is_object()) fail(where, "expected an object");
  if (model.contains("type")) {
    const std::string type = get_string(model, "type", where);
    if (type != "BPE")
      fail(where + ".type",
           "unsupported model type '" + model::excerpt(type) + "' (only BPE is supported)");
  } else if (!model.contains("merges")) {
    fail(where, "model has no \"type\" and no \"merges\"; only BPE models are supported");
  }
  if (const auto it = model.find("dropout"); it != model.end() && !it->is_null()) {
    if (!it->is_number()) fail(where + ".dropout", "expected a number or null");
    if (it->get<double>() != 0.0)
      fail(where + ".dropout",
           "BPE dropout " + model::json_excerpt(*it) +
               " is not supported (it makes encoding random)");
  }

  BpeModel m;
  m.unk_token_ = optional_string(model, "unk_token", where);
  m.continuing_subword_prefix_ =
      optional_string(model, "continuing_subword_prefix", where).value_or("");
  m.end_of_word_suffix_ = optional_string(model, "end_of_word_suffix", where).value_or("");
  m.fuse_unk_ = get_bool(model, "fuse_unk", false, where);
  m.byte_fallback_ = get_bool(model, "byte_fallback", false, where);
  m.ignore_merges_ = get_bool(model, "ignore_merges", false, where);

  const Json& vocab = require(model, "vocab", where);
  if (!vocab.is_object()) fail(where + ".vocab", "expected an object of token: id");
  int64_t max_id = -1;
  m.vocab_.reserve(vocab.size());
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
      fail(where + ".vocab",
           "token '" + model::excerpt(token) + "' has id " + model::json_excerpt(id) +
               ", expected a non-negative integer");
    m.vocab_.insert_or_assign(token, static_cast<int32_t>(id.get<int64_t>()));
    max_id = std::max(max_id, id.get<int64_t>());
  }
  if (max_id > 4 * static_cast<int64_t>(vocab.size()) + 65536)
    fail(where + ".vocab", "ids up to " + std::to_string(max_id) + " for " +
                               std::to_string(vocab.size()) + " tokens are too sparse");
  m.vocab_r_.assign(static_cast<size_t>(max_id + 1), std::string());
  m.has_id_.assign(static_cast<size_t>(max_id + 1), false);
  for (const auto& [token, id] : m.vocab_) {
    m.vocab_r_[id] = token;
    m.has_id_[id] = true;
  }

  const Json& merges = require(model, "merges", where);
  if (!merges.is_array()) fail(where + ".merges", "expected an array");
  m.merges_.reserve(merges.size());
  // Error locations are only formatted on failure: real vocabularies have ~10^5 merges.
  const auto at = [&](size_t k) { return where + ".merges[" + std::to_string(k) + "]"; };
  const auto lookup = [&](std::string_view token, size_t k) {
    const auto it = m.vocab_.find(token);
    if (it == m.vocab_.end())
      fail(at(k), "token '" + model::excerpt(token) + "' is not in the vocabulary");
    return it->second;
  };
  const std::string& prefix = m.continuing_subword_prefix_;
  std::string merged;
  for (size_t k = 0; k < merges.size(); ++k) {
    const Json& e = merges[k];
    std::string_view a, b;
    if (e.is_string()) {  // "a b"
      const std::string& s = e.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
        fail(at(k), "expected \"left right\" with one space, got \"" + model::excerpt(s) + "\"");
      a = std::string_view(s).substr(0, space);
      b = std::string_view(s).substr(space + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get_ref<const std::string&>();
      b = e[1].get_ref<const std::string&>();
    } else {
      fail(at(k), "expected \"left right\" or [\"left\", \"right\"]");
    }
    if (!prefix.empty() && b.substr(0, prefix.size()) != prefix)
      fail(at(k), "right part '" + model::excerpt(b) + "' lacks the continuing_subword_prefix '" +
                      model::excerpt(prefix) + "'");
    const int32_t ia = lookup(a, k), ib = lookup(b, k);
    merged.assign(a);
    merged.append(b.substr(prefix.size()));
    m.merges_.insert_or_assign(pair_key(ia, ib), Merge{static_cast<int32_t>(k), lookup(merged, k)});
  }

  if (m.byte_fallback_) {
    m.byte_ids_.assign(256, -1);
    for (int byte = 0; byte < 256; ++byte) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", byte);
      if (const auto it = m.vocab_.find(std::string_view(name)); it != m.vocab_.end())
        m.byte_ids_[byte] = it->second;
    }
  }
  m.cache_ = std::make_shared<Cache>();
  return m;
}

std::optional<int32_t> BpeModel::token_to_id(std::string_view token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= vocab_r_.size() || !has_id_[id]) return nullptr;
  return &vocab_r_[id];
}

int32_t BpeModel::unk_id() const {
  const auto it = vocab_.find(*unk_token_);
  if (it == vocab_.end())
    throw Error("tokenizer: the unk_token '" + model::excerpt(*unk_token_) +
                "' is not in the vocabulary");
  return it->second;
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {  // a word that is itself a token is taken whole
    if (const auto it = vocab_.find(word); it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() < kMaxCachedWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    if (const auto it = cache_->words.find(word); it != cache_->words.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out.size();
  merge_word(word, out);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    if (cache_->words.size() < kMaxCacheEntries)
      cache_->words.emplace(std::string(word),
                            std::vector<int32_t>(out.begin() + first, out.end()));
  }
}

// Word::merge_all: repeatedly merge the pair of lowest rank (leftmost first), O(n log n).
void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Symbol> syms;
  syms.reserve(word.size());
  const auto add = [&](int32_t id) {
    const auto n = static_cast<int32_t>(syms.size());
    if (n > 0) syms.back().next = n;
    syms.push_back({id, n - 1, -1, true});
  };

  int32_t pending_unk = -1;  // a run of unknown characters (fused when fuse_unk), -1: none
  std::string scratch;
  for (size_t i = 0; i < word.size();) {
    const size_t len = utf8_length(static_cast<unsigned char>(word[i]));
    std::string_view piece = word.substr(i, len);
    const bool is_first = i == 0, is_last = i + len >= word.size();
    i += len;
    if ((!is_first && !continuing_subword_prefix_.empty()) ||
        (is_last && !end_of_word_suffix_.empty())) {
      scratch.assign(is_first ? "" : continuing_subword_prefix_);
      scratch.append(piece);
      if (is_last) scratch.append(end_of_word_suffix_);
      piece = scratch;
    }
    if (const auto it = vocab_.find(piece); it != vocab_.end()) {
      if (pending_unk >= 0) add(pending_unk);
      pending_unk = -1;
      add(it->second);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (const char c : piece) all = all && byte_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all) {  // as in the crate, a pending unk is not flushed here
        for (const char c : piece) add(byte_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (unk_token_) {
      if (pending_unk >= 0 && !fuse_unk_) add(pending_unk);
      if (pending_unk < 0 || !fuse_unk_) pending_unk = unk_id();
    }  // without an unk token the character is dropped, as in the crate
  }
  if (pending_unk >= 0) add(pending_unk);

  struct Candidate {
    int32_t rank, pos, new_id;
  };
  const auto later = [](const Candidate& x, const Candidate& y) {
    return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> queue(later);
  for (size_t k = 0; k + 1 < syms.size(); ++k) {
    const auto it = merges_.find(pair_key(syms[k].id, syms[k + 1].id));
    if (it != merges_.end())
      queue.push({it->second.rank, static_cast<int32_t>(k), it->second.new_id});
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& s = syms[top.pos];
    if (!s.alive || s.next < 0) continue;
    Symbol& right = syms[s.next];
    // Skip entries made stale by earlier merges (same test as the crate: the pair's result).
    const auto it = merges_.find(pair_key(s.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    s.id = top.new_id;
    right.alive = false;
    s.next = right.next;
    if (s.next >= 0) syms[s.next].prev = top.pos;
    if (s.prev >= 0) {
      const auto p = merges_.find(pair_key(syms[s.prev].id, s.id));
      if (p != merges_.end()) queue.push({p->second.rank, s.prev, p->second.new_id});
    }
    if (s.next >= 0) {
      const auto n = merges_.find(pair_key(s.id, syms[s.next].id));
      if (n != merges_.end()) queue.push({n->second.rank, top.pos, n->second.new_id});
    }
  }
  for (const Symbol& s : syms)
    if (s.alive) out.push_back(s.id);
}

}  // namespace cca::tok::detail

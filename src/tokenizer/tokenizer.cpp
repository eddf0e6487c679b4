// Tokenizer: loading tokenizer.json, added-token extraction, the encode and decode pipelines.
#include "tokenizer/tokenizer.hpp"

#include <array>
#include <unordered_set>

#include "cca/error.hpp"
#include "model/untrusted.hpp"
#include "tokenizer/bpe.hpp"
#include "tokenizer/pipeline.hpp"
#include "tokenizer/regex.hpp"
#include "tokenizer/unicode.hpp"

namespace cca::tok {

using detail::Json;
using detail::Piece;

namespace {

struct AddedToken {
  std::string content;
  int32_t id;
  bool single_word, lstrip, rstrip, normalized, special;
};

// Leftmost-longest matching of added tokens (the crate's Aho-Corasick, MatchKind::LeftmostLongest).
class TokenTrie {
 public:
  void add(std::string_view pattern, int32_t token) {
    if (pattern.empty()) return;
    int32_t node = 0;
    for (const char c : pattern) {
      const auto b = static_cast<unsigned char>(c);
      int32_t next = -1;
      for (const auto& [kb, kid] : nodes_[node].kids)
        if (kb == b) next = kid;
      if (next < 0) {
        next = static_cast<int32_t>(nodes_.size());
        nodes_[node].kids.emplace_back(b, next);
        nodes_.emplace_back();
      }
      node = next;
    }
    nodes_[node].token = token;
    first_[static_cast<unsigned char>(pattern[0])] = true;
    empty_ = false;
  }
  bool empty() const { return empty_; }

  // The longest token starting at s[pos]: (token, end), or token -1.
  std::pair<int32_t, size_t> longest_at(std::string_view s, size_t pos) const {
    std::pair<int32_t, size_t> best{-1, pos};
    if (!first_[static_cast<unsigned char>(s[pos])]) return best;
    int32_t node = 0;
    for (size_t i = pos; i < s.size(); ++i) {
      const auto b = static_cast<unsigned char>(s[i]);
      int32_t next = -1;
      for (const auto& [kb, kid] : nodes_[node].kids)
        if (kb == b) next = kid;
      if (next < 0) break;
      node = next;
      if (nodes_[node].token >= 0) best = {nodes_[node].token, i + 1};
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> kids;
    int32_t token = -1;
  };
  std::vector<Node> nodes_ = std::vector<Node>(1);
  std::array<bool, 256> first_{};
  bool empty_ = true;
};

using StringSet = std::unordered_set<std::string, detail::StringHash, std::equal_to<>>;

constexpr std::array<std::string_view, 4> kEosNames = {"</s>", "<|end_of_text|>", "<|endoftext|>",
                                                       "<eos>"};

}  // namespace

struct Tokenizer::Impl {
  detail::BpeModel model;
  std::unique_ptr<detail::Normalizer> normalizer;
  std::unique_ptr<detail::PreTokenizer> pre_tokenizer;
  std::unique_ptr<detail::PostProcessor> post_processor;
  std::unique_ptr<detail::Decoder> decoder;
  std::vector<AddedToken> added;  // index = token number in the tries
  detail::StringMap<int32_t> added_ids;
  std::unordered_map<int32_t, size_t> added_by_id;
  StringSet special_contents;
  TokenTrie raw_trie, normalized_trie;
  detail::Pattern word_char;  // Rust regex \w: what single_word tokens must not touch
  std::optional<int32_t> bos, eos;
  int64_t vocab_size = 0;

  const std::string* token_of(int32_t id) const {
    if (const auto it = added_by_id.find(id); it != added_by_id.end())
      return &added[it->second].content;
    return model.id_to_token(id);
  }

  bool is_word_char(std::string_view ch) const { return !word_char.find_all(ch).empty(); }

  // AddedVocabulary::find_matches: cuts `piece` at the added tokens of `trie`.
  void split_on_added(const Piece& piece, const TokenTrie& trie, std::vector<Piece>& out) const {
    const std::string& s = piece.text;
    size_t start_offset = 0;
    const auto emit_text = [&](size_t b, size_t e) {
      if (e > b) out.push_back({s.substr(b, e - b), -1, piece.at_start && b == 0});
    };
    for (size_t pos = 0; pos < s.size();) {
      const auto [token, end] = trie.longest_at(s, pos);
      if (token < 0) {
        ++pos;
        continue;
      }
      const AddedToken& t = added[token];
      size_t start = pos, stop = end;
      pos = end;  // the automaton resumes after the match, whatever is done with it
      if (t.single_word) {
        size_t last = start;  // the character before the match
        while (last > 0 && (static_cast<unsigned char>(s[--last]) & 0xC0) == 0x80) {
        }
        const bool start_space =
            start == 0 || !is_word_char(std::string_view(s).substr(last, start - last));
        const bool stop_space =
            stop == s.size() ||
            !is_word_char(std::string_view(s).substr(
                stop, detail::utf8_length(static_cast<unsigned char>(s[stop]))));
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) {  // take the whitespace before it (not what an earlier match took)
        size_t i = start_offset, run = start;
        while (i < start) {
          const size_t at = i;
          const bool ws = detail::is_white_space(detail::next_code_point(s, i));
          if (!ws)
            run = start;
          else if (run == start)
            run = at;
        }
        start = std::max(run, start_offset);
      }
      if (t.rstrip) {
        size_t i = stop;
        while (i < s.size()) {
          size_t j = i;
          if (!detail::is_white_space(detail::next_code_point(s, j))) break;
          i = j;
        }
        stop = i;
      }
      if (start < start_offset) continue;  // inside whitespace an earlier rstrip took
      emit_text(start_offset, start);
      out.push_back({s.substr(start, stop - start), t.id, piece.at_start && start == 0});
      start_offset = stop;
      pos = std::max(pos, stop);
    }
    emit_text(start_offset, s.size());
  }
};

namespace {

// Errors start "tokenizer.json: "; from_file puts the path in its place.
std::shared_ptr<Tokenizer::Impl> load(std::string_view text) {
  const Json j = model::parse_json(text, "tokenizer.json");
  if (!j.is_object()) throw Error("tokenizer.json: expected a JSON object at the top level");
  auto m = std::make_shared<Tokenizer::Impl>();
  try {
    static const Json null_json;
    const auto part = [&](const char* key) -> const Json& {
      const auto it = j.find(key);
      return it == j.end() ? null_json : *it;
    };
    if (const Json& v = part("version"); !v.is_null() && !(v.is_string() && v == "1.0"))
      detail::fail("version", "unknown tokenizer.json version " + model::json_excerpt(v) +
                                  " (expected \"1.0\")");
    m->model = detail::BpeModel::from_json(detail::require(j, "model", "top level"), "model");
    m->normalizer = detail::parse_normalizer(part("normalizer"), "normalizer");
    m->pre_tokenizer = detail::parse_pre_tokenizer(part("pre_tokenizer"), "pre_tokenizer");
    m->post_processor = detail::parse_post_processor(part("post_processor"), "post_processor");
    m->decoder = detail::parse_decoder(part("decoder"), "decoder");
    m->word_char = detail::Pattern::regex(R"([\p{L}\p{Nl}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])");

    const Json& added = part("added_tokens");
    if (!added.is_null() && !added.is_array()) detail::fail("added_tokens", "expected an array");
    for (size_t k = 0; k < added.size(); ++k) {
      const std::string at = "added_tokens[" + std::to_string(k) + "]";
      const Json& a = added[k];
      const int64_t id = detail::get_int(a, "id", at);
      if (id < 0 || id > INT32_MAX) detail::fail(at + ".id", "expected a non-negative 32-bit id");
      AddedToken t{detail::get_string(a, "content", at),
                   static_cast<int32_t>(id),
                   false,
                   false,
                   false,
                   false,
                   false};
      t.special = detail::get_bool(a, "special", false, at);
      t.single_word = detail::get_bool(a, "single_word", false, at);
      t.lstrip = detail::get_bool(a, "lstrip", false, at);
      t.rstrip = detail::get_bool(a, "rstrip", false, at);
      t.normalized = detail::get_bool(a, "normalized", !t.special, at);
      if (t.content.empty()) continue;  // the crate ignores empty tokens
      const auto index = static_cast<int32_t>(m->added.size());
      if (t.normalized) {
        std::string pattern = t.content;
        if (m->normalizer) m->normalizer->normalize(pattern);
        m->normalized_trie.add(pattern, index);
      } else {
        m->raw_trie.add(t.content, index);
      }
      m->added_ids.insert_or_assign(t.content, t.id);
      m->added_by_id.insert_or_assign(t.id, m->added.size());
      if (t.special) m->special_contents.insert(t.content);
      m->added.push_back(std::move(t));
    }
  } catch (const Json::exception& e) {
    throw Error("tokenizer.json: malformed: " + model::excerpt(e.what(), 160));
  }

  // The post-processor adds its ids to every encoding: each must be a token, or the ids would
  // name nothing when decoded and could lie outside the model's vocabulary.
  if (m->post_processor)
    for (const int32_t id : m->post_processor->special_ids())
      if (!m->token_of(id))
        throw Error("tokenizer.json: post_processor: special token id " + std::to_string(id) +
                    " is neither in the vocabulary nor an added token");
  int64_t max_id = m->model.max_id();
  for (const AddedToken& t : m->added) max_id = std::max<int64_t>(max_id, t.id);
  m->vocab_size = max_id + 1;
  if (m->post_processor) m->bos = m->post_processor->leading_special();
  for (const std::string_view name : kEosNames) {
    const auto it = m->added_ids.find(name);
    if (it != m->added_ids.end() && m->special_contents.count(name)) {
      m->eos = it->second;
      break;
    }
  }
  return m;
}

// tokenizer_config.json (`text`, named `where` in errors): its "bos_token" and "eos_token" name
// the bos and eos of the tokenizer `m` (named `tokenizer_name`), as transformers has it.
void apply_config(Tokenizer::Impl& m, std::string_view text, const std::string& where,
                  const std::string& tokenizer_name) {
  const Json config = model::parse_json(text, where);
  if (!config.is_object()) throw Error(where + ": expected a JSON object");
  const auto named = [&](const char* key, std::optional<int32_t>& slot) {
    const auto found = config.find(key);
    if (found == config.end()) return;
    const Json& v = *found;
    if (v.is_null()) {
      slot.reset();
      return;
    }
    std::string name;
    if (v.is_string())
      name = v.get<std::string>();
    else if (v.is_object() && v.contains("content") && v.at("content").is_string())
      name = v.at("content").get<std::string>();
    else
      throw Error(where + ": " + key + ": expected a string, {\"content\": ...} or null, got " +
                  model::json_excerpt(v));
    const auto it = m.added_ids.find(name);
    if (it != m.added_ids.end()) {
      slot = it->second;
    } else if (const auto id = m.model.token_to_id(name)) {
      slot = *id;
    } else {
      throw Error(where + ": " + key + " '" + model::excerpt(name) + "' is not a token of " +
                  tokenizer_name);
    }
  };
  named("bos_token", m.bos);
  named("eos_token", m.eos);
}

}  // namespace

Tokenizer Tokenizer::from_json(std::string_view json,
                               std::optional<std::string_view> config_json) {
  std::shared_ptr<Impl> m = load(json);
  if (config_json) apply_config(*m, *config_json, "tokenizer_config.json", "tokenizer.json");
  return Tokenizer(std::move(m));
}

Tokenizer Tokenizer::from_file(const std::filesystem::path& path) {
  std::shared_ptr<Impl> m;
  const std::string text =
      model::read_text_file(path.string(), "tokenizer.json", model::kMaxJsonFileBytes);
  try {
    m = load(text);
  } catch (const Error& e) {  // name the file instead of "tokenizer.json"
    std::string msg = e.what();
    const std::string generic = "tokenizer.json: ";
    if (msg.compare(0, generic.size(), generic) == 0) msg.erase(0, generic.size());
    throw Error(path.string() + ": " + msg);
  }
  // tokenizer_config.json names bos and eos for transformers; follow it where it is present.
  const std::filesystem::path config_path = path.parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (std::filesystem::exists(config_path, ec)) {
    const std::string where = config_path.string();
    apply_config(*m, model::read_text_file(where, "tokenizer_config.json", model::kMaxJsonFileBytes),
                 where, path.string());
  }
  return Tokenizer(std::move(m));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  const Impl& m = *impl_;
  if (const size_t bad = detail::find_invalid_utf8(text); bad != std::string_view::npos)
    throw Error("tokenizer: input text is not valid UTF-8 (at byte " + std::to_string(bad) + ")");

  // 1. Added tokens that match the raw text; 2. normalize the rest and match the normalized ones.
  std::vector<Piece> raw;
  Piece whole{std::string(text), -1, true};
  if (m.raw_trie.empty())
    raw.push_back(std::move(whole));
  else
    m.split_on_added(whole, m.raw_trie, raw);
  std::vector<Piece> pieces;
  pieces.reserve(raw.size());
  for (Piece& p : raw) {
    if (p.id < 0 && m.normalizer) m.normalizer->normalize(p.text);
    if (p.id >= 0 || m.normalized_trie.empty()) {
      if (p.id >= 0 || !p.text.empty()) pieces.push_back(std::move(p));
    } else {
      m.split_on_added(p, m.normalized_trie, pieces);
    }
  }
  // 3. Pre-tokenize into words; 4. the model; 5. post-process.
  if (m.pre_tokenizer) m.pre_tokenizer->pre_tokenize(pieces);
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  for (const Piece& p : pieces) {
    if (p.id >= 0)
      ids.push_back(p.id);
    else
      m.model.tokenize(p.text, ids);
  }
  if (m.post_processor) m.post_processor->process(ids, add_special);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  const Impl& m = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    const std::string* t = m.token_of(id);
    if (!t || (skip_special && m.special_contents.count(*t))) continue;
    tokens.push_back(*t);
  }
  std::string out;
  if (m.decoder) {
    m.decoder->decode_chain(tokens);
    for (const std::string& t : tokens) out += t;
  } else {
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
  }
  return out;
}

int32_t Tokenizer::token_to_id(std::string_view token) const {
  if (const auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) return it->second;
  return impl_->model.token_to_id(token).value_or(-1);
}

std::string Tokenizer::id_to_token(int32_t id) const {
  const std::string* t = impl_->token_of(id);
  if (!t) throw Error("tokenizer: no token has id " + std::to_string(id));
  return *t;
}

bool Tokenizer::has_token(int32_t id) const { return impl_->token_of(id) != nullptr; }

bool Tokenizer::is_special(int32_t id) const {
  const std::string* t = impl_->token_of(id);
  return t && impl_->special_contents.count(*t) > 0;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }

}  // namespace cca::tok

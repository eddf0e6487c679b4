// Normalizers, pre-tokenizers, decoders and post-processors of tokenizer.json, with the
// semantics of the Hugging Face tokenizers crate (names in comments are its types).
#include "tokenizer/pipeline.hpp"

#include <algorithm>
#include <array>
#include <unordered_map>
#include <utility>

#include "cca/error.hpp"
#include "model/untrusted.hpp"
#include "tokenizer/regex.hpp"
#include "tokenizer/unicode.hpp"

namespace cca::tok::detail {

// ---- JSON access ---------------------------------------------------------------------------

void fail(const std::string& where, const std::string& what) {
  throw Error("tokenizer.json: " + where + ": " + what);
}

const Json& require(const Json& obj, const char* key, const std::string& where) {
  if (!obj.is_object()) fail(where, "expected an object");
  const auto it = obj.find(key);
  if (it == obj.end()) fail(where, std::string("missing field '") + key + "'");
  return *it;
}

std::string get_string(const Json& obj, const char* key, const std::string& where) {
  const Json& v = require(obj, key, where);
  if (!v.is_string()) fail(where + "." + key, "expected a string");
  return v.get<std::string>();
}

bool get_bool(const Json& obj, const char* key, bool fallback, const std::string& where) {
  if (!obj.is_object()) fail(where, "expected an object");
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) fail(where + "." + key, "expected true or false");
  return it->get<bool>();
}

int64_t get_int(const Json& obj, const char* key, const std::string& where) {
  const Json& v = require(obj, key, where);
  if (!v.is_number_integer()) fail(where + "." + key, "expected an integer");
  return v.get<int64_t>();
}

namespace {

std::string type_of(const Json& j, const std::string& where) {
  if (!j.is_object()) fail(where, "expected an object with a \"type\"");
  return get_string(j, "type", where);
}

const Json& array_field(const Json& j, const char* key, const std::string& where) {
  const Json& a = require(j, key, where);
  if (!a.is_array()) fail(where + "." + key, "expected an array");
  return a;
}

// A single character given as a JSON string (Metaspace replacement, Strip content).
char32_t one_char(const Json& j, const char* key, const std::string& where) {
  const std::string s = get_string(j, key, where);
  if (s.empty() || find_invalid_utf8(s) != std::string::npos)
    fail(where + "." + key, "expected one character");
  size_t i = 0;
  const char32_t cp = next_code_point(s, i);
  if (i != s.size()) fail(where + "." + key, "expected one character, got '" + model::excerpt(s) + "'");
  return cp;
}

// {"String": "..."} or {"Regex": "..."}.
Pattern parse_pattern(const Json& j, const std::string& where) {
  if (j.is_object() && j.size() == 1) {
    if (j.contains("String") && j["String"].is_string())
      return Pattern::literal(j["String"].get<std::string>());
    if (j.contains("Regex") && j["Regex"].is_string()) {
      try {
        return Pattern::regex(j["Regex"].get<std::string>());
      } catch (const Error& e) {
        fail(where, e.what());
      }
    }
  }
  fail(where, "expected {\"String\": ...} or {\"Regex\": ...}");
}

// ---- splitting (NormalizedString::split) ----------------------------------------------------

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

Behavior parse_behavior(const Json& j, const std::string& where) {
  const std::string b = get_string(j, "behavior", where);
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  fail(where + ".behavior", "unknown split behavior '" + model::excerpt(b) + "'");
}

// Cuts `piece` at `matches` (sorted, non-overlapping byte ranges); appends the non-empty parts.
void split_at(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& matches,
              Behavior behavior, bool invert, std::vector<Piece>& out) {
  struct Seg {
    size_t b, e;
    bool flag;  // a match; after the behavior is applied: to be removed
  };
  const std::string& s = piece.text;
  std::vector<Seg> segs;
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (prev != b) segs.push_back({prev, b, false});
    segs.push_back({b, e, true});
    prev = e;
  }
  if (prev != s.size()) segs.push_back({prev, s.size(), false});
  if (invert)
    for (Seg& g : segs) g.flag = !g.flag;

  std::vector<Seg> kept;
  kept.reserve(segs.size());
  bool prev_match = false;
  switch (behavior) {
    case Behavior::kRemoved:
      kept = segs;
      break;
    case Behavior::kIsolated:
      for (const Seg& g : segs) kept.push_back({g.b, g.e, false});
      break;
    case Behavior::kContiguous:
      for (const Seg& g : segs) {
        if (g.flag == prev_match && !kept.empty())
          kept.back().e = g.e;
        else
          kept.push_back({g.b, g.e, false});
        prev_match = g.flag;
      }
      break;
    case Behavior::kMergedWithPrevious:
      for (const Seg& g : segs) {
        if (g.flag && !prev_match && !kept.empty())
          kept.back().e = g.e;
        else
          kept.push_back({g.b, g.e, false});
        prev_match = g.flag;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->flag && !prev_match && !kept.empty())
          kept.back().b = it->b;
        else
          kept.push_back({it->b, it->e, false});
        prev_match = it->flag;
      }
      std::reverse(kept.begin(), kept.end());
      break;
  }
  for (const Seg& g : kept)
    if (!g.flag && g.e > g.b)
      out.push_back({s.substr(g.b, g.e - g.b), -1, piece.at_start && g.b == 0});
}

// Applies `f(piece, out)` to every piece that is not an added token.
template <class F>
void for_each_text(std::vector<Piece>& pieces, F&& f) {
  std::vector<Piece> out;
  out.reserve(pieces.size() * 2);
  for (Piece& p : pieces) {
    if (p.id >= 0)
      out.push_back(std::move(p));
    else
      f(p, out);
  }
  pieces = std::move(out);
}

std::vector<std::pair<size_t, size_t>> find_char(std::string_view s, std::string_view ch) {
  std::vector<std::pair<size_t, size_t>> m;
  for (size_t pos = s.find(ch); pos != std::string_view::npos; pos = s.find(ch, pos + ch.size()))
    m.emplace_back(pos, pos + ch.size());
  return m;
}

std::string utf8_of(char32_t cp) {
  std::string s;
  append_utf8(s, cp);
  return s;
}

// ---- normalizers -----------------------------------------------------------------------------

class NfcNormalizer final : public Normalizer {
 public:
  void normalize(std::string& s) const override { s = nfc(s); }
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void normalize(std::string& s) const override {
    if (!s.empty()) s.insert(0, prefix_);  // NormalizedString::prepend needs a first character
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Pattern p, std::string content)
      : pattern_(std::move(p)), content_(std::move(content)) {}
  void normalize(std::string& s) const override { s = pattern_.replace_all(s, content_); }

 private:
  Pattern pattern_;
  std::string content_;
};

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& s) const override {
    size_t b = 0, e = s.size();
    if (left_) {
      while (b < e) {
        size_t i = b;
        if (!is_white_space(next_code_point(s, i))) break;
        b = i;
      }
    }
    if (right_) {
      size_t i = b, run = e;  // start of the trailing whitespace run
      while (i < e) {
        const size_t at = i;
        const bool ws = is_white_space(next_code_point(s, i));
        if (!ws)
          run = e;
        else if (run == e)
          run = at;
      }
      e = run;
    }
    s = s.substr(b, e - b);
  }

 private:
  bool left_, right_;
};

// Nested Sequences are flattened when parsed, so the bound on the growth of the whole chain
// (checked after every step) bounds every step's input: no nesting multiplies it.
class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts) {
    for (auto& p : parts) {
      if (auto* seq = dynamic_cast<SequenceNormalizer*>(p.get()))
        for (auto& q : seq->parts_) parts_.push_back(std::move(q));
      else
        parts_.push_back(std::move(p));
    }
  }
  void normalize(std::string& s) const override {
    const size_t limit = max_growth(s.size());
    for (const auto& n : parts_) {
      n->normalize(s);
      if (s.size() > limit)
        throw Error("tokenizer: the normalizers make a text longer than " +
                    std::to_string(limit) + " bytes");
    }
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

// ---- pre-tokenizers --------------------------------------------------------------------------

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern p, Behavior b, bool invert)
      : pattern_(std::move(p)), behavior_(b), invert_(invert) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for_each_text(pieces, [&](Piece& p, std::vector<Piece>& out) {
      split_at(p, pattern_.find_all(p.text), behavior_, invert_, out);
    });
  }

 private:
  Pattern pattern_;
  Behavior behavior_;
  bool invert_;
};

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex)
      : add_prefix_space_(add_prefix_space), use_regex_(use_regex) {
    if (use_regex_) regex_ = Pattern::regex(kGpt2Pattern);
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for_each_text(pieces, [&](Piece& p, std::vector<Piece>& out) {
      if (add_prefix_space_ && !p.text.empty() && p.text[0] != ' ') p.text.insert(0, " ");
      const size_t first = out.size();
      if (use_regex_)
        split_at(p, regex_.find_all(p.text), Behavior::kIsolated, false, out);
      else if (!p.text.empty())
        out.push_back(std::move(p));
      for (size_t k = first; k < out.size(); ++k) {
        std::string mapped;
        mapped.reserve(out[k].text.size() * 2);
        for (const char c : out[k].text) mapped += byte_to_unicode(static_cast<uint8_t>(c));
        out[k].text = std::move(mapped);
      }
    });
  }

 private:
  bool add_prefix_space_, use_regex_;
  Pattern regex_;
};

enum class PrependScheme { kAlways, kFirst, kNever };

PrependScheme parse_prepend_scheme(const Json& j, const std::string& where) {
  const bool has_scheme = j.contains("prepend_scheme") && !j["prepend_scheme"].is_null();
  PrependScheme scheme = PrependScheme::kAlways;
  if (has_scheme) {
    const std::string s = get_string(j, "prepend_scheme", where);
    if (s == "always")
      scheme = PrependScheme::kAlways;
    else if (s == "first")
      scheme = PrependScheme::kFirst;
    else if (s == "never")
      scheme = PrependScheme::kNever;
    else
      fail(where + ".prepend_scheme",
           "unknown value '" + model::excerpt(s) + "' (expected first, always or never)");
  }
  if (!get_bool(j, "add_prefix_space", true, where)) {  // the older spelling of "never"
    if (has_scheme && scheme != PrependScheme::kNever)
      fail(where, "add_prefix_space false contradicts prepend_scheme");
    scheme = PrependScheme::kNever;
  }
  return scheme;
}

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(char32_t replacement, PrependScheme scheme, bool split)
      : rep_(utf8_of(replacement)), scheme_(scheme), split_(split) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for_each_text(pieces, [&](Piece& p, std::vector<Piece>& out) {
      std::string t;
      t.reserve(p.text.size() + rep_.size());
      for (const char c : p.text) {
        if (c == ' ')
          t += rep_;
        else
          t += c;
      }
      const bool starts = t.compare(0, rep_.size(), rep_) == 0;
      const bool prepend =
          !t.empty() && !starts &&
          (scheme_ == PrependScheme::kAlways || (scheme_ == PrependScheme::kFirst && p.at_start));
      if (prepend) t.insert(0, rep_);
      p.text = std::move(t);
      if (split_)
        split_at(p, find_char(p.text, rep_), Behavior::kMergedWithNext, false, out);
      else if (!p.text.empty())
        out.push_back(std::move(p));
    });
  }

 private:
  std::string rep_;
  PrependScheme scheme_;
  bool split_;
};

class DigitsPreTokenizer final : public PreTokenizer {
 public:
  explicit DigitsPreTokenizer(bool individual)
      : individual_(individual), digit_(Pattern::regex("\\p{N}")) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for_each_text(pieces, [&](Piece& p, std::vector<Piece>& out) {
      split_at(p, digit_.find_all(p.text),
               individual_ ? Behavior::kIsolated : Behavior::kContiguous, false, out);
    });
  }

 private:
  bool individual_;
  Pattern digit_;
};

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for (const auto& p : parts_) p->pre_tokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

// ---- decoders --------------------------------------------------------------------------------

class ByteLevelDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& t : tokens) {
      std::string mapped;
      bool all = true;
      for (size_t i = 0; i < t.size() && all;) {  // tokens are valid UTF-8 (from JSON)
        const int b = byte_from_unicode(next_code_point(t, i));
        if (b < 0)
          all = false;
        else
          mapped.push_back(static_cast<char>(b));
      }
      bytes += all ? mapped : t;  // a token outside the alphabet stays as it is
    }
    tokens.assign(1, utf8_lossy(bytes));
  }
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Pattern p, std::string content)
      : pattern_(std::move(p)), content_(std::move(content)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) t = pattern_.replace_all(t, content_);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// <0xNN> tokens become bytes; a run of them that is not valid UTF-8 gives one U+FFFD per byte.
class ByteFallbackDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string pending;
    const auto flush = [&] {
      if (pending.empty()) return;
      if (find_invalid_utf8(pending) == std::string::npos) {
        out.push_back(pending);
      } else {
        for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (std::string& t : tokens) {
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && hex_value(t[3]) >= 0 &&
          hex_value(t[4]) >= 0) {
        pending.push_back(static_cast<char>(hex_value(t[3]) * 16 + hex_value(t[4])));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens = std::move(out);
  }
};

class FuseDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const std::string& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};

// Removes up to `start` leading and `stop` trailing `content` characters from each token.
class StripDecoder final : public Decoder {
 public:
  StripDecoder(char32_t content, size_t start, size_t stop)
      : content_(content), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) {
      std::vector<size_t> starts;  // byte offset of each character
      for (size_t i = 0; i < t.size(); i += utf8_length(t[i])) starts.push_back(i);
      const auto char_at = [&](size_t k) {
        size_t i = starts[k];
        return next_code_point(t, i);
      };
      size_t first = 0, last = starts.size();
      for (size_t k = 0; k < start_ && k < starts.size() && char_at(k) == content_; ++k)
        first = k + 1;
      for (size_t k = 0; k < stop_ && k < starts.size(); ++k) {
        const size_t idx = starts.size() - k - 1;
        if (char_at(idx) != content_) break;
        last = idx;
      }
      if (first >= last) {
        t.clear();
      } else {
        const size_t b = starts[first], e = last < starts.size() ? starts[last] : t.size();
        t = t.substr(b, e - b);
      }
    }
  }

 private:
  char32_t content_;
  size_t start_, stop_;
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(char32_t replacement, PrependScheme scheme)
      : rep_(utf8_of(replacement)), drop_first_(scheme != PrependScheme::kNever) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      const std::string with = (i == 0 && drop_first_) ? "" : " ";
      std::string out;
      const std::string& t = tokens[i];
      for (size_t pos = 0; pos < t.size();) {
        if (t.compare(pos, rep_.size(), rep_) == 0) {
          out += with;
          pos += rep_.size();
        } else {
          out += t[pos++];
        }
      }
      tokens[i] = std::move(out);
    }
  }

 private:
  std::string rep_;
  bool drop_first_;
};

// Flattened and bounded as SequenceNormalizer is.
class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts) {
    for (auto& p : parts) {
      if (auto* seq = dynamic_cast<SequenceDecoder*>(p.get()))
        for (auto& q : seq->parts_) parts_.push_back(std::move(q));
      else
        parts_.push_back(std::move(p));
    }
  }
  void decode_chain(std::vector<std::string>& tokens) const override {
    const auto bytes = [&] {
      size_t n = 0;
      for (const std::string& t : tokens) n += t.size();
      return n;
    };
    const size_t limit = max_growth(bytes());
    for (const auto& d : parts_) {
      d->decode_chain(tokens);
      if (bytes() > limit)
        throw Error("tokenizer: the decoders make a text longer than " + std::to_string(limit) +
                    " bytes");
    }
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

// ---- post-processors -------------------------------------------------------------------------

// The single-sequence template: special tokens around the sequence ($A).
class TemplatePostProcessor final : public PostProcessor {
 public:
  struct Item {
    bool is_sequence;
    std::vector<int32_t> ids;  // the special token's ids
  };
  explicit TemplatePostProcessor(std::vector<Item> items) : items_(std::move(items)) {}
  void process(std::vector<int32_t>& ids, bool add_special) const override {
    if (!add_special) return;
    std::vector<int32_t> out;
    out.reserve(ids.size() + items_.size());
    for (const Item& it : items_) {
      if (it.is_sequence)
        out.insert(out.end(), ids.begin(), ids.end());
      else
        out.insert(out.end(), it.ids.begin(), it.ids.end());
    }
    ids = std::move(out);
  }
  std::optional<int32_t> leading_special() const override {
    if (!items_.empty() && !items_[0].is_sequence && !items_[0].ids.empty())
      return items_[0].ids[0];
    return std::nullopt;
  }
  std::vector<int32_t> special_ids() const override {
    std::vector<int32_t> ids;
    for (const Item& it : items_) ids.insert(ids.end(), it.ids.begin(), it.ids.end());
    return ids;
  }

 private:
  std::vector<Item> items_;
};

std::unique_ptr<PostProcessor> parse_template(const Json& j, const std::string& where) {
  const Json& specials = require(j, "special_tokens", where);
  if (!specials.is_object()) fail(where + ".special_tokens", "expected an object");
  const auto special_ids = [&](const std::string& name, const std::string& at) {
    const auto it = specials.find(name);
    if (it == specials.end())
      fail(at, "special token '" + model::excerpt(name) + "' is not in special_tokens");
    const std::string in = where + ".special_tokens." + model::excerpt(name);
    const Json& ids = require(*it, "ids", in);
    std::vector<int32_t> out;
    if (!ids.is_array()) fail(in + ".ids", "expected an array");
    for (const Json& v : ids) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
        fail(in + ".ids", "expected non-negative integer ids");
      out.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    return out;
  };
  const Json& single = require(j, "single", where);
  const std::string at = where + ".single";
  std::vector<TemplatePostProcessor::Item> items;
  const auto add_sequence = [&](const std::string& id) {
    if (id != "A" && id != "0")
      fail(at, "the single-sequence template refers to sequence '" + model::excerpt(id) + "'");
    items.push_back({true, {}});
  };
  if (single.is_string()) {  // "<s> $A" (the form the Python API takes)
    const std::string s = single.get<std::string>();
    for (size_t pos = 0; pos < s.size();) {
      const size_t b = s.find_first_not_of(' ', pos);
      if (b == std::string::npos) break;
      const size_t e = std::min(s.find(' ', b), s.size());
      std::string piece = s.substr(b, e - b);
      pos = e;
      if (const size_t colon = piece.rfind(':');
          colon != std::string::npos && colon > 0 &&
          piece.find_first_not_of("0123456789", colon + 1) == std::string::npos)
        piece.resize(colon);  // drop the type id
      if (piece[0] == '$')
        add_sequence(piece.size() == 1 ? "A" : piece.substr(1));
      else
        items.push_back({false, special_ids(piece, at)});
    }
  } else if (single.is_array()) {
    for (size_t k = 0; k < single.size(); ++k) {
      const Json& item = single[k];
      const std::string ai = at + "[" + std::to_string(k) + "]";
      if (item.is_object() && item.contains("Sequence")) {
        add_sequence(get_string(item["Sequence"], "id", ai + ".Sequence"));
      } else if (item.is_object() && item.contains("SpecialToken")) {
        items.push_back(
            {false, special_ids(get_string(item["SpecialToken"], "id", ai + ".SpecialToken"), ai)});
      } else {
        fail(ai, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
      }
    }
  } else {
    fail(at, "expected an array or a string");
  }
  if (std::count_if(items.begin(), items.end(), [](const auto& i) { return i.is_sequence; }) != 1)
    fail(at, "the template must hold the sequence $A exactly once");
  return std::make_unique<TemplatePostProcessor>(std::move(items));
}

// BertProcessing / RobertaProcessing: cls $A sep, with "cls": ["[CLS]", 101].
std::unique_ptr<PostProcessor> parse_cls_sep(const Json& j, const std::string& where) {
  const auto token = [&](const char* key) {
    const Json& v = require(j, key, where);
    if (!v.is_array() || v.size() != 2 || !v[1].is_number_integer() || v[1].get<int64_t>() < 0)
      fail(where + "." + key, "expected [token, id]");
    return std::vector<int32_t>{static_cast<int32_t>(v[1].get<int64_t>())};
  };
  std::vector<TemplatePostProcessor::Item> items{
      {false, token("cls")}, {true, {}}, {false, token("sep")}};
  return std::make_unique<TemplatePostProcessor>(std::move(items));
}

class NoOpPostProcessor final : public PostProcessor {  // ByteLevel: only trims offsets
 public:
  void process(std::vector<int32_t>&, bool) const override {}
};

class SequencePostProcessor final : public PostProcessor {
 public:
  explicit SequencePostProcessor(std::vector<std::unique_ptr<PostProcessor>> parts)
      : parts_(std::move(parts)) {}
  void process(std::vector<int32_t>& ids, bool add_special) const override {
    for (const auto& p : parts_) p->process(ids, add_special);
  }
  std::optional<int32_t> leading_special() const override {
    for (const auto& p : parts_)
      if (auto id = p->leading_special()) return id;
    return std::nullopt;
  }
  std::vector<int32_t> special_ids() const override {
    std::vector<int32_t> ids;
    for (const auto& p : parts_) {
      const std::vector<int32_t> more = p->special_ids();
      ids.insert(ids.end(), more.begin(), more.end());
    }
    return ids;
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> parts_;
};

template <class T, class Parse>
std::vector<std::unique_ptr<T>> parse_list(const Json& j, const char* key, const std::string& where,
                                           Parse parse) {
  const Json& arr = array_field(j, key, where);
  std::vector<std::unique_ptr<T>> out;
  for (size_t k = 0; k < arr.size(); ++k) {
    auto p = parse(arr[k], where + "." + key + "[" + std::to_string(k) + "]");
    if (p) out.push_back(std::move(p));
  }
  return out;
}

struct ByteTables {
  std::array<std::string, 256> to;
  std::unordered_map<char32_t, int> from;
};

const ByteTables& byte_tables() {
  static const ByteTables t = [] {
    ByteTables r;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      r.to[b] = utf8_of(cp);
      r.from[cp] = b;
    }
    return r;
  }();
  return t;
}

}  // namespace

const std::string& byte_to_unicode(uint8_t b) { return byte_tables().to[b]; }

int byte_from_unicode(char32_t cp) {
  const auto& from = byte_tables().from;
  const auto it = from.find(cp);
  return it == from.end() ? -1 : it->second;
}

// ---- parsers ---------------------------------------------------------------------------------

std::unique_ptr<Normalizer> parse_normalizer(const Json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where);
  if (type == "NFC") return std::make_unique<NfcNormalizer>();
  if (type == "Prepend")
    return std::make_unique<PrependNormalizer>(get_string(j, "prepend", where));
  if (type == "Replace")
    return std::make_unique<ReplaceNormalizer>(
        parse_pattern(require(j, "pattern", where), where + ".pattern"),
        get_string(j, "content", where));
  if (type == "Strip")
    return std::make_unique<StripNormalizer>(get_bool(j, "strip_left", true, where),
                                             get_bool(j, "strip_right", true, where));
  if (type == "Sequence")
    return std::make_unique<SequenceNormalizer>(
        parse_list<Normalizer>(j, "normalizers", where, parse_normalizer));
  fail(where, "unsupported normalizer type '" + model::excerpt(type) +
                  "' (supported: NFC, Prepend, Replace, Strip, Sequence)");
}

std::unique_ptr<PreTokenizer> parse_pre_tokenizer(const Json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where);
  if (type == "Split")
    return std::make_unique<SplitPreTokenizer>(
        parse_pattern(require(j, "pattern", where), where + ".pattern"), parse_behavior(j, where),
        get_bool(j, "invert", false, where));
  if (type == "ByteLevel")
    return std::make_unique<ByteLevelPreTokenizer>(get_bool(j, "add_prefix_space", true, where),
                                                   get_bool(j, "use_regex", true, where));
  if (type == "Metaspace")
    return std::make_unique<MetaspacePreTokenizer>(one_char(j, "replacement", where),
                                                   parse_prepend_scheme(j, where),
                                                   get_bool(j, "split", true, where));
  if (type == "Digits")
    return std::make_unique<DigitsPreTokenizer>(get_bool(j, "individual_digits", false, where));
  if (type == "Sequence")
    return std::make_unique<SequencePreTokenizer>(
        parse_list<PreTokenizer>(j, "pretokenizers", where, parse_pre_tokenizer));
  fail(where, "unsupported pre-tokenizer type '" + model::excerpt(type) +
                  "' (supported: Split, ByteLevel, Metaspace, Digits, Sequence)");
}

std::unique_ptr<Decoder> parse_decoder(const Json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where);
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Replace")
    return std::make_unique<ReplaceDecoder>(
        parse_pattern(require(j, "pattern", where), where + ".pattern"),
        get_string(j, "content", where));
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    const int64_t start = get_int(j, "start", where), stop = get_int(j, "stop", where);
    if (start < 0 || stop < 0) fail(where, "start and stop must be non-negative");
    return std::make_unique<StripDecoder>(one_char(j, "content", where), size_t(start),
                                          size_t(stop));
  }
  if (type == "Metaspace")
    return std::make_unique<MetaspaceDecoder>(one_char(j, "replacement", where),
                                              parse_prepend_scheme(j, where));
  if (type == "Sequence")
    return std::make_unique<SequenceDecoder>(
        parse_list<Decoder>(j, "decoders", where, parse_decoder));
  fail(where,
       "unsupported decoder type '" + model::excerpt(type) +
           "' (supported: ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence)");
}

std::unique_ptr<PostProcessor> parse_post_processor(const Json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where);
  if (type == "TemplateProcessing") return parse_template(j, where);
  if (type == "ByteLevel") return std::make_unique<NoOpPostProcessor>();
  if (type == "BertProcessing" || type == "RobertaProcessing") return parse_cls_sep(j, where);
  if (type == "Sequence")
    return std::make_unique<SequencePostProcessor>(
        parse_list<PostProcessor>(j, "processors", where, parse_post_processor));
  fail(where, "unsupported post-processor type '" + model::excerpt(type) +
                  "' (supported: TemplateProcessing, ByteLevel, BertProcessing, RobertaProcessing, "
                  "Sequence)");
}

}  // namespace cca::tok::detail

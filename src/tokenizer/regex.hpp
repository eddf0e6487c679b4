// Patterns of tokenizer.json (Split pre-tokenizer, Replace normalizer/decoder): a literal string
// or an Oniguruma regex, matched with PCRE2 (UTF + UCP, JIT where available).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace cca::tok::detail {

// Rewrites the Oniguruma syntax that Hugging Face patterns use into PCRE2 syntax with the same
// meaning: \s and \S become Unicode White_Space classes (PCRE2's \s misses U+0085), \h and \H
// become hex-digit classes. Throws cca::Error naming the pattern on what it cannot carry over.
std::string onig_to_pcre2(std::string_view pattern);

// A compiled pattern. Matching is thread-safe.
// How long a text may grow in one Replace and in a whole normalizer or decoder chain: far above
// what real tokenizers do (Replace " " -> "\u2581" triples it), but a bound, where a Sequence
// of Replaces that each double the text would grow it exponentially.
inline size_t max_growth(size_t n) { return 16 * n + 4096; }

// How many steps (an item of the pattern tried at a position of the text, counted through PCRE2
// callouts, backtracking included) one find_all() may take: 16 per item of the pattern per byte
// of text, plus one byte. Far above real patterns (the test RegexBudgetLeavesRealPatternsAlone
// runs llama3's split pattern over the texts that make it work hardest); backtracking that is
// exponential at one position, or heavy at every position of a long text, runs into it and is
// refused.
inline uint64_t max_regex_steps(uint64_t items, size_t bytes) {
  return 16 * items * (static_cast<uint64_t>(bytes) + 1);
}

class Pattern {
 public:
  static Pattern literal(std::string text);
  static Pattern regex(const std::string& onig_pattern);  // throws cca::Error when invalid

  // Non-overlapping matches [begin, end) of the pattern in valid UTF-8 `s`, left to right, as
  // the tokenizers crate finds them (an empty match never directly follows the previous match).
  // cca::Error when the matching takes more than max_regex_steps() steps or hits one of PCRE2's
  // limits at one position: "it backtracks too much on this text".
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const;

  // `s` with every match replaced by `content`. cca::Error when the result would be longer than
  // max_growth(s.size()): a long content replacing every character is unbounded work.
  std::string replace_all(std::string_view s, std::string_view content) const;

  const std::string& source() const { return source_; }

 private:
  struct Compiled;
  std::string source_;
  bool is_regex_ = false;
  std::shared_ptr<const Compiled> re_;
};

}  // namespace cca::tok::detail

// PCRE2-backed patterns with the Oniguruma meaning of \s, as the tokenizers crate has it.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/regex.hpp"

#include <pcre2.h>

#include <algorithm>
#include <cstdint>

#include "cca/error.hpp"
#include "model/untrusted.hpp"
#include "tokenizer/unicode.hpp"

namespace cca::tok::detail {

namespace {

// Unicode White_Space as the body of a character class.
constexpr std::string_view kWhiteSpaceClass =
    "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}";
constexpr std::string_view kHexClass = "0-9a-fA-F";

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  if (pcre2_get_error_message(code, buf, sizeof(buf)) < 0) return "error " + std::to_string(code);
  return reinterpret_cast<const char*>(buf);
}

// Per-thread JIT stack: deep backtracking on long inputs needs more than the 32 KiB default.
struct MatchEnv {
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchEnv() {
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(64 * 1024, 16 * 1024 * 1024, nullptr);
    if (context && stack) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchEnv() {
    if (stack) pcre2_jit_stack_free(stack);
    if (context) pcre2_match_context_free(context);
  }
};

MatchEnv& match_env() {
  thread_local MatchEnv env;
  return env;
}

// The steps find_all() may still take: each callout (PCRE2_AUTO_CALLOUT puts one before every
// item of the pattern, so one each time the matcher tries an item, backtracking included) takes
// one; at zero the match is abandoned with PCRE2_ERROR_CALLOUT.
struct StepBudget {
  uint64_t left = 0;
};

int take_step(pcre2_callout_block*, void* data) {
  auto& budget = *static_cast<StepBudget*>(data);
  if (budget.left == 0) return PCRE2_ERROR_CALLOUT;
  --budget.left;
  return 0;
}

int count_item(pcre2_callout_enumerate_block*, void* data) {
  ++*static_cast<uint64_t*>(data);
  return 0;
}

}  // namespace

struct Pattern::Compiled {
  pcre2_code* code = nullptr;
  uint64_t items = 1;  // callout points: the items of the pattern, and its end
  ~Compiled() { pcre2_code_free(code); }
};

std::string onig_to_pcre2(std::string_view p) {
  const auto fail = [&](const std::string& why) {
    throw Error("tokenizer: regex '" + model::excerpt(p) + "': " + why);
  };
  std::string out;
  out.reserve(p.size() + 64);
  bool in_class = false;
  bool class_start = false;  // just after '[' or '[^', where ']' is a literal
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\') {
      if (i + 1 >= p.size()) fail("ends with a lone backslash");
      const char n = p[++i];
      class_start = false;
      if (n == 's' || n == 'h') {
        const std::string_view body = n == 's' ? kWhiteSpaceClass : kHexClass;
        if (in_class) {
          out += body;
        } else {
          out += '[';
          out += body;
          out += ']';
        }
      } else if (n == 'S' || n == 'H') {
        if (in_class) fail(std::string("\\") + n + " inside a character class is not supported");
        out += "[^";
        out += n == 'S' ? kWhiteSpaceClass : kHexClass;
        out += ']';
      } else {
        out += '\\';
        out += n;
      }
      continue;
    }
    if (in_class) {
      if (c == ']' && !class_start) {
        in_class = false;
      } else if (c == '[') {
        if (i + 1 < p.size() && p[i + 1] == ':') {  // POSIX class such as [:alpha:]
          const size_t e = p.find(":]", i + 2);
          if (e == std::string_view::npos) fail("unterminated POSIX class");
          out.append(p.substr(i, e + 2 - i));
          i = e + 1;
          class_start = false;
          continue;
        }
        fail("nested character classes (Oniguruma set operations) are not supported");
      } else if (c == '&' && i + 1 < p.size() && p[i + 1] == '&') {
        fail("character class intersection '&&' is not supported");
      }
      out += c;
      class_start = false;
      continue;
    }
    out += c;
    if (c == '[') {
      in_class = true;
      class_start = true;
      if (i + 1 < p.size() && p[i + 1] == '^') {
        out += '^';
        ++i;
      }
    }
  }
  if (in_class) fail("unterminated character class");
  return out;
}

Pattern Pattern::literal(std::string text) {
  Pattern p;
  p.source_ = std::move(text);
  return p;
}

Pattern Pattern::regex(const std::string& onig_pattern) {
  const std::string translated = onig_to_pcre2(onig_pattern);
  int err = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_AUTO_CALLOUT, &err, &offset, nullptr);
  if (!code)
    throw Error("tokenizer: regex '" + model::excerpt(onig_pattern) +
                "' does not compile: " + pcre2_message(err) +
                " at offset " + std::to_string(offset));
  auto compiled = std::make_shared<Compiled>();
  compiled->code = code;
  uint64_t items = 0;
  pcre2_callout_enumerate(code, count_item, &items);
  compiled->items = std::max<uint64_t>(items, 1);
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // without JIT the interpreter still works
  Pattern p;
  p.source_ = onig_pattern;
  p.is_regex_ = true;
  p.re_ = std::move(compiled);
  return p;
}

std::vector<std::pair<size_t, size_t>> Pattern::find_all(std::string_view s) const {
  std::vector<std::pair<size_t, size_t>> out;
  if (!is_regex_) {
    if (source_.empty()) return out;
    for (size_t pos = s.find(source_); pos != std::string_view::npos;
         pos = s.find(source_, pos + source_.size()))
      out.emplace_back(pos, pos + source_.size());
    return out;
  }
  pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
  if (!md) throw Error("tokenizer: out of memory for regex match data");
  MatchEnv& env = match_env();
  const uint64_t max_steps = max_regex_steps(re_->items, s.size());
  StepBudget budget{max_steps};
  pcre2_set_callout(env.context, take_step, &budget);
  size_t pos = 0;
  size_t last_end = std::string_view::npos;
  while (pos <= s.size()) {
    // The input was validated as UTF-8 once; checking it again per call would be quadratic.
    const int rc = pcre2_match(re_->code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                               PCRE2_NO_UTF_CHECK, md, env.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      pcre2_match_data_free(md);
      pcre2_set_callout(env.context, nullptr, nullptr);
      // PCRE2's match, depth and heap limits bound the work at each start position, the step
      // budget that of the whole text: a pattern that backtracks catastrophically, once or at
      // every position of a long text, fails here instead of running for hours.
      const std::string why =
          rc == PCRE2_ERROR_CALLOUT
              ? "more than " + std::to_string(max_steps) + " steps for a text of " +
                    std::to_string(s.size()) + " bytes"
          : rc == PCRE2_ERROR_MATCHLIMIT || rc == PCRE2_ERROR_DEPTHLIMIT ||
                  rc == PCRE2_ERROR_HEAPLIMIT || rc == PCRE2_ERROR_JIT_STACKLIMIT
              ? pcre2_message(rc)
              : "";
      throw Error("tokenizer: regex '" + model::excerpt(source_) + "' failed to match: " +
                  (why.empty() ? pcre2_message(rc)
                               : "it backtracks too much on this text (" + why + ")"));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t b = ov[0], e = ov[1];
    if (b == e) {
      if (b != last_end) {
        out.emplace_back(b, e);
        last_end = e;
      }
      if (b >= s.size()) break;
      pos = b + utf8_length(static_cast<unsigned char>(s[b]));
    } else {
      out.emplace_back(b, e);
      last_end = e;
      pos = e;
    }
  }
  pcre2_match_data_free(md);
  pcre2_set_callout(env.context, nullptr, nullptr);
  return out;
}

std::string Pattern::replace_all(std::string_view s, std::string_view content) const {
  std::string out;
  out.reserve(s.size());
  size_t prev = 0;
  const size_t limit = max_growth(s.size());
  for (const auto& [b, e] : find_all(s)) {
    if (out.size() + (b - prev) + content.size() > limit)
      throw Error("tokenizer: replacing '" + model::excerpt(source_) + "' by '" +
                  model::excerpt(content) + "' makes a text of " + std::to_string(s.size()) +
                  " bytes longer than " + std::to_string(limit) + " bytes");
    out.append(s.substr(prev, b - prev));
    out.append(content);
    prev = e;
  }
  out.append(s.substr(prev));
  return out;
}

}  // namespace cca::tok::detail

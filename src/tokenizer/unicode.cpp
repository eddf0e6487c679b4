// UTF-8 handling and NFC normalization for the tokenizer (tables in unicode_tables.cpp).
#include "tokenizer/unicode.hpp"

#include <algorithm>
#include <unordered_map>
#include <vector>

namespace cca::tok::detail {

namespace {

// Length of the well-formed UTF-8 prefix of the sequence at s[i] that could still complete a
// character (Unicode Table 3-7), and whether it is a whole character.
struct SeqCheck {
  size_t length;  // bytes examined that belong to the (possibly broken) sequence, >= 1
  bool valid;
};

SeqCheck check_sequence(std::string_view s, size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {1, true};
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {1, false};
  }
  for (size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) return {k, false};
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) return {k, false};
  }
  return {need, true};
}

constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

uint8_t combining_class(char32_t cp) {
  if (cp < 0x300) return 0;
  const auto* end = kCombiningClasses + kNumCombiningClasses;
  const auto* it = std::lower_bound(kCombiningClasses, end, cp,
                                    [](const CombiningClass& c, char32_t v) { return c.cp < v; });
  return it != end && it->cp == cp ? it->ccc : 0;
}

const Decomposition* find_decomposition(char32_t cp) {
  const auto* end = kDecompositions + kNumDecompositions;
  const auto* it = std::lower_bound(kDecompositions, end, cp,
                                    [](const Decomposition& d, char32_t v) { return d.cp < v; });
  return it != end && it->cp == cp ? it : nullptr;
}

void decompose(char32_t cp, std::vector<char32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const char32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (cp < 0xC0) {  // nothing below U+00C0 decomposes
    out.push_back(cp);
    return;
  }
  const Decomposition* d = find_decomposition(cp);
  if (!d) {
    out.push_back(cp);
    return;
  }
  decompose(d->first, out);
  if (d->second) decompose(d->second, out);
}

const std::unordered_map<uint64_t, char32_t>& composition_map() {
  static const auto* map = [] {
    auto* m = new std::unordered_map<uint64_t, char32_t>();
    for (size_t i = 0; i < kNumDecompositions; ++i) {
      const Decomposition& d = kDecompositions[i];
      if (d.composes) m->emplace((uint64_t(d.first) << 32) | d.second, d.cp);
    }
    return m;
  }();
  return *map;
}

// The primary composite of (a, b), or 0.
char32_t compose(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto& m = composition_map();
  const auto it = m.find((uint64_t(a) << 32) | b);
  return it == m.end() ? 0 : it->second;
}

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const SeqCheck c = check_sequence(s, i);
    if (!c.valid) return i;
    i += c.length;
  }
  return std::string_view::npos;
}

char32_t next_code_point(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  const size_t n = utf8_length(b0);
  char32_t cp = n == 1 ? b0 : n == 2 ? (b0 & 0x1F) : n == 3 ? (b0 & 0x0F) : (b0 & 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    const SeqCheck c = check_sequence(bytes, i);
    if (c.valid)
      out.append(bytes.substr(i, c.length));
    else
      out.append("\xEF\xBF\xBD");
    i += c.length;
  }
  return out;
}

bool is_white_space(char32_t cp) {
  if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  if (cp < 0x85) return false;
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

std::string nfc(std::string_view s) {
  // Text below U+0300 (lead bytes below 0xCC) is already in NFC.
  if (std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0xCC; }))
    return std::string(s);
  std::vector<char32_t> d;
  d.reserve(s.size());
  for (size_t i = 0; i < s.size();) decompose(next_code_point(s, i), d);

  // Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < d.size(); ++i) {
    const uint8_t c = combining_class(d[i]);
    if (c == 0) continue;
    size_t j = i;
    while (j > 0) {
      const uint8_t p = combining_class(d[j - 1]);
      if (p == 0 || p <= c) break;
      std::swap(d[j - 1], d[j]);
      --j;
    }
  }

  // Canonical composition: a character joins the last starter unless a character between them
  // has class 0 or a class >= its own (it is blocked).
  std::vector<char32_t> r;
  r.reserve(d.size());
  ptrdiff_t starter = -1;
  for (const char32_t c : d) {
    const uint8_t cc = combining_class(c);
    if (starter >= 0) {
      const bool adjacent = static_cast<ptrdiff_t>(r.size()) - 1 == starter;
      const uint8_t last_cc = adjacent ? 0 : combining_class(r.back());
      if (adjacent || (last_cc != 0 && last_cc < cc)) {
        if (const char32_t comp = compose(r[starter], c)) {
          r[starter] = comp;
          continue;
        }
      }
    }
    if (cc == 0) starter = static_cast<ptrdiff_t>(r.size());
    r.push_back(c);
  }
  std::string out;
  out.reserve(s.size());
  for (const char32_t c : r) append_utf8(out, c);
  return out;
}

}  // namespace cca::tok::detail

// UTF-8 and Unicode helpers of the tokenizer: decoding, validation, the lossy byte-to-text
// conversion that Hugging Face decoders use, Unicode White_Space, and NFC normalization.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace cca::tok::detail {

// Byte offset of the first invalid UTF-8 sequence in `s`, or npos when `s` is valid UTF-8
// (surrogates and overlong forms are invalid).
size_t find_invalid_utf8(std::string_view s);

// Decodes the code point starting at s[i] (s must be valid UTF-8) and advances i past it.
char32_t next_code_point(std::string_view s, size_t& i);

// Byte length of the UTF-8 sequence that starts with lead byte `b` (1 for ASCII and stray bytes).
inline size_t utf8_length(unsigned char b) {
  return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

void append_utf8(std::string& out, char32_t cp);

// Rust's String::from_utf8_lossy: each maximal ill-formed subsequence becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes);

// Unicode White_Space (Rust's char::is_whitespace, Oniguruma's \s).
bool is_white_space(char32_t cp);

// Unicode canonical composition (NFC) of valid UTF-8 `s`.
std::string nfc(std::string_view s);

// The generated tables (unicode_tables.cpp), sorted by code point.
struct CombiningClass {
  char32_t cp;
  uint8_t ccc;
};
struct Decomposition {
  char32_t cp, first, second;  // second == 0: a singleton decomposition
  uint8_t composes;            // (first, second) composes back to cp under NFC
};
extern const CombiningClass kCombiningClasses[];
extern const size_t kNumCombiningClasses;
extern const Decomposition kDecompositions[];
extern const size_t kNumDecompositions;

}  // namespace cca::tok::detail

// Text of a generation as it is produced, token by token: what `cca generate` prints and what
// the server streams. Each token decodes only a short window of the ids (the last released
// token onwards), not the whole generation, and the text is released once it is final: a tail
// that ends in U+FFFD (an incomplete UTF-8 sequence that later byte tokens may complete) waits
// for the next token, and so does a tail that could be the start of a stop string. A stop
// string ends the text just before it. The released text equals the decode of all the ids
// whenever that decode never rewrites earlier characters; a byte-fallback tokenizer does when
// a run of byte tokens is not UTF-8 (all of the run's bytes become U+FFFD), and the stream then
// keeps what it released.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace cca::tok {

class TextStream {
 public:
  // `decode`: the text of a run of ids (Tokenizer::decode with the caller's skip_special).
  explicit TextStream(std::function<std::string(const std::vector<int32_t>&)> decode,
                      std::vector<std::string> stops = {});

  // Takes the next token; returns the text that became final with it ("" while held back, and
  // after a stop string).
  std::string add(int32_t id);
  // The end of the generation: the text still held back.
  std::string finish();

  bool stopped() const { return stopped_; }  // a stop string ended the text
  const std::string& text() const { return text_; }  // everything released so far
  int64_t tokens() const { return int64_t(ids_.size()); }

 private:
  std::string release(bool final);
  void take_window(bool final);
  std::function<std::string(const std::vector<int32_t>&)> decode_;
  std::vector<std::string> stops_;
  size_t longest_stop_ = 0;
  std::vector<int32_t> ids_;
  size_t prefix_ = 0, read_ = 0;  // ids [prefix_, read_) decoded already; window starts at prefix_
  std::string pending_, text_;
  bool stopped_ = false;
};

}  // namespace cca::tok

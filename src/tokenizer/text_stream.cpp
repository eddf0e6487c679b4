#include "tokenizer/text_stream.hpp"

#include <algorithm>

namespace cca::tok {
namespace {

const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace

TextStream::TextStream(std::function<std::string(const std::vector<int32_t>&)> decode,
                       std::vector<std::string> stops)
    : decode_(std::move(decode)), stops_(std::move(stops)) {
  std::erase_if(stops_, [](const std::string& s) { return s.empty(); });
  for (const std::string& s : stops_) longest_stop_ = std::max(longest_stop_, s.size());
}

// The text of ids [prefix_, end) minus that of [prefix_, read_) is what the ids since read_ add:
// both decodes start at the same token, so decoder rules that look at the first token (a
// stripped leading space) treat them alike. The window moves on once its text is final.
void TextStream::take_window(bool final) {
  const std::vector<int32_t> all(ids_.begin() + int64_t(prefix_), ids_.end());
  const std::string now = decode_(all);
  const std::string before =
      read_ > prefix_ ? decode_({ids_.begin() + int64_t(prefix_), ids_.begin() + int64_t(read_)})
                      : std::string();
  if (now.size() > before.size() && (final || !ends_with(now, kReplacement)) &&
      now.compare(0, before.size(), before) == 0) {
    pending_ += now.substr(before.size());
    prefix_ = read_;
    read_ = ids_.size();
  }
}

std::string TextStream::add(int32_t id) {
  if (stopped_) return {};
  ids_.push_back(id);
  take_window(false);
  return release(false);
}

std::string TextStream::finish() {
  if (stopped_) return {};
  if (read_ < ids_.size()) take_window(true);
  return release(true);
}

std::string TextStream::release(bool final) {
  // A stop string starts in the pending text: what was released never ends with the start of
  // one (that tail is held back below).
  size_t at = std::string::npos;
  for (const std::string& s : stops_) at = std::min(at, pending_.find(s));
  if (at != std::string::npos) {
    std::string out = pending_.substr(0, at);
    text_ += out;
    pending_.clear();
    stopped_ = true;
    return out;
  }
  size_t hold = 0;
  if (!final) {
    for (size_t k = std::min(pending_.size(), longest_stop_ ? longest_stop_ - 1 : 0); k > 0; --k) {
      const std::string_view tail(pending_.data() + pending_.size() - k, k);
      if (std::any_of(stops_.begin(), stops_.end(),
                      [&](const std::string& s) { return s.compare(0, k, tail) == 0; })) {
        hold = k;
        break;
      }
    }
  }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  text_ += out;
  return out;
}

}  // namespace cca::tok

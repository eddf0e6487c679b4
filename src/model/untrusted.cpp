#include "model/untrusted.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "cca/error.hpp"

namespace cca::model {

namespace {

// Closes a file descriptor on scope exit.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// The byte offset where nesting first goes deeper than kMaxJsonDepth, or npos. Counts brackets
// outside strings; the parser checks everything else.
size_t too_deep_at(std::string_view text) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;  // the escaped character cannot end the string
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) return i;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return std::string_view::npos;
}

}  // namespace

std::string read_text_file(const std::string& path, const std::string& what, int64_t max_bytes) {
  // O_NONBLOCK: opening a FIFO for reading must not wait for a writer; it is refused below.
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK)};
  if (f.fd < 0) {
    if (errno == ENOENT) throw Error(what + " not found: " + path);
    throw Error("cannot open " + what + " " + path + ": " + std::strerror(errno));
  }
  struct stat st {};
  check(::fstat(f.fd, &st) == 0, "cannot read " + what + " " + path + ": " + std::strerror(errno));
  if (S_ISDIR(st.st_mode)) throw Error("cannot read " + what + " " + path + ": it is a directory");
  check(S_ISREG(st.st_mode), "cannot read " + what + " " + path +
                                 ": not a regular file (a FIFO, socket or device is refused)");
  check(int64_t(st.st_size) <= max_bytes,
        what + " " + path + " is too large: " + std::to_string(st.st_size) +
            " bytes, the limit is " + std::to_string(max_bytes));
  std::string out(size_t(st.st_size), '\0');
  size_t have = 0;
  while (have < out.size()) {
    const ssize_t n = ::read(f.fd, out.data() + have, out.size() - have);
    if (n < 0 && errno == EINTR) continue;
    check(n >= 0, "error reading " + what + " " + path + ": " + std::strerror(errno));
    if (n == 0) break;  // the file shrank while we read it
    have += size_t(n);
  }
  out.resize(have);
  return out;
}

nlohmann::json parse_json(std::string_view text, const std::string& source) {
  if (const size_t at = too_deep_at(text); at != std::string_view::npos)
    throw Error(source + ": JSON nested deeper than " + std::to_string(kMaxJsonDepth) +
                " levels (at byte " + std::to_string(at) + ")");
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // a syntax error, bad UTF-8, 1e400
    // "[json.exception.parse_error.101] parse error at line 1, column 4: syntax error ...":
    // without the tag, and with the token it quotes (which can be long) cut short.
    std::string detail = e.what();
    if (const size_t tag = detail.find("] "); detail[0] == '[' && tag != std::string::npos)
      detail.erase(0, tag + 2);
    if (detail.rfind("parse error", 0) == 0) detail.replace(0, 11, "invalid JSON");
    throw Error(source + ": not valid JSON: " + excerpt(detail, 200));
  }
}

std::string excerpt(std::string_view s, size_t max_bytes) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    // One character: a control byte escaped (4 bytes), else the bytes of its UTF-8 sequence.
    std::string piece;
    if (c < 0x20 || c == 0x7F) {
      char esc[8];
      std::snprintf(esc, sizeof esc, "\\x%02X", c);
      piece = esc;
    } else {
      const size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
      piece = s.substr(i, std::min(n, s.size() - i));
    }
    if (out.size() + piece.size() > max_bytes) break;  // the bound is on what is printed
    out += piece;
    i += c < 0x20 || c == 0x7F ? 1 : piece.size();
  }
  if (i < s.size()) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

std::string json_excerpt(const nlohmann::json& v, size_t max_bytes) {
  return excerpt(v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), max_bytes);
}

}  // namespace cca::model

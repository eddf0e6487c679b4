// The one error type of the library: a message that names the bad value.
#pragma once
#include <stdexcept>
#include <string>

namespace cca {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Throws cca::Error with `message` unless `ok`.
inline void check(bool ok, const std::string& message) {
  if (!ok) throw Error(message);
}

}  // namespace cca

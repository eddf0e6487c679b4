// A progress bar on stderr for long prefills: tokens done, tokens/s and the time left. Drawn only
// when stderr is a terminal (or when forced), updated in place with "\r".
#pragma once
#include <cstdint>
#include <string>

namespace cca {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, bool enabled);
  ~ProgressBar();
  void update(int64_t done);
  void finish();  // ends the line

 private:
  std::string label_;
  int64_t total_;
  bool enabled_, open_ = false;
  double start_s_;
  int last_permille_ = -1;
};

double monotonic_seconds();

}  // namespace cca

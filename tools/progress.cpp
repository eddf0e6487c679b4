#include "progress.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace cca {

double monotonic_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

ProgressBar::ProgressBar(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled && ::isatty(2)),
      start_s_(monotonic_seconds()) {}

ProgressBar::~ProgressBar() {
  if (open_) std::fputc('\n', stderr);
}

void ProgressBar::update(int64_t done) {
  if (!enabled_ || total_ <= 0) return;
  const int permille = int(1000 * done / total_);
  if (permille == last_permille_) return;
  last_permille_ = permille;
  constexpr int kWidth = 30;
  const int fill = int(int64_t(kWidth) * done / total_);
  const double elapsed = std::max(1e-9, monotonic_seconds() - start_s_);
  const double rate = double(done) / elapsed;
  const double eta = rate > 0 ? double(total_ - done) / rate : 0;
  std::fprintf(stderr, "\r%s [%.*s%*s] %lld/%lld tokens (%d%%) %.0f tok/s, %.0f s left ",
               label_.c_str(), fill, "==============================", kWidth - fill, "",
               (long long)done, (long long)total_, permille / 10, rate, eta);
  std::fflush(stderr);
  open_ = true;
}

void ProgressBar::finish() {
  if (open_) std::fputc('\n', stderr);
  open_ = false;
}

}  // namespace cca

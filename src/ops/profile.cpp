#include "ops/profile.hpp"

#include <chrono>

#include "cca/error.hpp"
#include "ops/impl.hpp"

namespace cca::ops {
namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

Profile::Profile(Device device, void* stream) : device_(device), stream_(stream) {}

Profile::~Profile() {
  reset();
#ifdef CCA_WITH_CUDA
  for (void* e : free_events_) cuda::event_destroy(e);
#endif
}

void* Profile::event() {
#ifdef CCA_WITH_CUDA
  if (!free_events_.empty()) {
    void* e = free_events_.back();
    free_events_.pop_back();
    return e;
  }
  return cuda::event_create();
#else
  return nullptr;
#endif
}

void Profile::begin(const char* name, double flops) {
  if (!enabled_) return;
  Region r{name, flops, nullptr, nullptr, 0, 0};
  if (device_ == Device::cuda) {
#ifdef CCA_WITH_CUDA
    r.start = event();
    cuda::event_record(r.start, stream_);
#endif
  } else {
    r.t0 = now_s();
  }
  open_.push_back(r);
}

void Profile::end() {
  if (!enabled_ || open_.empty()) return;
  Region r = open_.back();
  open_.pop_back();
  if (device_ == Device::cuda) {
#ifdef CCA_WITH_CUDA
    r.stop = event();
    cuda::event_record(r.stop, stream_);
#endif
  } else {
    r.t1 = now_s();
  }
  done_.push_back(r);
}

std::vector<Profile::Row> Profile::report() {
  std::vector<Row> rows;
  auto row_of = [&rows](const char* name) -> Row& {
    for (Row& r : rows)
      if (r.name == name) return r;
    rows.push_back(Row{name});
    return rows.back();
  };
  for (const Region& r : done_) {
    Row& row = row_of(r.name);
    row.calls += 1;
    row.flops += r.flops;
#ifdef CCA_WITH_CUDA
    if (device_ == Device::cuda) {
      row.ms += cuda::event_elapsed_ms(r.start, r.stop);
      continue;
    }
#endif
    row.ms += 1e3 * (r.t1 - r.t0);
  }
  return rows;
}

void Profile::reset() {
  for (const Region& r : done_) {
    if (r.start) free_events_.push_back(r.start);
    if (r.stop) free_events_.push_back(r.stop);
  }
  done_.clear();
  open_.clear();
}

}  // namespace cca::ops

// Where the time of a run goes: named regions of queued work, timed by CUDA events on the GPU
// (recorded on the context's stream around the region's launches) or by the clock on the CPU
// (whose ops are synchronous). Off by default; when off a region costs one branch. A profiled run
// is slower than a plain one (an event pair per region, no CUDA graphs): use it for shares, not
// headline numbers.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cca/attention.hpp"
#include "cca/tensor.hpp"

namespace cca::ops {

class Profile final : public PhaseTimer {
 public:
  Profile(Device device, void* stream);
  ~Profile() override;
  Profile(const Profile&) = delete;
  Profile& operator=(const Profile&) = delete;

  void set_enabled(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }
  // A region; `flops` (optional) is the work it does, for a rate. Regions nest.
  void begin(const char* name) override { begin(name, 0.0); }
  void begin(const char* name, double flops);
  void end() override;

  struct Row {
    std::string name;
    int64_t calls = 0;
    double ms = 0, flops = 0;
  };
  // The regions so far, summed by name in the order they first ended (waits for the stream).
  // Nested regions are reported as well as the regions that hold them.
  std::vector<Row> report();
  void reset();

 private:
  struct Region {
    const char* name;
    double flops;
    void *start, *stop;  // CUDA events
    double t0, t1;       // host clock (CPU), seconds
  };
  bool enabled_ = false;
  Device device_;
  void* stream_;
  std::vector<Region> done_;
  std::vector<Region> open_;
  std::vector<void*> free_events_;
  void* event();
};

// Times the ops queued during its life as one region of `profile` (when it is enabled).
class Timed {
 public:
  Timed(Profile& profile, const char* name, double flops = 0) : p_(profile.enabled() ? &profile : nullptr) {
    if (p_) p_->begin(name, flops);
  }
  ~Timed() {
    if (p_) p_->end();
  }
  Timed(const Timed&) = delete;
  Timed& operator=(const Timed&) = delete;

 private:
  Profile* p_;
};

}  // namespace cca::ops

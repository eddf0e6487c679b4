// Scratch memory owned by a backend (host or device), freed on scope exit.
#pragma once
#include "backend.hpp"

namespace cca {

class Workspace {
 public:
  Workspace(const Backend& be, int64_t bytes) : be_(be), ptr_(bytes > 0 ? be.alloc(bytes) : nullptr) {}
  ~Workspace() { if (ptr_) be_.free(ptr_); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* data() const { return ptr_; }

 private:
  const Backend& be_;
  void* ptr_;
};

}  // namespace cca

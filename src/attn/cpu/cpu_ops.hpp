// The operations of the optimised CPU backend (cpu_attend.cpp, cpu_attend_bwd.cpp, cpu_pool.cpp).
#pragma once
#include "backend.hpp"

namespace cca::cpu {

// Tiled online-softmax attention over the core/sink/local segments of `p` (backend.hpp).
void attend(const AttendProblem& p);
// Few queries per KV head (decoding): rows vectorised over D, each K/V row read once per KV head.
constexpr int64_t kDecodeMaxRows = 16;  // n * Hq/Hkv at or below this takes attend_decode
bool prefers_decode_path(const AttendProblem& p);
void attend_decode(const AttendProblem& p);
// Core tokens of groups [p.group_begin, p.group_end).
void pool(const PoolProblem& p);
// Backward (backend.hpp): delta = rowsum(dout * out); the attention backward (cpu_attend_bwd.cpp);
// the pooling backward.
void attend_bwd_delta(const AttendBwdProblem& p);
void attend_bwd(const AttendBwdProblem& p);
void pool_bwd(const PoolBwdProblem& p);
// OpenMP team size for `items` work items and `flops` of work, asking for `threads` (0 = all).
int thread_count(int threads, int64_t items, double flops);
double attend_flops(const AttendProblem& p);

}  // namespace cca::cpu

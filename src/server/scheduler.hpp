// Continuous batching over the engine: one thread owns the engine and runs step after step;
// requests join the running batch and leave it between steps. Each step holds one token of
// every decoding sequence and fills the rest of the engine's chunk with prompt tokens of the
// sequences still prefilling (the oldest first), so a long prompt is prefilled in chunks
// between the decode steps of the others and no sequence waits for another's prompt. Each
// sequence has its own compressed caches. Admission is by cache budget: a request reserves the
// cache bytes of its capacity (prompt + max tokens, within the context limit); one that can
// never fit is refused with the numbers, one that cannot fit now waits in a bounded FIFO queue.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cca/error.hpp"
#include "engine/engine.hpp"
#include "server/metrics.hpp"

namespace cca::server {

struct SchedulerOptions {
  int64_t queue = 64;      // requests that may wait
  int64_t kv_budget = 0;   // cache bytes the running sequences may reserve in all
  int64_t max_context = 0; // the context limit of every sequence (0: none)
};

using Clock = std::chrono::steady_clock;

// One generation.
struct Job {
  model::TokenIds prompt;
  model::SamplingParams sampling;
  engine::StopRules rules;  // the scheduler sets max_context
  int top_logprobs = -1;    // -1: none; else the chosen token's and this many others'
  Clock::time_point arrival = Clock::now();
  // On the scheduler thread, each new token (with its logprobs when asked): false ends the
  // generation after it (a stop string).
  std::function<bool(int32_t id, const engine::Engine::TokenLogprob* lp)> on_token;
  // Once, at the end: "stop token", "max new tokens", "max context", "stop string",
  // "cancelled", or "error: ..." (an engine failure).
  std::function<void(const std::string& reason)> on_finish;
};

// A job the scheduler does not take.
struct Refusal : Error {
  enum Kind { never_fits, queue_full, shutting_down };
  Refusal(Kind k, const std::string& what) : Error(what), kind(k) {}
  Kind kind;
};

class Scheduler {
 public:
  // The engine's max_batch is the number of sequences that run at once; its chunk the tokens of
  // a step. Needs max_batch <= chunk / 2, so that a step always has room for prompt tokens.
  Scheduler(engine::Engine& eng, const SchedulerOptions& opt, Metrics* metrics = nullptr);
  ~Scheduler();  // cancels what is left and stops the thread
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  using Ticket = uint64_t;
  // Queues the job (Refusal when it can never fit, the queue is full or the scheduler drains).
  Ticket submit(Job job);
  // Ends a job: removed from the queue, or its sequence freed before the next step; its
  // on_finish gets "cancelled". Nothing happens for a job that has finished.
  void cancel(Ticket t);
  // Takes no more jobs and cancels the queued ones; the running ones may finish until
  // `deadline`, then they are cancelled. Returns when none is left.
  void drain(Clock::time_point deadline);

  SchedulerGauges gauges() const;
  // The cache bytes a job with this prompt length and these rules reserves.
  int64_t reservation(int64_t prompt_tokens, const engine::StopRules& rules) const;
  const SchedulerOptions& options() const { return opt_; }

 private:
  struct Slot {
    Ticket ticket = 0;
    Job job;
    int64_t bytes = 0;
    std::unique_ptr<engine::Sequence> seq;
    int64_t fed = 0;  // prompt tokens fed
    int64_t generated = 0;
    int32_t next = 0;  // the last token chosen, fed by the next step
    Clock::time_point last_token;
  };
  void loop();
  void run_step();
  void finish(Slot& s, const std::string& reason);
  // Delivers a chosen token; false when the sequence finished with it.
  bool deliver(Slot& s, int32_t id, const engine::Engine::TokenLogprob* lp);

  engine::Engine& eng_;
  SchedulerOptions opt_;
  Metrics* metrics_;
  mutable std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::deque<std::unique_ptr<Slot>> queue_;   // guarded by mu_
  std::set<Ticket> cancels_;                  // guarded by mu_
  std::vector<std::unique_ptr<Slot>> running_;  // the loop thread's
  std::vector<Ticket> running_tickets_;       // guarded by mu_ (for cancel and gauges)
  int64_t reserved_ = 0, held_ = 0, steps_ = 0;  // guarded by mu_
  Ticket next_ticket_ = 0;
  bool closing_ = false, cancel_all_ = false, stop_ = false;
  std::thread thread_;
};

}  // namespace cca::server

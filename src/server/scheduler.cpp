#include "server/scheduler.hpp"

#include <algorithm>
#include <sstream>

namespace cca::server {
namespace {

std::string gib(int64_t bytes) {
  std::ostringstream o;
  o.precision(bytes < (int64_t(1) << 30) ? 4 : 3);
  o << double(bytes) / double(int64_t(1) << 30) << " GiB";
  return o.str();
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

Scheduler::Scheduler(engine::Engine& eng, const SchedulerOptions& opt, Metrics* metrics)
    : eng_(eng), opt_(opt), metrics_(metrics) {
  check(opt_.queue >= 0, "the queue length must be >= 0");
  check(opt_.kv_budget > 0, "the cache budget must be > 0 bytes");
  check(eng_.max_batch() * 2 <= eng_.chunk(),
        "running " + std::to_string(eng_.max_batch()) + " sequences at once needs steps of at "
        "least " + std::to_string(2 * eng_.max_batch()) + " tokens (--chunk; it is " +
        std::to_string(eng_.chunk()) + "): a step holds one token of each decoding sequence and "
        "at least as many prompt tokens");
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
    closing_ = true;
    cancel_all_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

int64_t Scheduler::reservation(int64_t prompt_tokens, const engine::StopRules& rules) const {
  return eng_.sequence_cache_bytes(rules.capacity(prompt_tokens));
}

Scheduler::Ticket Scheduler::submit(Job job) {
  job.rules.max_context = opt_.max_context;
  auto s = std::make_unique<Slot>();
  s->bytes = reservation(int64_t(job.prompt.size()), job.rules);
  if (s->bytes > opt_.kv_budget) {
    std::ostringstream o;
    o << "this request can never fit: its caches need " << gib(s->bytes) << " ("
      << job.prompt.size() << " prompt tokens + up to " << job.rules.max_new_tokens
      << " generated, " << eng_.variant().describe() << " in " << dtype_name(eng_.kv_dtype())
      << ") and the server's cache budget is " << gib(opt_.kv_budget)
      << " (--kv-budget); ask for fewer tokens";
    throw Refusal(Refusal::never_fits, o.str());
  }
  s->job = std::move(job);
  std::lock_guard<std::mutex> g(mu_);
  if (closing_) throw Refusal(Refusal::shutting_down, "the server is shutting down");
  if (int64_t(queue_.size()) >= opt_.queue)
    throw Refusal(Refusal::queue_full,
                  "the server is busy: " + std::to_string(queue_.size()) +
                      " requests are waiting already (--queue " + std::to_string(opt_.queue) +
                      "); retry later");
  s->ticket = ++next_ticket_;
  const Ticket t = s->ticket;
  queue_.push_back(std::move(s));
  cv_.notify_all();
  return t;
}

void Scheduler::cancel(Ticket t) {
  std::lock_guard<std::mutex> g(mu_);
  cancels_.insert(t);
  cv_.notify_all();
}

void Scheduler::drain(Clock::time_point deadline) {
  {
    std::lock_guard<std::mutex> g(mu_);
    closing_ = true;
    for (const auto& s : queue_) cancels_.insert(s->ticket);
  }
  cv_.notify_all();
  std::unique_lock<std::mutex> lk(mu_);
  if (!idle_cv_.wait_until(lk, deadline, [&] { return queue_.empty() && running_tickets_.empty(); })) {
    cancel_all_ = true;
    cv_.notify_all();
    idle_cv_.wait(lk, [&] { return queue_.empty() && running_tickets_.empty(); });
  }
}

SchedulerGauges Scheduler::gauges() const {
  std::lock_guard<std::mutex> g(mu_);
  SchedulerGauges r;
  r.queued = int64_t(queue_.size());
  r.running = int64_t(running_tickets_.size());
  r.kv_reserved = reserved_;
  r.kv_held = held_;
  r.kv_budget = opt_.kv_budget;
  r.steps = steps_;
  return r;
}

void Scheduler::finish(Slot& s, const std::string& reason) {
  if (metrics_ && s.generated > 0) metrics_->e2e(seconds(Clock::now() - s.job.arrival));
  s.seq.reset();  // the caches go now, and the gauges say so before the client hears
  {
    std::lock_guard<std::mutex> g(mu_);
    reserved_ -= s.bytes;
    std::erase(running_tickets_, s.ticket);
  }
  s.ticket = 0;  // finished: swept from running_ after the step
  if (s.job.on_finish) s.job.on_finish(reason);
}

bool Scheduler::deliver(Slot& s, int32_t id, const engine::Engine::TokenLogprob* lp) {
  const Clock::time_point now = Clock::now();
  if (metrics_) {
    if (s.generated == 0) metrics_->ttft(seconds(now - s.job.arrival));
    else metrics_->itl(seconds(now - s.last_token));
    metrics_->generated_tokens(1);
  }
  s.last_token = now;
  ++s.generated;
  const bool more = s.job.on_token ? s.job.on_token(id, lp) : true;
  const char* why = s.job.rules.after_token(id, s.generated);
  if (!why && !more) why = "stop string";
  if (!why) why = s.job.rules.before_step(s.seq->length());
  if (why) {
    finish(s, why);
    return false;
  }
  s.next = id;
  return true;
}

void Scheduler::loop() {
  while (true) {
    std::vector<std::unique_ptr<Slot>> admitted, dropped;
    std::vector<Ticket> cancelled;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] {
        return stop_ || !queue_.empty() || !running_tickets_.empty() || !cancels_.empty();
      });
      if (cancel_all_) {
        for (const auto& s : queue_) cancels_.insert(s->ticket);
        for (const Ticket t : running_tickets_) cancels_.insert(t);
      }
      for (auto it = queue_.begin(); it != queue_.end();) {
        if (cancels_.count((*it)->ticket)) {
          dropped.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
      for (const Ticket t : running_tickets_)
        if (cancels_.count(t)) cancelled.push_back(t);
      cancels_.clear();
      // Admission: in arrival order, while a slot and the cache budget allow.
      while (!queue_.empty() && !cancel_all_ &&
             int64_t(running_tickets_.size() + admitted.size()) < eng_.max_batch() &&
             reserved_ + queue_.front()->bytes <= opt_.kv_budget) {
        reserved_ += queue_.front()->bytes;
        admitted.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      for (const auto& s : admitted) running_tickets_.push_back(s->ticket);
      if (stop_ && queue_.empty() && running_tickets_.empty() && admitted.empty() &&
          dropped.empty() && running_.empty()) {
        idle_cv_.notify_all();
        return;
      }
    }
    for (auto& s : dropped)
      if (s->job.on_finish) s->job.on_finish("cancelled");
    for (auto& s : running_)
      if (std::find(cancelled.begin(), cancelled.end(), s->ticket) != cancelled.end())
        finish(*s, "cancelled");
    for (auto& s : admitted) {
      try {
        s->seq = eng_.new_sequence(s->job.rules.capacity(int64_t(s->job.prompt.size())));
        if (metrics_) metrics_->prompt_tokens(int64_t(s->job.prompt.size()));
      } catch (const std::exception& e) {
        finish(*s, std::string("error: ") + e.what());
        continue;
      }
      running_.push_back(std::move(s));
    }
    std::erase_if(running_, [](const auto& s) { return s->ticket == 0; });
    if (!running_.empty()) {
      try {
        run_step();
      } catch (const std::exception& e) {
        // The step's sequences are in an unknown state: they end with the error.
        for (auto& s : running_)
          if (s->ticket) finish(*s, std::string("error: ") + e.what());
      }
      std::erase_if(running_, [](const auto& s) { return s->ticket == 0; });
    }
    std::lock_guard<std::mutex> g(mu_);
    held_ = 0;
    for (const auto& s : running_) held_ += s->seq->kv_bytes();
    if (queue_.empty() && running_tickets_.empty()) idle_cv_.notify_all();
  }
}

void Scheduler::run_step() {
  std::vector<Slot*> decoding, prefilling;
  for (auto& s : running_)
    (s->fed < int64_t(s->job.prompt.size()) ? prefilling : decoding).push_back(s.get());
  std::vector<engine::Sequence*> seqs;
  std::vector<model::SamplingParams> sampling;
  std::vector<int32_t> choice_rows, counters;
  std::vector<Slot*> chosen;  // the slot of each choice row

  if (prefilling.empty()) {  // a pure decode step: Engine::decode (CUDA graphs on the GPU)
    std::vector<int32_t> toks;
    for (Slot* s : decoding) {
      seqs.push_back(s->seq.get());
      toks.push_back(s->next);
      sampling.push_back(s->job.sampling);
      choice_rows.push_back(int32_t(chosen.size()));
      chosen.push_back(s);
    }
    const std::vector<int32_t> next = eng_.decode(seqs, toks, sampling);
    for (size_t i = 0; i < chosen.size(); ++i) {
      Slot& s = *chosen[i];
      std::vector<engine::Engine::TokenLogprob> lp;
      if (s.job.top_logprobs >= 0)
        lp = eng_.chosen_logprobs(std::span(&choice_rows[i], 1), std::span(&next[i], 1),
                                  s.job.top_logprobs);
      deliver(s, next[i], lp.empty() ? nullptr : &lp[0]);
    }
  } else {
    // One token of each decoding sequence, then prompt chunks, oldest first.
    std::vector<model::TokenIds> parts;
    parts.reserve(running_.size());
    int64_t budget = eng_.chunk() - int64_t(decoding.size()), row = 0;
    for (Slot* s : decoding) {
      seqs.push_back(s->seq.get());
      parts.push_back({s->next});
      counters.push_back(int32_t(s->seq->length()));  // the position of the token fed
      choice_rows.push_back(int32_t(row++));
      sampling.push_back(s->job.sampling);
      chosen.push_back(s);
    }
    std::vector<std::pair<Slot*, int64_t>> fed;
    for (Slot* s : prefilling) {
      const int64_t n = std::min(budget, int64_t(s->job.prompt.size()) - s->fed);
      if (n <= 0) break;
      seqs.push_back(s->seq.get());
      parts.emplace_back(s->job.prompt.begin() + s->fed, s->job.prompt.begin() + s->fed + n);
      fed.emplace_back(s, n);
      row += n;
      budget -= n;
      if (s->fed + n == int64_t(s->job.prompt.size())) {  // the prompt's end: its first token
        choice_rows.push_back(int32_t(row - 1));
        counters.push_back(int32_t(s->job.prompt.size() - 1));
        sampling.push_back(s->job.sampling);
        chosen.push_back(s);
      }
    }
    std::vector<const model::TokenIds*> tp;
    for (const auto& p : parts) tp.push_back(&p);
    eng_.step(seqs, tp);
    for (auto& [s, n] : fed) s->fed += n;
    std::vector<int32_t> next;
    if (!chosen.empty()) next = eng_.choose(choice_rows, sampling, counters);
    for (size_t i = 0; i < chosen.size(); ++i) {
      Slot& s = *chosen[i];
      // As generate(): a prompt that fills the context gets no token.
      if (s.generated == 0 && s.fed == int64_t(s.job.prompt.size())) {
        if (const char* why = s.job.rules.max_new_tokens == 0 ? "max new tokens"
                                                               : s.job.rules.before_step(s.seq->length())) {
          finish(s, why);
          continue;
        }
      }
      std::vector<engine::Engine::TokenLogprob> lp;
      const int32_t r = int32_t(i);
      if (s.job.top_logprobs >= 0)
        lp = eng_.chosen_logprobs(std::span(&r, 1), std::span(&next[i], 1), s.job.top_logprobs);
      deliver(s, next[i], lp.empty() ? nullptr : &lp[0]);
    }
  }
  std::lock_guard<std::mutex> g(mu_);
  ++steps_;
}

}  // namespace cca::server

#include "server/http_server.hpp"

#include <arpa/inet.h>
#include <dirent.h>
#include <httplib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <random>

#include "cca/error.hpp"
#include "model/untrusted.hpp"
#include "server/api.hpp"
#include "tokenizer/text_stream.hpp"

namespace cca::server {
namespace {

using namespace std::chrono_literals;

int64_t unix_time() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string random_id(const char* prefix) {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> g(mu);
  char buf[40];
  std::snprintf(buf, sizeof buf, "%s-%016llx", prefix, (unsigned long long)rng());
  return buf;
}

uint64_t random_seed() {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> g(mu);
  return rng();
}

// The socket of the connection a handler serves, found by its two addresses: cpp-httplib 0.11
// gives a handler no way to see that its client has gone, and a non-streaming request would
// otherwise generate to the end for nobody. -1 when not found.
int find_connection_socket(const httplib::Request& req) {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return -1;
  int found = -1;
  while (dirent* e = readdir(d)) {
    const int fd = std::atoi(e->d_name);
    if (fd <= 2) continue;
    struct stat st{};
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage peer{}, local{};
    socklen_t pl = sizeof peer, ll = sizeof local;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&local), &ll) != 0)
      continue;
    auto port_of = [](const sockaddr_storage& a) {
      return a.ss_family == AF_INET ? ntohs(reinterpret_cast<const sockaddr_in&>(a).sin_port)
             : a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<const sockaddr_in6&>(a).sin6_port)
                                       : 0;
    };
    char host[INET6_ADDRSTRLEN] = {};
    if (peer.ss_family == AF_INET)
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in&>(peer).sin_addr, host, sizeof host);
    else if (peer.ss_family == AF_INET6)
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6&>(peer).sin6_addr, host, sizeof host);
    if (port_of(peer) == req.remote_port && port_of(local) == req.local_port &&
        req.remote_addr == host) {
      found = fd;
      break;
    }
  }
  closedir(d);
  return found;
}

// True when the peer has closed the connection (an orderly close or a reset).
bool peer_gone(int fd) {
  char c;
  const ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

// What a running generation hands from the scheduler thread to its HTTP handler.
struct Generation {
  struct Event {
    std::string text;
    std::vector<TokenInfo> lps;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Event> events;
  bool done = false;
  std::string reason;
  Completion c;  // text and counts so far
};

// cpp-httplib 0.11 listens with a backlog of 5 connections (CPPHTTPLIB_LISTEN_BACKLOG, fixed
// in the Debian library): more clients connecting at once than that lose connections. Calling
// listen() again on the bound socket raises the backlog.
class HttpServer : public httplib::Server {
 public:
  void raise_backlog(int n) {
    const int fd = svr_sock_;
    if (fd >= 0) ::listen(fd, n);
  }
};

}  // namespace

struct Server::Impl {
  Impl(engine::Engine& e, const tok::Tokenizer* t, model::GenerationConfig g, ChatTemplate ct,
       const SchedulerOptions& so, const ServerOptions& o)
      : eng(e), tok(t), gen(std::move(g)), chat(std::move(ct)), opt(o), sched(e, so, &metrics_) {}

  engine::Engine& eng;
  const tok::Tokenizer* tok;
  model::GenerationConfig gen;
  ChatTemplate chat;
  ServerOptions opt;
  Metrics metrics_;
  Scheduler sched;
  HttpServer http;
  int64_t started = unix_time();
  std::atomic<bool> draining{false};
  std::once_flag shutdown_once;
  std::mutex active_mu;
  std::condition_variable active_cv;
  int active = 0;  // generation handlers still writing

  void begin_active() {
    std::lock_guard<std::mutex> g(active_mu);
    ++active;
  }
  void end_active() {
    std::lock_guard<std::mutex> g(active_mu);
    --active;
    active_cv.notify_all();
  }

  void reply_json(httplib::Response& res, int status, const Json& j) {
    res.status = status;
    res.set_content(j.dump(), "application/json");
  }
  void reply_error(httplib::Response& res, const ApiError& e) {
    if (e.status == 503 || e.status == 429) res.set_header("Retry-After", "1");
    reply_json(res, e.status, e.body());
  }

  void authorize(const httplib::Request& req) {
    if (opt.api_key.empty()) return;
    const std::string h = req.get_header_value("Authorization");
    if (h.empty())
      throw ApiError(401, "no API key: send the header 'Authorization: Bearer <key>'", "",
                     "invalid_api_key");
    if (h != "Bearer " + opt.api_key)
      throw ApiError(401, "wrong API key", "", "invalid_api_key");
  }

  std::string token_text(int32_t id) const {
    if (!tok) return std::to_string(id);
    return tok->decode({id}, false);
  }

  model::TokenIds prompt_of(const Request& r) {
    model::TokenIds ids;
    if (r.endpoint == Endpoint::chat) {
      if (!tok) throw ApiError(400, "the model has no tokenizer.json: chat needs one", "messages");
      const std::string text = chat.render(r.messages);
      ids = tok->encode(text, false);  // the template writes the special tokens itself
    } else if (r.prompt_ids) {
      ids = *r.prompt_ids;
      const int64_t V = eng.config().vocab_size;
      for (size_t i = 0; i < ids.size(); ++i)
        if (ids[i] >= V)
          throw ApiError(400, "'prompt' token " + std::to_string(i) + " is " +
                                  std::to_string(ids[i]) + ", outside the model's vocabulary "
                                  "(vocab_size " + std::to_string(V) + ")",
                         "prompt");
    } else {
      if (!tok)
        throw ApiError(400, "the model has no tokenizer.json: send 'prompt' as token ids",
                       "prompt");
      try {
        ids = tok->encode(r.prompt, true);
      } catch (const Error& e) {
        throw ApiError(400, std::string("'prompt' cannot be tokenized: ") + e.what(), "prompt");
      }
    }
    if (ids.empty()) throw ApiError(400, "the prompt encodes to no tokens", "prompt");
    if (opt.max_context > 0 && int64_t(ids.size()) > opt.max_context)
      throw ApiError(400, "the prompt has " + std::to_string(ids.size()) +
                              " tokens, more than the server's context limit of " +
                              std::to_string(opt.max_context) + " (--max-context)",
                     r.endpoint == Endpoint::chat ? "messages" : "prompt", "context_length_exceeded");
    return ids;
  }

  void generate(const httplib::Request& req, httplib::Response& res, Endpoint ep) {
    const std::string name = ep == Endpoint::chat ? "chat" : "completions";
    std::shared_ptr<Generation> g;
    Scheduler::Ticket ticket = 0;
    Request r;
    const Clock::time_point arrival = Clock::now();
    try {
      authorize(req);
      if (draining) throw ApiError(503, "the server is shutting down");
      r = parse_request(ep, req.body);
      Job job;
      job.arrival = arrival;
      job.prompt = prompt_of(r);
      model::SamplingRequest sr = r.sampling;
      if (!r.seed_given) sr.seed = random_seed();
      try {
        job.sampling = model::resolve_sampling(sr, gen);
      } catch (const Error& e) {
        throw ApiError(400, e.what());
      }
      job.rules.max_new_tokens =
          r.max_tokens ? *r.max_tokens
          : ep == Endpoint::completions ? 16
          : std::max<int64_t>(1, (opt.max_context > 0 ? opt.max_context : 1 << 30) -
                                     int64_t(job.prompt.size()));
      if (!r.ignore_eos) {
        job.rules.stop_ids = gen.eos_token_ids;
        if (job.rules.stop_ids.empty() && tok && tok->eos_id()) job.rules.stop_ids.push_back(*tok->eos_id());
      }
      job.top_logprobs = r.top_logprobs;
      g = std::make_shared<Generation>();
      g->c.id = random_id(ep == Endpoint::chat ? "chatcmpl" : "cmpl");
      g->c.model = opt.model_id;
      g->c.created = unix_time();
      g->c.prompt_tokens = int64_t(job.prompt.size());
      auto text = std::make_shared<tok::TextStream>(
          [t = tok](const std::vector<int32_t>& ids) { return t ? t->decode(ids, true) : std::string(); },
          r.stop);
      const int top = r.top_logprobs;
      job.on_token = [this, g, text, top](int32_t id, const engine::Engine::TokenLogprob* lp) {
        Generation::Event ev;
        ev.text = text->add(id);
        if (lp) {
          TokenInfo info{token_text(id), lp->logprob, {}};
          for (const auto& [tid, v] : lp->top) info.top.emplace_back(token_text(tid), v);
          (void)top;
          ev.lps.push_back(std::move(info));
        }
        std::lock_guard<std::mutex> l(g->mu);
        ++g->c.completion_tokens;
        g->c.text += ev.text;
        for (const auto& i : ev.lps) g->c.logprobs.push_back(i);
        g->events.push_back(std::move(ev));
        g->cv.notify_all();
        return !text->stopped();
      };
      job.on_finish = [g, text](const std::string& reason) {
        const bool normal = reason != "cancelled" && reason.rfind("error", 0) != 0;
        const std::string tail = normal ? text->finish() : std::string();
        std::lock_guard<std::mutex> l(g->mu);
        if (!tail.empty()) {
          g->c.text += tail;
          g->events.push_back({tail, {}});
        }
        g->done = true;
        g->reason = reason;
        g->cv.notify_all();
      };
      try {
        ticket = sched.submit(std::move(job));
      } catch (const Refusal& e) {
        throw ApiError(e.kind == Refusal::never_fits ? 400 : 503, e.what(), "",
                       e.kind == Refusal::never_fits ? "context_length_exceeded" : "");
      }
    } catch (const ApiError& e) {
      reply_error(res, e);
      metrics_.request(name, e.status);
      return;
    }
    if (r.stream) stream(req, res, r, g, ticket, name);
    else wait(req, res, r, g, ticket, name);
  }

  // Non-streaming: waits for the end, watching the connection.
  void wait(const httplib::Request& req, httplib::Response& res, const Request& r,
            const std::shared_ptr<Generation>& g, Scheduler::Ticket ticket, const std::string& name) {
    begin_active();
    const int fd = find_connection_socket(req);
    std::unique_lock<std::mutex> lk(g->mu);
    bool gone = false;
    while (!g->done) {
      g->cv.wait_for(lk, 100ms);
      if (!g->done && !gone && fd >= 0 && peer_gone(fd)) {
        gone = true;
        sched.cancel(ticket);
      }
    }
    if (g->reason == "cancelled") {
      reply_error(res, ApiError(503, gone ? "the client closed the connection"
                                          : "cancelled: the server is shutting down"));
    } else if (g->reason.rfind("error", 0) == 0) {
      reply_error(res, ApiError(500, g->reason));
    } else {
      g->c.finish_reason = finish_reason(g->reason);
      reply_json(res, 200, response_body(r, g->c));
    }
    metrics_.request(name, res.status);
    lk.unlock();
    end_active();
  }

  // Streaming: one server-sent event per generated token, then the finish chunk, the usage
  // chunk when asked, and [DONE]. A failed write (the client has gone) cancels the request.
  void stream(const httplib::Request&, httplib::Response& res, const Request& r,
              const std::shared_ptr<Generation>& g, Scheduler::Ticket ticket,
              const std::string& name) {
    begin_active();
    res.status = 200;
    res.set_header("Cache-Control", "no-cache");
    auto first = std::make_shared<bool>(true);
    auto ended = std::make_shared<bool>(false);
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, g, r, ticket, first, ended, name](size_t, httplib::DataSink& sink) {
          auto send = [&](const Json& j) {
            const std::string s = "data: " + j.dump() + "\n\n";
            return sink.write(s.data(), s.size());
          };
          std::unique_lock<std::mutex> lk(g->mu);
          g->cv.wait_for(lk, 50ms, [&] { return !g->events.empty() || g->done; });
          if (g->events.empty() && !g->done) {
            lk.unlock();
            if (!sink.is_writable()) {
              sched.cancel(ticket);
              return false;
            }
            return true;
          }
          std::deque<Generation::Event> evs;
          evs.swap(g->events);
          const bool done = g->done;
          const std::string reason = g->reason;
          Completion c = g->c;
          lk.unlock();
          size_t offset = c.text.size();
          for (const auto& e : evs) offset -= e.text.size();
          for (const auto& e : evs) {
            c.text_offset = offset;
            if (!send(chunk_body(r, c, e.text, e.lps, *first, ""))) {
              sched.cancel(ticket);
              return false;
            }
            offset += e.text.size();
            *first = false;
          }
          if (!done) return true;
          if (reason == "cancelled" || reason.rfind("error", 0) == 0) {
            const ApiError err(reason == "cancelled" ? 503 : 500,
                               reason == "cancelled" ? "cancelled: the server is shutting down" : reason);
            send(err.body());
            metrics_.request(name, err.status);
          } else {
            send(chunk_body(r, c, "", {}, *first, finish_reason(reason)));
            if (r.include_usage) send(usage_chunk(r, c));
            const std::string d = "data: [DONE]\n\n";
            sink.write(d.data(), d.size());
            metrics_.request(name, 200);
          }
          *ended = true;
          sink.done();
          return true;
        },
        [this, ticket, ended, name](bool ok) {
          if (!*ended) {  // the client went away
            sched.cancel(ticket);
            metrics_.request(name, 499);
          }
          end_active();
        });
  }

  void routes() {
    http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      if (draining) reply_json(res, 503, {{"status", "shutting down"}});
      else reply_json(res, 200, {{"status", "ok"}});
    });
    auto models = [this](const httplib::Request& req, httplib::Response& res) {
      try {
        authorize(req);
      } catch (const ApiError& e) {
        reply_error(res, e);
        return;
      }
      const Json m = {{"id", opt.model_id}, {"object", "model"}, {"created", started},
                      {"owned_by", "cca"}, {"max_model_len", opt.max_context}};
      if (req.matches.size() > 1) {
        if (req.matches[1] != opt.model_id)
          return reply_error(res, ApiError(404, "no model '" + model::excerpt(req.matches[1].str(), 80) +
                                                    "' (this server has '" + opt.model_id + "')",
                                           "model", "model_not_found"));
        return reply_json(res, 200, m);
      }
      reply_json(res, 200, {{"object", "list"}, {"data", Json::array({m})}});
    };
    http.Get("/v1/models", models);
    http.Get("/v1/models/(.+)", models);
    http.Get("/metrics", [this](const httplib::Request& req, httplib::Response& res) {
      try {
        authorize(req);
      } catch (const ApiError& e) {
        return reply_error(res, e);
      }
      res.set_content(metrics_.render(sched.gauges()), "text/plain; version=0.0.4");
    });
    http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      generate(req, res, Endpoint::completions);
    });
    http.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      generate(req, res, Endpoint::chat);
    });
    // Errors httplib answers itself (no route, a body too large, a bad request line) get an
    // OpenAI-style body too.
    http.set_error_handler(httplib::Server::HandlerWithResponse(
        [this](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      const std::string what = res.status == 404 ? "no route " + req.method + " " + model::excerpt(req.path, 100)
                               : res.status == 413 ? "the request body is larger than " +
                                                         std::to_string(opt.max_body_bytes) + " bytes"
                                                   : "HTTP " + std::to_string(res.status);
      reply_json(res, res.status, ApiError(res.status, what).body());
      return httplib::Server::HandlerResponse::Handled;
    }));
    http.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "internal error";
      try {
        if (ep) std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = std::string("internal error: ") + e.what();
      } catch (...) {
      }
      reply_json(res, 500, ApiError(500, what).body());
    });
  }
};

Server::Server(engine::Engine& eng, const tok::Tokenizer* tok, model::GenerationConfig gen,
               ChatTemplate chat, const SchedulerOptions& sched, const ServerOptions& opt)
    : impl_(std::make_unique<Impl>(eng, tok, std::move(gen), std::move(chat), sched, opt)) {
  Impl& m = *impl_;
  const int threads = opt.http_threads > 0
                          ? opt.http_threads
                          : int(eng.max_batch() + sched.queue + 8);
  m.http.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  m.http.set_payload_max_length(opt.max_body_bytes);
  m.routes();
}

Server::~Server() { shutdown(); }

int Server::bind() {
  Impl& m = *impl_;
  int port = m.opt.port;
  if (port == 0) {
    port = m.http.bind_to_any_port(m.opt.host);
    check(port > 0, "cannot listen on " + m.opt.host + " (any port)");
  } else {
    check(m.http.bind_to_port(m.opt.host, port),
          "cannot listen on " + m.opt.host + ":" + std::to_string(port) +
              " (in use, or not an address of this machine)");
  }
  m.http.raise_backlog(1024);
  return port;
}

void Server::serve() { impl_->http.listen_after_bind(); }

void Server::shutdown() {
  Impl& m = *impl_;
  std::call_once(m.shutdown_once, [&] {
    m.draining = true;
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(m.opt.shutdown_timeout_s));
    m.sched.drain(deadline);
    // Every job has ended; the handlers write their last bytes (bounded: a stuck client's
    // write times out after cpp-httplib's write timeout, 5 s).
    {
      std::unique_lock<std::mutex> lk(m.active_mu);
      m.active_cv.wait_for(lk, 6s, [&] { return m.active == 0; });
    }
    m.http.stop();
  });
}

Scheduler& Server::scheduler() { return impl_->sched; }
Metrics& Server::metrics() { return impl_->metrics_; }

}  // namespace cca::server

// The HTTP layer of cca serve (cpp-httplib): routes, the API key, server-sent events, the
// error bodies, /metrics, and the shutdown sequence. It turns requests into scheduler jobs
// (tokenizing prompts, rendering chat templates, the stop rules of generation_config.json) and
// the jobs' tokens into responses; generation itself is the scheduler's.
#pragma once
#include <memory>
#include <string>

#include "engine/engine.hpp"
#include "model/config.hpp"
#include "server/chat_template.hpp"
#include "server/metrics.hpp"
#include "server/scheduler.hpp"
#include "tokenizer/tokenizer.hpp"

namespace cca::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;             // 0: any free port (bind() says which)
  std::string api_key;         // "": no key needed
  std::string model_id;        // what /v1/models lists and responses name
  int64_t max_context = 0;     // prompts longer than this are refused (0: no limit)
  int http_threads = 0;        // 0: running + queued requests + 8
  double shutdown_timeout_s = 10;  // running requests' time to finish after a shutdown starts
  size_t max_body_bytes = size_t(64) << 20;
};

class Server {
 public:
  // `tok` may be null (a model without tokenizer.json: prompts as token ids only, empty texts).
  Server(engine::Engine& eng, const tok::Tokenizer* tok, model::GenerationConfig gen,
         ChatTemplate chat, const SchedulerOptions& sched, const ServerOptions& opt);
  ~Server();
  // Binds the listening socket; returns the port. cca::Error when it cannot.
  int bind();
  // Serves until shutdown() has finished (call bind() first).
  void serve();
  // From any thread, once or more: new generation requests get 503; queued ones are cancelled
  // (503); running ones finish, or are cancelled after shutdown_timeout_s (a stream then ends
  // with an error event); then the listening socket closes and serve() returns.
  void shutdown();

  Scheduler& scheduler();
  Metrics& metrics();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace cca::server

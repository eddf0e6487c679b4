// `cca serve`: an OpenAI-compatible HTTP server over the engine (src/server): continuous
// batching of requests on the GPU or the CPU, each sequence with its own compressed caches.
// SIGINT/SIGTERM: no new requests, running ones finish (or are cancelled after
// --shutdown-timeout), exit 0.
#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <pthread.h>
#include <thread>

#include "cca/error.hpp"
#include "commands.hpp"
#include "engine/engine.hpp"
#include "model_cli.hpp"
#include "server/http_server.hpp"

namespace cca {
namespace {

struct ServeArgs {
  ModelRunFlags run;
  std::string host = "127.0.0.1";
  int port = 8080;
  int64_t parallel = 8, queue = 64;
  std::string kv_budget = "auto";
  std::string api_key, chat_template_file, model_name;
  double shutdown_timeout = 10;
};

// "auto", or bytes with an optional K, M, G or T suffix (powers of 1024): "512M", "1.5G".
int64_t parse_size(const std::string& s, const std::string& flag) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  double mul = 1;
  const std::string suffix = end ? std::string(end) : "";
  if (suffix == "K" || suffix == "k") mul = 1024.0;
  else if (suffix == "M" || suffix == "m") mul = 1024.0 * 1024;
  else if (suffix == "G" || suffix == "g") mul = 1024.0 * 1024 * 1024;
  else if (suffix == "T" || suffix == "t") mul = 1024.0 * 1024 * 1024 * 1024;
  else if (!suffix.empty()) mul = -1;
  check(end != s.c_str() && mul > 0 && v > 0 && v * mul < 9e18,
        "invalid " + flag + " '" + s + "': expected auto or a size such as 512M or 20G");
  return int64_t(v * mul);
}

void run_serve(const ServeArgs& a) {
  check(!a.run.allow_long_prompt,
        "cca serve takes --max-context N (the longest context it serves) instead of "
        "--allow-long-prompt");
  check(a.parallel >= 1 && a.parallel <= 4096,
        "invalid --parallel " + std::to_string(a.parallel) + ": must be in [1, 4096]");
  check(a.queue >= 0 && a.queue <= 100000,
        "invalid --queue " + std::to_string(a.queue) + ": must be in [0, 100000]");
  check(a.port >= 0 && a.port <= 65535, "invalid --port " + std::to_string(a.port));
  check(a.shutdown_timeout >= 0 && a.shutdown_timeout <= 3600,
        "invalid --shutdown-timeout: must be in [0, 3600] seconds");
  const int64_t budget_flag = a.kv_budget == "auto" ? 0 : parse_size(a.kv_budget, "--kv-budget");

  // SIGINT and SIGTERM go to one thread that waits for them (sigwait): blocked here, before any
  // thread starts, so every thread inherits the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  const model::ModelConfig cfg = model::load_model_config(a.run.model);
  const model::GenerationConfig gen = model::load_generation_config(a.run.model, cfg);
  const int64_t limit = a.run.context_limit(cfg);
  std::unique_ptr<TextTokenizer> tok;
  std::error_code ec;
  if (std::filesystem::exists(std::filesystem::path(a.run.model) / "tokenizer.json", ec))
    tok = TextTokenizer::load(a.run.model, "", cfg.vocab_size);
  const tok::Tokenizer* t = tok ? &tok->tokenizer() : nullptr;
  server::ChatTemplate chat = server::ChatTemplate::load(a.run.model, a.chat_template_file, t);

  engine::Engine eng(a.run.model, a.run.for_model(cfg).engine_options(0, a.parallel));
  if (!eng.device_plan().note.empty())
    std::fprintf(stderr, "cca: %s\n", eng.device_plan().note.c_str());
  int64_t budget = budget_flag;
  if (budget == 0) {  // the GPU's free memory less 1 GiB, or half the host's available memory
    int64_t free_b = 0, total_b = 0;
    eng.context().memory_info(&free_b, &total_b);
    budget = eng.device() == Device::cuda ? free_b - (int64_t(1) << 30) : free_b / 2;
    check(budget > 0, "no memory is left for caches on " + eng.context().describe());
  }

  server::SchedulerOptions so;
  so.queue = a.queue;
  so.kv_budget = budget;
  so.max_context = limit;
  server::ServerOptions opt;
  opt.host = a.host;
  opt.port = a.port;
  opt.api_key = a.api_key;
  opt.model_id = a.model_name.empty()
                     ? std::filesystem::path(a.run.model).lexically_normal().filename().string()
                     : a.model_name;
  if (opt.model_id.empty()) opt.model_id = "model";
  opt.max_context = limit;
  opt.shutdown_timeout_s = a.shutdown_timeout;
  const std::string chat_source = chat.available() ? chat.source() : "none";
  server::Server srv(eng, t, gen, std::move(chat), so, opt);
  const int port = srv.bind();

  const int64_t per_seq = srv.scheduler().reservation(limit, {{}, 1, limit});
  std::fprintf(stderr,
               "cca serve: %s | %s, %s caches | context %lld tokens | parallel %lld, queue %lld "
               "| cache budget %s: %lld sequences of %lld tokens fit at once | chat template: %s\n",
               eng.context().describe().c_str(), eng.variant().describe().c_str(),
               dtype_name(eng.kv_dtype()), (long long)limit, (long long)a.parallel,
               (long long)a.queue, format_bytes(double(budget)).c_str(),
               (long long)(per_seq > 0 ? budget / per_seq : 0), (long long)limit,
               chat_source.c_str());
  std::fprintf(stderr, "cca serve: listening on http://%s:%d\n", a.host.c_str(), port);
  std::fflush(stderr);

  std::atomic<bool> served{false};
  std::thread watcher([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (served) return;
    std::fprintf(stderr, "cca serve: %s: finishing the running requests (at most %.0f s)\n",
                 sig == SIGINT ? "SIGINT" : "SIGTERM", a.shutdown_timeout);
    srv.shutdown();
  });
  srv.serve();
  // serve() returns after a shutdown, or when listening failed: the watcher then still waits.
  served = true;
  pthread_kill(watcher.native_handle(), SIGTERM);
  watcher.join();
  std::fprintf(stderr, "cca serve: stopped\n");
}

}  // namespace

void register_serve_command(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "serve", "OpenAI-compatible HTTP server with continuous batching over the compressed caches");
  cmd->add_option("--host", a->host, "address to listen on")->capture_default_str();
  cmd->add_option("--port", a->port, "port to listen on (0: any free port)")->capture_default_str();
  cmd->add_option("--parallel", a->parallel, "sequences generating at once")->capture_default_str();
  cmd->add_option("--queue", a->queue, "requests that may wait for a slot or cache memory; "
                                       "more are answered 503")
      ->capture_default_str();
  cmd->add_option("--kv-budget", a->kv_budget,
                  "cache memory all running sequences may reserve (e.g. 20G); auto: the GPU's "
                  "free memory after loading less 1 GiB, or half the host's available memory")
      ->capture_default_str();
  cmd->add_option("--api-key", a->api_key, "require 'Authorization: Bearer KEY'");
  cmd->add_option("--chat-template-file", a->chat_template_file,
                  "Jinja chat template to use instead of the model's");
  cmd->add_option("--model-name", a->model_name,
                  "the model id /v1/models lists (default: the model directory's name)");
  cmd->add_option("--shutdown-timeout", a->shutdown_timeout,
                  "seconds running requests get to finish after SIGINT/SIGTERM")
      ->capture_default_str();
  add_model_flags(cmd, a->run, true);
  cmd->callback([a] { run_serve(*a); });
}

}  // namespace cca

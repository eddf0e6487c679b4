// cca serve (src/server) on the CPU with the committed Qwen2 test model, in-process on an
// ephemeral loopback port: the JSON the OpenAI Python client sends and what it reads back,
// field by field; streaming (server-sent events, [DONE], usage); stop strings; 16 concurrent
// clients with long and short prompts whose outputs equal the same prompts run one at a time;
// bad requests (4xx with OpenAI's error body; the server keeps serving); admission by cache
// budget and the bounded queue; a client that disconnects frees its slot; shutdown; and the
// `cca serve` command itself (SIGTERM: exit 0). Every test is bounded: loopback only, short
// generations, timeouts on every wait.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <future>
#include <thread>

#include "server/http_server.hpp"
#include "temp_dir.hpp"
#include "test_model_util.hpp"
#include "tokenizer/text_stream.hpp"
#include "tokenizer/tokenizer.hpp"

namespace cca {
namespace {

using server::Json;
using namespace std::chrono_literals;

const std::string kKey = "sk-test-key";

std::string qwen2_dir() { return test::model_fixture_dir("qwen2"); }
std::string qwen2_template() {
  return std::string(CCA_SOURCE_DIR) + "/tests/data/chat_templates/qwen2.jinja";
}

// CCA with a small group and window, so that prompts of a few dozen tokens use core tokens.
const VariantSpec kVariant = VariantSpec::cca(4, 16);
constexpr int64_t kChunk = 32;

struct Options {
  int64_t parallel = 4, queue = 16, kv_budget = int64_t(1) << 30;
  std::string api_key = kKey;
  double shutdown_timeout_s = 5;
};

// A server on 127.0.0.1 and a free port, serving from its own thread.
struct TestServer {
  explicit TestServer(const Options& o = {})
      : tok(tok::Tokenizer::from_file(qwen2_dir() + "/tokenizer.json")),
        eng(qwen2_dir(), engine_options(o)) {
    const model::ModelConfig& cfg = eng.config();
    server::SchedulerOptions so;
    so.queue = o.queue;
    so.kv_budget = o.kv_budget;
    so.max_context = cfg.max_position_embeddings;
    server::ServerOptions opt;
    opt.port = 0;
    opt.api_key = o.api_key;
    opt.model_id = "qwen2-test";
    opt.max_context = cfg.max_position_embeddings;
    opt.shutdown_timeout_s = o.shutdown_timeout_s;
    srv = std::make_unique<server::Server>(
        eng, &tok, model::load_generation_config(qwen2_dir(), cfg),
        server::ChatTemplate::load(qwen2_dir(), qwen2_template(), &tok), so, opt);
    port = srv->bind();
    thread = std::thread([this] { srv->serve(); });
  }
  ~TestServer() {
    srv->shutdown();
    thread.join();
  }
  static engine::EngineOptions engine_options(const Options& o) {
    engine::EngineOptions e = test::cpu_options(kVariant, kChunk);
    e.max_batch = o.parallel;
    return e;
  }
  httplib::Client client(bool key = true) const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    if (key) c.set_default_headers({{"Authorization", "Bearer " + kKey}});
    return c;
  }
  // A gauge of /metrics.
  int64_t gauge(const std::string& name) const {
    auto r = client().Get("/metrics");
    if (!r) return -1;
    const size_t at = r->body.find("\n" + name + " ");
    if (at == std::string::npos) return -1;
    return std::stoll(r->body.substr(at + name.size() + 2));
  }
  // Waits (at most 10 s) until a gauge has a value.
  bool wait_gauge(const std::string& name, int64_t want) const {
    for (int i = 0; i < 1000; ++i) {
      if (gauge(name) == want) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  tok::Tokenizer tok;
  engine::Engine eng;
  std::unique_ptr<server::Server> srv;
  int port = 0;
  std::thread thread;
};

// The headers the OpenAI Python client (openai 1.x, httpx) sends.
httplib::Headers openai_headers() {
  return {{"Authorization", "Bearer " + kKey},
          {"User-Agent", "OpenAI/Python 1.54.0"},
          {"Accept", "application/json"},
          {"Accept-Encoding", "gzip, deflate"},
          {"X-Stainless-Lang", "python"},
          {"X-Stainless-Package-Version", "1.54.0"},
          {"X-Stainless-OS", "Linux"},
          {"X-Stainless-Arch", "x64"},
          {"X-Stainless-Runtime", "CPython"},
          {"X-Stainless-Runtime-Version", "3.11.2"},
          {"X-Stainless-Async", "false"},
          {"X-Stainless-Retry-Count", "0"}};
}

// ---- a raw HTTP/1.1 client: streams read as they come, connections closed mid-stream --------

int connect_loopback(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  timeval tv{30, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

void send_post(int fd, const std::string& path, const std::string& body) {
  const std::string req = "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " +
                          kKey + "\r\nContent-Type: application/json\r\nContent-Length: " +
                          std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
  ASSERT_EQ(write(fd, req.data(), req.size()), ssize_t(req.size()));
}

// Reads until `until` appears (or the connection closes); returns what was read.
std::string read_until(int fd, const std::string& until) {
  std::string got;
  char buf[4096];
  while (got.find(until) == std::string::npos) {
    const ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    got.append(buf, size_t(n));
  }
  return got;
}

// The JSON objects of the `data:` lines of a (chunked) event stream, and whether [DONE] came.
std::vector<Json> sse_events(const std::string& raw, bool* done) {
  std::vector<Json> out;
  *done = false;
  size_t at = 0;
  while ((at = raw.find("data: ", at)) != std::string::npos) {
    const size_t end = raw.find("\n\n", at);
    if (end == std::string::npos) break;
    const std::string data = raw.substr(at + 6, end - at - 6);
    if (data == "[DONE]") *done = true;
    else out.push_back(Json::parse(data));
    at = end;
  }
  return out;
}

std::vector<Json> stream(int port, const std::string& path, const Json& body, bool* done,
                         int* status = nullptr) {
  const int fd = connect_loopback(port);
  EXPECT_GE(fd, 0);
  send_post(fd, path, body.dump());
  const std::string raw = read_until(fd, "\r\n0\r\n\r\n");
  close(fd);
  if (status) *status = raw.size() > 12 ? std::stoi(raw.substr(9, 3)) : 0;
  return sse_events(raw, done);
}

Json post(const TestServer& s, const std::string& path, const Json& body, int* status) {
  auto r = s.client().Post(path.c_str(), body.dump(), "application/json");
  if (!r) {
    *status = -1;
    return {{"client_error", httplib::to_string(r.error())}};
  }
  *status = r->status;
  return Json::parse(r->body);
}

// ---- tests ----------------------------------------------------------------------------------

TEST(Server, OpenAIClientFlowFieldByField) {
  TestServer s;
  auto c = s.client(false);
  // GET /v1/models as client.models.list() asks it.
  auto models = c.Get("/v1/models", openai_headers());
  ASSERT_TRUE(models);
  ASSERT_EQ(models->status, 200);
  const Json m = Json::parse(models->body);
  EXPECT_EQ(m["object"], "list");
  ASSERT_EQ(m["data"].size(), 1u);
  EXPECT_EQ(m["data"][0]["id"], "qwen2-test");
  EXPECT_EQ(m["data"][0]["object"], "model");
  EXPECT_TRUE(m["data"][0]["created"].is_number_integer());
  EXPECT_EQ(m["data"][0]["owned_by"], "cca");

  // client.chat.completions.create(model=..., messages=..., max_tokens=8, temperature=0,
  // seed=1, n=1, presence_penalty=0, frequency_penalty=0, user="u", logprobs=False): the
  // fields it serialises, and nothing it leaves NOT_GIVEN.
  const Json chat_req = {{"messages", {{{"role", "system"}, {"content", "Be brief."}},
                                       {{"role", "user"}, {"content", "Hello there"}}}},
                         {"model", "qwen2-test"}, {"frequency_penalty", 0}, {"logprobs", false},
                         {"max_tokens", 8}, {"n", 1}, {"presence_penalty", 0}, {"seed", 1},
                         {"temperature", 0}, {"user", "u"}};
  auto r = c.Post("/v1/chat/completions", openai_headers(), chat_req.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(r->get_header_value("Content-Type"), "application/json");
  const Json j = Json::parse(r->body);
  EXPECT_EQ(j["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_TRUE(j["created"].is_number_integer());
  EXPECT_EQ(j["model"], "qwen2-test");
  ASSERT_EQ(j["choices"].size(), 1u);
  const Json& ch = j["choices"][0];
  EXPECT_EQ(ch["index"], 0);
  EXPECT_EQ(ch["message"]["role"], "assistant");
  EXPECT_TRUE(ch["message"]["content"].is_string());
  EXPECT_TRUE(ch["logprobs"].is_null());
  EXPECT_TRUE(ch["finish_reason"] == "stop" || ch["finish_reason"] == "length");
  // The prompt is the Qwen2 template's rendering of the messages, tokenized.
  const std::string rendered =
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
      "<|im_start|>assistant\n";
  EXPECT_EQ(j["usage"]["prompt_tokens"], int64_t(s.tok.encode(rendered, false).size()));
  const int64_t completion = j["usage"]["completion_tokens"];
  EXPECT_GE(completion, 1);
  EXPECT_LE(completion, 8);
  EXPECT_EQ(j["usage"]["total_tokens"], j["usage"]["prompt_tokens"].get<int64_t>() + completion);

  // The same messages again give the same answer (greedy); with logprobs, one entry per token.
  Json again = chat_req;
  again["logprobs"] = true;
  again["top_logprobs"] = 3;
  auto r2 = c.Post("/v1/chat/completions", openai_headers(), again.dump(), "application/json");
  ASSERT_TRUE(r2);
  const Json j2 = Json::parse(r2->body);
  EXPECT_EQ(j2["choices"][0]["message"]["content"], ch["message"]["content"]);
  const Json& lp = j2["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(int64_t(lp.size()), completion);
  for (const Json& t : lp) {
    EXPECT_TRUE(t["token"].is_string());
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
    ASSERT_EQ(t["top_logprobs"].size(), 3u);
    // Greedy: the chosen token is the most likely one.
    EXPECT_NEAR(t["logprob"].get<double>(), t["top_logprobs"][0]["logprob"].get<double>(), 1e-6);
    EXPECT_TRUE(t["bytes"].is_array());
  }

  // client.completions.create(model=..., prompt=..., max_tokens=5, temperature=0, logprobs=2).
  const Json comp_req = {{"model", "qwen2-test"}, {"prompt", "The quick brown fox"},
                         {"max_tokens", 5}, {"temperature", 0}, {"logprobs", 2}};
  auto r3 = c.Post("/v1/completions", openai_headers(), comp_req.dump(), "application/json");
  ASSERT_TRUE(r3);
  ASSERT_EQ(r3->status, 200) << r3->body;
  const Json k = Json::parse(r3->body);
  EXPECT_EQ(k["id"].get<std::string>().rfind("cmpl-", 0), 0u);
  EXPECT_EQ(k["object"], "text_completion");
  EXPECT_EQ(k["model"], "qwen2-test");
  EXPECT_TRUE(k["choices"][0]["text"].is_string());
  EXPECT_EQ(k["choices"][0]["index"], 0);
  const Json& klp = k["choices"][0]["logprobs"];
  const size_t n = klp["tokens"].size();
  EXPECT_EQ(int64_t(n), k["usage"]["completion_tokens"].get<int64_t>());
  EXPECT_EQ(klp["token_logprobs"].size(), n);
  EXPECT_EQ(klp["top_logprobs"].size(), n);
  EXPECT_EQ(klp["text_offset"].size(), n);
  EXPECT_EQ(k["usage"]["prompt_tokens"],
            int64_t(s.tok.encode("The quick brown fox", true).size()));

  // /health needs no key; the API does.
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  EXPECT_EQ(Json::parse(h->body)["status"], "ok");
  // /metrics counts what happened.
  auto met = s.client().Get("/metrics");
  ASSERT_TRUE(met);
  EXPECT_NE(met->body.find("cca_requests_total{endpoint=\"chat\",status=\"200\"} 2"), std::string::npos);
  EXPECT_NE(met->body.find("cca_requests_total{endpoint=\"completions\",status=\"200\"} 1"), std::string::npos);
  EXPECT_NE(met->body.find("cca_time_to_first_token_seconds_count 3"), std::string::npos);
  EXPECT_NE(met->body.find("cca_inter_token_latency_seconds_bucket{le=\"+Inf\"}"), std::string::npos);
  EXPECT_NE(met->body.find("cca_kv_cache_budget_bytes 1073741824"), std::string::npos);
}

TEST(Server, StreamingAsOpenAIClientsExpect) {
  TestServer s;
  const Json req = {{"model", "m"}, {"messages", {{{"role", "user"}, {"content", "Tell me"}}}},
                    {"max_tokens", 10}, {"temperature", 0}, {"ignore_eos", true}};
  int status = 0;
  const Json whole = post(s, "/v1/chat/completions", req, &status);
  ASSERT_EQ(status, 200);

  Json sreq = req;
  sreq["stream"] = true;
  sreq["stream_options"] = {{"include_usage", true}};
  bool done = false;
  int st = 0;
  const std::vector<Json> ev = stream(s.port, "/v1/chat/completions", sreq, &done, &st);
  EXPECT_EQ(st, 200);
  ASSERT_TRUE(done);
  // One chunk per token, then the finish chunk, then the usage chunk.
  ASSERT_EQ(ev.size(), 10u + 2u);
  std::string text;
  for (size_t i = 0; i < 10; ++i) {
    EXPECT_EQ(ev[i]["object"], "chat.completion.chunk");
    EXPECT_EQ(ev[i]["id"], ev[0]["id"]);
    EXPECT_TRUE(ev[i]["choices"][0]["finish_reason"].is_null());
    if (i == 0) EXPECT_EQ(ev[i]["choices"][0]["delta"]["role"], "assistant");
    text += ev[i]["choices"][0]["delta"].value("content", "");
  }
  EXPECT_EQ(text, whole["choices"][0]["message"]["content"].get<std::string>());
  EXPECT_EQ(ev[10]["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(ev[11]["choices"].empty());
  EXPECT_EQ(ev[11]["usage"], whole["usage"]);

  // Completions stream with logprobs: one entry per chunk.
  const Json creq = {{"prompt", "Hello"}, {"max_tokens", 6}, {"temperature", 0}, {"stream", true},
                     {"logprobs", 1}, {"ignore_eos", true}};
  const std::vector<Json> cev = stream(s.port, "/v1/completions", creq, &done);
  ASSERT_TRUE(done);
  ASSERT_EQ(cev.size(), 7u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(cev[i]["object"], "text_completion");
    EXPECT_EQ(cev[i]["choices"][0]["logprobs"]["tokens"].size(), 1u);
  }
  EXPECT_EQ(cev[6]["choices"][0]["finish_reason"], "length");
}

TEST(Server, StopStrings) {
  TestServer s;
  const Json base = {{"prompt", "Once upon a time"}, {"max_tokens", 16}, {"temperature", 0},
                     {"ignore_eos", true}};
  int st = 0;
  const Json full = post(s, "/v1/completions", base, &st);
  ASSERT_EQ(st, 200);
  const std::string text = full["choices"][0]["text"];
  ASSERT_GE(text.size(), 6u) << text;
  // A stop string from the middle of the greedy text: the answer ends before it.
  const std::string stop = text.substr(text.size() / 2, 2);
  const size_t at = text.find(stop);
  Json req = base;
  req["stop"] = {"never-appears", stop};
  const Json cut = post(s, "/v1/completions", req, &st);
  ASSERT_EQ(st, 200);
  EXPECT_EQ(cut["choices"][0]["text"], text.substr(0, at));
  EXPECT_EQ(cut["choices"][0]["finish_reason"], "stop");
  EXPECT_LT(cut["usage"]["completion_tokens"].get<int64_t>(), 16);
  // Streaming: the same text, the stop string never sent.
  req["stream"] = true;
  bool done = false;
  const std::vector<Json> ev = stream(s.port, "/v1/completions", req, &done);
  ASSERT_TRUE(done);
  std::string streamed;
  for (const Json& e : ev) streamed += e["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(streamed, text.substr(0, at));
  EXPECT_EQ(ev.back()["choices"][0]["finish_reason"], "stop");
}

// 16 clients at once, prompts of 3 to 300 tokens (several chunks of 32), 4 sequences running at
// a time: every request is answered, and each output is what the engine gives that prompt alone
// (greedy, and sampled with a seed).
TEST(Server, ConcurrentClientsMatchOneAtATime) {
  Options o;
  o.parallel = 4;
  o.queue = 16;
  TestServer s(o);
  const int kClients = 16;
  std::vector<Json> reqs(kClients);
  std::vector<model::TokenIds> prompts(kClients);
  for (int i = 0; i < kClients; ++i) {
    const int64_t len = i % 4 == 0 ? 250 + 13 * i : 3 + 5 * i;  // long and short
    for (int64_t t = 0; t < len; ++t) prompts[size_t(i)].push_back(int32_t((t * 31 + i * 17 + 7) % 500));
    reqs[size_t(i)] = {{"prompt", prompts[size_t(i)]}, {"max_tokens", 6 + i % 5}, {"ignore_eos", true}};
    if (i % 3 == 2) {
      reqs[size_t(i)]["temperature"] = 0.8;
      reqs[size_t(i)]["top_p"] = 0.9;
      reqs[size_t(i)]["seed"] = 100 + i;
    } else {
      reqs[size_t(i)]["temperature"] = 0;
    }
  }
  std::vector<Json> got(kClients);
  std::vector<int> status(kClients);
  std::vector<std::thread> th;
  for (int i = 0; i < kClients; ++i)
    th.emplace_back([&, i] {
      if (i % 2) {  // half of them stream
        Json r = reqs[size_t(i)];
        r["stream"] = true;
        bool done = false;
        std::string text;
        for (const Json& e : stream(s.port, "/v1/completions", r, &done, &status[size_t(i)]))
          text += e["choices"][0]["text"].get<std::string>();
        got[size_t(i)] = {{"choices", {{{"text", text}}}}};
      } else {
        got[size_t(i)] = post(s, "/v1/completions", reqs[size_t(i)], &status[size_t(i)]);
      }
    });
  for (auto& t : th) t.join();

  // The reference: each prompt alone through Engine::generate.
  engine::Engine single(qwen2_dir(), test::cpu_options(kVariant, kChunk));
  const model::GenerationConfig gen = model::load_generation_config(qwen2_dir(), single.config());
  for (int i = 0; i < kClients; ++i) {
    ASSERT_EQ(status[size_t(i)], 200) << "client " << i << ": " << got[size_t(i)].dump();
    engine::GenerateRequest g;
    g.prompt = prompts[size_t(i)];
    model::SamplingRequest sr;
    sr.temperature = reqs[size_t(i)]["temperature"].get<double>();
    if (reqs[size_t(i)].contains("top_p")) sr.top_p = reqs[size_t(i)]["top_p"].get<double>();
    if (reqs[size_t(i)].contains("seed")) sr.seed = reqs[size_t(i)]["seed"].get<uint64_t>();
    g.sampling = model::resolve_sampling(sr, gen);
    g.max_new_tokens = reqs[size_t(i)]["max_tokens"];
    const engine::GenerateResult want =
        single.generate(std::span(&g, 1), single.config().max_position_embeddings).front();
    EXPECT_EQ(got[size_t(i)]["choices"][0]["text"].get<std::string>(), s.tok.decode(want.tokens, true))
        << "client " << i << " (" << prompts[size_t(i)].size() << " prompt tokens)";
  }
  EXPECT_TRUE(s.wait_gauge("cca_requests_running", 0));
  EXPECT_EQ(s.gauge("cca_kv_cache_reserved_bytes"), 0);
}

TEST(Server, BadRequestsGetOpenAIErrorsAndTheServerKeepsServing) {
  TestServer s;
  struct Case {
    const char* path;
    std::string body;
    int status;
    const char* message;  // a part of error.message
    const char* param;    // error.param ("" for null)
  };
  const std::string long_prompt = Json(std::vector<int>(1100, 5)).dump();
  const std::vector<Case> cases = {
      {"/v1/completions", "{\"prompt\": \"a\",", 400, "not valid JSON", ""},
      {"/v1/completions", "[1, 2]", 400, "must be a JSON object", ""},
      {"/v1/completions", R"({"max_tokens": 4})", 400, "'prompt' is required", "prompt"},
      {"/v1/completions", R"({"prompt": 5})", 400, "'prompt' must be a string", "prompt"},
      {"/v1/completions", R"({"prompt": "a", "temperature": "hot"})", 400, "'temperature' must be a number", "temperature"},
      {"/v1/completions", R"({"prompt": "a", "temperature": -1})", 400, "'temperature' must be in [0, 100]", "temperature"},
      {"/v1/completions", R"({"prompt": "a", "top_p": 1.5})", 400, "'top_p' must be in (0, 1]", "top_p"},
      {"/v1/completions", R"({"prompt": "a", "top_k": -3})", 400, "'top_k' must be >= 0", "top_k"},
      {"/v1/completions", R"({"prompt": "a", "max_tokens": "5"})", 400, "'max_tokens' must be an integer", "max_tokens"},
      {"/v1/completions", R"({"prompt": "a", "max_tokens": 0})", 400, "at least 1", "max_tokens"},
      {"/v1/completions", R"({"prompt": "a", "stream": "yes"})", 400, "'stream' must be true or false", "stream"},
      {"/v1/completions", R"({"prompt": "a", "stop": 7})", 400, "'stop' must be a string", "stop"},
      {"/v1/completions", R"({"prompt": "a", "stop": [""]})", 400, "must not be empty", "stop"},
      {"/v1/completions", R"({"prompt": "a", "n": 2})", 400, "'n' = 2 is not supported", "n"},
      {"/v1/completions", R"({"prompt": "a", "logprobs": 9})", 400, "'logprobs' must be in [0, 5]", "logprobs"},
      {"/v1/completions", R"({"prompt": "a", "seed": "x"})", 400, "'seed' must be an integer", "seed"},
      {"/v1/completions", R"({"prompt": ["a", "b"]})", 400, "one per request", "prompt"},
      {"/v1/completions", R"({"prompt": [1, 2, 600]})", 400, "outside the model's vocabulary", "prompt"},
      {"/v1/completions", "{\"prompt\": " + long_prompt + "}", 400, "more than the server's context limit of 1024", "prompt"},
      {"/v1/chat/completions", R"({"messages": "hi"})", 400, "'messages' must be an array", "messages"},
      {"/v1/chat/completions", R"({"messages": [{"content": "hi"}]})", 400, "role' must be a string", "messages[0].role"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]})", 400, "tool calling", "tools"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})", 400, "needs 'logprobs'", "top_logprobs"},
      {"/v1/nothing", "{}", 404, "no route POST /v1/nothing", ""},
  };
  for (const Case& c : cases) {
    auto r = s.client().Post(c.path, c.body, "application/json");
    ASSERT_TRUE(r) << c.body;
    EXPECT_EQ(r->status, c.status) << c.body << " -> " << r->body;
    const Json e = Json::parse(r->body);
    ASSERT_TRUE(e.contains("error")) << r->body;
    EXPECT_NE(e["error"]["message"].get<std::string>().find(c.message), std::string::npos)
        << c.body << " -> " << r->body;
    if (*c.param) EXPECT_EQ(e["error"]["param"], c.param) << r->body;
    EXPECT_TRUE(e["error"]["type"].is_string());
  }
  // The API key: missing, wrong.
  auto nokey = s.client(false).Post("/v1/completions", R"({"prompt": "a"})", "application/json");
  ASSERT_TRUE(nokey);
  EXPECT_EQ(nokey->status, 401);
  EXPECT_EQ(Json::parse(nokey->body)["error"]["code"], "invalid_api_key");
  httplib::Client wrong("127.0.0.1", s.port);
  wrong.set_default_headers({{"Authorization", "Bearer nope"}});
  auto wr = wrong.Get("/v1/models");
  ASSERT_TRUE(wr);
  EXPECT_EQ(wr->status, 401);
  EXPECT_EQ(Json::parse(wr->body)["error"]["message"], "wrong API key");
  // Still serving.
  int st = 0;
  const Json ok = post(s, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 2}}, &st);
  EXPECT_EQ(st, 200) << ok.dump();
}

TEST(Server, AdmissionByCacheBudgetAndABoundedQueue) {
  // The budget holds the caches of one sequence of 1001 tokens (CPU: kv_cache_bytes).
  Options o;
  o.parallel = 2;
  o.queue = 1;
  {
    engine::Engine probe(qwen2_dir(), TestServer::engine_options(o));
    o.kv_budget = probe.sequence_cache_bytes(1001);
  }
  TestServer s(o);
  // A generation of 1 + 1000 tokens holds the whole budget; a second request waits in the
  // queue (though a slot is free), a third finds the queue full: 503.
  auto first = std::async(std::launch::async, [&] {
    int s1 = 0;
    post(s, "/v1/completions", {{"prompt", {5}}, {"max_tokens", 1000}, {"ignore_eos", true}}, &s1);
    return s1;
  });
  ASSERT_TRUE(s.wait_gauge("cca_requests_running", 1));
  auto second = std::async(std::launch::async, [&] {
    int s2 = 0;
    post(s, "/v1/completions", {{"prompt", {6}}, {"max_tokens", 3}}, &s2);
    return s2;
  });
  ASSERT_TRUE(s.wait_gauge("cca_requests_queued", 1));
  EXPECT_EQ(s.gauge("cca_requests_running"), 1);
  auto third = s.client().Post("/v1/completions", R"({"prompt": [7], "max_tokens": 3})", "application/json");
  ASSERT_TRUE(third);
  EXPECT_EQ(third->status, 503);
  EXPECT_NE(third->body.find("the server is busy"), std::string::npos) << third->body;
  EXPECT_EQ(third->get_header_value("Retry-After"), "1");
  EXPECT_EQ(first.get(), 200);
  EXPECT_EQ(second.get(), 200);  // it ran once the first had finished
}

TEST(Server, ARequestThatCanNeverFitIsRefusedWithTheNumbers) {
  Options o;
  o.kv_budget = 1 << 16;  // 64 KiB: a few dozen tokens of this model's caches
  TestServer s(o);
  int st = 0;
  const Json e = post(s, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 900}}, &st);
  EXPECT_EQ(st, 400);
  const std::string msg = e["error"]["message"];
  EXPECT_NE(msg.find("can never fit"), std::string::npos) << msg;
  EXPECT_NE(msg.find("GiB"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--kv-budget"), std::string::npos) << msg;
  EXPECT_EQ(e["error"]["code"], "context_length_exceeded");
}

TEST(Server, AClientThatDisconnectsFreesItsSlotAtOnce) {
  Options o;
  o.parallel = 1;
  TestServer s(o);
  // Streaming: read the first event, then hang up.
  int fd = connect_loopback(s.port);
  ASSERT_GE(fd, 0);
  send_post(fd, "/v1/completions",
            Json({{"prompt", "a"}, {"max_tokens", 1000}, {"ignore_eos", true}, {"stream", true}}).dump());
  EXPECT_NE(read_until(fd, "data: ").find("data: "), std::string::npos);
  close(fd);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(s.wait_gauge("cca_requests_running", 0));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  // Non-streaming: hang up while it generates.
  fd = connect_loopback(s.port);
  send_post(fd, "/v1/completions", Json({{"prompt", "a"}, {"max_tokens", 1000}, {"ignore_eos", true}}).dump());
  ASSERT_TRUE(s.wait_gauge("cca_requests_running", 1));
  close(fd);
  EXPECT_TRUE(s.wait_gauge("cca_requests_running", 0));
  // The slot serves the next request.
  int st = 0;
  post(s, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 2}}, &st);
  EXPECT_EQ(st, 200);
  auto m = s.client().Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_NE(m->body.find("cca_generated_tokens_total"), std::string::npos);
}

TEST(Server, ShutdownFinishesOrCancelsInFlightRequestsWithinTheBound) {
  Options o;
  o.parallel = 1;
  o.queue = 4;
  o.shutdown_timeout_s = 0;  // running requests are cancelled at once (this model is fast
                             // enough to finish a long one within any short bound)
  auto s = std::make_unique<TestServer>(o);
  // A stream that runs, and a request queued behind it.
  std::promise<std::string> streamed;
  std::thread reader([&] {
    const int fd = connect_loopback(s->port);
    send_post(fd, "/v1/completions",
              Json({{"prompt", "a"}, {"max_tokens", 1000}, {"ignore_eos", true}, {"stream", true}}).dump());
    streamed.set_value(read_until(fd, "\r\n0\r\n\r\n"));
    close(fd);
  });
  ASSERT_TRUE(s->wait_gauge("cca_requests_running", 1));
  auto queued = std::async(std::launch::async, [&] {
    int st = 0;
    post(*s, "/v1/completions", {{"prompt", "b"}, {"max_tokens", 3}}, &st);
    return st;
  });
  ASSERT_TRUE(s->wait_gauge("cca_requests_queued", 1));
  const auto t0 = std::chrono::steady_clock::now();
  s->srv->shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_EQ(queued.get(), 503);
  const std::string raw = streamed.get_future().get();
  reader.join();
  EXPECT_NE(raw.find("cancelled: the server is shutting down"), std::string::npos) << raw.substr(0, 300);
  s.reset();  // serve() has returned: the thread joins
}

// The command: `cca serve --port 0` prints where it listens, answers, and exits 0 on SIGTERM
// after finishing the request in flight.
TEST(ServeCommand, AnswersAndExitsZeroOnSigterm) {
  test::TempDir dir;
  const std::string log = dir.file("serve.log");
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    dup2(fd, 1);
    const std::string model = qwen2_dir(), tmpl = qwen2_template();
    execl(CCA_CLI_PATH, CCA_CLI_PATH, "serve", "--model", model.c_str(), "--port", "0",
          "--threads", "1", "--parallel", "2", "--chat-template-file", tmpl.c_str(),
          "--api-key", kKey.c_str(), (char*)nullptr);
    _exit(127);
  }
  int port = 0;
  for (int i = 0; i < 1000 && port == 0; ++i) {
    std::this_thread::sleep_for(20ms);
    const std::string text = test::read_file(log);
    const size_t at = text.find("listening on http://127.0.0.1:");
    if (at != std::string::npos && text.find('\n', at) != std::string::npos)
      port = std::stoi(text.substr(at + 30));
  }
  ASSERT_GT(port, 0) << test::read_file(log);
  httplib::Client c("127.0.0.1", port);
  c.set_read_timeout(30, 0);
  c.set_default_headers({{"Authorization", "Bearer " + kKey}});
  auto r = c.Post("/v1/chat/completions",
                  R"({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})",
                  "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  // A request in flight when SIGTERM comes still gets its answer.
  for (int i = 0; i < 500; ++i) {
    auto m = c.Get("/metrics");
    if (m && m->body.find("\ncca_requests_running 0") != std::string::npos) break;
    std::this_thread::sleep_for(10ms);
  }
  auto inflight = std::async(std::launch::async, [&] {
    httplib::Client c2("127.0.0.1", port);
    c2.set_read_timeout(30, 0);
    c2.set_default_headers({{"Authorization", "Bearer " + kKey}});
    auto r2 = c2.Post("/v1/completions", R"({"prompt": "a", "max_tokens": 200, "ignore_eos": true})",
                      "application/json");
    return r2 ? r2->status : -1;
  });
  for (int i = 0; i < 500; ++i) {
    auto m = c.Get("/metrics");
    if (m && m->body.find("\ncca_requests_running 1") != std::string::npos) break;
    std::this_thread::sleep_for(10ms);
  }
  kill(pid, SIGTERM);
  int wstatus = 0;
  for (int i = 0; i < 1500; ++i) {
    if (waitpid(pid, &wstatus, WNOHANG) == pid) break;
    std::this_thread::sleep_for(10ms);
    if (i == 1499) {
      kill(pid, SIGKILL);
      waitpid(pid, &wstatus, 0);
      FAIL() << "cca serve did not exit within 15 s of SIGTERM";
    }
  }
  ASSERT_TRUE(WIFEXITED(wstatus)) << test::read_file(log);
  EXPECT_EQ(WEXITSTATUS(wstatus), 0) << test::read_file(log);
  EXPECT_EQ(inflight.get(), 200);
  EXPECT_NE(test::read_file(log).find("SIGTERM"), std::string::npos);
}

}  // namespace
}  // namespace cca

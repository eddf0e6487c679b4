#include "server/api.hpp"

#include <cmath>

#include "cca/error.hpp"
#include "model/untrusted.hpp"

namespace cca::server {
namespace {

ApiError bad(const std::string& message, const std::string& param = {}) {
  return ApiError(400, message, param);
}

std::string type_of(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null: return "null";
    case Json::value_t::boolean: return "a boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return "an integer";
    case Json::value_t::number_float: return "a number";
    case Json::value_t::string: return "a string";
    case Json::value_t::array: return "an array";
    case Json::value_t::object: return "an object";
    default: return "a value";
  }
}

ApiError wrong_type(const std::string& field, const char* want, const Json& got) {
  return bad("'" + field + "' must be " + want + ", got " + type_of(got) + " (" +
                 model::excerpt(got.dump(), 60) + ")",
             field);
}

// A field's value when present and not null.
const Json* field(const Json& body, const char* name) {
  auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

std::optional<bool> get_bool(const Json& body, const char* name) {
  const Json* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) throw wrong_type(name, "true or false", *v);
  return v->get<bool>();
}

std::optional<int64_t> get_int(const Json& body, const char* name) {
  const Json* v = field(body, name);
  if (!v) return std::nullopt;
  if (v->is_number_integer()) return v->get<int64_t>();
  if (v->is_number_unsigned()) throw bad("'" + std::string(name) + "' is out of range", name);
  // 16.0 is an integer to Python clients' JSON encoders too.
  if (v->is_number_float()) {
    const double d = v->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) return int64_t(d);
  }
  throw wrong_type(name, "an integer", *v);
}

std::optional<double> get_number(const Json& body, const char* name) {
  const Json* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_number()) throw wrong_type(name, "a number", *v);
  return v->get<double>();
}

std::optional<std::string> get_string(const Json& body, const char* name) {
  const Json* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_string()) throw wrong_type(name, "a string", *v);
  return v->get<std::string>();
}

// Fields of OpenAI's API this server does not implement: accepted when they ask for nothing
// (their default), refused otherwise.
void refuse_unsupported(const Json& body, Endpoint ep) {
  if (auto n = get_int(body, "n"); n && *n != 1)
    throw bad("'n' = " + std::to_string(*n) + " is not supported: this server returns one choice "
              "per request; send several requests",
              "n");
  if (auto b = get_int(body, "best_of"); b && *b != 1)
    throw bad("'best_of' is not supported (only 1)", "best_of");
  if (auto e = get_bool(body, "echo"); e && *e) throw bad("'echo' is not supported", "echo");
  for (const char* p : {"presence_penalty", "frequency_penalty"})
    if (auto v = get_number(body, p); v && *v != 0)
      throw bad(std::string("'") + p + "' is not supported (only 0)", p);
  if (const Json* lb = field(body, "logit_bias")) {
    if (!lb->is_object()) throw wrong_type("logit_bias", "an object", *lb);
    if (!lb->empty()) throw bad("'logit_bias' is not supported", "logit_bias");
  }
  if (auto s = get_string(body, "suffix"); s && !s->empty())
    throw bad("'suffix' is not supported", "suffix");
  for (const char* p : {"tools", "functions"})
    if (const Json* t = field(body, p)) {
      if (!t->is_array()) throw wrong_type(p, "an array", *t);
      if (!t->empty()) throw bad(std::string("'") + p + "' (tool calling) is not supported", p);
    }
  for (const char* p : {"tool_choice", "function_call"})
    if (const Json* t = field(body, p); t && !(t->is_string() && *t == "none"))
      throw bad(std::string("'") + p + "' (tool calling) is not supported", p);
  if (const Json* rf = field(body, "response_format")) {
    if (!rf->is_object()) throw wrong_type("response_format", "an object", *rf);
    const auto t = rf->find("type");
    if (t != rf->end() && !(t->is_string() && *t == "text"))
      throw bad("'response_format' other than {\"type\": \"text\"} is not supported",
                "response_format");
  }
  get_string(body, "user");
  get_bool(body, "parallel_tool_calls");
  get_bool(body, "store");
  if (ep == Endpoint::chat) {
    if (const Json* m = field(body, "metadata"); m && !m->is_object())
      throw wrong_type("metadata", "an object", *m);
  }
}

std::vector<std::string> parse_stop(const Json& body) {
  const Json* s = field(body, "stop");
  if (!s) return {};
  std::vector<std::string> out;
  if (s->is_string()) {
    out.push_back(s->get<std::string>());
  } else if (s->is_array()) {
    for (const Json& x : *s) {
      if (!x.is_string()) throw wrong_type("stop", "a string or an array of strings", *s);
      out.push_back(x.get<std::string>());
    }
  } else {
    throw wrong_type("stop", "a string or an array of strings", *s);
  }
  if (out.size() > kMaxStops)
    throw bad("'stop' has " + std::to_string(out.size()) + " strings; at most " +
                  std::to_string(kMaxStops),
              "stop");
  for (const std::string& x : out) {
    if (x.empty()) throw bad("'stop' strings must not be empty", "stop");
    if (x.size() > kMaxStopBytes)
      throw bad("a 'stop' string is " + std::to_string(x.size()) + " bytes; at most " +
                    std::to_string(kMaxStopBytes),
                "stop");
  }
  return out;
}

std::vector<int32_t> token_ids(const Json& arr) {
  std::vector<int32_t> ids;
  for (const Json& x : arr) {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX)
      throw bad("'prompt' token ids must be integers >= 0, got " + model::excerpt(x.dump(), 40),
                "prompt");
    ids.push_back(int32_t(x.get<int64_t>()));
  }
  return ids;
}

void parse_prompt(const Json& body, Request& r) {
  const Json* p = field(body, "prompt");
  if (!p) throw bad("'prompt' is required", "prompt");
  const char* want = "a string, an array of token ids, or an array of one of those";
  if (p->is_string()) {
    r.prompt = p->get<std::string>();
  } else if (p->is_array()) {
    if (p->empty()) throw bad("'prompt' is empty", "prompt");
    const Json& first = (*p)[0];
    if (first.is_number()) {
      r.prompt_ids = token_ids(*p);
    } else if (p->size() > 1) {
      throw bad("'prompt' holds " + std::to_string(p->size()) +
                    " prompts; this server takes one per request",
                "prompt");
    } else if (first.is_string()) {
      r.prompt = first.get<std::string>();
    } else if (first.is_array()) {
      r.prompt_ids = token_ids(first);
    } else {
      throw wrong_type("prompt", want, *p);
    }
  } else {
    throw wrong_type("prompt", want, *p);
  }
  if (r.prompt_ids ? r.prompt_ids->empty() : r.prompt.empty())
    throw bad("'prompt' is empty", "prompt");
}

void parse_messages(const Json& body, Request& r) {
  const Json* m = field(body, "messages");
  if (!m) throw bad("'messages' is required", "messages");
  if (!m->is_array()) throw wrong_type("messages", "an array", *m);
  if (m->empty()) throw bad("'messages' is empty", "messages");
  r.messages = Json::array();
  for (size_t i = 0; i < m->size(); ++i) {
    const Json& msg = (*m)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!msg.is_object()) throw wrong_type(where, "an object", msg);
    auto role = msg.find("role");
    if (role == msg.end() || !role->is_string())
      throw bad("'" + where + ".role' must be a string", where + ".role");
    Json out = Json::object();
    for (auto it = msg.begin(); it != msg.end(); ++it) {
      if (it.key() == "content") continue;
      if (it.key() == "tool_calls" && !it->is_null() && !(it->is_array() && it->empty()))
        throw bad("'" + where + ".tool_calls' (tool calling) is not supported", where + ".tool_calls");
      out[it.key()] = *it;
    }
    // Content: a string, or text parts [{"type": "text", "text": ...}] joined; null is "".
    auto c = msg.find("content");
    std::string content;
    if (c == msg.end() || c->is_null()) {
    } else if (c->is_string()) {
      content = c->get<std::string>();
    } else if (c->is_array()) {
      for (const Json& part : *c) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string())
          throw bad("'" + where + ".content' parts must be {\"type\": \"text\", \"text\": ...}: "
                    "this server takes text only",
                    where + ".content");
        content += part["text"].get<std::string>();
      }
    } else {
      throw wrong_type(where + ".content", "a string or an array of text parts", *c);
    }
    out["content"] = content;
    r.messages.push_back(std::move(out));
  }
}

Json logprobs_completions(const Completion& c, const std::vector<TokenInfo>& lps, size_t offset) {
  Json tokens = Json::array(), lp = Json::array(), top = Json::array(), off = Json::array();
  for (const TokenInfo& t : lps) {
    tokens.push_back(t.text);
    lp.push_back(t.logprob);
    Json m = Json::object();
    for (const auto& [s, v] : t.top) m[s] = v;
    top.push_back(std::move(m));
    off.push_back(offset);
    offset += t.text.size();
  }
  return {{"tokens", tokens}, {"token_logprobs", lp}, {"top_logprobs", top}, {"text_offset", off}};
}

Json bytes_of(const std::string& s) {
  Json b = Json::array();
  for (const char ch : s) b.push_back(int(static_cast<unsigned char>(ch)));
  return b;
}

Json logprobs_chat(const std::vector<TokenInfo>& lps) {
  Json content = Json::array();
  for (const TokenInfo& t : lps) {
    Json top = Json::array();
    for (const auto& [s, v] : t.top) top.push_back({{"token", s}, {"logprob", v}, {"bytes", bytes_of(s)}});
    content.push_back({{"token", t.text}, {"logprob", t.logprob}, {"bytes", bytes_of(t.text)},
                       {"top_logprobs", top}});
  }
  return {{"content", content}, {"refusal", nullptr}};
}

Json usage(const Completion& c) {
  return {{"prompt_tokens", c.prompt_tokens},
          {"completion_tokens", c.completion_tokens},
          {"total_tokens", c.prompt_tokens + c.completion_tokens}};
}

Json head(const Request& r, const Completion& c, bool chunk) {
  const bool chat = r.endpoint == Endpoint::chat;
  return {{"id", c.id},
          {"object", chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
          {"created", c.created},
          {"model", c.model},
          {"system_fingerprint", nullptr}};
}

}  // namespace

ApiError::ApiError(int st, std::string message, std::string p, std::string c, std::string t)
    : std::runtime_error(std::move(message)), status(st), type(std::move(t)), param(std::move(p)),
      code(std::move(c)) {
  if (type.empty())
    type = st == 401 ? "authentication_error"
           : st == 404 ? "not_found_error"
           : st == 429 || st == 503 ? "server_overloaded"
           : st >= 500 ? "server_error" : "invalid_request_error";
}

Json ApiError::body() const {
  return {{"error",
           {{"message", what()},
            {"type", type},
            {"param", param.empty() ? Json(nullptr) : Json(param)},
            {"code", code.empty() ? Json(nullptr) : Json(code)}}}};
}

Request parse_request(Endpoint ep, std::string_view text) {
  Json body;
  try {
    model::parse_json(text, "the request body");  // depth limit and a short message first
    body = Json::parse(text);
  } catch (const Error& e) {
    throw bad(e.what());
  } catch (const std::exception& e) {
    throw bad(std::string("the request body is not valid JSON: ") + model::excerpt(e.what(), 200));
  }
  if (!body.is_object()) throw bad("the request body must be a JSON object, got " + type_of(body));
  Request r;
  r.endpoint = ep;
  r.model = get_string(body, "model").value_or("");
  if (ep == Endpoint::completions) parse_prompt(body, r);
  else parse_messages(body, r);
  refuse_unsupported(body, ep);

  std::optional<int64_t> mt = get_int(body, "max_tokens");
  if (ep == Endpoint::chat)
    if (auto mct = get_int(body, "max_completion_tokens")) mt = mct;
  if (mt && *mt < 1)
    throw bad("'max_tokens' must be at least 1, got " + std::to_string(*mt), "max_tokens");
  r.max_tokens = mt;

  r.sampling.temperature = get_number(body, "temperature");
  if (r.sampling.temperature && !(*r.sampling.temperature >= 0 && *r.sampling.temperature <= 100))
    throw bad("'temperature' must be in [0, 100] (0: greedy), got " +
                  model::excerpt(body["temperature"].dump(), 30),
              "temperature");
  r.sampling.top_p = get_number(body, "top_p");
  if (r.sampling.top_p && !(*r.sampling.top_p > 0 && *r.sampling.top_p <= 1))
    throw bad("'top_p' must be in (0, 1], got " + model::excerpt(body["top_p"].dump(), 30), "top_p");
  if (auto k = get_int(body, "top_k")) {
    if (*k < -1) throw bad("'top_k' must be >= 0 (0 or -1: off), got " + std::to_string(*k), "top_k");
    if (*k > 0) r.sampling.top_k = *k;
  }
  if (auto s = get_int(body, "seed")) {
    r.sampling.seed = uint64_t(*s);
    r.seed_given = true;
  }
  r.stop = parse_stop(body);
  r.stream = get_bool(body, "stream").value_or(false);
  if (const Json* so = field(body, "stream_options")) {
    if (!so->is_object()) throw wrong_type("stream_options", "an object", *so);
    r.include_usage = get_bool(*so, "include_usage").value_or(false);
  }
  r.ignore_eos = get_bool(body, "ignore_eos").value_or(false);

  if (ep == Endpoint::completions) {
    if (auto lp = get_int(body, "logprobs")) {
      if (*lp < 0 || *lp > 5) throw bad("'logprobs' must be in [0, 5], got " + std::to_string(*lp), "logprobs");
      r.top_logprobs = int(*lp);
    }
  } else {
    const bool lp = get_bool(body, "logprobs").value_or(false);
    const auto top = get_int(body, "top_logprobs");
    if (top && (*top < 0 || *top > kMaxTopLogprobs))
      throw bad("'top_logprobs' must be in [0, 20], got " + std::to_string(*top), "top_logprobs");
    if (top && !lp) throw bad("'top_logprobs' needs 'logprobs': true", "top_logprobs");
    if (lp) r.top_logprobs = int(top.value_or(0));
  }
  return r;
}

const char* finish_reason(const std::string& s) {
  return s == "max new tokens" || s == "max context" ? "length" : "stop";
}

Json response_body(const Request& r, const Completion& c) {
  Json j = head(r, c, false);
  Json choice = {{"index", 0}};
  if (r.endpoint == Endpoint::chat) {
    choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    choice["logprobs"] = r.top_logprobs >= 0 ? logprobs_chat(c.logprobs) : Json(nullptr);
  } else {
    choice["text"] = c.text;
    choice["logprobs"] = r.top_logprobs >= 0 ? logprobs_completions(c, c.logprobs, 0) : Json(nullptr);
  }
  choice["finish_reason"] = c.finish_reason;
  j["choices"] = Json::array({choice});
  j["usage"] = usage(c);
  return j;
}

Json chunk_body(const Request& r, const Completion& c, const std::string& delta,
                const std::vector<TokenInfo>& lps, bool first, const std::string& finish) {
  Json j = head(r, c, true);
  Json choice = {{"index", 0}};
  if (r.endpoint == Endpoint::chat) {
    Json d = Json::object();
    if (first) d["role"] = "assistant";
    if (!delta.empty() || first) d["content"] = delta;
    choice["delta"] = d;
    choice["logprobs"] = r.top_logprobs >= 0 && !lps.empty() ? logprobs_chat(lps) : Json(nullptr);
  } else {
    choice["text"] = delta;
    choice["logprobs"] =
        r.top_logprobs >= 0 && !lps.empty() ? logprobs_completions(c, lps, c.text_offset) : Json(nullptr);
  }
  choice["finish_reason"] = finish.empty() ? Json(nullptr) : Json(finish);
  j["choices"] = Json::array({choice});
  return j;
}

Json usage_chunk(const Request& r, const Completion& c) {
  Json j = head(r, c, true);
  j["choices"] = Json::array();
  j["usage"] = usage(c);
  return j;
}

}  // namespace cca::server

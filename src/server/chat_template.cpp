#include "server/chat_template.hpp"

#include <filesystem>

#include "cca/error.hpp"
#include "model/untrusted.hpp"

namespace cca::server {
namespace fs = std::filesystem;

namespace {

// A special token of tokenizer_config.json: a string or an AddedToken {"content": ...}.
std::optional<std::string> token_string(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

ChatTemplate ChatTemplate::from_text(const std::string& text, const std::string& source,
                                     std::map<std::string, std::string> specials) {
  ChatTemplate t;
  t.tpl_ = jinja::Template::parse(text, source);
  t.source_ = source;
  t.specials_ = std::move(specials);
  return t;
}

ChatTemplate ChatTemplate::load(const std::string& dir, const std::string& file,
                                const tok::Tokenizer* tok) {
  std::map<std::string, std::string> specials;
  if (tok) {
    if (auto b = tok->bos_id()) specials["bos_token"] = tok->id_to_token(*b);
    if (auto e = tok->eos_id()) specials["eos_token"] = tok->id_to_token(*e);
  }
  std::optional<std::string> text;
  std::string source;
  const fs::path cfg_path = fs::path(dir) / "tokenizer_config.json";
  std::error_code ec;
  if (fs::exists(cfg_path, ec)) {
    const nlohmann::json cfg = model::parse_json(
        model::read_text_file(cfg_path.string(), "tokenizer_config.json", model::kMaxJsonFileBytes),
        cfg_path.string());
    if (cfg.is_object()) {
      for (const char* k : {"bos_token", "eos_token", "unk_token", "pad_token"})
        if (cfg.contains(k))
          if (auto s = token_string(cfg[k])) specials[k] = *s;
      if (cfg.contains("chat_template")) {
        const nlohmann::json& ct = cfg["chat_template"];
        source = cfg_path.string() + " (chat_template)";
        if (ct.is_string()) {
          text = ct.get<std::string>();
        } else if (ct.is_array()) {
          for (const auto& e : ct)
            if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
                e["template"].is_string())
              text = e["template"].get<std::string>();
          check(text.has_value(), source + ": a list of templates without one named \"default\"");
        } else if (!ct.is_null()) {
          throw Error(source + ": must be a string or a list of {name, template}");
        }
      }
    }
  }
  const fs::path jinja_path = fs::path(dir) / "chat_template.jinja";
  if (file.empty() && fs::exists(jinja_path, ec)) {
    text = model::read_text_file(jinja_path.string(), "chat_template.jinja", model::kMaxConfigBytes);
    source = jinja_path.string();
  }
  if (!file.empty()) {
    text = model::read_text_file(file, "--chat-template-file", model::kMaxConfigBytes);
    source = file;
  }
  ChatTemplate t;
  t.specials_ = std::move(specials);
  if (!text) {
    t.missing_ = "the model has no chat template (no chat_template in tokenizer_config.json, no "
                 "chat_template.jinja in " + dir + "); start the server with --chat-template-file, "
                 "or use /v1/completions";
    return t;
  }
  t.tpl_ = jinja::Template::parse(*text, source);
  t.source_ = source;
  return t;
}

std::string ChatTemplate::render(const Json& messages) const {
  if (!tpl_) throw ApiError(400, missing_, "messages");
  std::map<std::string, jinja::Value> vars;
  vars["messages"] = jinja::Value::from_json(messages);
  vars["add_generation_prompt"] = jinja::Value(true);
  for (const auto& [k, v] : specials_) vars[k] = jinja::Value(v);
  try {
    return tpl_->render(vars);
  } catch (const jinja::RaisedError& e) {
    throw ApiError(400, std::string("the chat template refused the messages: ") + e.what(),
                   "messages");
  } catch (const Error& e) {
    throw ApiError(400, std::string("the chat template failed on these messages: ") + e.what(),
                   "messages");
  }
}

}  // namespace cca::server

// The chat template of a model, rendered with the jinja renderer: where it comes from
// (--chat-template-file, else the model directory's chat_template.jinja, else
// tokenizer_config.json's "chat_template": a string, or a list of {name, template} of which the
// one named "default" is used), the special-token strings it may print (bos_token, eos_token,
// ... from tokenizer_config.json, else the tokenizer's bos and eos), and the variables it gets
// (messages, add_generation_prompt = true), as transformers' apply_chat_template passes them.
#pragma once
#include <map>
#include <optional>
#include <string>

#include "server/api.hpp"
#include "server/jinja.hpp"
#include "tokenizer/tokenizer.hpp"

namespace cca::server {

class ChatTemplate {
 public:
  // Loads and parses the template (cca::Error naming the file and the line of what the renderer
  // cannot take). A model without one gives a ChatTemplate that is not available().
  static ChatTemplate load(const std::string& model_dir, const std::string& template_file,
                           const tok::Tokenizer* tok);
  // From template text (tests, fuzzing); `specials` are the token strings it may print.
  static ChatTemplate from_text(const std::string& text, const std::string& source,
                                std::map<std::string, std::string> specials);

  bool available() const { return tpl_.has_value(); }
  const std::string& source() const { return source_; }  // where the template came from
  const std::string& missing_reason() const { return missing_; }

  // The prompt text for the messages (Request::messages), ending with the assistant's turn.
  // ApiError 400 when the template refuses the messages (raise_exception) or fails on them.
  std::string render(const Json& messages) const;

 private:
  std::optional<jinja::Template> tpl_;
  std::string source_, missing_;
  std::map<std::string, std::string> specials_;
};

}  // namespace cca::server

// The chat template renderer (src/server/jinja.*): the Llama-3, Llama-3.1, Mistral (v0.1,
// v0.3) and Qwen2 (2, 2.5) templates render every case of tests/data/chat_templates/expected.json
// exactly as Python's jinja2 does under transformers' settings (made by
// scripts/make_chat_template_fixtures.py), refusals included; templates the renderer cannot
// take are refused at load, naming what and the line; Jinja's scoping, namespaces, tojson and
// whitespace rules; incremental detokenization with stop strings (tok::TextStream).
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "server/chat_template.hpp"
#include "server/jinja.hpp"
#include "temp_dir.hpp"
#include "test_model_util.hpp"
#include "tokenizer/text_stream.hpp"
#include "tokenizer/tokenizer.hpp"

namespace cca {
namespace {

using server::Json;
using server::jinja::Template;
using server::jinja::Value;

std::string fixture_dir() { return std::string(CCA_SOURCE_DIR) + "/tests/data/chat_templates/"; }

std::string render(const std::string& src, const std::map<std::string, Value>& vars = {}) {
  return Template::parse(src, "t").render(vars);
}

TEST(ChatTemplate, RendersTheModelTemplatesAsJinja2Does) {
  const Json all = Json::parse(test::read_file(fixture_dir() + "expected.json"));
  int cases = 0;
  for (auto it = all.begin(); it != all.end(); ++it) {
    const std::string name = it.key();
    std::map<std::string, std::string> specials;
    for (auto s = (*it)["specials"].begin(); s != (*it)["specials"].end(); ++s)
      specials[s.key()] = s.value().get<std::string>();
    const std::string src = test::read_file(fixture_dir() + name + ".jinja");
    const Template t = Template::parse(src, name);
    for (auto c = (*it)["cases"].begin(); c != (*it)["cases"].end(); ++c) {
      std::map<std::string, Value> vars;
      for (auto v = c.value()["input"].begin(); v != c.value()["input"].end(); ++v)
        vars[v.key()] = Value::from_json(v.value());
      vars["add_generation_prompt"] = Value(true);
      for (const auto& [k, v] : specials) vars[k] = Value(v);
      const std::string where = name + " / " + c.key();
      if (c.value().contains("error")) {
        try {
          t.render(vars);
          ADD_FAILURE() << where << ": rendered, expected the error "
                        << c.value()["error"].get<std::string>();
        } catch (const server::jinja::RaisedError& e) {
          EXPECT_EQ(std::string(e.what()), c.value()["error"].get<std::string>()) << where;
        }
      } else {
        EXPECT_EQ(t.render(vars), c.value()["text"].get<std::string>()) << where;
      }
      ++cases;
    }
  }
  EXPECT_EQ(cases, 30);
}

TEST(ChatTemplate, UnsupportedTemplatesAreRefusedAtLoadByNameAndLine) {
  auto error_of = [](const std::string& src) -> std::string {
    try {
      Template::parse(src, "tmpl");
    } catch (const server::jinja::TemplateError& e) {
      return e.what();
    }
    return "(parsed)";
  };
  EXPECT_EQ(error_of("a\n{{ x | frobnicate }}"), "tmpl line 2: the filter 'frobnicate' is not supported");
  EXPECT_EQ(error_of("{% macro m() %}{% endmacro %}"), "tmpl line 1: the tag {% macro %} is not supported");
  EXPECT_EQ(error_of("{{ x is shiny }}"), "tmpl line 1: the test 'shiny' is not supported");
  EXPECT_EQ(error_of("{{ now() }}"), "tmpl line 1: the function 'now' is not supported");
  EXPECT_EQ(error_of("{{ s.zfill(3) }}"), "tmpl line 1: the method 'zfill' is not supported");
  EXPECT_EQ(error_of("{% if x %}"), "tmpl line 1: the template ends before {% elif %} or {% else %} or {% endif %}");
  EXPECT_EQ(error_of("{{ 'abc }}"), "tmpl line 1: a tag opened with '{{' is never closed");
  EXPECT_EQ(error_of("{% endfor %}"), "tmpl line 1: unexpected tag {% endfor %}");
  EXPECT_EQ(error_of("{{ (((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1 }}"),
            "tmpl line 1: expressions nested too deeply");
  // A template that loops without end stops at the iteration bound.
  EXPECT_THROW(render("{% for i in range(100000000) %}{% endfor %}"), server::jinja::TemplateError);
}

TEST(ChatTemplate, JinjaSemantics) {
  // A loop's body has its own scope; a namespace carries values out of it.
  EXPECT_EQ(render("{% set x = 1 %}{% for i in [1, 2] %}{% set x = i %}{% endfor %}{{ x }}"), "1");
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for i in [1, 2, 3] %}{% set ns.n = ns.n + i %}"
                   "{% endfor %}{{ ns.n }}"),
            "6");
  EXPECT_EQ(render("{% for i in range(5) if i is odd %}{{ loop.index }}:{{ i }}{{ ',' if not loop.last }}"
                   "{% endfor %}"),
            "1:1,2:3");
  EXPECT_EQ(render("{% for k, v in {'a': 1, 'b': [1, 'x']} | items %}{{ k }}={{ v }};{% endfor %}"),
            "a=1;b=[1, 'x'];");
  EXPECT_EQ(render("{{ {'a': [1, 2.5, none, true], 'b': 'é\"'} | tojson }}"),
            "{\"a\": [1, 2.5, null, true], \"b\": \"é\\\"\"}");
  EXPECT_EQ(render("{{ {'a': 1} | tojson(indent=2) }}"), "{\n  \"a\": 1\n}");
  EXPECT_EQ(render("{{ 'abcdef'[1:4] }}{{ [1, 2, 3][::-1] }}{{ 'x' ~ 2 }}{{ 7 // 2 }}{{ -7 % 3 }}{{ 1 / 4 }}"),
            "bcd[3, 2, 1]x2320.25");
  EXPECT_EQ(render("{{ ' hi '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'Abc'.startswith('A') }}|{{ x.y is defined }}",
                   {{"x", Value(server::jinja::Object{})}}),
            "hi|['a', 'b']|True|False");
  EXPECT_EQ(render("{{ undefined_thing }}|{{ none }}|{{ 'a' if false }}|{{ [] | length }}"), "|None||0");
  EXPECT_THROW(render("{{ missing.attr }}"), server::jinja::TemplateError);
  EXPECT_THROW(render("{{ 'a' + 1 }}"), server::jinja::TemplateError);
  EXPECT_THROW(render("{{ raise_exception('no') }}"), server::jinja::RaisedError);
  // Whitespace: trim_blocks and lstrip_blocks, and the - and + markers.
  EXPECT_EQ(render("{% if true %}\n  x\n{% endif %}\n"), "  x\n");
  EXPECT_EQ(render("a\n    {% if true %}b{% endif %}"), "a\nb");
  EXPECT_EQ(render("a  {{- 'b' -}}  c"), "abc");
  EXPECT_EQ(render("a\n  {%+ if true %}b{% endif +%}\nc"), "a\n  b\nc");
}

TEST(ChatTemplate, LoadsFromTokenizerConfigAndAnswersRefusalsWithAnApiError) {
  test::TempDir dir;
  test::write_file(dir.file("tokenizer_config.json"),
                   R"({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": [)"
                   R"({"name": "tool_use", "template": "no"},)"
                   R"({"name": "default", "template": "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"}]})");
  const server::ChatTemplate t = server::ChatTemplate::load(dir.path().string(), "", nullptr);
  ASSERT_TRUE(t.available());
  EXPECT_EQ(t.render(Json::parse(R"([{"role": "user", "content": "hi"}])")), "<s>[user]hi</s>");
  try {
    t.render(Json::parse(R"([{"role": "system", "content": "x"}])"));
    ADD_FAILURE() << "rendered";
  } catch (const server::ApiError& e) {
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(std::string(e.what()), "the chat template refused the messages: no system");
  }
  // --chat-template-file wins; a directory without a template is not available, saying why.
  test::write_file(dir.file("t.jinja"), "{{ messages[0].content }}!");
  EXPECT_EQ(server::ChatTemplate::load(dir.path().string(), dir.file("t.jinja"), nullptr)
                .render(Json::parse(R"([{"role": "user", "content": "hi"}])")),
            "hi!");
  test::TempDir empty;
  const server::ChatTemplate none = server::ChatTemplate::load(empty.path().string(), "", nullptr);
  EXPECT_FALSE(none.available());
  EXPECT_NE(none.missing_reason().find("--chat-template-file"), std::string::npos);
}

// Streaming text equals the decode of all ids, for any cut; stop strings end it before them.
TEST(TextStream, EqualsTheWholeDecodeAndStopsBeforeAStopString) {
  for (const char* name : {"llama", "qwen2"}) {
    const tok::Tokenizer tk =
        tok::Tokenizer::from_file(test::model_fixture_dir(name) + "/tokenizer.json");
    auto decode = [&](const std::vector<int32_t>& ids) { return tk.decode(ids, true); };
    std::mt19937 rng(7);
    const std::vector<std::string> words = {" the", " ünïcödé", "fox", "\n", " 42", "café", " 🙂",
                                            "  ", "jumps", ".", " \"q\""};
    for (int trial = 0; trial < 30; ++trial) {
      // Byte-level (qwen2): any ids. Byte fallback (llama): the ids of text, since a run of
      // byte tokens that is not UTF-8 decodes to U+FFFDs that a later byte can rewrite.
      std::vector<int32_t> ids;
      if (std::string(name) == "qwen2") {
        ids.resize(1 + rng() % 40);
        for (auto& id : ids) id = int32_t(rng() % uint32_t(tk.vocab_size()));
      } else {
        std::string text;
        for (int w = 0; w < 1 + int(rng() % 12); ++w) text += words[rng() % words.size()];
        ids = tk.encode(text, false);
      }
      tok::TextStream s(decode);
      std::string out;
      for (int32_t id : ids) out += s.add(id);
      out += s.finish();
      EXPECT_EQ(out, decode(ids)) << name << " trial " << trial;
    }
    // A stop string found across token boundaries: the text ends before it.
    std::vector<int32_t> ids = tk.encode("The quick brown fox jumps over the lazy dog", false);
    const std::string full = decode(ids);
    const size_t at = full.find("fox");
    ASSERT_NE(at, std::string::npos);
    tok::TextStream s(decode, {"zzz", "x jum"});
    std::string out;
    for (int32_t id : ids) {
      out += s.add(id);
      if (s.stopped()) break;
    }
    out += s.finish();
    EXPECT_TRUE(s.stopped());
    EXPECT_EQ(out, full.substr(0, at + 2)) << name;
  }
}

}  // namespace
}  // namespace cca

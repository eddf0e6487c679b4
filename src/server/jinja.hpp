// A Jinja2 renderer for chat templates: the subset of the language that Hugging Face chat
// templates use (those of Llama-3/3.1/3.2, Mistral and Qwen2/2.5 among them), rendered as
// transformers renders them (trim_blocks and lstrip_blocks on, no autoescape, its tojson). A
// template is parsed once; every filter, test, function and method it names is checked then,
// so a template that needs something this renderer lacks is refused at load, by name and line.
//
// Supported: {{ }}, {% %}, {# #} with - and + whitespace control; if/elif/else, for (tuple
// targets, an `if` filter, else, loop.index/index0/revindex/revindex0/first/last/length/
// previtem/nextitem, break, continue), set (names, namespace attributes, {% set %} blocks),
// generation blocks; literals, lists, dicts, attribute and item access, slices, the operators
// of Python (or and not in, is [not], comparisons, + - * / // % **, ~, a if b else c). The
// filters, tests, functions and methods are listed in jinja.cpp (kFilters, kTests, ...).
// Not supported (refused at load): macros, call blocks, includes, imports, extends, raw.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "cca/error.hpp"

namespace cca::server::jinja {

// A template that cannot be parsed or rendered; the message names the template and the line.
struct TemplateError : Error {
  using Error::Error;
};
// The template's own raise_exception("..."): a refusal of the input (e.g. roles that do not
// alternate), not a fault of the template.
struct RaisedError : Error {
  using Error::Error;
};

class Value;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;  // in insertion order

struct Undefined {
  std::string name;  // what was looked up, for error messages
};
struct None {};

// A template value: Python's types as templates see them. Arrays and objects are immutable and
// shared; a namespace() is the one mutable object.
class Value {
 public:
  struct Namespace {
    Object members;
  };
  using Data = std::variant<Undefined, None, bool, int64_t, double, std::string,
                            std::shared_ptr<const Array>, std::shared_ptr<const Object>,
                            std::shared_ptr<Namespace>>;

  Value() : data_(Undefined{}) {}
  Value(Data d) : data_(std::move(d)) {}
  Value(bool b) : data_(b) {}
  Value(int64_t i) : data_(i) {}
  Value(int i) : data_(int64_t(i)) {}
  Value(double d) : data_(d) {}
  Value(std::string s) : data_(std::move(s)) {}
  Value(const char* s) : data_(std::string(s)) {}
  Value(Array a) : data_(std::make_shared<const Array>(std::move(a))) {}
  Value(Object o) : data_(std::make_shared<const Object>(std::move(o))) {}
  static Value none() { return Value(Data(None{})); }
  static Value undefined(std::string name = {}) { return Value(Data(Undefined{std::move(name)})); }
  static Value from_json(const nlohmann::ordered_json& j);

  const Data& data() const { return data_; }
  bool is_undefined() const { return std::holds_alternative<Undefined>(data_); }
  bool is_none() const { return std::holds_alternative<None>(data_); }
  bool is_bool() const { return std::holds_alternative<bool>(data_); }
  bool is_int() const { return std::holds_alternative<int64_t>(data_); }
  bool is_float() const { return std::holds_alternative<double>(data_); }
  bool is_number() const { return is_int() || is_float(); }
  bool is_string() const { return std::holds_alternative<std::string>(data_); }
  bool is_array() const { return std::holds_alternative<std::shared_ptr<const Array>>(data_); }
  bool is_object() const { return std::holds_alternative<std::shared_ptr<const Object>>(data_); }
  bool is_namespace() const { return std::holds_alternative<std::shared_ptr<Namespace>>(data_); }

  bool as_bool() const { return std::get<bool>(data_); }
  int64_t as_int() const { return std::get<int64_t>(data_); }
  double as_number() const { return is_int() ? double(as_int()) : std::get<double>(data_); }
  const std::string& as_string() const { return std::get<std::string>(data_); }
  const Array& as_array() const { return *std::get<std::shared_ptr<const Array>>(data_); }
  const Object& as_object() const { return *std::get<std::shared_ptr<const Object>>(data_); }
  Namespace& as_namespace() const { return *std::get<std::shared_ptr<Namespace>>(data_); }

  bool truthy() const;
  // A member of an object or namespace (undefined when absent or not a mapping).
  Value member(std::string_view key) const;
  std::string type_name() const;

 private:
  Data data_;
};

// str() of a value as Python prints it ("True", "None", "['a', 1]"); undefined is "".
std::string to_str(const Value& v);
// json.dumps(v, ensure_ascii=False, indent=indent) (indent < 0: none), as transformers' tojson.
std::string to_json(const Value& v, int indent = -1);

struct Node;

class Template {
 public:
  // Parses `source`; `name` says where it came from in messages. Throws TemplateError.
  static Template parse(std::string_view source, const std::string& name);
  // Renders with the given variables (messages, bos_token, add_generation_prompt, ...).
  // Throws TemplateError for a fault in the template, RaisedError for raise_exception().
  std::string render(const std::map<std::string, Value>& vars) const;

  // Bounds on a render, against templates that loop without end: output bytes and loop
  // iterations.
  static constexpr int64_t kMaxOutputBytes = int64_t(64) << 20;
  static constexpr int64_t kMaxIterations = 10'000'000;

 private:
  std::shared_ptr<const Node> root_;
  std::string name_;
};

}  // namespace cca::server::jinja

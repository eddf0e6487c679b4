// Values and evaluation of the Jinja subset (jinja.hpp): Python's semantics for the operators,
// truthiness, str() and json.dumps as transformers' tojson uses them, Jinja2's scoping (a for
// loop's body has its own scope; namespace() objects carry values out of it) and its undefined
// values (printing or iterating one gives nothing; reading an attribute of one is an error).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <limits>

#include "model/untrusted.hpp"
#include "server/jinja_ast.hpp"

namespace cca::server::jinja {
namespace {

const char* const kFilters[] = {
    "abs",    "capitalize", "count",   "d",        "default", "first",  "float", "indent",
    "int",    "items",      "join",    "last",     "length",  "list",   "lower", "map",
    "max",    "min",        "reject",  "rejectattr", "replace", "reverse", "round", "safe",
    "select", "selectattr", "sort",    "string",   "sum",     "title",  "tojson", "trim",
    "unique", "upper"};
const char* const kTests[] = {
    "defined", "undefined", "none",  "boolean",   "true",   "false", "string", "number",
    "integer", "float",     "mapping", "iterable", "sequence", "callable", "equalto", "eq",
    "==",      "ne",        "!=",    "odd",       "even",   "divisibleby", "in", "lower",
    "upper",   "sameas",    "gt",    ">",         "ge",     ">=",    "lt",     "<",
    "le",      "<="};
const char* const kFunctions[] = {"raise_exception", "namespace", "range", "strftime_now",
                                  "dict"};
const char* const kMethods[] = {"strip",   "lstrip", "rstrip",  "upper",  "lower",
                                "title",   "capitalize", "startswith", "endswith", "split",
                                "replace", "find",   "join",    "count",  "items",
                                "keys",    "values", "get"};

template <size_t N>
bool in_list(const char* const (&list)[N], std::string_view name) {
  return std::any_of(std::begin(list), std::end(list), [&](const char* s) { return name == s; });
}

// ---- strings --------------------------------------------------------------------------------

// The code points of UTF-8 text as byte ranges (an invalid byte is one unit of its own).
std::vector<std::string> code_points(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + n > s.size()) n = 1;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) n = 1;
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string strip(const std::string& s, const Value& chars, bool left, bool right) {
  auto drop = [&](char c) {
    return chars.is_string() ? chars.as_string().find(c) != std::string::npos : is_ws(c);
  };
  size_t a = 0, b = s.size();
  if (left)
    while (a < b && drop(s[a])) ++a;
  if (right)
    while (b > a && drop(s[b - 1])) --b;
  return s.substr(a, b - a);
}

std::string ascii_case(std::string s, bool upper) {
  for (char& c : s) c = char(upper ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string capitalize(const std::string& s) {
  std::string r = ascii_case(s, false);
  if (!r.empty()) r[0] = char(std::toupper(static_cast<unsigned char>(r[0])));
  return r;
}

std::string title(const std::string& s) {
  std::string r = s;
  bool start = true;
  for (char& c : r) {
    const bool alpha = std::isalpha(static_cast<unsigned char>(c));
    c = char(start ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
    start = !alpha;
  }
  return r;
}

std::string replace_all(const std::string& s, const std::string& from, const std::string& to,
                        int64_t count) {
  if (from.empty()) return s;
  std::string r;
  size_t i = 0;
  for (int64_t n = 0; count < 0 || n < count; ++n) {
    const size_t j = s.find(from, i);
    if (j == std::string::npos) break;
    r.append(s, i, j - i).append(to);
    i = j + from.size();
  }
  return r.append(s, i, std::string::npos);
}

std::string py_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  int prec = 1;
  for (; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  const int exp = d == 0 ? 0 : int(std::floor(std::log10(std::fabs(d))));
  if (exp < -4 || exp >= 16) return buf;  // "1e-05", "1.5e+16"
  std::snprintf(buf, sizeof buf, "%.*f", std::max(prec - 1 - exp, 0), d);
  std::string s = buf;
  if (s.find('.') == std::string::npos) s += ".0";
  return s;
}

std::string py_repr_string(const std::string& s) {
  const char q = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string r(1, q);
  for (const char c : s) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (c == q || c == '\\') r += '\\', r += c;
    else if (c == '\n') r += "\\n";
    else if (c == '\r') r += "\\r";
    else if (c == '\t') r += "\\t";
    else if (u < 0x20 || u == 0x7F) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", u);
      r += b;
    } else {
      r += c;
    }
  }
  return r + q;
}

std::string repr(const Value& v) { return v.is_string() ? py_repr_string(v.as_string()) : to_str(v); }

std::string json_string(const std::string& s) {
  std::string r = "\"";
  for (const char c : s) {
    const unsigned char u = static_cast<unsigned char>(c);
    switch (c) {
      case '"': r += "\\\""; break;
      case '\\': r += "\\\\"; break;
      case '\n': r += "\\n"; break;
      case '\r': r += "\\r"; break;
      case '\t': r += "\\t"; break;
      case '\b': r += "\\b"; break;
      case '\f': r += "\\f"; break;
      default:
        if (u < 0x20) {
          char b[8];
          std::snprintf(b, sizeof b, "\\u%04x", u);
          r += b;
        } else {
          r += c;
        }
    }
  }
  return r + "\"";
}

void json_dump(const Value& v, int indent, int level, std::string& out) {
  const std::string nl = indent >= 0 ? "\n" : "";
  auto pad = [&](int l) { return indent >= 0 ? std::string(size_t(indent * l), ' ') : ""; };
  const std::string item_sep = indent >= 0 ? "," : ", ";
  if (v.is_undefined()) throw TemplateError("tojson of an undefined value");
  if (v.is_none()) out += "null";
  else if (v.is_bool()) out += v.as_bool() ? "true" : "false";
  else if (v.is_int()) out += std::to_string(v.as_int());
  else if (v.is_float()) {
    const double d = v.as_number();
    out += std::isnan(d) ? "NaN" : std::isinf(d) ? (d > 0 ? "Infinity" : "-Infinity") : py_float(d);
  } else if (v.is_string()) out += json_string(v.as_string());
  else if (v.is_array()) {
    const Array& a = v.as_array();
    if (a.empty()) {
      out += "[]";
      return;
    }
    out += "[" + nl;
    for (size_t i = 0; i < a.size(); ++i) {
      out += (i ? item_sep + nl : "") + pad(level + 1);
      json_dump(a[i], indent, level + 1, out);
    }
    out += nl + pad(level) + "]";
  } else {
    const Object& o = v.is_object() ? v.as_object() : v.as_namespace().members;
    if (o.empty()) {
      out += "{}";
      return;
    }
    out += "{" + nl;
    for (size_t i = 0; i < o.size(); ++i) {
      out += (i ? item_sep + nl : "") + pad(level + 1) + json_string(o[i].first) + ": ";
      json_dump(o[i].second, indent, level + 1, out);
    }
    out += nl + pad(level) + "}";
  }
}

// ---- comparisons ----------------------------------------------------------------------------

bool numeric(const Value& v) { return v.is_number() || v.is_bool(); }
double num(const Value& v) { return v.is_bool() ? (v.as_bool() ? 1.0 : 0.0) : v.as_number(); }

bool py_eq(const Value& a, const Value& b) {
  if (numeric(a) && numeric(b) && (a.is_number() || b.is_number())) {
    if (a.is_int() && b.is_int()) return a.as_int() == b.as_int();
    return num(a) == num(b);
  }
  if (a.data().index() != b.data().index()) return false;
  if (a.is_undefined() || a.is_none()) return true;
  if (a.is_bool()) return a.as_bool() == b.as_bool();
  if (a.is_string()) return a.as_string() == b.as_string();
  if (a.is_array()) {
    const Array &x = a.as_array(), &y = b.as_array();
    if (x.size() != y.size()) return false;
    for (size_t i = 0; i < x.size(); ++i)
      if (!py_eq(x[i], y[i])) return false;
    return true;
  }
  if (a.is_object()) {
    const Object &x = a.as_object(), &y = b.as_object();
    if (x.size() != y.size()) return false;
    for (const auto& [k, v] : x)
      if (!py_eq(v, b.member(k)) || b.member(k).is_undefined()) return false;
    return true;
  }
  return &a.as_namespace() == &b.as_namespace();
}

}  // namespace

bool has_filter(std::string_view n) { return in_list(kFilters, n); }
bool has_test(std::string_view n) { return in_list(kTests, n); }
bool has_function(std::string_view n) { return in_list(kFunctions, n); }
bool has_method(std::string_view n) { return in_list(kMethods, n); }

// ---- Value ----------------------------------------------------------------------------------

Value Value::from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null: return none();
    case nlohmann::ordered_json::value_t::boolean: return Value(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer: return Value(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      const uint64_t u = j.get<uint64_t>();
      return u <= uint64_t(std::numeric_limits<int64_t>::max()) ? Value(int64_t(u)) : Value(double(u));
    }
    case nlohmann::ordered_json::value_t::number_float: return Value(j.get<double>());
    case nlohmann::ordered_json::value_t::string: return Value(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      Array a;
      for (const auto& e : j) a.push_back(from_json(e));
      return Value(std::move(a));
    }
    case nlohmann::ordered_json::value_t::object: {
      Object o;
      for (auto it = j.begin(); it != j.end(); ++it) o.emplace_back(it.key(), from_json(it.value()));
      return Value(std::move(o));
    }
    default: return none();
  }
}

bool Value::truthy() const {
  if (is_undefined() || is_none()) return false;
  if (is_bool()) return as_bool();
  if (is_int()) return as_int() != 0;
  if (is_float()) return as_number() != 0;
  if (is_string()) return !as_string().empty();
  if (is_array()) return !as_array().empty();
  if (is_object()) return !as_object().empty();
  return true;
}

Value Value::member(std::string_view key) const {
  const Object* o = is_object() ? &as_object() : is_namespace() ? &as_namespace().members : nullptr;
  if (o)
    for (const auto& [k, v] : *o)
      if (k == key) return v;
  return undefined(std::string(key));
}

std::string Value::type_name() const {
  static const char* names[] = {"undefined", "NoneType", "bool", "int", "float", "str",
                                "list", "dict", "Namespace"};
  return names[data_.index()];
}

std::string to_str(const Value& v) {
  if (v.is_undefined()) return "";
  if (v.is_none()) return "None";
  if (v.is_bool()) return v.as_bool() ? "True" : "False";
  if (v.is_int()) return std::to_string(v.as_int());
  if (v.is_float()) return py_float(v.as_number());
  if (v.is_string()) return v.as_string();
  if (v.is_array()) {
    std::string r = "[";
    for (size_t i = 0; i < v.as_array().size(); ++i) r += (i ? ", " : "") + repr(v.as_array()[i]);
    return r + "]";
  }
  const Object& o = v.is_object() ? v.as_object() : v.as_namespace().members;
  std::string r = v.is_object() ? "{" : "<Namespace {";
  for (size_t i = 0; i < o.size(); ++i)
    r += (i ? ", " : "") + py_repr_string(o[i].first) + ": " + repr(o[i].second);
  return r + (v.is_object() ? "}" : "}>");
}

std::string to_json(const Value& v, int indent) {
  std::string out;
  json_dump(v, indent, 0, out);
  return out;
}

// ---- rendering ------------------------------------------------------------------------------

namespace {

class Renderer {
 public:
  Renderer(const std::string& name, const std::map<std::string, Value>& vars) : name_(name) {
    scopes_.emplace_back(vars.begin(), vars.end());
  }

  void run(const Node& root, std::string& out) { exec(root.bodies[0], out); }

 private:
  enum class Flow { normal, brk, cont };

  [[noreturn]] void fail(int line, const std::string& what) const {
    throw TemplateError(name_ + " line " + std::to_string(line) + ": " + what);
  }

  Value lookup(const std::string& n) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(n);
      if (f != it->end()) return f->second;
    }
    return Value::undefined(n);
  }

  void count_iteration(int line) {
    if (++iterations_ > Template::kMaxIterations)
      fail(line, "more than " + std::to_string(Template::kMaxIterations) + " loop iterations");
  }

  Flow exec(const Body& body, std::string& out) {
    for (const auto& n : body) {
      const Flow f = exec(*n, out);
      if (f != Flow::normal) return f;
    }
    return Flow::normal;
  }

  Flow exec(const Node& n, std::string& out) {
    switch (n.kind) {
      case Node::Kind::text: out += n.text; break;
      case Node::Kind::output: out += to_str(eval(*n.expr)); break;
      case Node::Kind::if_:
        for (size_t i = 0; i < n.conds.size(); ++i)
          if (eval(*n.conds[i]).truthy()) return exec(n.bodies[i], out);
        if (n.bodies.size() > n.conds.size()) return exec(n.bodies.back(), out);
        break;
      case Node::Kind::for_: return exec_for(n, out);
      case Node::Kind::set: {
        Value v;
        if (n.expr) {
          v = eval(*n.expr);
        } else {
          std::string s;
          exec(n.bodies[0], s);
          v = Value(s);
        }
        if (n.targets.size() == 1) {
          scopes_.back()[n.targets[0]] = v;
        } else {
          const Value ns = lookup(n.targets[0]);
          if (!ns.is_namespace())
            fail(n.line, "'" + n.targets[0] + "' is not a namespace(): cannot set ." + n.targets[1]);
          Object& m = ns.as_namespace().members;
          auto it = std::find_if(m.begin(), m.end(), [&](const auto& p) { return p.first == n.targets[1]; });
          if (it != m.end()) it->second = v;
          else m.emplace_back(n.targets[1], v);
        }
        break;
      }
      case Node::Kind::brk: return Flow::brk;
      case Node::Kind::cont: return Flow::cont;
      case Node::Kind::block: return exec(n.bodies[0], out);
    }
    if (out.size() > size_t(Template::kMaxOutputBytes))
      fail(n.line, "the output exceeds " + std::to_string(Template::kMaxOutputBytes) + " bytes");
    return Flow::normal;
  }

  Array iterate(const Value& v, int line) {
    if (v.is_undefined()) return {};
    if (v.is_array()) return v.as_array();
    if (v.is_object()) {
      Array keys;
      for (const auto& [k, x] : v.as_object()) keys.emplace_back(k);
      return keys;
    }
    if (v.is_string()) {
      Array chars;
      for (auto& c : code_points(v.as_string())) chars.emplace_back(std::move(c));
      return chars;
    }
    fail(line, "'" + v.type_name() + "' object is not iterable");
  }

  void bind(const std::vector<std::string>& targets, const Value& item, int line) {
    if (targets.size() == 1) {
      scopes_.back()[targets[0]] = item;
      return;
    }
    const Array parts = iterate(item, line);
    if (parts.size() != targets.size())
      fail(line, "cannot unpack " + std::to_string(parts.size()) + " values into " +
                     std::to_string(targets.size()) + " loop variables");
    for (size_t i = 0; i < targets.size(); ++i) scopes_.back()[targets[i]] = parts[i];
  }

  Flow exec_for(const Node& n, std::string& out) {
    Array items = iterate(eval(*n.expr), n.line);
    scopes_.emplace_back();
    if (n.filter) {
      Array kept;
      for (const Value& it : items) {
        count_iteration(n.line);
        bind(n.targets, it, n.line);
        if (eval(*n.filter).truthy()) kept.push_back(it);
      }
      items = std::move(kept);
    }
    const int64_t len = int64_t(items.size());
    for (int64_t i = 0; i < len; ++i) {
      count_iteration(n.line);
      bind(n.targets, items[size_t(i)], n.line);
      Object loop = {{"index", Value(i + 1)},
                     {"index0", Value(i)},
                     {"revindex", Value(len - i)},
                     {"revindex0", Value(len - i - 1)},
                     {"first", Value(i == 0)},
                     {"last", Value(i == len - 1)},
                     {"length", Value(len)},
                     {"previtem", i > 0 ? items[size_t(i - 1)] : Value::undefined("previtem")},
                     {"nextitem", i + 1 < len ? items[size_t(i + 1)] : Value::undefined("nextitem")}};
      scopes_.back()["loop"] = Value(std::move(loop));
      if (exec(n.bodies[0], out) == Flow::brk) break;
    }
    scopes_.pop_back();
    if (len == 0 && n.bodies.size() > 1) return exec(n.bodies[1], out);
    return Flow::normal;
  }

  // ---- expressions ----

  std::string describe(const Expr& e) const {
    if (e.kind == Expr::Kind::name) return e.name;
    if (e.kind == Expr::Kind::attr) return describe(*e.items[0]) + "." + e.name;
    if (e.kind == Expr::Kind::index) return describe(*e.items[0]) + "[...]";
    return "the value";
  }

  Value get_item(const Value& obj, const Value& key, const Expr& e) {
    if (obj.is_undefined()) fail(e.line, "'" + describe(*e.items[0]) + "' is undefined");
    if ((obj.is_object() || obj.is_namespace()) && key.is_string()) return obj.member(key.as_string());
    if (key.is_int() && (obj.is_array() || obj.is_string())) {
      std::vector<std::string> cps;
      if (obj.is_string()) cps = code_points(obj.as_string());
      const int64_t n = obj.is_array() ? int64_t(obj.as_array().size()) : int64_t(cps.size());
      int64_t i = key.as_int();
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::undefined("index");
      return obj.is_array() ? obj.as_array()[size_t(i)] : Value(cps[size_t(i)]);
    }
    return Value::undefined(to_str(key));
  }

  Value slice(const Value& obj, const Expr& e) {
    if (!obj.is_array() && !obj.is_string())
      fail(e.line, "'" + obj.type_name() + "' object cannot be sliced");
    std::vector<std::string> cps;
    if (obj.is_string()) cps = code_points(obj.as_string());
    const int64_t n = obj.is_array() ? int64_t(obj.as_array().size()) : int64_t(cps.size());
    auto bound = [&](const ExprPtr& x, int64_t dflt) -> std::optional<int64_t> {
      if (!x) return std::nullopt;
      const Value v = eval(*x);
      if (v.is_none()) return std::nullopt;
      if (!v.is_int()) fail(e.line, "slice indices must be integers");
      return v.as_int();
    };
    const int64_t step = bound(e.items[3], 1).value_or(1);
    if (step == 0) fail(e.line, "slice step cannot be zero");
    auto norm = [&](std::optional<int64_t> v, int64_t dflt) {
      if (!v) return dflt;
      int64_t x = *v < 0 ? *v + n : *v;
      return step > 0 ? std::clamp<int64_t>(x, 0, n) : std::clamp<int64_t>(x, -1, n - 1);
    };
    const int64_t start = norm(bound(e.items[1], 0), step > 0 ? 0 : n - 1);
    const int64_t stop = norm(bound(e.items[2], 0), step > 0 ? n : -1);
    Array a;
    std::string s;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      if (obj.is_array()) a.push_back(obj.as_array()[size_t(i)]);
      else s += cps[size_t(i)];
    }
    return obj.is_array() ? Value(std::move(a)) : Value(s);
  }

  // A dotted attribute path of an item (selectattr, map, sort, ...).
  static Value attr_path(const Value& v, const std::string& path) {
    Value cur = v;
    size_t i = 0;
    while (i <= path.size()) {
      const size_t j = std::min(path.find('.', i), path.size());
      cur = cur.member(path.substr(i, j - i));
      i = j + 1;
    }
    return cur;
  }

  struct Args {
    std::vector<Value> pos;
    std::vector<std::pair<std::string, Value>> kw;
    Value get(size_t i, const char* name, Value dflt = Value()) const {
      for (const auto& [k, v] : kw)
        if (k == name) return v;
      return i < pos.size() ? pos[i] : dflt;
    }
  };
  Args eval_args(const std::vector<Arg>& args) {
    Args a;
    for (const Arg& x : args) {
      if (x.name.empty()) a.pos.push_back(eval(*x.value));
      else a.kw.emplace_back(x.name, eval(*x.value));
    }
    return a;
  }

  int64_t to_int(const Value& v, int line, const char* what) {
    if (v.is_int()) return v.as_int();
    if (v.is_bool()) return v.as_bool();
    fail(line, std::string(what) + " must be an integer, got " + v.type_name());
  }

  Value arith(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "~") return Value(to_str(a) + to_str(b));
    if (op == "+") {
      if (a.is_string() && b.is_string()) return Value(a.as_string() + b.as_string());
      if (a.is_array() && b.is_array()) {
        Array r = a.as_array();
        r.insert(r.end(), b.as_array().begin(), b.as_array().end());
        return Value(std::move(r));
      }
    }
    if (op == "*" && a.is_string() && b.is_int()) {
      std::string r;
      for (int64_t i = 0; i < b.as_int(); ++i) {
        r += a.as_string();
        if (r.size() > size_t(Template::kMaxOutputBytes)) fail(line, "a string too long");
      }
      return Value(r);
    }
    if (!numeric(a) || !numeric(b))
      fail(line, "unsupported operand types for " + op + ": '" + a.type_name() + "' and '" +
                     b.type_name() + "'");
    const bool ints = !a.is_float() && !b.is_float();
    const double x = num(a), y = num(b);
    if (ints && op != "/" && op != "**") {
      const int64_t i = a.is_bool() ? a.as_bool() : a.as_int(), j = b.is_bool() ? b.as_bool() : b.as_int();
      int64_t r = 0;
      if (op == "+" && !__builtin_add_overflow(i, j, &r)) return Value(r);
      if (op == "-" && !__builtin_sub_overflow(i, j, &r)) return Value(r);
      if (op == "*" && !__builtin_mul_overflow(i, j, &r)) return Value(r);
      if (op == "//" || op == "%") {
        if (j == 0) fail(line, "integer division or modulo by zero");
        if (i == std::numeric_limits<int64_t>::min() && j == -1) fail(line, "integer overflow");
        int64_t q = i / j, m = i % j;
        if (m != 0 && ((m < 0) != (j < 0))) {
          --q;
          m += j;
        }
        return Value(op == "//" ? q : m);
      }
      if (op == "+" || op == "-" || op == "*") fail(line, "integer overflow");
    }
    if (op == "+") return Value(x + y);
    if (op == "-") return Value(x - y);
    if (op == "*") return Value(x * y);
    if (op == "/" || op == "//" || op == "%") {
      if (y == 0) fail(line, "division by zero");
      if (op == "/") return Value(x / y);
      if (op == "//") return Value(std::floor(x / y));
      const double m = std::fmod(x, y);
      return Value(m != 0 && ((m < 0) != (y < 0)) ? m + y : m);
    }
    if (op == "**") {
      if (ints && y >= 0) {
        const double r = std::pow(x, y);
        if (std::fabs(r) < 9.2e18) return Value(int64_t(std::llround(r)));
        fail(line, "integer overflow");
      }
      return Value(std::pow(x, y));
    }
    fail(line, "unknown operator " + op);
  }

  bool less(const Value& a, const Value& b, int line) {
    if (numeric(a) && numeric(b)) return num(a) < num(b);
    if (a.is_string() && b.is_string()) return a.as_string() < b.as_string();
    if (a.is_array() && b.is_array()) {
      const Array &x = a.as_array(), &y = b.as_array();
      for (size_t i = 0; i < std::min(x.size(), y.size()); ++i) {
        if (less(x[i], y[i], line)) return true;
        if (less(y[i], x[i], line)) return false;
      }
      return x.size() < y.size();
    }
    fail(line, "cannot compare '" + a.type_name() + "' and '" + b.type_name() + "'");
  }

  bool contains(const Value& hay, const Value& needle, int line) {
    if (hay.is_undefined()) return false;
    if (hay.is_string()) {
      if (!needle.is_string()) fail(line, "'in <string>' needs a string on the left");
      return hay.as_string().find(needle.as_string()) != std::string::npos;
    }
    if (hay.is_array())
      return std::any_of(hay.as_array().begin(), hay.as_array().end(),
                         [&](const Value& v) { return py_eq(v, needle); });
    if (hay.is_object() || hay.is_namespace())
      return needle.is_string() && !hay.member(needle.as_string()).is_undefined();
    fail(line, "argument of type '" + hay.type_name() + "' is not iterable");
  }

  bool compare(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "==") return py_eq(a, b);
    if (op == "!=") return !py_eq(a, b);
    if (op == "<") return less(a, b, line);
    if (op == ">") return less(b, a, line);
    if (op == "<=") return !less(b, a, line);
    if (op == ">=") return !less(a, b, line);
    if (op == "in") return contains(b, a, line);
    return !contains(b, a, line);  // not in
  }

  bool test(const std::string& name, const Value& v, const std::vector<Value>& args, int line) {
    auto arg = [&](size_t i) {
      if (i >= args.size()) fail(line, "the test '" + name + "' needs an argument");
      return args[i];
    };
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.is_none();
    if (name == "boolean") return v.is_bool();
    if (name == "true") return v.is_bool() && v.as_bool();
    if (name == "false") return v.is_bool() && !v.as_bool();
    if (name == "string") return v.is_string();
    if (name == "number") return v.is_number();
    if (name == "integer") return v.is_int();
    if (name == "float") return v.is_float();
    if (name == "mapping") return v.is_object() || v.is_namespace();
    if (name == "iterable") return v.is_array() || v.is_object() || v.is_string() || v.is_undefined();
    if (name == "sequence") return v.is_array() || v.is_object() || v.is_string();
    if (name == "callable") return false;
    if (name == "equalto" || name == "eq" || name == "==") return py_eq(v, arg(0));
    if (name == "ne" || name == "!=") return !py_eq(v, arg(0));
    if (name == "odd" || name == "even") {
      const int64_t i = to_int(v, line, "the value of 'odd'/'even'");
      return (((i % 2) + 2) % 2 == 1) == (name == "odd");
    }
    if (name == "divisibleby") {
      const int64_t d = to_int(arg(0), line, "divisibleby's argument");
      if (d == 0) fail(line, "divisibleby 0");
      return to_int(v, line, "the value of divisibleby") % d == 0;
    }
    if (name == "in") return contains(arg(0), v, line);
    if (name == "lower") return v.is_string() && ascii_case(v.as_string(), false) == v.as_string();
    if (name == "upper") return v.is_string() && ascii_case(v.as_string(), true) == v.as_string();
    if (name == "sameas") {
      const Value b = arg(0);
      if (v.is_none() || v.is_undefined() || v.is_bool()) return v.data().index() == b.data().index() && py_eq(v, b);
      return false;
    }
    if (name == "gt" || name == ">") return less(arg(0), v, line);
    if (name == "ge" || name == ">=") return !less(v, arg(0), line);
    if (name == "lt" || name == "<") return less(v, arg(0), line);
    if (name == "le" || name == "<=") return !less(arg(0), v, line);
    fail(line, "unknown test '" + name + "'");
  }

  Value filter(const std::string& name, const Value& v, const Args& a, int line) {
    auto need_string = [&]() -> const std::string& {
      if (!v.is_string()) fail(line, "the filter '" + name + "' needs a string, got " + v.type_name());
      return v.as_string();
    };
    auto items = [&]() { return iterate(v, line); };
    if (name == "safe") return v;
    if (name == "string") return Value(to_str(v));
    if (name == "trim") return Value(strip(need_string(), a.get(0, "chars"), true, true));
    if (name == "lower") return Value(ascii_case(to_str(v), false));
    if (name == "upper") return Value(ascii_case(to_str(v), true));
    if (name == "capitalize") return Value(capitalize(to_str(v)));
    if (name == "title") return Value(title(to_str(v)));
    if (name == "replace") {
      const Value from = a.get(0, "old"), to = a.get(1, "new"), cnt = a.get(2, "count", Value(-1));
      return Value(replace_all(to_str(v), to_str(from), to_str(to), to_int(cnt, line, "replace's count")));
    }
    if (name == "length" || name == "count") {
      if (v.is_string()) return Value(int64_t(code_points(v.as_string()).size()));
      if (v.is_array()) return Value(int64_t(v.as_array().size()));
      if (v.is_object()) return Value(int64_t(v.as_object().size()));
      if (v.is_undefined()) return Value(0);
      fail(line, "object of type '" + v.type_name() + "' has no len()");
    }
    if (name == "default" || name == "d") {
      const bool boolean = a.get(1, "boolean", Value(false)).truthy();
      if (v.is_undefined() || (boolean && !v.truthy())) return a.get(0, "default_value", Value(""));
      return v;
    }
    if (name == "first" || name == "last") {
      const Array xs = items();
      if (xs.empty()) return Value::undefined(name);
      return name == "first" ? xs.front() : xs.back();
    }
    if (name == "list") return Value(items());
    if (name == "reverse") {
      if (v.is_string()) {
        auto cps = code_points(v.as_string());
        std::string r;
        for (auto it = cps.rbegin(); it != cps.rend(); ++it) r += *it;
        return Value(r);
      }
      Array xs = items();
      std::reverse(xs.begin(), xs.end());
      return Value(std::move(xs));
    }
    if (name == "items") {
      if (v.is_undefined()) return Value(Array{});
      if (!v.is_object() && !v.is_namespace()) fail(line, "the filter 'items' needs a mapping, got " + v.type_name());
      Array r;
      for (const auto& [k, x] : v.is_object() ? v.as_object() : v.as_namespace().members)
        r.emplace_back(Array{Value(k), x});
      return Value(std::move(r));
    }
    if (name == "join") {
      const std::string sep = to_str(a.get(0, "d", Value("")));
      const Value attr = a.get(1, "attribute");
      std::string r;
      bool first = true;
      for (const Value& x : items()) {
        r += (first ? "" : sep) + to_str(attr.is_undefined() ? x : attr_path(x, to_str(attr)));
        first = false;
      }
      return Value(r);
    }
    if (name == "tojson") {
      const Value ind = a.get(0, "indent");
      return Value(to_json(v, ind.is_undefined() || ind.is_none() ? -1 : int(to_int(ind, line, "tojson's indent"))));
    }
    if (name == "int") {
      if (v.is_int()) return v;
      if (v.is_float()) return Value(int64_t(v.as_number()));
      if (v.is_bool()) return Value(int64_t(v.as_bool()));
      if (v.is_string()) {
        char* e = nullptr;
        const std::string s = strip(v.as_string(), Value(), true, true);
        const long long x = std::strtoll(s.c_str(), &e, 10);
        if (!s.empty() && *e == 0) return Value(int64_t(x));
      }
      return a.get(0, "default", Value(0));
    }
    if (name == "float") {
      if (v.is_number()) return Value(v.as_number());
      if (v.is_string()) {
        char* e = nullptr;
        const std::string s = strip(v.as_string(), Value(), true, true);
        const double x = std::strtod(s.c_str(), &e);
        if (!s.empty() && *e == 0) return Value(x);
      }
      return a.get(0, "default", Value(0.0));
    }
    if (name == "abs") {
      if (v.is_int()) return Value(v.as_int() < 0 ? -v.as_int() : v.as_int());
      if (v.is_float()) return Value(std::fabs(v.as_number()));
      fail(line, "bad operand type for abs(): '" + v.type_name() + "'");
    }
    if (name == "round") {
      if (!numeric(v)) fail(line, "the filter 'round' needs a number");
      const int64_t prec = to_int(a.get(0, "precision", Value(0)), line, "round's precision");
      const std::string method = to_str(a.get(1, "method", Value("common")));
      const double f = std::pow(10.0, double(prec)), x = num(v) * f;
      const double r = method == "ceil" ? std::ceil(x) : method == "floor" ? std::floor(x) : std::round(x);
      return Value(r / f);
    }
    if (name == "indent") {
      const Value w = a.get(0, "width", Value(4));
      const std::string pad = w.is_string() ? w.as_string() : std::string(size_t(std::clamp<int64_t>(to_int(w, line, "indent's width"), 0, 1024)), ' ');
      const bool first = a.get(1, "first", Value(false)).truthy(), blank = a.get(2, "blank", Value(false)).truthy();
      const std::string s = to_str(v);
      std::string r;
      size_t i = 0;
      bool first_line = true;
      while (i <= s.size()) {
        const size_t j = std::min(s.find('\n', i), s.size());
        const std::string ln = s.substr(i, j - i);
        if ((!first_line || first) && (blank || !strip(ln, Value(), true, true).empty())) r += pad;
        r += ln;
        if (j < s.size()) r += '\n';
        first_line = false;
        i = j + 1;
      }
      return Value(r);
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool by_attr = name.size() > 6;
      const bool keep = name == "select" || name == "selectattr";
      const size_t t0 = by_attr ? 1 : 0;
      const std::string attr = by_attr ? to_str(a.get(0, "attribute")) : "";
      const Value test_name = t0 < a.pos.size() ? a.pos[t0] : Value();
      if (!test_name.is_undefined() && (!test_name.is_string() || !has_test(test_name.as_string())))
        fail(line, "the filter '" + name + "' names an unknown test " + model::excerpt(to_str(test_name), 40));
      const std::vector<Value> targs(a.pos.begin() + int64_t(std::min(a.pos.size(), t0 + 1)), a.pos.end());
      Array r;
      for (const Value& x : items()) {
        const Value y = by_attr ? attr_path(x, attr) : x;
        const bool ok = test_name.is_undefined() ? y.truthy() : test(test_name.as_string(), y, targs, line);
        if (ok == keep) r.push_back(x);
      }
      return Value(std::move(r));
    }
    if (name == "map") {
      Array r;
      const Value attr = a.get(99, "attribute");
      if (!attr.is_undefined()) {
        const Value dflt = a.get(99, "default");
        for (const Value& x : items()) {
          Value y = attr_path(x, to_str(attr));
          r.push_back(y.is_undefined() && !dflt.is_undefined() ? dflt : y);
        }
      } else {
        if (a.pos.empty() || !a.pos[0].is_string() || !has_filter(a.pos[0].as_string()))
          fail(line, "map needs attribute= or the name of a supported filter");
        Args rest;
        rest.pos.assign(a.pos.begin() + 1, a.pos.end());
        rest.kw = a.kw;
        for (const Value& x : items()) r.push_back(filter(a.pos[0].as_string(), x, rest, line));
      }
      return Value(std::move(r));
    }
    if (name == "unique") {
      Array r;
      for (const Value& x : items())
        if (std::none_of(r.begin(), r.end(), [&](const Value& y) { return py_eq(x, y); })) r.push_back(x);
      return Value(std::move(r));
    }
    if (name == "sort") {
      Array xs = items();
      const bool rev = a.get(0, "reverse", Value(false)).truthy();
      const Value attr = a.get(2, "attribute");
      auto key = [&](const Value& x) { return attr.is_undefined() ? x : attr_path(x, to_str(attr)); };
      std::stable_sort(xs.begin(), xs.end(), [&](const Value& x, const Value& y) {
        return rev ? less(key(y), key(x), line) : less(key(x), key(y), line);
      });
      return Value(std::move(xs));
    }
    if (name == "sum") {
      const Value attr = a.get(0, "attribute");
      Value total = a.get(1, "start", Value(0));
      for (const Value& x : items()) total = arith("+", total, attr.is_undefined() ? x : attr_path(x, to_str(attr)), line);
      return total;
    }
    if (name == "min" || name == "max") {
      const Array xs = items();
      if (xs.empty()) return Value::undefined(name);
      Value best = xs[0];
      for (const Value& x : xs)
        if (name == "min" ? less(x, best, line) : less(best, x, line)) best = x;
      return best;
    }
    fail(line, "unknown filter '" + name + "'");
  }

  Value call_function(const Expr& callee, const Args& a, int line) {
    const std::string& f = callee.name;
    if (f == "raise_exception") throw RaisedError(to_str(a.get(0, "message")));
    if (f == "namespace" || f == "dict") {
      Object o;
      if (!a.pos.empty() && a.pos[0].is_object()) o = a.pos[0].as_object();
      for (const auto& [k, v] : a.kw) o.emplace_back(k, v);
      if (f == "dict") return Value(std::move(o));
      auto ns = std::make_shared<Value::Namespace>();
      ns->members = std::move(o);
      return Value(Value::Data(ns));
    }
    if (f == "range") {
      int64_t start = 0, stop = 0, step = 1;
      if (a.pos.size() == 1) stop = to_int(a.pos[0], line, "range's argument");
      else if (a.pos.size() >= 2) {
        start = to_int(a.pos[0], line, "range's start");
        stop = to_int(a.pos[1], line, "range's stop");
        if (a.pos.size() > 2) step = to_int(a.pos[2], line, "range's step");
      }
      if (step == 0) fail(line, "range() step must not be zero");
      // Its length first: a range beyond the iteration bound is refused before it is built.
      const long double span = (long double)stop - (long double)start;
      const long double n = span / step > 0 ? std::ceil(span / step) : 0;
      if (n + (long double)iterations_ > (long double)Template::kMaxIterations)
        fail(line, "more than " + std::to_string(Template::kMaxIterations) + " loop iterations");
      iterations_ += int64_t(n);
      Array r;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) r.emplace_back(i);
      return Value(std::move(r));
    }
    if (f == "strftime_now") {
      const std::string fmt = to_str(a.get(0, "format"));
      const std::time_t t = std::time(nullptr);
      std::tm tm{};
      localtime_r(&t, &tm);
      char buf[256];
      const size_t n = std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
      return Value(std::string(buf, n));
    }
    fail(line, "unknown function '" + f + "'");
  }

  Value call_method(const Expr& callee, const Args& a, int line) {
    const Value obj = eval(*callee.items[0]);
    const std::string& m = callee.name;
    if (obj.is_undefined()) fail(line, "'" + describe(*callee.items[0]) + "' is undefined");
    if (obj.is_string()) {
      const std::string& s = obj.as_string();
      if (m == "strip" || m == "lstrip" || m == "rstrip")
        return Value(strip(s, a.get(0, "chars"), m != "rstrip", m != "lstrip"));
      if (m == "upper" || m == "lower") return Value(ascii_case(s, m == "upper"));
      if (m == "title") return Value(title(s));
      if (m == "capitalize") return Value(capitalize(s));
      if (m == "startswith" || m == "endswith") {
        const Value p = a.get(0, "prefix");
        Array options = p.is_array() ? p.as_array() : Array{p};
        for (const Value& o : options) {
          const std::string t = to_str(o);
          if (m == "startswith" ? s.compare(0, t.size(), t) == 0 && s.size() >= t.size()
                                : s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0)
            return Value(true);
        }
        return Value(false);
      }
      if (m == "split") {
        const Value sep = a.get(0, "sep");
        const int64_t maxsplit = to_int(a.get(1, "maxsplit", Value(-1)), line, "split's maxsplit");
        Array r;
        if (sep.is_undefined() || sep.is_none()) {
          size_t i = 0;
          int64_t n = 0;
          while (true) {
            while (i < s.size() && is_ws(s[i])) ++i;
            if (i >= s.size()) break;
            if (maxsplit >= 0 && n == maxsplit) {
              r.emplace_back(strip(s.substr(i), Value(), false, true));
              break;
            }
            size_t j = i;
            while (j < s.size() && !is_ws(s[j])) ++j;
            r.emplace_back(s.substr(i, j - i));
            ++n;
            i = j;
          }
        } else {
          const std::string d = to_str(sep);
          if (d.empty()) fail(line, "empty separator");
          size_t i = 0;
          int64_t n = 0;
          while (true) {
            const size_t j = s.find(d, i);
            if (j == std::string::npos || (maxsplit >= 0 && n == maxsplit)) {
              r.emplace_back(s.substr(i));
              break;
            }
            r.emplace_back(s.substr(i, j - i));
            i = j + d.size();
            ++n;
          }
        }
        return Value(std::move(r));
      }
      if (m == "replace")
        return Value(replace_all(s, to_str(a.get(0, "old")), to_str(a.get(1, "new")),
                                 to_int(a.get(2, "count", Value(-1)), line, "replace's count")));
      if (m == "find") {
        const size_t p = s.find(to_str(a.get(0, "sub")));
        return Value(p == std::string::npos ? int64_t(-1) : int64_t(code_points(s.substr(0, p)).size()));
      }
      if (m == "count") {
        const std::string t = to_str(a.get(0, "sub"));
        if (t.empty()) return Value(int64_t(code_points(s).size()) + 1);
        int64_t n = 0;
        for (size_t p = s.find(t); p != std::string::npos; p = s.find(t, p + t.size())) ++n;
        return Value(n);
      }
      if (m == "join") {
        std::string r;
        bool first = true;
        for (const Value& x : iterate(a.get(0, "iterable"), line)) {
          if (!x.is_string()) fail(line, "join() takes strings, got " + x.type_name());
          r += (first ? "" : s) + x.as_string();
          first = false;
        }
        return Value(r);
      }
    }
    if (obj.is_object() || obj.is_namespace()) {
      const Object& o = obj.is_object() ? obj.as_object() : obj.as_namespace().members;
      if (m == "items" || m == "keys" || m == "values") {
        Array r;
        for (const auto& [k, v] : o)
          r.push_back(m == "items" ? Value(Array{Value(k), v}) : m == "keys" ? Value(k) : v);
        return Value(std::move(r));
      }
      if (m == "get") {
        const Value v = obj.member(to_str(a.get(0, "key")));
        return v.is_undefined() ? a.get(1, "default", Value::none()) : v;
      }
    }
    fail(line, "'" + obj.type_name() + "' object has no method '" + m + "'");
  }

  Value eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::literal: return e.value;
      case Expr::Kind::name: return lookup(e.name);
      case Expr::Kind::list: {
        Array a;
        for (const auto& x : e.items) a.push_back(eval(*x));
        return Value(std::move(a));
      }
      case Expr::Kind::dict: {
        Object o;
        for (size_t i = 0; i + 1 < e.items.size(); i += 2) {
          const Value k = eval(*e.items[i]);
          if (!k.is_string()) fail(e.line, "dict keys must be strings here");
          const Value v = eval(*e.items[i + 1]);
          auto it = std::find_if(o.begin(), o.end(), [&](const auto& p) { return p.first == k.as_string(); });
          if (it != o.end()) it->second = v;
          else o.emplace_back(k.as_string(), v);
        }
        return Value(std::move(o));
      }
      case Expr::Kind::attr: {
        const Value obj = eval(*e.items[0]);
        if (obj.is_undefined()) fail(e.line, "'" + describe(*e.items[0]) + "' is undefined");
        return obj.member(e.name);
      }
      case Expr::Kind::index: return get_item(eval(*e.items[0]), eval(*e.items[1]), e);
      case Expr::Kind::slice: return slice(eval(*e.items[0]), e);
      case Expr::Kind::call: {
        const Args a = eval_args(e.args);
        return e.items[0]->kind == Expr::Kind::name ? call_function(*e.items[0], a, e.line)
                                                    : call_method(*e.items[0], a, e.line);
      }
      case Expr::Kind::filter: return filter(e.name, eval(*e.items[0]), eval_args(e.args), e.line);
      case Expr::Kind::test: {
        const Args a = eval_args(e.args);
        return Value(test(e.name, eval(*e.items[0]), a.pos, e.line) != e.negated);
      }
      case Expr::Kind::unary: {
        const Value v = eval(*e.items[0]);
        if (e.op == "not") return Value(!v.truthy());
        if (!numeric(v)) fail(e.line, "bad operand type for unary " + e.op + ": '" + v.type_name() + "'");
        if (e.op == "+") return v;
        if (v.is_float()) return Value(-v.as_number());
        const int64_t i = v.is_bool() ? v.as_bool() : v.as_int();
        if (i == std::numeric_limits<int64_t>::min()) fail(e.line, "integer overflow");
        return Value(-i);
      }
      case Expr::Kind::binary: {
        if (e.op == "and" || e.op == "or") {
          const Value a = eval(*e.items[0]);
          if (a.truthy() == (e.op == "or")) return a;
          return eval(*e.items[1]);
        }
        return arith(e.op, eval(*e.items[0]), eval(*e.items[1]), e.line);
      }
      case Expr::Kind::compare: {
        Value left = eval(*e.items[0]);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          const Value right = eval(*e.items[i + 1]);
          if (!compare(e.ops[i], left, right, e.line)) return Value(false);
          left = right;
        }
        return Value(true);
      }
      case Expr::Kind::cond:
        if (eval(*e.items[0]).truthy()) return eval(*e.items[1]);
        return e.items[2] ? eval(*e.items[2]) : Value::undefined();
    }
    return Value();
  }

  const std::string& name_;
  std::vector<std::map<std::string, Value>> scopes_;
  int64_t iterations_ = 0;
};

}  // namespace

Template Template::parse(std::string_view source, const std::string& name) {
  Template t;
  t.root_ = parse_template(source, name);
  t.name_ = name;
  return t;
}

std::string Template::render(const std::map<std::string, Value>& vars) const {
  std::string out;
  Renderer r(name_, vars);
  r.run(*root_, out);
  return out;
}

}  // namespace cca::server::jinja

// Lexer and parser of the Jinja subset (jinja.hpp): the template is cut into text and tags with
// Jinja2's whitespace rules as transformers sets them (trim_blocks: the newline after a block or
// comment tag goes; lstrip_blocks: spaces and tabs before a block or comment tag that starts a
// line go; '-' strips all whitespace on its side, '+' keeps it), then each tag's expression is
// parsed by recursive descent with Jinja2's operator precedence.
#include <cctype>
#include <cstdlib>
#include <set>

#include "model/untrusted.hpp"
#include "server/jinja_ast.hpp"

namespace cca::server::jinja {
namespace {

constexpr int kMaxDepth = 200;  // nesting of expressions and blocks

struct Piece {
  enum Kind { text, var, block, comment } kind = text;
  std::string content;  // text, or the inside of the tag
  int line = 1;
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

[[noreturn]] void fail(const std::string& name, int line, const std::string& what) {
  throw TemplateError(name + " line " + std::to_string(line) + ": " + what);
}

// Cuts the source into pieces and applies the whitespace rules.
std::vector<Piece> lex_pieces(std::string_view src, const std::string& name) {
  std::vector<Piece> out;
  size_t i = 0;
  int line = 1;
  bool line_start = true;      // the text that follows begins a line
  bool strip_next = false;     // a '-' before the tag's end: strip the next text's whitespace
  bool trim_newline = false;   // trim_blocks: drop one newline right after the tag
  auto count_lines = [](std::string_view s) { return int(std::count(s.begin(), s.end(), '\n')); };
  while (i <= src.size()) {
    size_t open = src.find('{', i);
    while (open != std::string_view::npos && open + 1 < src.size() &&
           src[open + 1] != '{' && src[open + 1] != '%' && src[open + 1] != '#')
      open = src.find('{', open + 1);
    if (open != std::string_view::npos && open + 1 >= src.size()) open = std::string_view::npos;
    std::string text(src.substr(i, open == std::string_view::npos ? std::string_view::npos : open - i));
    const int text_line = line;
    line += count_lines(text);
    if (trim_newline && !text.empty() && text[0] == '\n') text.erase(0, 1);
    if (strip_next) {
      size_t k = 0;
      while (k < text.size() && is_space(text[k])) ++k;
      text.erase(0, k);
    }
    if (open == std::string_view::npos) {
      if (!text.empty()) out.push_back({Piece::text, text, text_line});
      break;
    }
    const char kind_c = src[open + 1];
    const Piece::Kind kind = kind_c == '{' ? Piece::var : kind_c == '%' ? Piece::block : Piece::comment;
    size_t p = open + 2;
    char left = 0;
    if (p < src.size() && (src[p] == '-' || src[p] == '+')) left = src[p++];
    // The end of the tag, outside string literals.
    const std::string close = kind == Piece::var ? "}}" : kind == Piece::block ? "%}" : "#}";
    size_t end = std::string_view::npos;
    if (kind == Piece::comment) {
      end = src.find(close, p);
    } else {
      char quote = 0;
      for (size_t k = p; k + 1 < src.size(); ++k) {
        if (quote) {
          if (src[k] == '\\') ++k;
          else if (src[k] == quote) quote = 0;
        } else if (src[k] == '\'' || src[k] == '"') {
          quote = src[k];
        } else if (src.compare(k, 2, close) == 0) {
          end = k;
          break;
        }
      }
    }
    if (end == std::string_view::npos)
      fail(name, line, std::string("a tag opened with '{") + kind_c + "' is never closed");
    char right = 0;
    size_t inner_end = end;
    if (inner_end > p && (src[inner_end - 1] == '-' || src[inner_end - 1] == '+')) {
      right = src[inner_end - 1];
      --inner_end;
    }
    // Whitespace before the tag.
    if (left == '-') {
      while (!text.empty() && is_space(text.back())) text.pop_back();
    } else if (left != '+' && kind != Piece::var) {
      const size_t nl = text.rfind('\n');
      const size_t from = nl == std::string::npos ? 0 : nl + 1;
      if ((nl != std::string::npos || line_start) && from < text.size() &&
          std::all_of(text.begin() + int64_t(from), text.end(), is_space))
        text.erase(from);
    }
    if (!text.empty()) out.push_back({Piece::text, text, text_line});
    const std::string inner(src.substr(p, inner_end - p));
    if (kind != Piece::comment) out.push_back({kind, inner, line});
    line += count_lines(src.substr(open, end + 2 - open));
    i = end + 2;
    strip_next = right == '-';
    trim_newline = kind != Piece::var && right != '+' && right != '-';
    line_start = trim_newline && i < src.size() && src[i] == '\n';
    if (i >= src.size()) break;
  }
  return out;
}

// ---- expression tokens ----------------------------------------------------------------------

struct Tok {
  enum Kind { name, string, integer, number, op, end } kind = end;
  std::string text;
  int64_t i = 0;
  double d = 0;
};

std::string unescape(std::string_view s, const std::string& name, int line) {
  std::string out;
  for (size_t k = 0; k < s.size(); ++k) {
    if (s[k] != '\\' || k + 1 == s.size()) {
      out += s[k];
      continue;
    }
    const char c = s[++k];
    switch (c) {
      case 'n': out += '\n'; break;
      case 't': out += '\t'; break;
      case 'r': out += '\r'; break;
      case '0': out += '\0'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'u':
      case 'x': {
        const size_t n = c == 'u' ? 4 : 2;
        if (k + n >= s.size()) fail(name, line, "a truncated \\" + std::string(1, c) + " escape");
        const std::string hex(s.substr(k + 1, n));
        char* e = nullptr;
        const unsigned long cp = std::strtoul(hex.c_str(), &e, 16);
        if (hex.size() != n || *e) fail(name, line, "a bad \\" + std::string(1, c) + " escape");
        k += n;
        if (cp < 0x80) {
          out += char(cp);
        } else if (cp < 0x800) {
          out += char(0xC0 | (cp >> 6));
          out += char(0x80 | (cp & 0x3F));
        } else {
          out += char(0xE0 | (cp >> 12));
          out += char(0x80 | ((cp >> 6) & 0x3F));
          out += char(0x80 | (cp & 0x3F));
        }
        break;
      }
      default: out += c;  // \\, \', \" and unknown escapes keep the character
    }
  }
  return out;
}

std::vector<Tok> tokenize(std::string_view s, const std::string& name, int line) {
  std::vector<Tok> out;
  size_t k = 0;
  while (k < s.size()) {
    const char c = s[k];
    if (is_space(c)) {
      ++k;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t e = k;
      while (e < s.size() && (std::isalnum(static_cast<unsigned char>(s[e])) || s[e] == '_')) ++e;
      out.push_back({Tok::name, std::string(s.substr(k, e - k))});
      k = e;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t e = k;
      bool is_float = false;
      while (e < s.size() && (std::isdigit(static_cast<unsigned char>(s[e])) || s[e] == '_')) ++e;
      if (e + 1 < s.size() && s[e] == '.' && std::isdigit(static_cast<unsigned char>(s[e + 1]))) {
        is_float = true;
        ++e;
        while (e < s.size() && std::isdigit(static_cast<unsigned char>(s[e]))) ++e;
      }
      if (e < s.size() && (s[e] == 'e' || s[e] == 'E')) {
        size_t f = e + 1;
        if (f < s.size() && (s[f] == '+' || s[f] == '-')) ++f;
        if (f < s.size() && std::isdigit(static_cast<unsigned char>(s[f]))) {
          is_float = true;
          e = f;
          while (e < s.size() && std::isdigit(static_cast<unsigned char>(s[e]))) ++e;
        }
      }
      std::string text(s.substr(k, e - k));
      std::erase(text, '_');
      Tok t{is_float ? Tok::number : Tok::integer, text};
      errno = 0;
      if (is_float) t.d = std::strtod(text.c_str(), nullptr);
      else t.i = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == ERANGE) fail(name, line, "the number " + model::excerpt(text, 40) + " is out of range");
      out.push_back(t);
      k = e;
    } else if (c == '\'' || c == '"') {
      size_t e = k + 1;
      while (e < s.size() && s[e] != c) e += s[e] == '\\' ? 2 : 1;
      if (e >= s.size()) fail(name, line, "a string literal is never closed");
      out.push_back({Tok::string, unescape(s.substr(k + 1, e - k - 1), name, line)});
      k = e + 1;
    } else {
      static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%",
                                   "~", "|", ".", ",", ":", "(", ")", "[", "]", "{", "}", "<",
                                   ">", "="};
      bool found = false;
      for (const char* o : kOps) {
        const size_t n = std::char_traits<char>::length(o);
        if (s.compare(k, n, o) == 0) {
          out.push_back({Tok::op, o});
          k += n;
          found = true;
          break;
        }
      }
      if (!found) fail(name, line, "unexpected character '" + model::excerpt(s.substr(k, 1)) + "'");
    }
  }
  out.push_back({Tok::end, ""});
  return out;
}

// ---- expressions ----------------------------------------------------------------------------

class ExprParser {
 public:
  ExprParser(std::vector<Tok> toks, const std::string& name, int line)
      : t_(std::move(toks)), name_(name), line_(line) {}

  ExprPtr expression() {
    Guard g(*this);
    ExprPtr e = or_expr();
    if (is_name("if")) {
      ++p_;
      auto c = make(Expr::Kind::cond);
      c->items.push_back(or_expr());
      c->items.push_back(e);
      if (is_name("else")) {
        ++p_;
        c->items.push_back(expression());
      } else {
        c->items.push_back(nullptr);
      }
      return c;
    }
    return e;
  }
  // `a, b` as a tuple (for-loop iterables and set values): a list.
  ExprPtr tuple_or_expression() {
    ExprPtr e = expression();
    if (!is_op(",")) return e;
    auto l = make(Expr::Kind::list);
    l->items.push_back(e);
    while (is_op(",")) {
      ++p_;
      if (at_end()) break;
      l->items.push_back(expression());
    }
    return l;
  }
  ExprPtr or_expr_public() { return or_expr(); }

  bool at_end() const { return t_[p_].kind == Tok::end; }
  bool is_name(const char* n) const { return t_[p_].kind == Tok::name && t_[p_].text == n; }
  bool is_op(const char* o) const { return t_[p_].kind == Tok::op && t_[p_].text == o; }
  std::string take_name(const char* what) {
    if (t_[p_].kind != Tok::name) error(std::string("expected ") + what);
    return t_[p_++].text;
  }
  void expect_op(const char* o) {
    if (!is_op(o)) error(std::string("expected '") + o + "'");
    ++p_;
  }
  void expect_end() {
    if (!at_end()) error("unexpected '" + model::excerpt(t_[p_].text, 40) + "'");
  }
  [[noreturn]] void error(const std::string& what) const { fail(name_, line_, what); }

 private:
  struct Guard {
    explicit Guard(ExprParser& p) : p_(p) {
      if (++p_.depth_ > kMaxDepth) p_.error("expressions nested too deeply");
    }
    ~Guard() { --p_.depth_; }
    ExprParser& p_;
  };

  std::shared_ptr<Expr> make(Expr::Kind k) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = line_;
    return e;
  }
  ExprPtr binary(const std::string& op, ExprPtr a, ExprPtr b) {
    auto e = make(Expr::Kind::binary);
    e->op = op;
    e->items = {std::move(a), std::move(b)};
    return e;
  }

  ExprPtr or_expr() {
    ExprPtr e = and_expr();
    while (is_name("or")) {
      ++p_;
      e = binary("or", e, and_expr());
    }
    return e;
  }
  ExprPtr and_expr() {
    ExprPtr e = not_expr();
    while (is_name("and")) {
      ++p_;
      e = binary("and", e, not_expr());
    }
    return e;
  }
  ExprPtr not_expr() {
    Guard g(*this);
    if (is_name("not")) {
      ++p_;
      auto e = make(Expr::Kind::unary);
      e->op = "not";
      e->items.push_back(not_expr());
      return e;
    }
    return compare();
  }
  ExprPtr compare() {
    ExprPtr first = math1();
    std::shared_ptr<Expr> c;
    while (true) {
      std::string op;
      if (t_[p_].kind == Tok::op && (is_op("==") || is_op("!=") || is_op("<") || is_op(">") ||
                                     is_op("<=") || is_op(">="))) {
        op = t_[p_++].text;
      } else if (is_name("in")) {
        ++p_;
        op = "in";
      } else if (is_name("not") && t_[p_ + 1].kind == Tok::name && t_[p_ + 1].text == "in") {
        p_ += 2;
        op = "not in";
      } else {
        break;
      }
      if (!c) {
        c = make(Expr::Kind::compare);
        c->items.push_back(first);
      }
      c->ops.push_back(op);
      c->items.push_back(math1());
    }
    return c ? ExprPtr(c) : first;
  }
  ExprPtr math1() {
    ExprPtr e = concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = t_[p_++].text;
      e = binary(op, e, concat());
    }
    return e;
  }
  ExprPtr concat() {
    ExprPtr e = math2();
    while (is_op("~")) {
      ++p_;
      e = binary("~", e, math2());
    }
    return e;
  }
  ExprPtr math2() {
    ExprPtr e = power();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = t_[p_++].text;
      e = binary(op, e, power());
    }
    return e;
  }
  ExprPtr power() {
    ExprPtr e = unary(true);
    while (is_op("**")) {
      ++p_;
      e = binary("**", e, unary(true));
    }
    return e;
  }
  ExprPtr unary(bool with_filter) {
    Guard g(*this);
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      auto u = make(Expr::Kind::unary);
      u->op = t_[p_++].text;
      u->items.push_back(unary(false));
      e = u;
    } else {
      e = postfix(primary());
    }
    return with_filter ? filters(e) : e;
  }
  ExprPtr primary() {
    Guard g(*this);
    const Tok& t = t_[p_];
    if (t.kind == Tok::name) {
      ++p_;
      auto lit = make(Expr::Kind::literal);
      if (t.text == "true" || t.text == "True") lit->value = Value(true);
      else if (t.text == "false" || t.text == "False") lit->value = Value(false);
      else if (t.text == "none" || t.text == "None") lit->value = Value::none();
      else {
        auto n = make(Expr::Kind::name);
        n->name = t.text;
        return n;
      }
      return lit;
    }
    if (t.kind == Tok::string) {
      std::string s;
      while (t_[p_].kind == Tok::string) s += t_[p_++].text;  // adjacent literals join
      auto lit = make(Expr::Kind::literal);
      lit->value = Value(s);
      return lit;
    }
    if (t.kind == Tok::integer || t.kind == Tok::number) {
      ++p_;
      auto lit = make(Expr::Kind::literal);
      lit->value = t.kind == Tok::integer ? Value(t.i) : Value(t.d);
      return lit;
    }
    if (is_op("(")) {
      ++p_;
      if (is_op(")")) {
        ++p_;
        return make(Expr::Kind::list);
      }
      ExprPtr e = tuple_or_expression();
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      ++p_;
      auto l = make(Expr::Kind::list);
      while (!is_op("]")) {
        l->items.push_back(expression());
        if (!is_op(",")) break;
        ++p_;
      }
      expect_op("]");
      return l;
    }
    if (is_op("{")) {
      ++p_;
      auto d = make(Expr::Kind::dict);
      while (!is_op("}")) {
        d->items.push_back(expression());
        expect_op(":");
        d->items.push_back(expression());
        if (!is_op(",")) break;
        ++p_;
      }
      expect_op("}");
      return d;
    }
    if (t.kind == Tok::end) error("an expression is missing");
    error("unexpected '" + model::excerpt(t.text, 40) + "'");
  }
  std::vector<Arg> call_args() {
    std::vector<Arg> args;
    expect_op("(");
    while (!is_op(")")) {
      Arg a;
      if (t_[p_].kind == Tok::name && t_[p_ + 1].kind == Tok::op && t_[p_ + 1].text == "=") {
        a.name = t_[p_].text;
        p_ += 2;
      }
      a.value = expression();
      args.push_back(std::move(a));
      if (!is_op(",")) break;
      ++p_;
    }
    expect_op(")");
    return args;
  }
  ExprPtr postfix(ExprPtr e) {
    while (true) {
      if (is_op(".")) {
        ++p_;
        auto a = make(Expr::Kind::attr);
        if (t_[p_].kind == Tok::integer) {  // x.0 is x[0]
          a->kind = Expr::Kind::index;
          auto lit = make(Expr::Kind::literal);
          lit->value = Value(t_[p_++].i);
          a->items = {e, lit};
        } else {
          a->name = take_name("an attribute name after '.'");
          a->items = {e};
        }
        e = a;
      } else if (is_op("[")) {
        ++p_;
        std::vector<ExprPtr> parts(1);
        bool is_slice = false;
        while (!is_op("]")) {
          if (is_op(":")) {
            ++p_;
            is_slice = true;
            parts.emplace_back();
            continue;
          }
          if (parts.back()) error("expected ':' or ']'");
          parts.back() = expression();
        }
        expect_op("]");
        if (is_slice) {
          if (parts.size() > 3) error("a slice has at most three parts");
          auto s = make(Expr::Kind::slice);
          parts.resize(3);
          s->items = {e, parts[0], parts[1], parts[2]};
          e = s;
        } else {
          if (!parts[0]) error("an empty subscript");
          auto ix = make(Expr::Kind::index);
          ix->items = {e, parts[0]};
          e = ix;
        }
      } else if (is_op("(")) {
        auto c = make(Expr::Kind::call);
        if (e->kind == Expr::Kind::name) {
          if (!has_function(e->name)) error("the function '" + e->name + "' is not supported");
        } else if (e->kind == Expr::Kind::attr) {
          if (!has_method(e->name)) error("the method '" + e->name + "' is not supported");
        } else {
          error("only named functions and methods can be called");
        }
        c->items = {e};
        c->args = call_args();
        e = c;
      } else {
        return e;
      }
    }
  }
  ExprPtr filters(ExprPtr e) {
    while (true) {
      if (is_op("|")) {
        ++p_;
        auto f = make(Expr::Kind::filter);
        f->name = take_name("a filter name after '|'");
        if (!has_filter(f->name)) error("the filter '" + f->name + "' is not supported");
        f->items = {e};
        if (is_op("(")) f->args = call_args();
        e = f;
      } else if (is_name("is")) {
        ++p_;
        auto t = make(Expr::Kind::test);
        if (is_name("not")) {
          ++p_;
          t->negated = true;
        }
        t->name = take_name("a test name after 'is'");
        if (!has_test(t->name)) error("the test '" + t->name + "' is not supported");
        t->items = {e};
        if (is_op("(")) {
          t->args = call_args();
        } else if (t_[p_].kind == Tok::string || t_[p_].kind == Tok::integer ||
                   t_[p_].kind == Tok::number ||
                   (t_[p_].kind == Tok::name && !is_name("and") && !is_name("or") &&
                    !is_name("else") && !is_name("if") && !is_name("in") && !is_name("not") &&
                    !is_name("is"))) {
          t->args.push_back({"", postfix(primary())});
        }
        e = t;
      } else {
        return e;
      }
    }
  }

  std::vector<Tok> t_;
  size_t p_ = 0;
  const std::string& name_;
  int line_;
  int depth_ = 0;
};

// ---- statements -----------------------------------------------------------------------------

class Parser {
 public:
  Parser(std::vector<Piece> pieces, const std::string& name)
      : pieces_(std::move(pieces)), name_(name) {}

  Body body(const std::set<std::string>& ends, std::string* ended_by, int depth) {
    if (depth > kMaxDepth) fail(name_, line(), "blocks nested too deeply");
    Body out;
    while (p_ < pieces_.size()) {
      const Piece& pc = pieces_[p_];
      if (pc.kind == Piece::text) {
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::text;
        n->text = pc.content;
        n->line = pc.line;
        out.push_back(n);
        ++p_;
        continue;
      }
      ExprParser ep(tokenize(pc.content, name_, pc.line), name_, pc.line);
      if (pc.kind == Piece::var) {
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::output;
        n->line = pc.line;
        n->expr = ep.expression();
        ep.expect_end();
        out.push_back(n);
        ++p_;
        continue;
      }
      const std::string tag = ep.at_end() ? "" : ep.take_name("a tag name");
      if (ends.count(tag)) {
        if (ended_by) *ended_by = tag;
        return out;  // the caller reads the tag's expression
      }
      ++p_;
      out.push_back(statement(tag, ep, pc.line, depth));
    }
    if (!ends.empty()) {
      std::string want;
      for (const auto& e : ends) want += (want.empty() ? "" : " or ") + ("{% " + e + " %}");
      fail(name_, line(), "the template ends before " + want);
    }
    return out;
  }

 private:
  int line() const { return p_ < pieces_.size() ? pieces_[p_].line : (pieces_.empty() ? 1 : pieces_.back().line); }

  // The expression of the current (end or middle) tag, after its name.
  ExprParser tag_parser() {
    const Piece& pc = pieces_[p_];
    ExprParser ep(tokenize(pc.content, name_, pc.line), name_, pc.line);
    ep.take_name("a tag name");
    return ep;
  }

  std::shared_ptr<const Node> statement(const std::string& tag, ExprParser& ep, int ln, int depth) {
    auto n = std::make_shared<Node>();
    n->line = ln;
    if (tag == "if") {
      n->kind = Node::Kind::if_;
      n->conds.push_back(ep.expression());
      ep.expect_end();
      while (true) {
        std::string ended;
        n->bodies.push_back(body({"elif", "else", "endif"}, &ended, depth + 1));
        ExprParser tp = tag_parser();
        ++p_;
        if (ended == "elif") {
          n->conds.push_back(tp.expression());
          tp.expect_end();
        } else if (ended == "else") {
          tp.expect_end();
          std::string e2;
          n->bodies.push_back(body({"endif"}, &e2, depth + 1));
          tag_parser().expect_end();
          ++p_;
          break;
        } else {
          tp.expect_end();
          break;
        }
      }
    } else if (tag == "for") {
      n->kind = Node::Kind::for_;
      n->targets.push_back(ep.take_name("a loop variable"));
      while (ep.is_op(",")) {
        ep.expect_op(",");
        n->targets.push_back(ep.take_name("a loop variable"));
      }
      if (!ep.is_name("in")) ep.error("expected 'in' in a for tag");
      ep.take_name("in");
      n->expr = ep.or_expr_public();  // `if` after the iterable filters the items
      if (ep.is_name("if")) {
        ep.take_name("if");
        n->filter = ep.expression();
      }
      if (ep.is_name("recursive")) ep.error("recursive loops are not supported");
      ep.expect_end();
      std::string ended;
      n->bodies.push_back(body({"else", "endfor"}, &ended, depth + 1));
      tag_parser().expect_end();
      ++p_;
      if (ended == "else") {
        std::string e2;
        n->bodies.push_back(body({"endfor"}, &e2, depth + 1));
        tag_parser().expect_end();
        ++p_;
      }
    } else if (tag == "set") {
      n->kind = Node::Kind::set;
      n->targets.push_back(ep.take_name("a variable name"));
      if (ep.is_op(".")) {
        ep.expect_op(".");
        n->targets.push_back(ep.take_name("an attribute name"));
      }
      if (ep.is_op("=")) {
        ep.expect_op("=");
        n->expr = ep.tuple_or_expression();
        ep.expect_end();
      } else {
        ep.expect_end();
        if (n->targets.size() != 1) ep.error("a {% set %} block sets a plain name");
        std::string ended;
        n->bodies.push_back(body({"endset"}, &ended, depth + 1));
        tag_parser().expect_end();
        ++p_;
      }
    } else if (tag == "break" || tag == "continue") {
      n->kind = tag == "break" ? Node::Kind::brk : Node::Kind::cont;
      ep.expect_end();
    } else if (tag == "generation") {  // transformers' assistant-mask marker: renders its body
      n->kind = Node::Kind::block;
      ep.expect_end();
      std::string ended;
      n->bodies.push_back(body({"endgeneration"}, &ended, depth + 1));
      tag_parser().expect_end();
      ++p_;
    } else if (tag.empty()) {
      ep.error("an empty {% %} tag");
    } else if (tag == "macro" || tag == "call" || tag == "include" || tag == "import" ||
               tag == "from" || tag == "extends" || tag == "block" || tag == "raw" ||
               tag == "filter" || tag == "with" || tag == "autoescape" || tag == "do") {
      ep.error("the tag {% " + tag + " %} is not supported");
    } else {
      ep.error("unexpected tag {% " + model::excerpt(tag, 40) + " %}");
    }
    return n;
  }

  std::vector<Piece> pieces_;
  size_t p_ = 0;
  const std::string& name_;
};

}  // namespace

std::shared_ptr<const Node> parse_template(std::string_view source, const std::string& name) {
  Parser p(lex_pieces(source, name), name);
  auto root = std::make_shared<Node>();
  root->kind = Node::Kind::block;
  root->bodies.push_back(p.body({}, nullptr, 0));
  return root;
}

}  // namespace cca::server::jinja

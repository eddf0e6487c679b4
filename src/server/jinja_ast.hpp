// The parsed form of a template (jinja_parse.cpp builds it, jinja.cpp evaluates it), and the
// names of the filters, tests, functions and methods the evaluator has, which the parser checks.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "server/jinja.hpp"

namespace cca::server::jinja {

struct Expr;
using ExprPtr = std::shared_ptr<const Expr>;

struct Arg {
  std::string name;  // "" for a positional argument
  ExprPtr value;
};

struct Expr {
  enum class Kind {
    literal,   // value
    name,      // name
    list,      // items
    dict,      // items: key, value, key, value, ...
    attr,      // items[0].name
    index,     // items[0][items[1]]
    slice,     // items[0][items[1]:items[2]:items[3]] (null items: omitted)
    call,      // items[0](args)
    filter,    // items[0] | name(args)
    test,      // items[0] is [not] name(args)
    unary,     // op items[0]: "not", "-", "+"
    binary,    // items[0] op items[1]
    compare,   // items[0] ops[0] items[1] ops[1] items[2] ...
    cond,      // items[1] if items[0] else items[2] (items[2] null: undefined)
  };
  Kind kind = Kind::literal;
  int line = 0;
  Value value;
  std::string name, op;
  std::vector<std::string> ops;
  bool negated = false;
  std::vector<ExprPtr> items;
  std::vector<Arg> args;
};

struct Node;
using Body = std::vector<std::shared_ptr<const Node>>;

struct Node {
  enum class Kind {
    text,       // text
    output,     // {{ expr }}
    if_,        // conds[i] -> bodies[i]; bodies.size() == conds.size() + 1 with an else
    for_,       // for targets in expr [if filter]: bodies[0], else bodies[1]
    set,        // targets[0] (or targets[0].targets[1]) = expr, or {% set targets[0] %}bodies[0]
    brk,        // break
    cont,       // continue
    block,      // bodies[0] (the root, a generation block)
  };
  Kind kind = Kind::text;
  int line = 0;
  std::string text;
  ExprPtr expr, filter;
  std::vector<ExprPtr> conds;
  std::vector<std::string> targets;
  std::vector<Body> bodies;
};

// What the evaluator implements (jinja.cpp); the parser refuses any other name at load.
bool has_filter(std::string_view name);
bool has_test(std::string_view name);
bool has_function(std::string_view name);
bool has_method(std::string_view name);

// jinja_parse.cpp
std::shared_ptr<const Node> parse_template(std::string_view source, const std::string& name);

}  // namespace cca::server::jinja

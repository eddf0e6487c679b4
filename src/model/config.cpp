#include "model/config.hpp"

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cca/error.hpp"
#include "cca/variant.hpp"

namespace cca::model {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

constexpr int64_t kMaxPositions = int64_t(1) << 30;

// Typed field access with messages that name the file and the key.
class Fields {
 public:
  Fields(const Json& j, std::string source) : j_(j), source_(std::move(source)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  int64_t integer(const char* key) const {
    check(has(key), source_ + ": missing required field \"" + key + "\"");
    return integer_or(key, 0);
  }
  int64_t integer_or(const char* key, int64_t fallback) const {
    if (!has(key)) return fallback;
    const Json& v = j_.at(key);
    // JSON writers sometimes spell integers as 4096.0; accept exact integral numbers (in range:
    // converting 1e19 to int64 is undefined behaviour).
    if (v.is_number_unsigned() && v.get<uint64_t>() <= uint64_t(INT64_MAX))
      return v.get<int64_t>();
    if (v.is_number_integer() && !v.is_number_unsigned()) return v.get<int64_t>();
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (std::fabs(d) < 0x1p63 && d == std::trunc(d)) return int64_t(d);
    }
    throw Error(source_ + ": field \"" + key + "\" must be an integer, got " + json_excerpt(v));
  }
  double number_or(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    const Json& v = j_.at(key);
    check(v.is_number(),
          source_ + ": field \"" + key + "\" must be a number, got " + json_excerpt(v));
    return v.get<double>();
  }
  bool boolean_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const Json& v = j_.at(key);
    check(v.is_boolean(),
          source_ + ": field \"" + key + "\" must be true or false, got " + json_excerpt(v));
    return v.get<bool>();
  }
  std::string string_or(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const Json& v = j_.at(key);
    check(v.is_string(),
          source_ + ": field \"" + key + "\" must be a string, got " + json_excerpt(v));
    return v.get<std::string>();
  }
  // An integer or a list of integers (eos_token_id).
  std::vector<int64_t> int_list_or_empty(const char* key) const {
    std::vector<int64_t> r;
    if (!has(key)) return r;
    const Json& v = j_.at(key);
    auto one = [&](const Json& x) {
      check(x.is_number_integer() && x.get<int64_t>() >= 0,
            source_ + ": field \"" + key + "\" must be a token id or a list of them, got " +
                json_excerpt(v));
      r.push_back(x.get<int64_t>());
    };
    if (v.is_array()) {
      for (const Json& x : v) one(x);
    } else {
      one(v);
    }
    return r;
  }
  const Json& object_or_null(const char* key) const {
    static const Json null_json;
    if (!has(key)) return null_json;
    const Json& v = j_.at(key);
    check(v.is_object(),
          source_ + ": field \"" + key + "\" must be an object, got " + json_excerpt(v));
    return v;
  }

 private:
  const Json& j_;
  std::string source_;
};

Json parse_json_object(const std::string& text, const std::string& source) {
  Json j = parse_json(text, source);
  check(j.is_object(), source + ": expected a JSON object at the top level");
  return j;
}

// rope_scaling (legacy, next to a top-level rope_theta) or rope_parameters (transformers 5,
// rope_theta inside); "type" is the older spelling of "rope_type".
RopeConfig parse_rope(const Json& top, const std::string& source) {
  Fields f(top, source);
  RopeConfig r;
  r.theta = f.number_or("rope_theta", 10000.0);
  const char* key = f.has("rope_parameters") ? "rope_parameters" : "rope_scaling";
  const Json& rs = f.object_or_null(key);
  if (rs.is_null()) return r;
  const std::string where = source + " " + key;
  Fields s(rs, where);
  r.theta = s.number_or("rope_theta", r.theta);
  std::string type = s.string_or("rope_type", s.string_or("type", "default"));
  if (type == "default") {
    r.type = RopeType::standard;
  } else if (type == "linear") {
    r.type = RopeType::linear;
    r.factor = s.number_or("factor", 0.0);
    check(s.has("factor"), where + ": rope type linear needs \"factor\"");
  } else if (type == "llama3") {
    r.type = RopeType::llama3;
    for (const char* k :
         {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
      check(s.has(k), where + ": rope type llama3 needs \"" + k + "\"");
    r.factor = s.number_or("factor", 0.0);
    r.low_freq_factor = s.number_or("low_freq_factor", 0.0);
    r.high_freq_factor = s.number_or("high_freq_factor", 0.0);
    r.original_max_positions = s.integer("original_max_position_embeddings");
    check(r.high_freq_factor > r.low_freq_factor,
          where + ": llama3 needs high_freq_factor > low_freq_factor");
  } else {
    throw Error(where + ": unsupported rope type \"" + excerpt(type) +
                "\" (supported: default, linear, llama3)");
  }
  check(r.factor > 0, where + ": factor must be > 0");
  check(r.theta > 0, where + ": rope_theta must be > 0");
  if (r.type == RopeType::llama3) {
    check(r.low_freq_factor > 0, where + ": low_freq_factor must be > 0");
    check(r.original_max_positions >= 1 && r.original_max_positions <= kMaxPositions,
          where + ": original_max_position_embeddings = " +
              std::to_string(r.original_max_positions) + ": must be in [1, " +
              std::to_string(kMaxPositions) + "]");
  }
  return r;
}

// config.json's "cca" entry. An unknown key is an error rather than ignored: it would change
// the attention the model was trained with.
AttentionDefaults parse_attention_defaults(const Json& top, const std::string& source) {
  AttentionDefaults a;
  const Json& e = Fields(top, source).object_or_null("cca");
  if (e.is_null()) return a;
  const std::string where = source + ": entry \"cca\"";
  for (const auto& item : e.items()) {
    const std::string& k = item.key();
    check(k == "variant" || k == "group" || k == "window" || k == "sinks" || k == "pool" ||
              k == "pool_heads",
          where + ": unknown key " + excerpt(k) +
              " (expected variant, group, window, sinks, pool, pool_heads)");
  }
  const Fields f(e, where);
  auto name = [&](const char* key, auto parse) -> std::optional<std::string> {
    if (!f.has(key)) return std::nullopt;
    const std::string v = f.string_or(key, "");
    try {
      parse(v);
    } catch (const Error& err) {
      throw Error(where + ": " + excerpt(err.what(), 200));
    }
    return v;
  };
  a.variant = name("variant", parse_variant);
  a.pool = name("pool", parse_pool);
  a.pool_heads = name("pool_heads", parse_pool_heads);
  auto integer = [&](const char* key) -> std::optional<int64_t> {
    if (!f.has(key)) return std::nullopt;
    return f.integer_or(key, 0);
  };
  a.group = integer("group");
  a.window = integer("window");
  a.sinks = integer("sinks");
  return a;
}

}  // namespace

bool AttentionDefaults::empty() const {
  return !variant && !pool && !pool_heads && !group && !window && !sinks;
}

std::string AttentionDefaults::describe() const {
  std::string s;
  auto add = [&](const char* key, const std::string& v) {
    s += (s.empty() ? "" : " ") + std::string(key) + "=" + v;
  };
  if (variant) add("variant", *variant);
  if (group) add("group", std::to_string(*group));
  if (window) add("window", std::to_string(*window));
  if (sinks) add("sinks", std::to_string(*sinks));
  if (pool) add("pool", *pool);
  if (pool_heads) add("pool_heads", *pool_heads);
  return s;
}

const char* arch_name(Arch a) {
  switch (a) {
    case Arch::llama:
      return "LlamaForCausalLM";
    case Arch::mistral:
      return "MistralForCausalLM";
    case Arch::qwen2:
      return "Qwen2ForCausalLM";
  }
  return "?";
}

std::string RopeConfig::describe() const {
  std::ostringstream o;
  o << "theta " << theta;
  if (type == RopeType::linear) o << ", linear scaling x" << factor;
  if (type == RopeType::llama3)
    o << ", llama3 scaling x" << factor << " (low " << low_freq_factor << ", high "
      << high_freq_factor << ", original context " << original_max_positions << ")";
  return o.str();
}

ModelConfig parse_model_config(const std::string& text, const std::string& source) {
  const Json j = parse_json_object(text, source);
  Fields f(j, source);
  ModelConfig c;

  std::string arch;
  if (f.has("architectures")) {
    const Json& a = j.at("architectures");
    check(a.is_array() && !a.empty() && a[0].is_string(),
          source + ": \"architectures\" must be a list of names, got " + json_excerpt(a));
    arch = a[0].get<std::string>();
  } else {
    // Some exports carry only model_type.
    const std::string mt = f.string_or("model_type", "");
    if (mt == "llama")
      arch = "LlamaForCausalLM";
    else if (mt == "mistral")
      arch = "MistralForCausalLM";
    else if (mt == "qwen2")
      arch = "Qwen2ForCausalLM";
    else
      arch = mt.empty() ? "(none given)" : "model_type " + mt;
  }
  if (arch == "LlamaForCausalLM")
    c.arch = Arch::llama;
  else if (arch == "MistralForCausalLM")
    c.arch = Arch::mistral;
  else if (arch == "Qwen2ForCausalLM")
    c.arch = Arch::qwen2;
  else
    throw Error(source + ": unsupported architecture " + excerpt(arch) +
                " (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)");

  const std::string act = f.string_or("hidden_act", "silu");
  check(act == "silu", source + ": unsupported hidden_act \"" + excerpt(act) + "\" (only silu)");

  c.vocab_size = f.integer("vocab_size");
  c.hidden_size = f.integer("hidden_size");
  c.intermediate_size = f.integer("intermediate_size");
  c.num_layers = f.integer("num_hidden_layers");
  c.num_heads = f.integer("num_attention_heads");
  c.num_kv_heads = f.integer_or("num_key_value_heads", c.num_heads);
  check(c.num_heads > 0, source + ": num_attention_heads must be >= 1");
  c.head_dim = f.integer_or("head_dim", c.hidden_size / c.num_heads);
  c.max_position_embeddings = f.integer_or("max_position_embeddings", 2048);
  c.rms_norm_eps = f.number_or("rms_norm_eps", 1e-6);
  c.rope = parse_rope(j, source);
  c.tie_word_embeddings = f.boolean_or("tie_word_embeddings", false);
  c.bos_token_id = f.integer_or("bos_token_id", -1);
  c.eos_token_ids = f.int_list_or_empty("eos_token_id");
  c.attention = parse_attention_defaults(j, source);

  switch (c.arch) {
    case Arch::llama:
      c.qkv_bias = c.o_bias = f.boolean_or("attention_bias", false);
      c.mlp_bias = f.boolean_or("mlp_bias", false);
      break;
    case Arch::mistral:
      c.sliding_window = f.integer_or("sliding_window", 0);
      break;
    case Arch::qwen2:
      c.qkv_bias = true;
      if (f.boolean_or("use_sliding_window", false))
        c.sliding_window = f.integer_or("sliding_window", 0);
      break;
  }
  check(f.integer_or("pretraining_tp", 1) == 1,
        source + ": pretraining_tp > 1 is not supported (the checkpoint splits its projections)");
  c.validate();
  return c;
}

void ModelConfig::validate() const {
  // Every size is used (tensor names listed per layer, rotary tables, buffers) before the
  // checkpoint is compared with the config, so each has a limit; the largest real models are
  // far below them (in brackets), and the products of any two stay far inside int64.
  auto in_range = [](int64_t v, int64_t limit, const char* name) {
    check(v >= 1 && v <= limit, std::string("config.json: ") + name + " = " + std::to_string(v) +
                                    ": must be in [1, " + std::to_string(limit) + "]");
  };
  in_range(vocab_size, int64_t(1) << 24, "vocab_size");                // [256,000]
  in_range(hidden_size, int64_t(1) << 17, "hidden_size");              // [16,384]
  in_range(intermediate_size, int64_t(1) << 20, "intermediate_size");  // [53,248]
  in_range(num_layers, 1024, "num_hidden_layers");                     // [126]
  in_range(num_heads, 1024, "num_attention_heads");                    // [128]
  in_range(num_kv_heads, 1024, "num_key_value_heads");                 // [128]
  in_range(head_dim, 1024, "head_dim");                                // [256]
  in_range(max_position_embeddings, kMaxPositions, "max_position_embeddings");  // [10M]
  check(sliding_window >= 0, "config.json: sliding_window = " + std::to_string(sliding_window) +
                                 ": must be >= 0");
  check(num_heads % num_kv_heads == 0,
        "config.json: num_attention_heads = " + std::to_string(num_heads) +
            " must be a multiple of num_key_value_heads = " + std::to_string(num_kv_heads));
  check(head_dim % 2 == 0,
        "config.json: head_dim = " + std::to_string(head_dim) + " must be even (rotary pairs)");
  check(rms_norm_eps > 0, "config.json: rms_norm_eps must be > 0");
}

std::string ModelConfig::describe() const {
  std::ostringstream o;
  o << arch_name(arch) << ": " << num_layers << " layers, hidden " << hidden_size
    << ", intermediate " << intermediate_size << ", heads " << num_heads << " (kv " << num_kv_heads
    << "), head_dim " << head_dim << ", vocab " << vocab_size << ", max positions "
    << max_position_embeddings << ", rope " << rope.describe();
  if (qkv_bias) o << ", q/k/v bias";
  if (tie_word_embeddings) o << ", tied embeddings";
  if (sliding_window > 0) o << ", checkpoint sliding_window " << sliding_window;
  return o.str();
}

ModelConfig load_model_config(const std::string& model_dir) {
  std::error_code ec;
  check(fs::is_directory(model_dir, ec), "model directory not found: " + model_dir);
  const std::string path = (fs::path(model_dir) / "config.json").string();
  return parse_model_config(read_text_file(path, "config.json", kMaxConfigBytes), path);
}

GenerationConfig parse_generation_config(const std::string& text, const std::string& source) {
  const Json j = parse_json_object(text, source);
  Fields f(j, source);
  GenerationConfig g;
  g.present = true;
  g.eos_token_ids = f.int_list_or_empty("eos_token_id");
  g.bos_token_id = f.integer_or("bos_token_id", -1);
  g.do_sample = f.boolean_or("do_sample", false);
  g.temperature = f.number_or("temperature", 1.0);
  g.top_k = f.integer_or("top_k", 50);
  g.top_p = f.number_or("top_p", 1.0);
  // Checked here so that a bad value is blamed on the file, not on a flag the user never gave.
  auto bad = [&](const char* key, double v, const char* rule) {
    std::ostringstream o;
    o << source << ": " << key << " = " << v << ": " << rule;
    throw Error(o.str());
  };
  if (g.do_sample) {
    if (!(g.temperature > 0)) bad("temperature", g.temperature, "must be > 0 with do_sample");
    if (!(g.top_p > 0 && g.top_p <= 1)) bad("top_p", g.top_p, "must be in (0, 1] with do_sample");
  }
  if (!(g.temperature >= 0)) bad("temperature", g.temperature, "must be >= 0");
  if (g.top_k < 0) bad("top_k", double(g.top_k), "must be >= 0 (0 = off)");
  if (!(g.top_p >= 0 && g.top_p <= 1)) bad("top_p", g.top_p, "must be in [0, 1]");
  return g;
}

GenerationConfig load_generation_config(const std::string& model_dir, const ModelConfig& cfg) {
  const std::string path = (fs::path(model_dir) / "generation_config.json").string();
  std::error_code ec;
  GenerationConfig g;
  if (fs::exists(path, ec))
    g = parse_generation_config(
        read_text_file(path, "generation_config.json", kMaxConfigBytes), path);
  if (g.eos_token_ids.empty()) g.eos_token_ids = cfg.eos_token_ids;
  if (g.bos_token_id < 0) g.bos_token_id = cfg.bos_token_id;
  return g;
}

}  // namespace cca::model

#include "model/weights.hpp"

#include <cstring>
#include <set>
#include <sstream>

#include "cca/error.hpp"

namespace cca::model {
namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// "a, b, c (and N more)" for error messages.
std::string name_list(const std::vector<std::string>& names) {
  std::ostringstream o;
  const size_t shown = std::min<size_t>(names.size(), 5);
  for (size_t i = 0; i < shown; ++i) o << (i ? ", " : "") << names[i];
  if (names.size() > shown) o << " (and " << names.size() - shown << " more)";
  return o.str();
}

}  // namespace

std::vector<ExpectedTensor> expected_tensors(const ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.num_heads * c.head_dim,
                kvd = c.num_kv_heads * c.head_dim;
  std::vector<ExpectedTensor> t;
  t.push_back({"model.embed_tokens.weight", {c.vocab_size, H}});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", {H}});
    t.push_back({p + "self_attn.q_proj.weight", {qd, H}});
    t.push_back({p + "self_attn.k_proj.weight", {kvd, H}});
    t.push_back({p + "self_attn.v_proj.weight", {kvd, H}});
    t.push_back({p + "self_attn.o_proj.weight", {H, qd}});
    if (c.qkv_bias) {
      t.push_back({p + "self_attn.q_proj.bias", {qd}});
      t.push_back({p + "self_attn.k_proj.bias", {kvd}});
      t.push_back({p + "self_attn.v_proj.bias", {kvd}});
    }
    if (c.o_bias) t.push_back({p + "self_attn.o_proj.bias", {H}});
    t.push_back({p + "post_attention_layernorm.weight", {H}});
    t.push_back({p + "mlp.gate_proj.weight", {I, H}});
    t.push_back({p + "mlp.up_proj.weight", {I, H}});
    t.push_back({p + "mlp.down_proj.weight", {H, I}});
    if (c.mlp_bias) {
      t.push_back({p + "mlp.gate_proj.bias", {I}});
      t.push_back({p + "mlp.up_proj.bias", {I}});
      t.push_back({p + "mlp.down_proj.bias", {H}});
    }
  }
  t.push_back({"model.norm.weight", {H}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, H}});
  return t;
}

void check_tensors(const Checkpoint& ck, const ModelConfig& cfg) {
  std::vector<std::string> missing, misshaped, extra;
  std::set<std::string> known;
  for (const ExpectedTensor& e : expected_tensors(cfg)) {
    known.insert(e.name);
    const TensorInfo* t = ck.find(e.name);
    if (!t) {
      missing.push_back(e.name);
    } else if (t->shape != e.shape) {
      misshaped.push_back(e.name + " is " + t->shape_string() + " in " + t->file + ", expected " +
                          shape_str(e.shape));
    }
  }
  for (const auto& [name, t] : ck.tensors()) {
    if (known.count(name) || ends_with(name, ".rotary_emb.inv_freq")) continue;
    if (cfg.tie_word_embeddings && name == "lm_head.weight" &&
        t.shape == std::vector<int64_t>{cfg.vocab_size, cfg.hidden_size})
      continue;
    extra.push_back(name);
  }
  const std::string arch = arch_name(cfg.arch);
  check(missing.empty(), "checkpoint is missing tensor" +
                             std::string(missing.size() > 1 ? "s " : " ") + name_list(missing) +
                             " (needed by " + arch + " with this config.json)");
  check(misshaped.empty(), "mis-shaped tensor " + name_list(misshaped));
  check(extra.empty(), "checkpoint has unexpected tensor" +
                           std::string(extra.size() > 1 ? "s " : " ") + name_list(extra) +
                           " (not part of " + arch + " with this config.json)");
}

const float* Weights::get(const std::string& name) {
  const TensorInfo* t = ck_.find(name);
  check(t != nullptr, "checkpoint is missing tensor " + name);  // check_tensors ran before
  const int64_t n = t->numel();
  params_ += n;
  if (t->dtype == DType::f32 && reinterpret_cast<uintptr_t>(t->data) % alignof(float) == 0) {
    mapped_bytes_ += n * 4;
    return static_cast<const float*>(t->data);
  }
  std::unique_ptr<float[]> buf(new float[size_t(n)]);
  float* dst = buf.get();
  const auto* src16 = static_cast<const unsigned char*>(t->data);
  switch (t->dtype) {
    case DType::f32:  // unaligned float32: copy bytes
      std::memcpy(dst, t->data, size_t(n) * 4);
      break;
    case DType::f16:
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src16 + 2 * i, 2);
        dst[i] = f16_to_float(h);
      }
      break;
    case DType::bf16:
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src16 + 2 * i, 2);
        dst[i] = bf16_to_float(h);
      }
      break;
  }
  converted_bytes_ += n * 4;
  owned_.push_back(std::move(buf));
  return dst;
}

Weights::Weights(Checkpoint ck, const ModelConfig& c) : ck_(std::move(ck)) {
  check_tensors(ck_, c);
  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.num_heads * c.head_dim,
                kvd = c.num_kv_heads * c.head_dim;
  embed = get("model.embed_tokens.weight");
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto linear = [&](const std::string& name, int64_t out, int64_t in, bool bias) {
      Linear L;
      L.w = get(p + name + ".weight");
      L.b = bias ? get(p + name + ".bias") : nullptr;
      L.out = out;
      L.in = in;
      return L;
    };
    LayerWeights w;
    w.attn_norm = get(p + "input_layernorm.weight");
    w.q = linear("self_attn.q_proj", qd, H, c.qkv_bias);
    w.k = linear("self_attn.k_proj", kvd, H, c.qkv_bias);
    w.v = linear("self_attn.v_proj", kvd, H, c.qkv_bias);
    w.o = linear("self_attn.o_proj", H, qd, c.o_bias);
    w.mlp_norm = get(p + "post_attention_layernorm.weight");
    w.gate = linear("mlp.gate_proj", I, H, c.mlp_bias);
    w.up = linear("mlp.up_proj", I, H, c.mlp_bias);
    w.down = linear("mlp.down_proj", H, I, c.mlp_bias);
    layers.push_back(w);
  }
  final_norm = get("model.norm.weight");
  lm_head = c.tie_word_embeddings ? embed : get("lm_head.weight");
}

}  // namespace cca::model

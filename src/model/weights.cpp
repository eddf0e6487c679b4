#include "model/weights.hpp"

#include <algorithm>
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

namespace {

constexpr int64_t kArenaAlign = 256;
int64_t align_up(int64_t x) { return (x + kArenaAlign - 1) / kArenaAlign * kArenaAlign; }

// Every tensor the forward reads, in load order: the linears' parts are stacked for the GPU.
struct LayerNames {
  std::string attn_norm, mlp_norm;
  std::vector<std::string> qkv, qkv_bias, o, o_bias, gate_up, gate_up_bias, down, down_bias;
};

LayerNames layer_names(const ModelConfig& c, int64_t l) {
  const std::string p = "model.layers." + std::to_string(l) + ".";
  LayerNames n;
  n.attn_norm = p + "input_layernorm.weight";
  n.mlp_norm = p + "post_attention_layernorm.weight";
  for (const char* t : {"q", "k", "v"}) {
    n.qkv.push_back(p + "self_attn." + t + "_proj.weight");
    if (c.qkv_bias) n.qkv_bias.push_back(p + "self_attn." + t + "_proj.bias");
  }
  n.o = {p + "self_attn.o_proj.weight"};
  if (c.o_bias) n.o_bias = {p + "self_attn.o_proj.bias"};
  for (const char* t : {"gate", "up"}) {
    n.gate_up.push_back(p + "mlp." + t + "_proj.weight");
    if (c.mlp_bias) n.gate_up_bias.push_back(p + "mlp." + t + "_proj.bias");
  }
  n.down = {p + "mlp.down_proj.weight"};
  if (c.mlp_bias) n.down_bias = {p + "mlp.down_proj.bias"};
  return n;
}

// A [rows, cols] view, or [rows] as [1, rows] for vectors.
TensorView view_of(void* data, DType dt, int64_t rows, int64_t cols, Device dev) {
  return ops::matrix(data, dt, rows, cols, cols, dev);
}

}  // namespace

int64_t weights_bytes(const ModelConfig& cfg, DType dtype) {
  int64_t b = 0;
  for (const ExpectedTensor& e : expected_tensors(cfg)) {
    int64_t n = 1;
    for (int64_t d : e.shape) n *= d;
    b += align_up(n * dtype_size(dtype));
  }
  return b;
}

Weights::Weights(Checkpoint ck, const ModelConfig& c, const ops::Context& ctx, DType dtype)
    : ck_(std::move(ck)), ctx_(&ctx), dtype_(dtype) {
  check_tensors(ck_, c);
  if (ctx.device() == Device::cpu) {
    check(dtype == DType::f32, std::string("the cpu runs float32 weights, not ") +
                                   dtype_name(dtype));
    load_host(c);
  } else {
    check(dtype == DType::bf16 || dtype == DType::f16,
          std::string("the GPU runs bfloat16 or float16 weights, not ") + dtype_name(dtype));
    load_device(c);
  }
}

Weights::~Weights() {
  if (arena_) ctx_->free(arena_);
}

TensorView Weights::host_tensor(const std::string& name) {
  const TensorInfo* t = ck_.find(name);
  check(t != nullptr, "checkpoint is missing tensor " + name);  // check_tensors ran before
  const int64_t n = t->numel();
  params_ += n;
  const int64_t rows = t->shape.size() == 2 ? t->shape[0] : 1, cols = n / std::max<int64_t>(rows, 1);
  if (t->dtype == DType::f32 && reinterpret_cast<uintptr_t>(t->data) % alignof(float) == 0) {
    mapped_bytes_ += n * 4;
    return view_of(const_cast<void*>(t->data), DType::f32, rows, cols, Device::cpu);
  }
  std::unique_ptr<float[]> buf(new float[size_t(n)]);
  float* dst = buf.get();
  const auto* src = static_cast<const unsigned char*>(t->data);
  const int64_t esize = dtype_size(t->dtype);
  const DType sdt = t->dtype;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (sdt == DType::f32) {
      std::memcpy(&dst[i], src + 4 * i, 4);  // unaligned float32
    } else {
      uint16_t h;
      std::memcpy(&h, src + esize * i, 2);
      dst[i] = sdt == DType::f16 ? f16_to_float(h) : bf16_to_float(h);
    }
  }
  converted_bytes_ += n * 4;
  owned_.push_back(std::move(buf));
  return view_of(dst, DType::f32, rows, cols, Device::cpu);
}

TensorView Weights::device_tensor(const std::vector<std::string>& names) {
  int64_t rows = 0, cols = 0, written = 0;
  const int64_t esize = dtype_size(dtype_);
  const int64_t base = arena_used_;
  for (const std::string& name : names) {
    const TensorInfo* t = ck_.find(name);
    check(t != nullptr, "checkpoint is missing tensor " + name);
    const int64_t n = t->numel();
    // 2-D tensors stack along rows (equal widths); 1-D ones (biases, norms) concatenate: the
    // same bytes either way, written one after another.
    const bool matrix2d = t->shape.size() == 2;
    const int64_t r = matrix2d ? t->shape[0] : 1;
    check(!matrix2d || cols == 0 || cols == n / r,
          "cannot stack " + name + " with the tensors before it");
    char* dst = static_cast<char*>(arena_) + base + written * esize;
    written += n;
    cols = matrix2d ? n / r : written;
    if (t->dtype == dtype_) {
      ctx_->upload(dst, t->data, n * esize);  // straight from the mapping
      ctx_->synchronize();
    } else {
      staging_.resize(size_t(n * esize));
      const auto* src = static_cast<const unsigned char*>(t->data);
      const DType sdt = t->dtype;
      const int64_t ssize = dtype_size(sdt);
      unsigned char* out = staging_.data();
      const DType ddt = dtype_;
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        float f;
        if (sdt == DType::f32) {
          std::memcpy(&f, src + 4 * i, 4);
        } else {
          uint16_t h;
          std::memcpy(&h, src + ssize * i, 2);
          f = sdt == DType::f16 ? f16_to_float(h) : bf16_to_float(h);
        }
        const uint16_t h = ddt == DType::f16 ? float_to_f16(f) : float_to_bf16(f);
        std::memcpy(out + 2 * i, &h, 2);
      }
      ctx_->upload(dst, staging_.data(), n * esize);
      ctx_->synchronize();  // the staging buffer is reused by the next tensor
      converted_bytes_ += n * esize;
    }
    params_ += n;
    rows = ck_.find(names.front())->shape.size() == 2 ? rows + r : 1;
  }
  check(base + written * esize <= device_bytes_, "the weights outgrew their allocation");
  arena_used_ = base + align_up(written * esize);
  return view_of(static_cast<char*>(arena_) + base, dtype_, rows, cols, Device::cuda);
}

void Weights::load_host(const ModelConfig& c) {
  embed = host_tensor("model.embed_tokens.weight");
  auto parts = [&](const std::vector<std::string>& w, const std::vector<std::string>& b) {
    std::vector<ops::LinearPart> r;
    for (size_t i = 0; i < w.size(); ++i)
      r.push_back({host_tensor(w[i]), b.empty() ? TensorView{} : host_tensor(b[i])});
    return r;
  };
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerNames n = layer_names(c, l);
    LayerWeights w;
    w.attn_norm = host_tensor(n.attn_norm);
    w.qkv = parts(n.qkv, n.qkv_bias);
    w.o = parts(n.o, n.o_bias);
    w.mlp_norm = host_tensor(n.mlp_norm);
    w.gate_up = parts(n.gate_up, n.gate_up_bias);
    w.down = parts(n.down, n.down_bias);
    layers.push_back(std::move(w));
  }
  final_norm = host_tensor("model.norm.weight");
  lm_head = c.tie_word_embeddings ? embed : host_tensor("lm_head.weight");
}

void Weights::load_device(const ModelConfig& c) {
  device_bytes_ = weights_bytes(c, dtype_);
  arena_ = ctx_->alloc(device_bytes_, "the model weights");
  embed = device_tensor({"model.embed_tokens.weight"});
  auto part = [&](const std::vector<std::string>& w, const std::vector<std::string>& b) {
    TensorView bias;
    if (!b.empty()) bias = device_tensor(b);  // [1, sum(out)]
    return std::vector<ops::LinearPart>{{device_tensor(w), bias}};
  };
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerNames n = layer_names(c, l);
    LayerWeights w;
    w.attn_norm = device_tensor({n.attn_norm});
    w.qkv = part(n.qkv, n.qkv_bias);
    w.o = part(n.o, n.o_bias);
    w.mlp_norm = device_tensor({n.mlp_norm});
    w.gate_up = part(n.gate_up, n.gate_up_bias);
    w.down = part(n.down, n.down_bias);
    layers.push_back(std::move(w));
  }
  final_norm = device_tensor({"model.norm.weight"});
  lm_head = c.tie_word_embeddings ? embed : device_tensor({"lm_head.weight"});
  std::vector<unsigned char>().swap(staging_);
}

}  // namespace cca::model

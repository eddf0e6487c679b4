#include "cca/variant.hpp"

#include <sstream>

#include "cca/error.hpp"
#include "cca/tensor.hpp"

namespace cca {

const char* variant_name(VariantKind k) {
  switch (k) {
    case VariantKind::full: return "full";
    case VariantKind::sliding: return "sliding";
    case VariantKind::streaming: return "streaming";
    case VariantKind::lminfinite: return "lminfinite";
    case VariantKind::cca: return "cca";
  }
  return "?";
}
const char* pool_name(PoolMode p) {
  switch (p) {
    case PoolMode::cca: return "cca";
    case PoolMode::mean: return "mean";
    case PoolMode::max: return "max";
  }
  return "?";
}
const char* pool_heads_name(PoolHeads h) { return h == PoolHeads::kv ? "kv" : "query"; }

VariantKind parse_variant(const std::string& s) {
  for (auto k : {VariantKind::full, VariantKind::sliding, VariantKind::streaming,
                 VariantKind::lminfinite, VariantKind::cca})
    if (s == variant_name(k)) return k;
  throw Error("unknown variant '" + s + "' (expected full, sliding, streaming, lminfinite or cca)");
}
PoolMode parse_pool(const std::string& s) {
  for (auto p : {PoolMode::cca, PoolMode::mean, PoolMode::max})
    if (s == pool_name(p)) return p;
  throw Error("unknown pool '" + s + "' (expected cca, mean or max)");
}
PoolHeads parse_pool_heads(const std::string& s) {
  if (s == "kv") return PoolHeads::kv;
  if (s == "query") return PoolHeads::query;
  throw Error("unknown pool_heads '" + s + "' (expected kv or query)");
}

void VariantSpec::validate() const {
  auto need = [](bool ok, const char* name, double value, const char* rule) {
    if (!ok) {
      std::ostringstream m;
      m << "invalid " << name << " = " << value << ": " << rule;
      throw Error(m.str());
    }
  };
  switch (kind) {
    case VariantKind::full: break;
    case VariantKind::sliding:
      need(window >= 1, "window", double(window), "must be >= 1");
      break;
    case VariantKind::streaming:
    case VariantKind::lminfinite:
      need(window >= 1, "window", double(window), "must be >= 1");
      need(sinks >= 0, "sinks", double(sinks), "must be >= 0");
      break;
    case VariantKind::cca:
      need(group >= 1, "group", double(group), "group size g must be >= 1");
      need(window >= 1, "window", double(window), "local window s must be >= 1");
      break;
  }
  need(std::isnan(scale) || (std::isfinite(scale) && scale > 0), "scale", scale,
       "must be finite and > 0");
}

std::string VariantSpec::describe() const {
  std::ostringstream o;
  o << variant_name(kind);
  switch (kind) {
    case VariantKind::full: break;
    case VariantKind::sliding: o << "(window=" << window << ")"; break;
    case VariantKind::streaming:
    case VariantKind::lminfinite: o << "(sinks=" << sinks << ", window=" << window << ")"; break;
    case VariantKind::cca:
      o << "(g=" << group << ", s=" << window << ", pool=" << pool_name(pool)
        << ", pool_heads=" << pool_heads_name(pool_heads) << ")";
      break;
  }
  return o.str();
}

std::string TensorView::shape_string() const {
  std::ostringstream o;
  o << "[";
  for (int i = 0; i < ndim; ++i) o << (i ? ", " : "") << shape[i];
  o << "]";
  return o.str();
}

TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = int(shape.size());
  check(v.ndim >= 1 && v.ndim <= 4, "make_view: 1 to 4 dimensions supported");
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.stride[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

}  // namespace cca

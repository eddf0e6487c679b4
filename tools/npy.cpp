#include "npy.hpp"

#include <unistd.h>

#include <bit>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <utility>

#include "cca/error.hpp"
#include "model/output_file.hpp"
#include "model/untrusted.hpp"

namespace cca {

static_assert(std::endian::native == std::endian::little, ".npy I/O assumes a little-endian host");

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
constexpr size_t kHeaderAlign = 64;  // NumPy aligns the data to 64 bytes; we do the same
constexpr size_t kMaxDims = 64;      // NPY_MAXDIMS of NumPy 2 (NumPy 1: 32)

// The dictionary of a .npy header, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// A Python literal; we accept exactly the keys NumPy writes and the value kinds they take.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& name) : s_(text), name_(name) {}

  struct Result {
    std::string descr;
    bool fortran_order = false;
    std::vector<int64_t> shape;
  };

  Result parse() {
    Result r;
    bool have_descr = false, have_order = false, have_shape = false;
    expect('{');
    while (true) {
      skip_ws();
      if (peek() == '}') break;
      std::string key = parse_string();
      expect(':');
      skip_ws();
      if (key == "descr") {
        if (peek() == '[')
          fail("structured dtypes are not supported (expected float32 or float16)");
        r.descr = parse_string();
        have_descr = true;
      } else if (key == "fortran_order") {
        r.fortran_order = parse_bool();
        have_order = true;
      } else if (key == "shape") {
        r.shape = parse_shape();
        have_shape = true;
      } else {
        fail("unexpected header key '" + model::excerpt(key) + "'");
      }
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      if (peek() == '}') break;
      fail("expected ',' or '}' in the header");
    }
    expect('}');
    skip_ws();
    if (i_ != s_.size()) fail("unexpected text after the header dictionary");
    if (!have_descr || !have_order || !have_shape)
      fail("header lacks one of the keys 'descr', 'fortran_order', 'shape'");
    return r;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    std::ostringstream m;
    m << name_ << ": bad .npy header: " << what << " (header: " << model::excerpt(s_, 200) << ")";
    throw Error(m.str());
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r'))
      ++i_;
  }
  void expect(char c) {
    skip_ws();
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string parse_string() {
    skip_ws();
    char q = peek();
    if (q != '\'' && q != '"') fail("expected a quoted string");
    size_t end = s_.find(q, i_ + 1);
    if (end == std::string_view::npos) fail("unterminated string");
    std::string r(s_.substr(i_ + 1, end - i_ - 1));
    i_ = end + 1;
    return r;
  }
  bool parse_bool() {
    for (bool value : {true, false}) {
      std::string_view word = value ? "True" : "False";
      if (s_.substr(i_, word.size()) == word) {
        i_ += word.size();
        return value;
      }
    }
    fail("fortran_order must be True or False");
  }
  std::vector<int64_t> parse_shape() {
    std::vector<int64_t> dims;
    expect('(');
    while (true) {
      skip_ws();
      if (peek() == ')') break;
      if (peek() < '0' || peek() > '9') fail("shape must be a tuple of non-negative integers");
      if (dims.size() == kMaxDims)
        fail("shape has more than " + std::to_string(kMaxDims) + " dimensions (NumPy's limit)");
      int64_t d = 0;
      while (peek() >= '0' && peek() <= '9') {
        if (d > (INT64_MAX - 9) / 10) fail("shape dimension too large");
        d = d * 10 + (s_[i_++] - '0');
      }
      if (peek() == 'L') ++i_;  // Python 2 long literal
      dims.push_back(d);
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      if (peek() != ')') fail("expected ',' or ')' in the shape");
    }
    ++i_;
    return dims;
  }

  std::string_view s_;
  const std::string& name_;
  size_t i_ = 0;
};

std::string dims_string(const std::vector<int64_t>& shape) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < shape.size(); ++i) o << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) o << ",";
  o << ")";
  return o.str();
}

// Product of the dimensions times the item size, or -1 on overflow.
int64_t byte_count(const std::vector<int64_t>& shape, int64_t item) {
  int64_t n = item;
  for (int64_t d : shape)
    if (__builtin_mul_overflow(n, d, &n)) return -1;
  return n;
}

uint32_t read_le(const std::byte* p, int bytes) {
  uint32_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | uint32_t(p[i]);
  return v;
}

}  // namespace

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Short even for a 64-dimensional shape: it appears in error messages.
std::string NpyArray::shape_string() const { return model::excerpt(dims_string(shape), 120); }

TensorView NpyArray::view() {
  check(!shape.empty() && shape.size() <= 4,
        "arrays of 1 to 4 dimensions are supported, got shape " + shape_string());
  TensorView v;
  v.data = data.data();
  v.dtype = dtype;
  v.ndim = int(shape.size());
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = shape[size_t(d)];
    v.stride[d] = stride;
    stride *= shape[size_t(d)];
  }
  return v;
}

NpyArray make_npy_array(DType dtype, std::vector<int64_t> shape) {
  NpyArray a;
  a.dtype = dtype;
  a.shape = std::move(shape);
  int64_t bytes = byte_count(a.shape, dtype_size(dtype));
  check(bytes >= 0, "array of shape " + a.shape_string() + " is too large");
  // A command holds an array and its file bytes at once: more than half the memory would end
  // with the process killed, not with an error.
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0)
    check(bytes <= int64_t(pages) * page / 2,
          "array of shape " + a.shape_string() + " needs " + std::to_string(bytes) +
              " bytes, more than half of this machine's memory (" +
              std::to_string(int64_t(pages) * page) + " bytes)");
  a.data.assign(size_t(bytes), std::byte{0});
  return a;
}

NpyArray parse_npy(std::span<const std::byte> bytes, const std::string& name) {
  if (bytes.size() < kMagicLen + 2 || std::memcmp(bytes.data(), kMagic, kMagicLen) != 0)
    throw Error(name + ": not a .npy file (missing the \\x93NUMPY magic)");
  const int major = int(bytes[6]), minor = int(bytes[7]);
  if (major < 1 || major > 3) {
    std::ostringstream m;
    m << name << ": unsupported .npy format version " << major << "." << minor
      << " (versions 1, 2 and 3 are supported)";
    throw Error(m.str());
  }
  const size_t len_bytes = major == 1 ? 2 : 4;
  const size_t preamble = kMagicLen + 2 + len_bytes;
  if (bytes.size() < preamble) throw Error(name + ": truncated .npy header");
  const size_t header_len = read_le(bytes.data() + kMagicLen + 2, int(len_bytes));
  if (bytes.size() < preamble + header_len) {
    std::ostringstream m;
    m << name << ": truncated .npy header: it declares " << header_len
      << " header bytes, the file has " << bytes.size() - preamble << " after the preamble";
    throw Error(m.str());
  }
  std::string_view text(reinterpret_cast<const char*>(bytes.data() + preamble), header_len);
  HeaderParser::Result h = HeaderParser(text, name).parse();

  NpyArray a;
  if (h.descr == "<f4") {
    a.dtype = DType::f32;
  } else if (h.descr == "<f2") {
    a.dtype = DType::f16;
  } else {
    throw Error(name + ": unsupported dtype '" + model::excerpt(h.descr) +
                "' (expected float32 '<f4' or float16 '<f2', little-endian)");
  }
  if (h.fortran_order)
    throw Error(name +
                ": Fortran-order arrays are not supported (save it in C order, "
                "e.g. numpy.ascontiguousarray)");
  a.shape = std::move(h.shape);
  const int64_t want = byte_count(a.shape, dtype_size(a.dtype));
  if (want < 0) throw Error(name + ": shape " + a.shape_string() + " is too large");
  const size_t have = bytes.size() - preamble - header_len;
  if (have != size_t(want)) {
    std::ostringstream m;
    m << name << ": " << (have < size_t(want) ? "truncated data" : "trailing bytes after the data")
      << ": shape " << a.shape_string() << " " << dtype_name(a.dtype) << " needs " << want
      << " data bytes, the file has " << have;
    throw Error(m.str());
  }
  const std::byte* p = bytes.data() + preamble + header_len;
  a.data.assign(p, p + want);
  return a;
}

NpyArray read_npy(const std::string& path) {
  // Only regular files: a FIFO or a device (/dev/zero) could block or never end.
  const std::string bytes = model::read_text_file(path, ".npy file", INT64_MAX);
  return parse_npy(std::as_bytes(std::span(bytes.data(), bytes.size())), path);
}

std::vector<std::byte> encode_npy(const TensorView& t) {
  check(t.device == Device::cpu, "encode_npy: the tensor must be in host memory");
  check(t.dtype != DType::bf16,
        "cannot write bfloat16 to .npy: NumPy has no bfloat16 dtype "
        "(convert to float32 or float16)");
  check(t.ndim >= 1 && t.ndim <= 4, "encode_npy: 1 to 4 dimensions supported");
  std::vector<int64_t> shape(t.shape, t.shape + t.ndim);
  std::ostringstream h;
  h << "{'descr': '" << (t.dtype == DType::f32 ? "<f4" : "<f2")
    << "', 'fortran_order': False, 'shape': " << dims_string(shape) << ", }";
  std::string header = h.str();
  // Version 1 stores the header length in 2 bytes; longer headers (very many dimensions) need 2.
  const auto padded_total = [&](size_t preamble) {
    return (preamble + header.size() + 1 + kHeaderAlign - 1) / kHeaderAlign * kHeaderAlign;
  };
  size_t len_bytes = 2;
  int version = 1;
  if (padded_total(kMagicLen + 4) - (kMagicLen + 4) > 65535) len_bytes = 4, version = 2;
  const size_t preamble = kMagicLen + 2 + len_bytes;
  const size_t total = padded_total(preamble);
  header.append(total - preamble - header.size() - 1, ' ');
  header.push_back('\n');

  const int64_t item = dtype_size(t.dtype);
  std::vector<std::byte> out(total + size_t(t.numel() * item));
  std::memcpy(out.data(), kMagic, kMagicLen);
  out[6] = std::byte(version);
  out[7] = std::byte(0);
  for (size_t i = 0; i < len_bytes; ++i) out[8 + i] = std::byte((header.size() >> (8 * i)) & 0xff);
  std::memcpy(out.data() + preamble, header.data(), header.size());

  // Gather in C order; the view may be strided (e.g. a slice).
  std::byte* dst = out.data() + total;
  int64_t s[4] = {1, 1, 1, 1}, st[4] = {0, 0, 0, 0};
  for (int d = 0; d < t.ndim; ++d) s[4 - t.ndim + d] = t.shape[d], st[4 - t.ndim + d] = t.stride[d];
  const bool rows_contiguous = st[3] == 1;
  for (int64_t a = 0; a < s[0]; ++a)
    for (int64_t b = 0; b < s[1]; ++b)
      for (int64_t c = 0; c < s[2]; ++c) {
        const int64_t base = a * st[0] + b * st[1] + c * st[2];
        if (rows_contiguous) {
          std::memcpy(dst, t.ptr(base), size_t(s[3] * item));
          dst += s[3] * item;
        } else {
          for (int64_t d = 0; d < s[3]; ++d, dst += item)
            std::memcpy(dst, t.ptr(base + d * st[3]), size_t(item));
        }
      }
  return out;
}

void write_npy(const std::string& path, const TensorView& t) {
  model::PendingFile f(path, encode_npy(t));
  f.commit();
}

}  // namespace cca

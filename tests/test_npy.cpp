// .npy reading and writing (tools/npy.cpp): round trips, header versions, rejection of every
// malformed input with a message naming the problem, atomic writes.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "cca/error.hpp"
#include "model/output_file.hpp"
#include "npy.hpp"
#include "output_path.hpp"
#include "temp_dir.hpp"

namespace cca {
namespace {

using Bytes = std::vector<std::byte>;

// A .npy file with the given header dictionary text (padded as NumPy pads it) and data bytes.
Bytes npy_file(const std::string& dict, const Bytes& data, int version = 1) {
  const size_t preamble = version == 1 ? 10 : 12;
  std::string header = dict;
  header.append(64 - (preamble + header.size() + 1) % 64, ' ');
  header.push_back('\n');
  Bytes out(preamble);
  std::memcpy(out.data(), "\x93NUMPY", 6);
  out[6] = std::byte(version);
  out[7] = std::byte(0);
  for (size_t i = 0; i < preamble - 8; ++i)
    out[8 + i] = std::byte((header.size() >> (8 * i)) & 0xff);
  for (char c : header) out.push_back(std::byte(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

Bytes float_bytes(std::vector<float> values) {
  Bytes b(values.size() * 4);
  std::memcpy(b.data(), values.data(), b.size());
  return b;
}

std::string error_of(const Bytes& file) {
  try {
    parse_npy(file, "x.npy");
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

NpyArray iota_array(DType dtype, std::vector<int64_t> shape) {
  NpyArray a = make_npy_array(dtype, std::move(shape));
  TensorView v = a.view();
  for (int64_t i = 0; i < v.numel(); ++i) v.store(i, 0.25f * float(i) - 3.f);
  return a;
}

TEST(Npy, ReadsAFileAsNumPyWritesIt) {
  // np.save(f, np.arange(3, dtype=np.float32)) with NumPy >= 1.23 (note the growth padding).
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
  header.append(20 + 40, ' ');
  header.push_back('\n');
  ASSERT_EQ(header.size(), 118u);
  Bytes file(10);
  std::memcpy(file.data(), "\x93NUMPY\x01\x00\x76\x00", 10);
  for (char c : header) file.push_back(std::byte(c));
  Bytes data = float_bytes({0.f, 1.f, 2.f});
  file.insert(file.end(), data.begin(), data.end());

  NpyArray a = parse_npy(file, "arange.npy");
  EXPECT_EQ(a.dtype, DType::f32);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{3}));
  EXPECT_EQ(a.data, data);
}

TEST(Npy, RoundTripFloat32InMemory) {
  NpyArray a = iota_array(DType::f32, {2, 3, 4, 5});
  Bytes file = encode_npy(a.view());
  EXPECT_EQ(std::memcmp(file.data(), "\x93NUMPY\x01\x00", 8), 0);
  EXPECT_EQ((file.size() - a.data.size()) % 64, 0u) << "data must start 64-byte aligned";
  NpyArray b = parse_npy(file, "a.npy");
  EXPECT_EQ(b.dtype, DType::f32);
  EXPECT_EQ(b.shape, a.shape);
  EXPECT_EQ(b.data, a.data);
}

TEST(Npy, RoundTripFloat16ThroughAFile) {
  test::TempDir dir;
  NpyArray a = iota_array(DType::f16, {7, 3});
  write_npy(dir.file("h.npy"), a.view());
  NpyArray b = read_npy(dir.file("h.npy"));
  EXPECT_EQ(b.dtype, DType::f16);
  EXPECT_EQ(b.shape, a.shape);
  EXPECT_EQ(b.data, a.data);
  EXPECT_FLOAT_EQ(b.view().load(5), 0.25f * 5 - 3.f);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"h.npy"}) << "no temporary file may remain";
}

TEST(Npy, OneDimensionalShapeIsWrittenAsATuple) {
  NpyArray a = iota_array(DType::f32, {5});
  Bytes file = encode_npy(a.view());
  std::string text(reinterpret_cast<const char*>(file.data()), file.size());
  EXPECT_NE(text.find("'shape': (5,)"), std::string::npos) << text.substr(0, 80);
  EXPECT_EQ(parse_npy(file, "a.npy").shape, (std::vector<int64_t>{5}));
}

TEST(Npy, StridedViewIsWrittenInCOrder) {
  NpyArray a = iota_array(DType::f32, {2, 6, 3, 4});
  TensorView slice = a.view().slice(1, 2, 3);  // rows 2..4 of dimension 1
  NpyArray b = parse_npy(encode_npy(slice), "s.npy");
  ASSERT_EQ(b.shape, (std::vector<int64_t>{2, 3, 3, 4}));
  TensorView bv = b.view(), av = a.view();
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t h = 0; h < 3; ++h)
        for (int64_t d = 0; d < 4; ++d)
          ASSERT_EQ(bv.load(bv.offset(i, t, h, d)), av.load(av.offset(i, t + 2, h, d)));
}

TEST(Npy, ReadsVersion2And3Headers) {
  Bytes data = float_bytes({1.f, 2.f, 3.f, 4.f, 5.f, 6.f});
  for (int version : {2, 3}) {
    NpyArray a = parse_npy(
        npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", data, version),
        "v.npy");
    EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3})) << "version " << version;
    EXPECT_EQ(a.data, data) << "version " << version;
  }
}

TEST(Npy, AcceptsOtherKeyOrderAndQuoting) {
  Bytes data = float_bytes({1.f, 2.f});
  NpyArray a = parse_npy(
      npy_file("{\"shape\": (1,2), \"fortran_order\": False, \"descr\": \"<f4\"}", data), "q.npy");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{1, 2}));
}

TEST(Npy, RejectsMalformedFilesNamingTheProblem) {
  const Bytes four = float_bytes({1.f, 2.f, 3.f, 4.f});
  const std::string ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
  Bytes good = npy_file(ok, four);
  ASSERT_EQ(error_of(good), "(no error)");

  struct Case {
    const char* what;
    Bytes file;
    const char* message;
  };
  Bytes truncated_data(good.begin(), good.end() - 3);
  Bytes trailing = good;
  trailing.push_back(std::byte{0});
  Bytes bad_magic = good;
  bad_magic[1] = std::byte{'X'};
  Bytes version4 = good;
  version4[6] = std::byte{4};
  Bytes short_header(good.begin(), good.begin() + 40);
  std::vector<Case> cases = {
      {"empty file", {}, "not a .npy file"},
      {"bad magic", bad_magic, "not a .npy file"},
      {"version 4", version4, "unsupported .npy format version 4"},
      {"truncated header", short_header, "truncated .npy header"},
      {"truncated data", truncated_data, "truncated data"},
      {"trailing bytes", trailing, "trailing bytes"},
      {"float64", npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", four),
       "unsupported dtype '<f8'"},
      {"big endian", npy_file("{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }", four),
       "unsupported dtype '>f4'"},
      {"bytes", npy_file("{'descr': '|u1', 'fortran_order': False, 'shape': (16,), }", four),
       "unsupported dtype '|u1'"},
      {"fortran", npy_file("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", four),
       "Fortran-order"},
      {"structured",
       npy_file("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4,), }", four),
       "structured dtypes"},
      {"missing key", npy_file("{'descr': '<f4', 'shape': (4,), }", four), "lacks one of the keys"},
      {"extra key",
       npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'x': 1}", four),
       "unexpected header key 'x'"},
      {"negative dim", npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (-4,), }", four),
       "non-negative integers"},
      {"not a dict", npy_file("hello", four), "expected '{'"},
      {"huge shape",
       npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
                four),
       "too large"},
  };
  for (const Case& c : cases) {
    std::string err = error_of(c.file);
    EXPECT_NE(err.find(c.message), std::string::npos) << c.what << ": " << err;
    EXPECT_EQ(err.rfind("x.npy", 0), 0u) << c.what << ": the message must name the file: " << err;
  }
}

TEST(Npy, TruncatedDataMessageGivesExpectedAndActualBytes) {
  Bytes file = npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
                        float_bytes({1.f, 2.f, 3.f}));
  std::string err = error_of(file);
  EXPECT_NE(err.find("needs 16 data bytes, the file has 12"), std::string::npos) << err;
}

TEST(Npy, MissingFileIsAnError) {
  test::TempDir dir;
  try {
    read_npy(dir.file("nope.npy"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nope.npy"), std::string::npos) << e.what();
  }
}

TEST(Npy, Bfloat16CannotBeWritten) {
  NpyArray a = make_npy_array(DType::bf16, {4});
  try {
    encode_npy(a.view());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bfloat16"), std::string::npos) << e.what();
  }
}

TEST(Npy, FailedWriteLeavesNoPartialOrTemporaryFile) {
  test::TempDir dir;
  NpyArray a = iota_array(DType::f32, {3});
  // The target is a directory: the rename fails after the temporary file was written.
  std::filesystem::create_directory(dir.file("out.npy"));
  EXPECT_THROW(write_npy(dir.file("out.npy"), a.view()), Error);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"out.npy"});
  EXPECT_TRUE(std::filesystem::is_directory(dir.file("out.npy")));
  // A missing directory fails before anything is written.
  EXPECT_THROW(write_npy(dir.file("missing/out.npy"), a.view()), Error);
  EXPECT_THROW(check_outputs({}, {{"--out", dir.file("missing/out.npy")}}), Error);
  EXPECT_THROW(check_outputs({}, {{"--out", dir.file("out.npy")}}), Error);
  EXPECT_NO_THROW(check_outputs({}, {{"--out", dir.file("new.npy")}}));
}

TEST(Npy, UncommittedPendingFileIsRemovedAndCommitReplaces) {
  test::TempDir dir;
  const std::string path = dir.file("o.npy");
  { std::ofstream(path) << "old"; }
  NpyArray a = iota_array(DType::f32, {3});
  Bytes bytes = encode_npy(a.view());
  { model::PendingFile f(path, bytes); }  // abandoned: e.g. a later step failed
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"o.npy"});
  EXPECT_EQ(std::filesystem::file_size(path), 3u) << "the old file must be untouched";
  {
    model::PendingFile f(path, bytes);
    f.commit();
  }
  EXPECT_EQ(read_npy(path).data, a.data);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"o.npy"});
}

}  // namespace
}  // namespace cca

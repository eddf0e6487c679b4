// Checkpoint loading: safetensors files the test writes itself (a tiny Llama), then damages.
// Each problem must be a cca::Error whose message names the file, tensor or field at fault.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "cca/error.hpp"
#include "model/random_model.hpp"
#include "model/safetensors.hpp"
#include "model/weights.hpp"
#include "temp_dir.hpp"
#include "test_model_util.hpp"

namespace cca {
namespace {

namespace fs = std::filesystem;

// 1 layer, hidden 16, 2 heads of 8 (1 kv head), MLP 24, vocab 20.
model::ModelConfig tiny_config() { return model::small_llama_config(1, 16, 2, 1, 24, 20, 128); }

// Every tensor of `cfg` as float32 with distinct values; callers edit the list before writing.
struct TensorSet {
  std::vector<std::vector<float>> storage;
  std::vector<model::TensorBytes> list;

  explicit TensorSet(const model::ModelConfig& cfg) {
    const auto expected = model::expected_tensors(cfg);
    storage.reserve(expected.size() + 4);
    for (const auto& e : expected) add(e.name, e.shape);
  }
  void add(const std::string& name, const std::vector<int64_t>& shape, const char* dtype = "F32") {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      v[size_t(i)] = 0.01f * float((i * 7 + storage.size()) % 13) - 0.05f;
    storage.push_back(std::move(v));
    list.push_back({name, dtype, shape, storage.back().data(), n * 4});
  }
  model::TensorBytes* find(const std::string& name) {
    for (auto& t : list)
      if (t.name == name) return &t;
    return nullptr;
  }
  void remove(const std::string& name) {
    for (size_t i = 0; i < list.size(); ++i)
      if (list[i].name == name) list.erase(list.begin() + ptrdiff_t(i));
  }
};

class ModelCheckpoint : public ::testing::Test {
 protected:
  // A model directory with config.json and `tensors` in model.safetensors.
  std::string write_model(const TensorSet& tensors, const std::string& name = "m") {
    const std::string d = dir_.file(name);
    fs::create_directories(d);
    test::write_file(d + "/config.json", model::model_config_json(tiny_config()));
    model::write_safetensors(d + "/model.safetensors", tensors.list);
    return d;
  }
  // Loading `model_dir` must fail with a message holding every one of `needles`.
  void expect_load_error(const std::string& model_dir, std::initializer_list<std::string> needles) {
    try {
      engine::Engine m(model_dir, test::cpu_options(VariantSpec::full(), 16));
      ADD_FAILURE() << "loaded " << model_dir;
    } catch (const Error& e) {
      for (const std::string& n : needles)
        EXPECT_NE(std::string(e.what()).find(n), std::string::npos)
            << "message '" << e.what() << "' does not name '" << n << "'";
    }
  }
  test::TempDir dir_;
};

TEST_F(ModelCheckpoint, WrittenModelLoads) {
  TensorSet t(tiny_config());
  const std::string d = write_model(t);
  engine::Engine e(d, test::cpu_options(VariantSpec::full(), 16));
  const model::Model& m = e.model();
  EXPECT_EQ(m.weights().parameter_count(),
            20 * 16 * 2 + 16 * 3 + 16 * 16 * 2 + 8 * 16 * 2 + 3 * 24 * 16);
  EXPECT_EQ(m.weights().layers.size(), 1u);
}

TEST_F(ModelCheckpoint, TruncatedFileNamesTheTensor) {
  TensorSet t(tiny_config());
  const std::string d = write_model(t);
  const std::string f = d + "/model.safetensors";
  fs::resize_file(f, fs::file_size(f) - 10);
  expect_load_error(d, {"truncated", "lm_head.weight", f});
  fs::resize_file(f, 5);  // not even the header length
  expect_load_error(d, {"truncated", f});
}

TEST_F(ModelCheckpoint, HeaderLengthBeyondTheFile) {
  TensorSet t(tiny_config());
  const std::string d = write_model(t);
  std::fstream io(d + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
  const unsigned char len[8] = {0, 0, 0, 0, 1, 0, 0, 0};  // 2^32 bytes
  io.write(reinterpret_cast<const char*>(len), 8);
  io.close();
  expect_load_error(d, {"header length 4294967296", "beyond the end"});
}

TEST_F(ModelCheckpoint, BadHeaderJson) {
  TensorSet t(tiny_config());
  const std::string d = write_model(t);
  std::fstream io(d + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
  io.seekp(8 + 1);
  io.write("#", 1);  // the header's first key loses its quote
  io.close();
  expect_load_error(d, {"bad safetensors header", "not valid JSON"});
}

TEST_F(ModelCheckpoint, MissingTensorIsNamed) {
  TensorSet t(tiny_config());
  t.remove("model.layers.0.mlp.up_proj.weight");
  expect_load_error(write_model(t), {"missing", "model.layers.0.mlp.up_proj.weight"});
}

TEST_F(ModelCheckpoint, MisshapedTensorIsNamed) {
  TensorSet t(tiny_config());
  t.remove("model.layers.0.self_attn.k_proj.weight");
  t.add("model.layers.0.self_attn.k_proj.weight", {16, 16});
  expect_load_error(write_model(t), {"mis-shaped", "model.layers.0.self_attn.k_proj.weight",
                                     "[16, 16]", "[8, 16]"});
}

TEST_F(ModelCheckpoint, UnsupportedDtypeIsNamed) {
  TensorSet t(tiny_config());
  t.find("model.norm.weight")->dtype = "I32";  // same byte count as F32
  expect_load_error(write_model(t), {"model.norm.weight", "unsupported dtype I32"});
  TensorSet u(tiny_config());
  u.add("model.extra.counts", {4}, "F64");  // 8 bytes each: the byte count must match too
  u.list.back().nbytes = 32;
  std::vector<double> d(4, 1.0);
  u.list.back().data = d.data();
  expect_load_error(write_model(u, "f64"), {"model.extra.counts", "unsupported dtype F64"});
}

TEST_F(ModelCheckpoint, ExtraTensorIsNamed) {
  TensorSet t(tiny_config());
  t.add("model.layers.3.self_attn.q_proj.weight", {16, 16});
  expect_load_error(write_model(t), {"unexpected", "model.layers.3.self_attn.q_proj.weight"});
  TensorSet ok(tiny_config());  // old exports' rotary buffers are ignored
  ok.add("model.layers.0.self_attn.rotary_emb.inv_freq", {4});
  EXPECT_NO_THROW(engine::Engine(write_model(ok, "inv_freq"), test::cpu_options(VariantSpec::full(), 16)));
}

TEST_F(ModelCheckpoint, OffsetsThatDisagreeWithTheShape) {
  TensorSet t(tiny_config());
  t.find("model.norm.weight")->shape = {8};  // 32 bytes of data for a shape of 8 floats
  t.find("model.norm.weight")->nbytes = 64;
  expect_load_error(write_model(t), {"model.norm.weight", "data_offsets", "needs 32"});
}

TEST_F(ModelCheckpoint, ShardsWithAnIndex) {
  TensorSet t(tiny_config());
  const std::string single = write_model(t, "single");
  const std::string d = dir_.file("sharded");
  fs::create_directories(d);
  test::write_file(d + "/config.json", model::model_config_json(tiny_config()));
  // The first half of the tensors in one shard, the rest in another.
  const size_t half = t.list.size() / 2;
  std::vector<model::TensorBytes> a(t.list.begin(), t.list.begin() + ptrdiff_t(half));
  std::vector<model::TensorBytes> b(t.list.begin() + ptrdiff_t(half), t.list.end());
  model::write_safetensors(d + "/model-00001-of-00002.safetensors", a);
  model::write_safetensors(d + "/model-00002-of-00002.safetensors", b);
  nlohmann::json index;
  for (const auto& x : a) index["weight_map"][x.name] = "model-00001-of-00002.safetensors";
  for (const auto& x : b) index["weight_map"][x.name] = "model-00002-of-00002.safetensors";
  test::write_file(d + "/model.safetensors.index.json", index.dump());

  engine::Engine ms(d, test::cpu_options(VariantSpec::full(), 16)),
      m1(single, test::cpu_options(VariantSpec::full(), 16));
  EXPECT_EQ(ms.model().weights().checkpoint().files().size(), 2u);
  const model::TokenIds ids = {1, 5, 19, 0, 7};
  EXPECT_EQ(test::run_logits(ms, ids), test::run_logits(m1, ids));

  // The index names a tensor's shard wrongly, then a shard that is not there.
  index["weight_map"][a[0].name] = "model-00002-of-00002.safetensors";
  test::write_file(d + "/model.safetensors.index.json", index.dump());
  expect_load_error(d, {"index places tensor " + a[0].name});
  index["weight_map"][a[0].name] = "model-00009-of-00009.safetensors";
  test::write_file(d + "/model.safetensors.index.json", index.dump());
  expect_load_error(d, {"shard model-00009-of-00009.safetensors", "not found"});
  test::write_file(d + "/model.safetensors.index.json", "{\"weight_map\": ");
  expect_load_error(d, {"model.safetensors.index.json", "not valid JSON"});
}

TEST_F(ModelCheckpoint, MissingFiles) {
  expect_load_error(dir_.file("nowhere"), {"model directory not found", "nowhere"});
  const std::string d = dir_.file("empty");
  fs::create_directories(d);
  expect_load_error(d, {"config.json not found"});
  test::write_file(d + "/config.json", model::model_config_json(tiny_config()));
  expect_load_error(d, {"no model.safetensors"});
}

}  // namespace
}  // namespace cca

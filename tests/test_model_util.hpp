// Helpers of the model-runtime tests: the Hugging Face fixtures of tests/data/models (made by
// scripts/make_model_fixtures.py), the parity measure, NLL from logits, small checkpoints.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "engine/engine.hpp"
#include "npy.hpp"

namespace cca::test {

inline std::string model_fixture_dir(const std::string& name) {
  return std::string(CCA_SOURCE_DIR) + "/tests/data/models/" + name;
}

struct ModelFixture {
  std::string dir;
  nlohmann::json ref;  // reference.json
  model::TokenIds prompt;
  std::vector<int32_t> greedy_full, greedy_cca;
  VariantSpec cca;  // the CCA parameters the fixture used
};

inline ModelFixture load_model_fixture(const std::string& name) {
  ModelFixture f;
  f.dir = model_fixture_dir(name);
  std::ifstream in(f.dir + "/reference.json");
  EXPECT_TRUE(in.good()) << "missing fixture " << f.dir;
  f.ref = nlohmann::json::parse(in);
  f.prompt = f.ref["prompt_ids"].get<std::vector<int32_t>>();
  f.greedy_full = f.ref["greedy_full"].get<std::vector<int32_t>>();
  f.greedy_cca = f.ref["greedy_cca"].get<std::vector<int32_t>>();
  f.cca =
      VariantSpec::cca(f.ref["cca"]["group"].get<int64_t>(), f.ref["cca"]["window"].get<int64_t>());
  return f;
}

// Float32 [T, V] logits from a fixture .npy file.
inline std::vector<float> read_logits(const std::string& path, int64_t* rows, int64_t* cols) {
  NpyArray a = read_npy(path);
  EXPECT_EQ(a.shape.size(), 2u);
  *rows = a.shape[0];
  *cols = a.shape[1];
  std::vector<float> v(size_t(a.numel()));
  const TensorView view = a.view();
  for (int64_t i = 0; i < a.numel(); ++i) v[size_t(i)] = view.load(i);
  return v;
}

// The parity measure of the model tests: max |ours - ref| / max |ref|.
inline double relative_max_diff(const std::vector<float>& ours, const std::vector<float>& ref) {
  EXPECT_EQ(ours.size(), ref.size());
  double diff = 0, scale = 0;
  for (size_t i = 0; i < std::min(ours.size(), ref.size()); ++i) {
    const double d = std::fabs(double(ours[i]) - double(ref[i]));
    diff = std::isnan(d) ? INFINITY : std::max(diff, d);
    scale = std::max(scale, std::fabs(double(ref[i])));
  }
  return diff / scale;
}

// Mean next-token NLL of ids under logits [T, V] (row t predicts ids[t + 1]), in float64.
inline double mean_nll_from_logits(const std::vector<float>& logits, int64_t V,
                                   const model::TokenIds& ids) {
  double sum = 0;
  for (size_t t = 0; t + 1 < ids.size(); ++t) {
    const float* row = logits.data() + t * size_t(V);
    const double mx = *std::max_element(row, row + V);
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(double(row[v]) - mx);
    sum += std::log(z) + mx - double(row[ids[t + 1]]);
  }
  return sum / double(ids.size() - 1);
}

// Engine options for the CPU with one thread (ctest runs tests side by side on few cores).
inline engine::EngineOptions cpu_options(const VariantSpec& v, int64_t chunk, int threads = 1) {
  engine::EngineOptions o;
  o.device = engine::DeviceChoice::cpu;
  o.variant = v;
  o.chunk = chunk;
  o.threads = threads;
  return o;
}

// Feeds ids into `seq` in the engine's chunks; `each_chunk(row0, rows)` after each step.
template <class Fn>
void feed(engine::Engine& e, engine::Sequence& seq, const model::TokenIds& ids, Fn each_chunk) {
  model::TokenIds part;
  engine::Sequence* s = &seq;
  for (size_t r0 = 0; r0 < ids.size(); r0 += size_t(e.chunk())) {
    part.assign(ids.begin() + int64_t(r0),
                ids.begin() + int64_t(std::min(ids.size(), r0 + size_t(e.chunk()))));
    const model::TokenIds* t = &part;
    e.step(std::span(&s, 1), std::span(&t, 1));
    each_chunk(int64_t(r0), int64_t(part.size()));
  }
}

// All logits [n, V] of `ids` through a fresh sequence, float32 on the host.
inline std::vector<float> run_logits(engine::Engine& e, const model::TokenIds& ids) {
  auto seq = e.new_sequence(int64_t(ids.size()));
  const int64_t V = e.config().vocab_size;
  std::vector<float> out(ids.size() * size_t(V)), block;
  feed(e, *seq, ids, [&](int64_t row0, int64_t rows) {
    for (int64_t b = 0; b < rows; b += 32) {
      std::vector<int32_t> r;
      for (int64_t i = b; i < std::min(rows, b + 32); ++i) r.push_back(int32_t(i));
      e.logits(r, block);
      std::copy(block.begin(), block.end(), out.begin() + (row0 + b) * V);
    }
  });
  return out;
}

inline void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline std::string ids_text(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return s;
}

}  // namespace cca::test

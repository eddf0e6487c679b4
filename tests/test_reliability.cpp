// Untrusted inputs: every input committed under tests/data/fuzz/<target>/ (the fuzzers' seeds,
// and every input that ever crashed, hung or tripped a sanitizer) replayed through the fuzz
// targets of fuzz/targets.hpp; the limits and helpers of src/model/untrusted.hpp.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>

#include "cca/error.hpp"
#include "model/output_file.hpp"
#include "model/untrusted.hpp"
#include "output_path.hpp"
#include "targets.hpp"
#include "temp_dir.hpp"

namespace cca {
namespace {

namespace fs = std::filesystem;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

class FuzzReplay : public ::testing::TestWithParam<fuzz::Target> {};

// Each committed input runs to completion (a refused input is a cca::Error, which the target
// catches; anything else fails the test or aborts it) and quickly: a hang in the fuzzer's terms
// is over 10 s, and these inputs are small.
TEST_P(FuzzReplay, EveryCommittedInputRunsCleanly) {
  const fuzz::Target t = GetParam();
  const fs::path dir = fs::path(CCA_SOURCE_DIR) / "tests/data/fuzz" / t.name;
  ASSERT_TRUE(fs::is_directory(dir)) << dir;
  int inputs = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string bytes = slurp(e.path());
    const auto start = std::chrono::steady_clock::now();
    EXPECT_NO_THROW(t.run(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()))
        << e.path();
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(s, 10.0) << e.path() << " took " << s << " s";
    ++inputs;
  }
  EXPECT_GT(inputs, 0) << "no seeds in " << dir;
}

INSTANTIATE_TEST_SUITE_P(Targets, FuzzReplay, ::testing::ValuesIn(fuzz::targets()),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Untrusted, JsonNestingIsBoundedBeforeTheDocumentIsBuilt) {
  const std::string ok = std::string(model::kMaxJsonDepth, '[') + std::string(model::kMaxJsonDepth, ']');
  EXPECT_EQ(model::parse_json(ok, "x").size(), 1u);
  const std::string deep = "[" + ok + "]";
  EXPECT_NE(error_of([&] { model::parse_json(deep, "f.json"); })
                .find("f.json: JSON nested deeper than 64 levels (at byte 64)"),
            std::string::npos);
  // Brackets inside strings (escaped quotes included) do not count.
  const std::string in_string = "[\"\\\"" + std::string(1000, '[') + "\"]";
  EXPECT_EQ(model::parse_json(in_string, "x")[0].get<std::string>().size(), 1001u);
}

TEST(Untrusted, JsonErrorsNameTheFileAndStayShort) {
  const std::string big = "[\"" + std::string(100000, 'x');  // unterminated: the parser quotes it
  const std::string msg = error_of([&] { model::parse_json(big, "f.json"); });
  EXPECT_EQ(msg.rfind("f.json: not valid JSON: invalid JSON at line 1", 0), 0u) << msg;
  EXPECT_LT(msg.size(), 400u) << msg;
  EXPECT_NE(msg.find("bytes)"), std::string::npos) << msg;
  // A number beyond double: the library's out_of_range error, with the file named.
  const std::string num = error_of([&] { model::parse_json("{\"a\": 1e400}", "g.json"); });
  EXPECT_EQ(num.rfind("g.json: not valid JSON: ", 0), 0u) << num;
  EXPECT_NE(num.find("1e400"), std::string::npos) << num;
}

TEST(Untrusted, ExcerptsAreShortAndSayHowLongTheValueWas) {
  EXPECT_EQ(model::excerpt("short"), "short");
  EXPECT_EQ(model::excerpt(std::string(100, 'a'), 10), "aaaaaaaaaa... (100 bytes)");
  EXPECT_EQ(model::excerpt("a\x1b[2Jb\n"), "a\\x1B[2Jb\\x0A");  // no terminal escapes
  // Cut at a character boundary: "é" is two bytes.
  EXPECT_EQ(model::excerpt("aé", 2), "a... (3 bytes)");
  // The bound is on what is printed: escaped control bytes count 4 each (a fuzzer's find).
  EXPECT_EQ(model::excerpt(std::string(100, '\0'), 10), "\\x00\\x00... (100 bytes)");
  const nlohmann::json v = nlohmann::json::array({std::string(1000, 'z')});
  EXPECT_EQ(model::json_excerpt(v, 6), "[\"zzzz... (1004 bytes)");
}

TEST(Untrusted, ReadTextFileRefusesWhatIsNotARegularFileOrTooLarge) {
  test::TempDir dir;
  const std::string f = dir.file("a.json");
  { std::ofstream(f) << "0123456789"; }
  EXPECT_EQ(model::read_text_file(f, "thing"), "0123456789");
  EXPECT_NE(error_of([&] { model::read_text_file(f, "thing", 9); })
                .find("thing " + f + " is too large: 10 bytes, the limit is 9"),
            std::string::npos);
  EXPECT_NE(error_of([&] { model::read_text_file(dir.file("no"), "thing"); })
                .find("thing not found: " + dir.file("no")),
            std::string::npos);
  EXPECT_NE(error_of([&] { model::read_text_file(dir.path().string(), "thing"); })
                .find("it is a directory"),
            std::string::npos);
  // A FIFO without a writer: opening it must not block, and it is refused.
  const std::string fifo = dir.file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_NE(error_of([&] { model::read_text_file(fifo, "thing"); }).find("not a regular file"),
            std::string::npos);
  EXPECT_NE(error_of([&] { model::read_text_file("/dev/zero", "thing"); })
                .find("not a regular file"),
            std::string::npos);
}

// A directory of outputs (a random model) appears whole or not at all, and never over files.
TEST(Outputs, PendingDirAppearsWholeOrNotAtAll) {
  test::TempDir dir;
  const std::string target = dir.file("m");
  {
    model::PendingDir d(target);
    std::ofstream(d.staging() + "/a.txt") << "a";
  }  // abandoned: nothing is left
  EXPECT_TRUE(dir.entries().empty());
  {
    model::PendingDir d(target);
    std::ofstream(d.staging() + "/a.txt") << "a";
    d.commit();
  }
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"m"});
  EXPECT_EQ(slurp(target + "/a.txt"), "a");
  // Over a directory with files in it: refused, the old files untouched, no temporary left.
  model::PendingDir again(target);
  std::ofstream(again.staging() + "/b.txt") << "b";
  EXPECT_NE(error_of([&] { again.commit(); }).find("it exists and is not empty"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(target + "/b.txt"));
}

TEST(Outputs, NewOutputDirMustBeNewOrEmpty) {
  test::TempDir dir;
  EXPECT_NO_THROW(check_new_output_dir({"--save-model", dir.file("new")}));
  fs::create_directory(dir.file("empty"));
  EXPECT_NO_THROW(check_new_output_dir({"--save-model", dir.file("empty")}));
  std::ofstream(dir.file("file")) << "x";
  EXPECT_NE(error_of([&] { check_new_output_dir({"--save-model", dir.file("file")}); })
                .find("exists and is not a directory"),
            std::string::npos);
  EXPECT_NE(error_of([&] { check_new_output_dir({"--save-model", dir.path().string()}); })
                .find("is a directory that is not empty"),
            std::string::npos);
  EXPECT_NE(error_of([&] { check_new_output_dir({"--save-model", dir.file("no/m")}); })
                .find("does not exist"),
            std::string::npos);
}

}  // namespace
}  // namespace cca

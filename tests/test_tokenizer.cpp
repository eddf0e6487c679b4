// The tokenizer.json tokenizer against Hugging Face `tokenizers` (fixtures made by
// scripts/make_tokenizer_fixtures.py), its own invariants, and its errors.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "cca/error.hpp"
#include "temp_dir.hpp"
#include "tokenizer/tokenizer.hpp"
#include "tokenizer/unicode.hpp"

namespace {

using cca::tok::Tokenizer;
using nlohmann::json;

const std::string kDataDir = std::string(CCA_SOURCE_DIR) + "/tests/data/tokenizer/";
const char* const kFixtures[] = {"llama3_bl", "qwen2_bl", "spm_legacy", "spm_metaspace"};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const json& cases() {
  static const json j = json::parse(slurp(kDataDir + "cases.json"));
  return j;
}

const Tokenizer& fixture(const std::string& name) {
  static std::map<std::string, Tokenizer> loaded;
  auto it = loaded.find(name);
  if (it == loaded.end())
    it = loaded.emplace(name, Tokenizer::from_file(kDataDir + name + ".json")).first;
  return it->second;
}

std::vector<int32_t> ids_of(const json& a) { return a.get<std::vector<int32_t>>(); }

// Message of the cca::Error that `f` throws ("" if it throws none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const cca::Error& e) {
    return e.what();
  }
  return "";
}

class HfParity : public ::testing::TestWithParam<const char*> {};

TEST_P(HfParity, EncodeMatchesIdsExactly) {
  const Tokenizer& tok = fixture(GetParam());
  const json& c = cases()[GetParam()];
  ASSERT_GT(c["encode"].size(), 30u);
  for (const json& e : c["encode"]) {
    const std::string text = e["text"];
    EXPECT_EQ(tok.encode(text, true), ids_of(e["ids"])) << GetParam() << " text: " << text;
    EXPECT_EQ(tok.encode(text, false), ids_of(e["ids_no_special"]))
        << GetParam() << " text: " << text;
  }
}

TEST_P(HfParity, DecodeMatches) {
  const Tokenizer& tok = fixture(GetParam());
  const json& c = cases()[GetParam()];
  for (const json& e : c["encode"]) {
    const auto ids = ids_of(e["ids"]);
    EXPECT_EQ(tok.decode(ids, false), e["decoded"].get<std::string>())
        << GetParam() << " text: " << e["text"];
    EXPECT_EQ(tok.decode(ids, true), e["decoded_skip_special"].get<std::string>()) << GetParam();
  }
  ASSERT_GT(c["decode"].size(), 60u);
  for (const json& d : c["decode"]) {
    EXPECT_EQ(tok.decode(ids_of(d["ids"]), d["skip_special"].get<bool>()),
              d["text"].get<std::string>())
        << GetParam() << " ids: " << d["ids"].dump() << " skip_special: " << d["skip_special"];
  }
}

TEST_P(HfParity, VocabularyAndSpecialTokens) {
  const Tokenizer& tok = fixture(GetParam());
  const json& c = cases()[GetParam()];
  EXPECT_EQ(tok.vocab_size(), c["vocab_size"].get<int64_t>());
  for (const json& a : c["added"]) {
    const int32_t id = a["id"];
    EXPECT_EQ(tok.token_to_id(a["content"].get<std::string>()), id);
    EXPECT_EQ(tok.id_to_token(id), a["content"].get<std::string>());
    EXPECT_EQ(tok.is_special(id), a["special"].get<bool>()) << a["content"];
  }
  EXPECT_EQ(tok.token_to_id("no such token \x01"), -1);
  EXPECT_THROW(tok.id_to_token(static_cast<int32_t>(tok.vocab_size())), cca::Error);
  // Unknown ids are skipped by decode, as Hugging Face does.
  EXPECT_EQ(tok.decode({-5, static_cast<int32_t>(tok.vocab_size()) + 7}), "");
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfParity, ::testing::ValuesIn(kFixtures));

TEST(Tokenizer, BosAndEos) {
  const Tokenizer& llama = fixture("llama3_bl");
  EXPECT_EQ(llama.bos_id(), llama.token_to_id("<|begin_of_text|>"));
  EXPECT_EQ(llama.eos_id(), llama.token_to_id("<|end_of_text|>"));
  EXPECT_EQ(llama.encode("hi", true).front(), *llama.bos_id());
  const Tokenizer& qwen = fixture("qwen2_bl");
  EXPECT_FALSE(qwen.bos_id().has_value());
  EXPECT_EQ(qwen.eos_id(), qwen.token_to_id("<|endoftext|>"));
  const Tokenizer& spm = fixture("spm_legacy");
  EXPECT_EQ(spm.bos_id(), 1);
  EXPECT_EQ(spm.eos_id(), 2);
}

TEST(Tokenizer, TokenizerConfigNamesBosAndEos) {
  cca::test::TempDir dir;
  { std::ofstream(dir.file("tokenizer.json")) << slurp(kDataDir + "llama3_bl.json"); }
  {
    std::ofstream(dir.file("tokenizer_config.json")) << R"({"bos_token": "<|begin_of_text|>",
       "eos_token": {"content": "<|eot_id|>", "special": true}})";
  }
  const Tokenizer tok = Tokenizer::from_file(dir.file("tokenizer.json"));
  EXPECT_EQ(tok.eos_id(), tok.token_to_id("<|eot_id|>"));
  EXPECT_EQ(tok.bos_id(), tok.token_to_id("<|begin_of_text|>"));

  {
    std::ofstream(dir.file("tokenizer_config.json"))
        << R"({"bos_token": null, "eos_token": "<nope>"})";
  }
  const std::string msg = error_of([&] { Tokenizer::from_file(dir.file("tokenizer.json")); });
  EXPECT_NE(msg.find("eos_token '<nope>'"), std::string::npos) << msg;
  { std::ofstream(dir.file("tokenizer_config.json")) << "{oops"; }
  EXPECT_NE(error_of([&] {
              Tokenizer::from_file(dir.file("tokenizer.json"));
            }).find("tokenizer_config.json"),
            std::string::npos);
}

// Random valid UTF-8 drawn from many scripts, controls, whitespace, marks and astral planes.
std::string random_text(std::mt19937& rng, bool allow_markup) {
  static const std::pair<char32_t, char32_t> kRanges[] = {
      {0x20, 0x7E},       {0x09, 0x0D},        {0x00, 0x1F},     {0x80, 0xFF},     {0x300, 0x36F},
      {0x400, 0x4FF},     {0x600, 0x6FF},      {0x900, 0x97F},   {0x1100, 0x11FF}, {0x2000, 0x206F},
      {0x3000, 0x303F},   {0x4E00, 0x9FFF},    {0xAC00, 0xD7A3}, {0xE000, 0xF8FF}, {0xFB00, 0xFFFD},
      {0x1F300, 0x1FAFF}, {0x10000, 0x10FFFF}, {0x20, 0x20},
  };
  std::uniform_int_distribution<int> len(0, 40), pick(0, std::size(kRanges) - 1);
  std::string s;
  for (int n = len(rng); n > 0; --n) {
    const auto [lo, hi] = kRanges[pick(rng)];
    char32_t cp = std::uniform_int_distribution<uint32_t>(lo, hi)(rng);
    if (cp >= 0xD800 && cp < 0xE000) cp = 0xFFFD;
    if (!allow_markup && (cp == '<' || cp == '[' || cp == 0x2581)) cp = 'x';
    cca::tok::detail::append_utf8(s, cp);
  }
  return s;
}

TEST(Tokenizer, ByteLevelRoundTripsAnyText) {
  std::mt19937 rng(7);
  const Tokenizer& llama = fixture("llama3_bl");
  const Tokenizer& qwen = fixture("qwen2_bl");
  for (int k = 0; k < 400; ++k) {
    const std::string s = random_text(rng, false);
    ASSERT_EQ(llama.decode(llama.encode(s, false)), s) << "case " << k;
    ASSERT_EQ(llama.decode(llama.encode(s, true), true), s) << "case " << k;
    // Qwen2 normalizes to NFC first; that is what comes back.
    ASSERT_EQ(qwen.decode(qwen.encode(s, false)), cca::tok::detail::nfc(s)) << "case " << k;
  }
}

TEST(Tokenizer, ByteFallbackRoundTripsAnyText) {
  std::mt19937 rng(11);
  const Tokenizer& spm = fixture("spm_legacy");
  for (int k = 0; k < 300; ++k) {
    const std::string s = random_text(rng, false);
    ASSERT_EQ(spm.decode(spm.encode(s, true), true), s) << "case " << k;
  }
  // Without byte fallback unknown characters fuse into one <unk>.
  const Tokenizer& meta = fixture("spm_metaspace");
  const auto ids =
      meta.encode("\xE4\xB8\xAD\xE6\x96\x87\xE5\xAD\x97", false);  // three CJK ideographs
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(std::count(ids.begin(), ids.end(), meta.token_to_id("<unk>")), 1);
}

TEST(Tokenizer, EncodeIsThreadSafe) {
  const Tokenizer& tok = fixture("llama3_bl");
  std::vector<std::string> texts;
  for (const json& e : cases()["llama3_bl"]["encode"]) texts.push_back(e["text"]);
  std::vector<std::vector<int32_t>> expected;
  for (const auto& t : texts) expected.push_back(tok.encode(t));
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w)
    threads.emplace_back([&, w] {
      for (int rep = 0; rep < 20; ++rep)
        for (size_t k = 0; k < texts.size(); ++k) bad[w] += tok.encode(texts[k]) != expected[k];
    });
  for (auto& t : threads) t.join();
  for (int w = 0; w < 4; ++w) EXPECT_EQ(bad[w], 0);
}

TEST(Tokenizer, NfcNormalization) {
  using cca::tok::detail::nfc;
  EXPECT_EQ(nfc("cafe\xCC\x81"), "caf\xC3\xA9");                           // e + acute
  EXPECT_EQ(nfc("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");  // jamo -> 각
  EXPECT_EQ(nfc("\xE1\xB8\x8B\xCC\xA3"), "\xE1\xB8\x8D\xCC\x87");          // reordered marks
  EXPECT_EQ(nfc("\xE2\x84\xAB"), "\xC3\x85");                              // Angstrom sign
  EXPECT_EQ(nfc("\xE0\xA5\x98"), "\xE0\xA4\x95\xE0\xA4\xBC");              // excluded: qa
  EXPECT_EQ(nfc("\xCC\x81"
                "a"),
            "\xCC\x81"
            "a");  // leading mark
  EXPECT_EQ(nfc("plain ASCII"), "plain ASCII");
}

TEST(Tokenizer, LossyUtf8MatchesRust) {
  using cca::tok::detail::utf8_lossy;
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(utf8_lossy("a\xE4\xB8"
                       "b"),
            "a" + r + "b");  // truncated 3-byte sequence: one U+FFFD
  EXPECT_EQ(utf8_lossy("\xF0\x9F\x98"), r);
  EXPECT_EQ(utf8_lossy("\xC0\xAF"), r + r);          // overlong: each byte
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), r + r + r);  // surrogate: each byte
  EXPECT_EQ(utf8_lossy("\xFF"
                       "ok"),
            r + "ok");
}

// A tiny BPE tokenizer.json; `model`, `pre` etc. replace its parts.
json tiny(json model = nullptr) {
  json j = json::parse(R"({
    "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
    "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
    "model": {"type": "BPE", "dropout": null, "unk_token": null, "vocab": {"a": 0, "b": 1, "ab": 2},
              "merges": ["a b"]}})");
  if (!model.is_null()) j["model"] = model;
  return j;
}

TEST(Tokenizer, TinyModelWithoutDecoderJoinsWithSpaces) {
  const Tokenizer tok = Tokenizer::from_json(tiny().dump());
  EXPECT_EQ(tok.encode("abba"), (std::vector<int32_t>{2, 1, 0}));
  EXPECT_EQ(tok.decode({2, 1, 0}), "ab b a");
  EXPECT_EQ(tok.encode("xaz"), (std::vector<int32_t>{0}));  // no unk token: unknown chars vanish
}

// The crate's documented example: "the-final--countdown" split on '-' with each behavior.
TEST(Tokenizer, SplitBehaviors) {
  const std::vector<std::string> words = {"the",  "-",      "final",  "--",        "countdown",
                                          "the-", "final-", "-final", "-countdown"};
  json vocab = json::object();
  for (size_t k = 0; k < words.size(); ++k) vocab[words[k]] = k;
  const auto split = [&](const std::string& behavior, bool invert = false) {
    json j = tiny();
    j["model"]["vocab"] = vocab;
    j["model"]["merges"] = json::array();
    j["model"]["ignore_merges"] = true;  // whole pieces map to their ids
    j["pre_tokenizer"] = {{"type", "Split"},
                          {"pattern", {{"String", "-"}}},
                          {"behavior", behavior},
                          {"invert", invert}};
    std::vector<std::string> out;
    const Tokenizer tok = Tokenizer::from_json(j.dump());
    for (const int32_t id : tok.encode("the-final--countdown")) out.push_back(tok.id_to_token(id));
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(split("Removed"), (V{"the", "final", "countdown"}));
  EXPECT_EQ(split("Isolated"), (V{"the", "-", "final", "-", "-", "countdown"}));
  EXPECT_EQ(split("MergedWithPrevious"), (V{"the-", "final-", "-", "countdown"}));
  EXPECT_EQ(split("MergedWithNext"), (V{"the", "-final", "-", "-countdown"}));
  EXPECT_EQ(split("Contiguous"), (V{"the", "-", "final", "--", "countdown"}));
  EXPECT_EQ(split("Removed", true), (V{"-", "-", "-"}));
}

// PCRE2's match limit bounds one start position; the step budget bounds the whole text. Each run
// of 20 'a' stays under PCRE2's limit, and the 2,000 runs took 12.4 s before the budget (Release,
// docs/reliability.md).
TEST(Tokenizer, RegexBacktrackingIsBoundedOverTheWholeText) {
  json j = tiny();
  j["pre_tokenizer"] = {
      {"type", "Split"}, {"pattern", {{"Regex", "(a+)+$"}}}, {"behavior", "Isolated"}};
  const Tokenizer tok = Tokenizer::from_json(j.dump());
  std::string text;
  for (int i = 0; i < 2000; ++i) text += std::string(20, 'a') + "b";
  const std::string msg = error_of([&] { tok.encode(text); });
  EXPECT_NE(msg.find("regex '(a+)+$' failed to match: it backtracks too much on this text (more "
                     "than "),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("steps for a text of 42000 bytes"), std::string::npos) << msg;
  EXPECT_NO_THROW(tok.encode(std::string(20000, 'b')));  // where it does not backtrack
}

// The budget is far above what a real split pattern takes, on texts that make it work hardest.
TEST(Tokenizer, RegexBudgetLeavesRealPatternsAlone) {
  const Tokenizer& tok = fixture("llama3_bl");
  const auto repeat = [](const std::string& unit, size_t bytes) {
    std::string s;
    while (s.size() < bytes) s += unit;
    return s;
  };
  for (const std::string& unit : {std::string(" "), std::string("   x"), std::string("'S'"),
                                  std::string(" !"), std::string("!\n"), std::string("a1!"),
                                  std::string("7"), std::string(100, ' ') + "x"})
    EXPECT_NO_THROW(tok.encode(repeat(unit, 1 << 16) + "x")) << "unit '" << unit << "'";
}

TEST(Tokenizer, ErrorsNameTheProblem) {
  const auto load_error = [](const std::string& text) {
    return error_of([&] { Tokenizer::from_json(text); });
  };
  const auto expect_mentions = [](const std::string& msg, const std::string& what) {
    EXPECT_NE(msg.find(what), std::string::npos)
        << "message: '" << msg << "' lacks '" << what << "'";
  };
  expect_mentions(load_error("{ not json"), "invalid JSON");
  expect_mentions(load_error("[1, 2]"), "object");
  expect_mentions(load_error("{}"), "model");

  json j = tiny();
  j["model"]["type"] = "WordPiece";
  expect_mentions(load_error(j.dump()), "'WordPiece'");
  j["model"]["type"] = "Unigram";
  expect_mentions(load_error(j.dump()), "'Unigram'");

  j = tiny();
  j["model"].erase("merges");
  expect_mentions(load_error(j.dump()), "merges");
  j = tiny();
  j["model"]["merges"] = json::array({"a c"});
  expect_mentions(load_error(j.dump()), "'c' is not in the vocabulary");
  j["model"]["merges"] = json::array({"a b c"});
  expect_mentions(load_error(j.dump()), "merges[0]");
  j["model"]["merges"] = json::parse(R"([["a", "b"], 7])");
  expect_mentions(load_error(j.dump()), "merges[1]");
  j = tiny();
  j["model"]["vocab"]["a"] = -1;
  expect_mentions(load_error(j.dump()), "model.vocab");
  j = tiny();
  j["model"]["dropout"] = 0.1;
  expect_mentions(load_error(j.dump()), "dropout");

  j = tiny();
  j["normalizer"] = {{"type", "NFKC"}};
  expect_mentions(load_error(j.dump()), "'NFKC'");
  j = tiny();
  j["normalizer"] = json::parse(
      R"({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]})");
  expect_mentions(load_error(j.dump()),
                  "normalizer.normalizers[1]: unsupported normalizer type 'Lowercase'");
  j = tiny();
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect_mentions(load_error(j.dump()), "'Whitespace'");
  j = tiny();
  j["pre_tokenizer"] = {
      {"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  expect_mentions(load_error(j.dump()), "pre_tokenizer.pattern");
  j["pre_tokenizer"]["pattern"] = {{"Regex", "a"}};
  j["pre_tokenizer"]["behavior"] = "Sideways";
  expect_mentions(load_error(j.dump()), "Sideways");
  j = tiny();
  j["decoder"] = {{"type", "WordPiece"}};
  expect_mentions(load_error(j.dump()), "'WordPiece'");
  j = tiny();
  j["post_processor"] = json::parse(R"({"type": "TemplateProcessing", "special_tokens": {},
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}}]})");
  expect_mentions(load_error(j.dump()), "'<s>'");
  j = tiny();
  j["added_tokens"] = json::parse(R"([{"content": "x"}])");
  expect_mentions(load_error(j.dump()), "added_tokens[0]");
  j = tiny();
  j["version"] = "2.0";
  expect_mentions(load_error(j.dump()), "version");

  expect_mentions(error_of([] { Tokenizer::from_file("/nonexistent/dir/tokenizer.json"); }),
                  "/nonexistent/dir/tokenizer.json");

  const Tokenizer tok = Tokenizer::from_json(tiny().dump());
  expect_mentions(error_of([&] { tok.encode("ok \xC3("); }), "not valid UTF-8");

  j = tiny();
  j["model"]["unk_token"] = "<unk>";  // declared but absent: an error when it is needed
  const Tokenizer needs_unk = Tokenizer::from_json(j.dump());
  EXPECT_EQ(needs_unk.encode("ab"), (std::vector<int32_t>{2}));
  expect_mentions(error_of([&] { needs_unk.encode("z"); }), "unk_token '<unk>'");
}

}  // namespace

#!/usr/bin/env python3
"""Trains the small tokenizers behind the C++ tokenizer tests and records what Hugging Face
`tokenizers` makes of a set of test strings (tests/data/tokenizer/).

Needs the `tokenizers` package (run on a machine that has it; the CPU machine has no Python
tokenizers). Writes, into --out:
  llama3_bl.json      byte-level BPE, Llama-3 split regex, ignore_merges, TemplateProcessing bos,
                      special tokens after the model vocabulary (as Llama-3 has them)
  qwen2_bl.json       byte-level BPE, Qwen2 split regex, NFC normalizer, no bos, merges written
                      in the legacy "a b" string form
  spm_legacy.json     SentencePiece-style BPE as Llama-2's tokenizer.json: Prepend/Replace
                      normalizer, byte_fallback, fuse_unk, Replace/ByteFallback/Fuse/Strip decoder
  spm_metaspace.json  the same vocabulary behind a Metaspace(prepend_scheme first) pre-tokenizer,
                      no byte fallback (unknown characters fuse into <unk>), Metaspace decoder
  cases.json          per tokenizer: encode cases (ids with and without special tokens, decodes)
                      and decode cases (random id lists, per-token decodes)

Usage: python3 scripts/make_tokenizer_fixtures.py --out tests/data/tokenizer
"""
import argparse
import json
import os
import random
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Training text: English, code, several scripts, emoji, digits and whitespace runs.
CORPUS = """The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.
Attention is all you need, but core context aware attention needs less memory for long contexts.
We evaluate the model on long documents with thousands of tokens, and the results are good.
It's a tokenizer test: they're here, we've seen it, I'm sure you'll like it, he'd agree.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 365 1024 2048 4096 65536 3.14159 2.71828 1,000,000.
Dates like 2024-01-15 and times like 12:30:45 appear in logs, with ids like 0x1F and 0b1010.
def tokenize(text):
    words = text.split()
    return [w.lower() for w in words if w]

for (int i = 0; i < n; ++i) {
    total += values[i] * weights[i];
}
if x == None or y != 0: print("value:", x, y)   # comment
    indented    with    many    spaces		and	tabs
line one
line two


line after blank lines
Le café est très bon, la crème brûlée aussi. Naïve résumé, façade, jalapeño, Ångström, Straße.
Der schnelle braune Fuchs springt über den faulen Hund. Über alles, schön, größer, weiß.
El niño comió mañana en la montaña. ¿Dónde está la biblioteca? ¡Hola!
Съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир! Москва, Россия.
我们的模型可以处理很长的上下文。中文分词很有意思，你好世界！今天天气很好。
日本語のテキストも少し含めます。こんにちは、世界。東京は大きい都市です。
مرحبا بالعالم. هذه جملة باللغة العربية. شكرا جزيلا.
Γειά σου κόσμε. Ελληνικά γράμματα: α β γ δ ε.
हिन्दी में एक वाक्य। नमस्ते दुनिया।
Emoji: 😀 😃 😄 👍 👍🏽 ❤️ 🚀 🤖 🎉 👨‍👩‍👧‍👦 🇯🇵 🇫🇷
Punctuation: "quotes", 'single', (parens), [brackets], {braces}, <angle>, a/b, a\\b, a|b, a&b.
Typography: ’curly’ “double” — em dash – en dash … ellipsis • bullet © ® ™ € £ ¥ ° ± × ÷.
URLs: https://example.com/path?query=1&x=2#frag and emails like someone@example.org.
JSON: {"key": "value", "list": [1, 2, 3], "nested": {"a": true, "b": null}}
SHOUTING IN CAPITALS AND MiXeD CaSe WoRdS, camelCaseIdentifiers and snake_case_names.
"""

TEXTS = [
    "",
    " ",
    "   ",
    "\n",
    "Hello world",
    " Hello  world ",
    "Hello, World! How's it going? I'M FINE, they'RE here, we'VE gone, it'S, she'LL, he'D.",
    "The year 2024 had 365 days; pi is 3.14159 and 1234567890 has ten digits.",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines\n",
    "whitespace runs:     five, \t\t mixed \n \n end   ",
    "中文测试：你好，世界！这是一个分词器。",
    "Русский текст: Привет, мир! Ёжик в тумане.",
    "العربية: مرحبا بالعالم",
    "Accents: café, naïve, résumé, Ångström, façade, jalapeño, Straße",
    "Decomposed: cafe\u0301 nai\u0308ve A\u030angstro\u0308m",
    "Emoji: 😀 👍🏽 👨\u200d👩\u200d👧\u200d👦 🇯🇵 ❤️ 🤖",
    "def f(x):\n    return x**2 + 1  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Unicode spaces:\u00a0nbsp,\u3000ideographic,\u2009thin,\u0085nel,\u2028ls, \u00a0 \u3000",
    "<|begin_of_text|>Hello<|eot_id|> world<|end_of_text|>",
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<s>Hello</s> world <unk> <s> x",
    "Mixed [MASK] tokens <tool> and hello world inside",
    "  [MASK]  spaced\t[MASK]\n",
    "a<sep>b <sep> c <sep>",
    "supercalifragilistic expialidocious supercalifragilistic",
    " supercalifragilistic",
    "ﬁne ligature, ½ fraction, ℌ and Ⅻ numerals",
    "\u0000 control \u0007 chars \u001b[0m",
    "Zero\u200bwidth\u200djoiner",
    "’curly’ “quotes” — dash … ellipsis",
    "MiXeD CaSe WoRdS and UPPERCASE and lowercase",
    "x" * 300,
    "12345678901234567890 0.5 -17 1e10",
    "▁already▁has▁metaspace ▁",
    "café vs cafe\u0301 at the start",
    "cafe\u0301",
    "<0x41> looks like a byte token",
]


def mixed_paragraph(rng, n_lines):
    lines = [l for l in CORPUS.split("\n")]
    return "\n".join(rng.choice(lines) for _ in range(n_lines))


def train_byte_level(pattern, vocab_size, normalizer):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines() * 3, trainer=trainer)
    return tok


def corpus_lines():
    return [line + "\n" for line in CORPUS.split("\n")]


BYTE_ENCODER = None


def byte_level_string(text):
    """The ByteLevel pre-tokenizer's image of `text` (bytes mapped to printable characters)."""
    global BYTE_ENCODER
    if BYTE_ENCODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        BYTE_ENCODER = dict(zip(bs, [chr(c) for c in cs]))
    return "".join(BYTE_ENCODER[b] for b in text.encode("utf-8"))


def with_model_fields(tok, **fields):
    """Re-creates `tok` from its JSON with the given model fields set (and checks they stuck)."""
    j = json.loads(tok.to_str())
    j["model"].update(fields)
    tok = Tokenizer.from_str(json.dumps(j, ensure_ascii=False))
    back = json.loads(tok.to_str())["model"]
    for k, v in fields.items():
        assert back.get(k) == v, f"model field {k} did not stick: {back.get(k)!r}"
    return tok, j


def add_unreachable_words(tok, words):
    """Adds whole words to the model vocabulary with no merges that build them, so that
    ignore_merges changes how they encode."""
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for w in words:
        if w not in vocab:
            vocab[w] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(j, ensure_ascii=False))


def make_llama3():
    tok = train_byte_level(LLAMA3_PATTERN, 600, None)
    tok = add_unreachable_words(tok, [byte_level_string(" supercalifragilistic"),
                                      byte_level_string("supercalifragilistic")])
    tok, _ = with_model_fields(tok, ignore_merges=True)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|eot_id|>"])
    tok.add_special_tokens([AddedToken("[MASK]", lstrip=True, rstrip=True, normalized=False,
                                       special=True)])
    tok.add_tokens([AddedToken("<tool>", normalized=False, special=False),
                    AddedToken("hello world", normalized=True, special=False),
                    AddedToken("<sep>", single_word=True, normalized=False, special=False)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    return tok


def make_qwen2():
    tok = train_byte_level(QWEN2_PATTERN, 500, normalizers.NFC())
    tok = add_unreachable_words(tok, [byte_level_string(" supercalifragilistic")])
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens([AddedToken("café", normalized=True, special=False),
                    AddedToken("<tool>", normalized=False, special=False, lstrip=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Write the merges in the legacy "a b" string form (older tokenizer.json files have it).
    j = json.loads(tok.to_str())
    merges = j["model"]["merges"]
    j["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    try:
        legacy = Tokenizer.from_str(json.dumps(j, ensure_ascii=False))
        assert legacy.encode(CORPUS).ids == tok.encode(CORPUS).ids
        return legacy
    except Exception as e:  # keep the array form if this version refuses strings
        print("warning: legacy merges not accepted, keeping arrays:", e)
        return tok


def make_spm_models():
    """Trains one SentencePiece-style vocabulary and lays it out as Llama-2 does:
    <unk> <s> </s>, then <0x00>..<0xFF>, then the trained pieces."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always",
                                                  split=True)
    trainer = trainers.BpeTrainer(vocab_size=150, limit_alphabet=70, show_progress=False)
    base.train_from_iterator(corpus_lines() * 3, trainer=trainer)
    j = json.loads(base.to_str())
    trained = sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in j["model"]["merges"]]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = 3 + b
    for piece, _ in trained:
        if piece not in vocab:
            vocab[piece] = len(vocab)

    def build(byte_fallback, legacy):
        tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), unk_token="<unk>",
                                   byte_fallback=byte_fallback, fuse_unk=True))
        if legacy:
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                   normalizers.Replace(" ", "\u2581")])
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                         split=True)
            tok.decoder = decoders.Sequence([
                decoders.ByteFallback(),
                decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True),
                decoders.Fuse()])
        tok.add_special_tokens([AddedToken("<unk>", normalized=False, special=True),
                                AddedToken("<s>", normalized=False, special=True),
                                AddedToken("</s>", normalized=False, special=True)])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)])
        return tok

    return build(True, True), build(False, False)


def record(name, tok, rng):
    """Encodes every test string and decodes ids; returns the cases for `name`."""
    texts = list(TEXTS) + [mixed_paragraph(rng, 6) for _ in range(2)]
    encode_cases = []
    for text in texts:
        with_special = tok.encode(text, add_special_tokens=True).ids
        without = tok.encode(text, add_special_tokens=False).ids
        encode_cases.append({
            "text": text,
            "ids": with_special,
            "ids_no_special": without,
            "decoded": tok.decode(with_special, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(with_special, skip_special_tokens=True),
        })
    n = tok.get_vocab_size(with_added_tokens=True)
    decode_cases = []
    for _ in range(40):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
        for skip in (False, True):
            decode_cases.append({"ids": ids, "skip_special": skip,
                                 "text": tok.decode(ids, skip_special_tokens=skip)})
    # One token at a time: partial UTF-8 sequences come out as U+FFFD.
    for text in ("Emoji: 😀 👍🏽 🤖", "中文测试：你好", "Привет"):
        for i in tok.encode(text, add_special_tokens=False).ids:
            decode_cases.append({"ids": [i], "skip_special": False,
                                 "text": tok.decode([i], skip_special_tokens=False)})
    added = [{"content": t.content, "id": i, "special": bool(t.special)}
             for i, t in sorted(tok.get_added_tokens_decoder().items())]
    # A check of transformers' view of the same file, where it is installed.
    try:
        from transformers import PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast(tokenizer_object=tok)
        bad = [c["text"] for c in encode_cases
               if hf.encode(c["text"], add_special_tokens=False) != c["ids_no_special"]]
        print(f"{name}: transformers agrees on {len(encode_cases) - len(bad)}/{len(encode_cases)}")
    except Exception as e:  # noqa: BLE001 - informational only
        print(f"{name}: transformers check skipped ({type(e).__name__}: {e})")
    return {"vocab_size": n, "added": added, "encode": encode_cases, "decode": decode_cases}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import tokenizers
    print("tokenizers", tokenizers.__version__, "python", sys.version.split()[0])

    spm_legacy, spm_metaspace = make_spm_models()
    built = {
        "llama3_bl": make_llama3(),
        "qwen2_bl": make_qwen2(),
        "spm_legacy": spm_legacy,
        "spm_metaspace": spm_metaspace,
    }
    rng = random.Random(20250101)
    cases = {"tokenizers_version": tokenizers.__version__}
    for name, tok in built.items():
        text = tok.to_str()
        path = os.path.join(args.out, name + ".json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        # Record with the tokenizer as it is read back from the file the tests read.
        reread = Tokenizer.from_file(path)
        cases[name] = record(name, reread, rng)
        print(f"{name}: {os.path.getsize(path)} bytes, vocab {cases[name]['vocab_size']}")
    path = os.path.join(args.out, "cases.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, separators=(",", ":"))
    print(f"cases.json: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()

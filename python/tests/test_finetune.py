"""cca.finetune's arguments, data files and output handling (the parts that need no
transformers; bench/gpu_python.sh runs the whole command on a GPU)."""
import importlib.util
import io
import json
import os
import tempfile
import unittest
from contextlib import redirect_stderr

import torch

from cca import finetune as ft

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


class Workspace(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.dir = self._tmp.name
        self.model = os.path.join(self.dir, "model")
        os.makedirs(self.model)
        self.config = dict(model_type="llama", vocab_size=100, hidden_size=32,
                           num_attention_heads=2, eos_token_id=2)
        self.write("model/config.json", json.dumps(self.config))

    def tearDown(self):
        self._tmp.cleanup()

    def write(self, name, text, mode="w"):
        path = os.path.join(self.dir, name)
        with open(path, mode) as f:
            f.write(text)
        return path

    def main(self, *argv):
        err = io.StringIO()
        with redirect_stderr(err):
            status = ft.main(list(argv))
        return status, err.getvalue()


class Arguments(Workspace):
    def args(self, *extra):
        return ["--model", self.model, "--data", "x.ids", "--seq-len", "8", "--steps", "1",
                "--out", os.path.join(self.dir, "out"), *extra]

    def test_numbers_are_checked(self):
        for extra, text in ((["--seq-len", "0"], "--seq-len = 0 must be >= 1"),
                            (["--group", "0"], "--group = 0"),
                            (["--lr", "0"], "--lr = 0.0 must be a finite number > 0"),
                            (["--lr", "nan"], "--lr = nan"),
                            (["--warmup-steps", "-1"], "--warmup-steps = -1"),
                            (["--max-grad-norm", "-1"], "--max-grad-norm = -1.0")):
            with self.subTest(extra=extra):
                status, err = self.main(*self.args(*extra))
                self.assertEqual(status, 2)
                self.assertIn(text, err)

    def test_model_folder_is_checked(self):
        os.remove(os.path.join(self.model, "config.json"))
        status, err = self.main(*self.args())
        self.assertEqual(status, 2)
        self.assertIn("no config.json", err)
        self.write("model/config.json", json.dumps(dict(self.config, model_type="gpt2")))
        self.assertIn("model_type 'gpt2' is not supported", self.main(*self.args())[1])
        self.write("model/config.json", json.dumps(dict(self.config, attention_dropout=0.1)))
        self.assertIn("attention_dropout = 0.1", self.main(*self.args())[1])

    def test_existing_output_is_refused(self):
        self.write("x.ids", " ".join(["5"] * 40))
        os.makedirs(os.path.join(self.dir, "out"))
        self.write("out/keep.txt", "mine")
        status, err = self.main(*self.args())
        self.assertEqual(status, 2)
        self.assertIn("already exists", err)
        self.assertEqual(os.listdir(os.path.join(self.dir, "out")), ["keep.txt"])

    @unittest.skipIf(HAVE_TRANSFORMERS, "transformers is installed here")
    def test_without_transformers_nothing_is_written(self):
        data = self.write("x.ids", " ".join(str(i % 100) for i in range(40)))
        out = os.path.join(self.dir, "sub", "out")
        status, err = self.main("--model", self.model, "--data", data, "--seq-len", "8",
                                "--steps", "1", "--out", out)
        self.assertEqual(status, 2)
        self.assertIn("needs Hugging Face transformers", err)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "sub")))


class Data(Workspace):
    def read(self, name, text, fmt=None, tokenize=None):
        path = self.write(name, text)
        return ft.read_tokens(path, fmt or ft.data_format(path, "auto"), 100, 2, tokenize)

    def assertUsage(self, text, fn, *args):
        with self.assertRaises(ft.UsageError) as ctx:
            fn(*args)
        self.assertIn(text, str(ctx.exception))

    def test_formats_by_extension(self):
        self.assertEqual(ft.data_format("a.jsonl", "auto"), "jsonl")
        self.assertEqual(ft.data_format("a.IDS", "auto"), "ids")
        self.assertEqual(ft.data_format("a.txt", "auto"), "text")
        self.assertEqual(ft.data_format("a.txt", "ids"), "ids")

    def test_token_ids(self):
        self.assertEqual(self.read("a.ids", "1 2\n3\t4  "), [1, 2, 3, 4])
        self.assertUsage("token 2 ('x7') is not an integer", self.read, "b.ids", "1 2 x7")
        self.assertUsage("token id 100 is outside the model's vocabulary (0..99)", self.read,
                         "c.ids", "1 100")
        self.assertUsage("token id -1", self.read, "d.ids", "-1")
        self.assertUsage("is empty", self.read, "e.ids", " \n")
        self.assertUsage("does not exist", ft.read_tokens, os.path.join(self.dir, "none.ids"),
                         "ids", 100)

    def test_jsonl_joins_documents_with_eos(self):
        text = '{"input_ids": [5, 6]}\n\n{"input_ids": [7]}\n'
        self.assertEqual(self.read("a.jsonl", text), [5, 6, 2, 7, 2])
        tokenize = lambda s: [len(w) for w in s.split()]  # noqa: E731
        self.assertEqual(self.read("b.jsonl", '{"text": "ab c"}', tokenize=tokenize), [2, 1, 2])
        self.assertUsage("line 2: not JSON", self.read, "c.jsonl", '{"input_ids": [1]}\n{oops')
        self.assertUsage("line 1: expected an object with 'text'", self.read, "d.jsonl", "[1, 2]")
        self.assertUsage("input_ids must be integers", self.read, "e.jsonl",
                         '{"input_ids": [1, 2.5]}')
        self.assertUsage("no usable tokenizer", self.read, "f.jsonl", '{"text": "hello"}')

    def test_text(self):
        self.assertEqual(self.read("a.txt", "xx y", tokenize=lambda s: [7, 8]), [7, 8])
        self.assertUsage("no usable tokenizer", self.read, "b.txt", "hello")
        path = self.write("c.txt", b"\xff\xfe bad", mode="wb")
        self.assertUsage("not UTF-8", ft.read_tokens, path, "text", 100, 2, lambda s: [1])

    def test_packing_and_batches(self):
        seqs = ft.pack_sequences(list(range(23)), 5)
        self.assertEqual(seqs.shape, (4, 5))
        self.assertEqual(seqs[1].tolist(), [5, 6, 7, 8, 9])
        self.assertUsage("has 3 tokens, fewer than --seq-len 5", ft.pack_sequences, [1, 2, 3], 5)
        gen = ft.batches(seqs, 2, seed=1)
        epoch = torch.cat([next(gen), next(gen)])
        self.assertEqual(sorted(epoch[:, 0].tolist()), [0, 5, 10, 15])  # each sequence once
        again = ft.batches(seqs, 2, seed=1)
        self.assertTrue(torch.equal(next(again), epoch[:2]))  # seeded


if __name__ == "__main__":
    unittest.main()

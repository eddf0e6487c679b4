"""A short fine-tune on the CPU with CCA, in CI, where transformers is not installed: the tiny
Llama of tests/data/models/llama written out in PyTorch (a test model, not a product; the
transformers path is hf_checks.py's) with cca.attention. Its forward reproduces the fixture's
logits from transformers with CCA attention (logits_cca.npy); a few AdamW steps through the
library's backward lower the loss; the trained weights, saved as a Hugging Face checkpoint, give
the same logits in `cca logits` (the C++ runtime) as in PyTorch."""
import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest

import numpy as np
import torch

import cca

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "tests", "data", "models", "llama")
CCA = dict(group=4, window=8)  # the fixture's (reference.json)
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        buf = bytearray(data[begin:end])
        out[name] = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        blob = t.detach().to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


class TinyLlama(torch.nn.Module):
    """Llama layers (RMSNorm, rotary embedding, GQA attention, SwiGLU) over float32 copies of
    the checkpoint's weights, with CCA attention."""

    def __init__(self, config, weights, inv_freq):
        super().__init__()
        self.c = config
        self.w = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v.float())
                                         for k, v in weights.items()})
        self.inv_freq = inv_freq

    def p(self, name):
        return self.w[name.replace(".", "__")]

    def norm(self, x, name):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"])
        return x * self.p(name)

    def forward(self, ids):
        c, (B, T) = self.c, ids.shape
        Hq, Hkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        freqs = torch.outer(torch.arange(T, dtype=torch.float32), self.inv_freq)
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

        def rope(x):  # [B, T, H, D], rotate-half convention
            half = torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1)
            return x * cos[:, None] + half * sin[:, None]

        x = self.p("model.embed_tokens.weight")[ids]
        for i in range(c["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            h = self.norm(x, pre + "input_layernorm.weight")
            q = rope((h @ self.p(pre + "self_attn.q_proj.weight").T).view(B, T, Hq, D))
            k = rope((h @ self.p(pre + "self_attn.k_proj.weight").T).view(B, T, Hkv, D))
            v = (h @ self.p(pre + "self_attn.v_proj.weight").T).view(B, T, Hkv, D)
            a = cca.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **CCA)
            x = x + a.transpose(1, 2).reshape(B, T, Hq * D) @ self.p(
                pre + "self_attn.o_proj.weight").T
            h = self.norm(x, pre + "post_attention_layernorm.weight")
            gate = torch.nn.functional.silu(h @ self.p(pre + "mlp.gate_proj.weight").T)
            x = x + (gate * (h @ self.p(pre + "mlp.up_proj.weight").T)) @ self.p(
                pre + "mlp.down_proj.weight").T
        return self.norm(x, "model.norm.weight") @ self.p("lm_head.weight").T

    def state(self):
        return {k.replace("__", "."): v for k, v in self.w.items()}


def cca_cli():
    path = os.environ.get("CCA_CLI") or os.path.join(REPO, "build", "cca")
    return path if os.path.isfile(path) else None


class TrainTiny(unittest.TestCase):
    def setUp(self):
        with open(os.path.join(FIXTURE, "config.json")) as f:
            self.config = json.load(f)
        with open(os.path.join(FIXTURE, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        weights = {}
        for name in files:
            weights.update(read_safetensors(os.path.join(FIXTURE, name)))
        inv_freq = torch.from_numpy(np.load(os.path.join(FIXTURE, "inv_freq.npy")))
        self.model = TinyLlama(self.config, weights, inv_freq)
        with open(os.path.join(FIXTURE, "reference.json")) as f:
            self.prompt = json.load(f)["prompt_ids"]

    def test_forward_matches_transformers_then_training_lowers_the_loss(self):
        ids = torch.tensor([self.prompt])
        with torch.no_grad():
            logits = self.model(ids)[0]
        want = torch.from_numpy(np.load(os.path.join(FIXTURE, "logits_cca.npy"))).double()
        err = ((logits.double() - want).abs().max() / want.abs().max()).item()
        self.assertLess(err, 1e-4, "the test model's forward differs from transformers + CCA")

        gen = torch.Generator().manual_seed(0)
        batch = torch.cat([ids, torch.randint(3, 512, (1, 40), generator=gen)])  # [2, 40]
        opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        losses = []
        for _ in range(10):
            logits = self.model(batch)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512),
                                                     batch[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        self.assertLess(losses[-1], 0.7 * losses[0], f"losses {losses}")

        cli = cca_cli()
        if cli is None:
            self.skipTest("no cca binary (CCA_CLI, build/cca) for the runtime comparison")
        with tempfile.TemporaryDirectory() as work:
            out = os.path.join(work, "trained")
            os.makedirs(out)
            for name in ("config.json", "generation_config.json", "tokenizer.json"):
                shutil.copy(os.path.join(FIXTURE, name), out)
            write_safetensors(os.path.join(out, "model.safetensors"), self.model.state())
            ids_file, npy = os.path.join(work, "p.ids"), os.path.join(work, "logits.npy")
            with open(ids_file, "w") as f:
                f.write(" ".join(map(str, self.prompt)))
            run = subprocess.run([cli, "logits", "--model", out, "--ids", ids_file, "--out", npy,
                                  "--device", "cpu", "--variant", "cca", "--group", "4",
                                  "--window", "8"], capture_output=True, text=True, timeout=120)
            self.assertEqual(run.returncode, 0, run.stderr)
            theirs = torch.from_numpy(np.load(npy)).double()
        with torch.no_grad():
            ours = self.model(ids)[0].double()
        err = ((theirs - ours).abs().max() / ours.abs().max()).item()
        self.assertLess(err, 1e-4, "cca logits of the trained checkpoint differ from PyTorch")


if __name__ == "__main__":
    unittest.main()

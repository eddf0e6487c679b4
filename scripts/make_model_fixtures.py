#!/usr/bin/env python3
"""Builds the model-runtime parity fixtures (tests/data/models/<name>/) with Hugging Face transformers.

Runs where PyTorch, transformers (5.x) and safetensors are installed (the GPU device machine; the
computation itself runs on its CPU in float32 so that no TF32 or GPU kernel choice enters the
reference). For each architecture it builds a small random checkpoint, saves it as Hugging Face
does (config.json, safetensors, generation_config.json) and records:

  logits_full.npy   float32 [T, V] logits of the prompt, HF eager attention
  logits_cca.npy    float32 [T, V] logits of the prompt with CCA attention (g=4, s=8), computed by
                    this script's own PyTorch implementation of docs/cca-semantics.md, registered
                    as a transformers attention function
  hidden_full.npy   float32 [L+1, T, H] hidden states (embeddings, then each layer) for debugging
  inv_freq.npy      float32 [D/2] the rotary inverse frequencies HF uses (rope scaling applied)
  reference.json    prompt ids, greedy continuations (full and cca), CCA parameters, the mean
                    next-token NLL of the prompt under each variant, library versions

Usage:  python3 scripts/make_model_fixtures.py --out DIR
Writes DIR/<name>.tar (one folder per model) and DIR/log.txt. Unpack into the repository with
    for f in DIR/*.tar; do tar -xf "$f" -C tests/data/models; done
"""
import argparse
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import traceback

import numpy as np
import torch
import transformers
from transformers import (AttentionInterface, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

PROMPT_LEN = 40
GREEDY_NEW = 8
CCA = {"g": 4, "s": 8}
CALLS = {"cca": 0}
LOG = []


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)


# ---- CCA attention, written directly from docs/cca-semantics.md ---------------------------------
def cca_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] (post-RoPE) -> ([B, T, Hq, D], None).

    Core tokens: group i = positions [i*g, (i+1)*g), pooled with the softmax of the query at the
    group's last position, averaged over the query heads of each KV head (pool=cca,
    pool_heads=kv). Query t sees core tokens 0..j(t)-1 and raw keys j(t)*g..t, with
    j(t) = max(0, floor((t + 1 - s) / g)); one softmax over [core; raw]. The padding mask that
    transformers passes is ignored: the fixtures use one unpadded sequence.
    """
    CALLS["cca"] += 1
    g, s = CCA["g"], CCA["s"]
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    r = Hq // Hkv
    scale = scaling if scaling is not None else D ** -0.5
    m = max(0, (T - s) // g)
    if m > 0:
        kg = key[:, :, : m * g].reshape(B, Hkv, m, g, D)
        vg = value[:, :, : m * g].reshape(B, Hkv, m, g, D)
        q_last = query[:, :, g - 1: m * g: g].reshape(B, Hkv, r, m, D)  # positions (i+1)*g - 1
        w = (torch.einsum("bcrmd,bcmnd->bcrmn", q_last, kg) * scale).softmax(dim=-1).mean(dim=2)
        kc = torch.einsum("bcmn,bcmnd->bcmd", w, kg)
        vc = torch.einsum("bcmn,bcmnd->bcmd", w, vg)
    else:
        kc = key.new_zeros(B, Hkv, 0, D)
        vc = value.new_zeros(B, Hkv, 0, D)
    keys = torch.cat([kc, key], dim=2).repeat_interleave(r, dim=1)  # query head h reads kv h // r
    vals = torch.cat([vc, value], dim=2).repeat_interleave(r, dim=1)

    t = torch.arange(T).unsqueeze(1)
    j = torch.clamp(torch.div(t + 1 - s, g, rounding_mode="floor"), min=0)
    core_ok = torch.arange(m).unsqueeze(0) < j
    kpos = torch.arange(T).unsqueeze(0)
    raw_ok = (kpos >= j * g) & (kpos <= t)
    allowed = torch.cat([core_ok, raw_ok], dim=1).to(query.device)  # [T, m + T]

    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), vals)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("cca_ref", cca_attention)


# ---- checkpoints -------------------------------------------------------------------------------
def make_config(cls, rope, **kw):
    """The config with rope given as transformers 5 `rope_parameters`, or the legacy keys."""
    try:
        return cls(rope_parameters=dict(rope), **kw)
    except Exception as e:  # older transformers: rope_theta + rope_scaling
        log("  note: rope_parameters rejected (%s); using rope_theta/rope_scaling" % e)
        legacy = dict(rope)
        theta = legacy.pop("rope_theta")
        scaling = legacy if legacy.get("rope_type", "default") != "default" else None
        return cls(rope_theta=theta, rope_scaling=scaling, **kw)


MODELS = [
    {   # GQA (4 query heads, 2 kv heads), llama3 rope scaling, bfloat16, sharded with an index.
        "name": "llama",
        "config_cls": LlamaConfig, "model_cls": LlamaForCausalLM,
        "rope": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64},
        "config": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2),
        "dtype": torch.bfloat16, "shard": "100KB",
        "generation": {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": False},
    },
    {   # head_dim 32 != hidden/heads, one kv head, linear rope scaling, float32, one file.
        "name": "mistral",
        "config_cls": MistralConfig, "model_cls": MistralForCausalLM,
        "rope": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        "config": dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       sliding_window=None, bos_token_id=1, eos_token_id=2),
        "dtype": torch.float32, "shard": None,
        "generation": {"bos_token_id": 1, "eos_token_id": 2},
    },
    {   # q/k/v bias, tied embeddings, rope_theta 1e6, float16, one file.
        "name": "qwen2",
        "config_cls": Qwen2Config, "model_cls": Qwen2ForCausalLM,
        "rope": {"rope_type": "default", "rope_theta": 1000000.0},
        "config": dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=5, eos_token_id=7),
        "dtype": torch.float16, "shard": None,
        "generation": {"bos_token_id": 5, "eos_token_id": [7, 8], "do_sample": True,
                       "temperature": 0.7, "top_k": 20, "top_p": 0.8},
    },
]


def randomize(model, seed):
    """Weights large enough that attention is far from uniform and logits well separated."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(0.1 * noise)


def load(path, impl):
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                     attn_implementation=impl)
    if getattr(model.config, "_attn_implementation", impl) != impl:
        log("  note: attn implementation was", model.config._attn_implementation, "; forcing", impl)
        model.config._attn_implementation = impl
    return model.eval()


def greedy(model, ids, steps):
    """Greedy continuation, recomputing the whole sequence each step (no cache): for cca this is
    the prefill semantics, which decoding through a cache must reproduce. Returns tokens and the
    top-1 minus top-2 logit margin of each step."""
    seq = list(ids)
    toks, margins = [], []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].double()
        top = torch.topk(logits, 2)
        toks.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        seq.append(toks[-1])
    return toks, margins


def mean_nll(logits, ids):
    lp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=-1)
    nll = -lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return {"tokens": len(ids) - 1, "mean_nll": float(nll.mean()), "ppl": float(math.exp(nll.mean()))}


def build(spec, work, seed):
    name = spec["name"]
    mdir = os.path.join(work, name)
    torch.manual_seed(seed)
    config = make_config(spec["config_cls"], spec["rope"], **spec["config"])
    model = spec["model_cls"](config)
    randomize(model, seed)
    if spec["config"].get("tie_word_embeddings"):
        log("  tied:", model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
    model = model.to(spec["dtype"])
    kw = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    model.save_pretrained(mdir, **kw)
    with open(os.path.join(mdir, "generation_config.json"), "w") as f:
        json.dump(spec["generation"], f, indent=2)
    log("  saved:", sorted(os.listdir(mdir)))

    rng = np.random.default_rng(seed)
    vocab = spec["config"]["vocab_size"]
    ids = [int(x) for x in rng.integers(10, vocab, size=PROMPT_LEN)]
    prompt = torch.tensor([ids])

    full = load(mdir, "eager")
    with torch.no_grad():
        out = full(input_ids=prompt, use_cache=False, output_hidden_states=True)
    logits_full = out.logits[0].float().numpy()
    hidden = torch.stack([h[0] for h in out.hidden_states]).float().numpy()
    try:
        inv_freq = full.model.rotary_emb.inv_freq.float().numpy()
    except AttributeError:
        inv_freq = None
        log("  note: no model.rotary_emb.inv_freq")
    greedy_full, margins_full = greedy(full, ids, GREEDY_NEW)

    cca = load(mdir, "cca_ref")
    calls0 = CALLS["cca"]
    with torch.no_grad():
        logits_cca = cca(input_ids=prompt, use_cache=False).logits[0].float().numpy()
    assert CALLS["cca"] > calls0, "the cca attention function was not called"
    greedy_cca, margins_cca = greedy(cca, ids, GREEDY_NEW)

    # Self-checks of the CCA function: a window covering the prompt is plain causal attention.
    saved = dict(CCA)
    CCA.update(g=4, s=10 ** 6)
    with torch.no_grad():
        wide = cca(input_ids=prompt, use_cache=False).logits[0].float().numpy()
    CCA.update(saved)
    scale = float(np.abs(logits_full).max())
    log("  check cca(s >= T) vs eager: max abs diff / max abs logit =",
        float(np.abs(wide - logits_full).max()) / scale)
    log("  cca vs full: max abs diff / max abs logit =",
        float(np.abs(logits_cca - logits_full).max()) / scale)
    log("  greedy full", greedy_full, "min margin", min(margins_full))
    log("  greedy cca ", greedy_cca, "min margin", min(margins_cca))

    np.save(os.path.join(mdir, "logits_full.npy"), logits_full.astype(np.float32))
    np.save(os.path.join(mdir, "logits_cca.npy"), logits_cca.astype(np.float32))
    np.save(os.path.join(mdir, "hidden_full.npy"), hidden.astype(np.float32))
    if inv_freq is not None:
        np.save(os.path.join(mdir, "inv_freq.npy"), inv_freq.astype(np.float32))
    ref = {
        "generator": "scripts/make_model_fixtures.py",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "architecture": type(full).__name__, "saved_dtype": str(spec["dtype"]),
        "prompt_ids": ids,
        "cca": {"group": CCA["g"], "window": CCA["s"], "pool": "cca", "pool_heads": "kv"},
        "greedy_full": greedy_full, "greedy_full_margins": margins_full,
        "greedy_cca": greedy_cca, "greedy_cca_margins": margins_cca,
        "nll_full": mean_nll(logits_full, ids), "nll_cca": mean_nll(logits_cca, ids),
    }
    with open(os.path.join(mdir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    return mdir


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for <name>.tar and log.txt")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_grad_enabled(False)
    log("torch", torch.__version__, "transformers", transformers.__version__, "numpy", np.__version__)
    work = tempfile.mkdtemp(prefix="cca-fixtures-")
    failed = 0
    for i, spec in enumerate(MODELS):
        if args.only and spec["name"] not in args.only.split(","):
            continue
        log("model", spec["name"])
        try:
            mdir = build(spec, work, seed=1234 + i)
            with tarfile.open(os.path.join(args.out, spec["name"] + ".tar"), "w") as tar:
                tar.add(mdir, arcname=spec["name"])
            log("  ok:", sorted(os.listdir(mdir)))
        except Exception:  # keep going: each model's fixtures are independent
            failed += 1
            log("  FAILED:\n" + traceback.format_exc())
    shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "log.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

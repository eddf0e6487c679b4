#!/usr/bin/env python3
"""One training step of a Hugging Face Llama model on one GPU with three attention functions
(issue 10's benchmark, part 6): "sdpa" (full causal, transformers' own), "cca" (this repo's
package: cca.transformers.register(), the library's CUDA forward and backward) and "flex-cca"
(the same function as compiled FlexAttention + PyTorch pooling under autograd, from
bench/hf_bench.py), and "no-attn": attention replaced by a copy of the values (each query
head gets its KV head's value row), which costs nothing, so its step time is the floor of the
rest of the model and sdpa / no-attn bounds what any attention function can gain. The model is Llama-3-8B-shaped (hidden 4096, 32/8 heads, MLP 14336,
vocabulary 128256) with --layers layers (default 8, so that bf16 weights, gradients and AdamW
states fit next to 32K-token activations), random weights made on the GPU. A step: forward with
labels (cross-entropy over all positions), backward, AdamW (fused) step, zero_grad; bf16
parameters, gradient checkpointing on every layer. Batch 1. One untimed step, then --steps
timed steps (CUDA-synchronised wall time, median); tokens/s = T / step time; peak memory =
torch.cuda.max_memory_allocated over the timed steps. Out of memory is recorded as "oom".
    CCA_LIBRARY=build-gpu/libcca.so python3 bench/hf_train_bench.py \
        --seq 16384,32768 --impl sdpa,cca,flex-cca --json out/hf-train.json"""
import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "python")]  # hf_bench, the cca package
from hf_bench import is_oom, make_flex_cca  # noqa: E402


def no_attention(module, query, key, value, attention_mask, **kwargs):
    """The floor: attention output = the position's own value row (heads expanded for GQA)."""
    del module, query, key, attention_mask, kwargs
    rep = 32 // value.shape[1]  # query heads per KV head (the model has 32 query heads)
    return value.repeat_interleave(rep, dim=1).transpose(1, 2).contiguous(), None


def build_model(impl_name, layers, seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation=impl_name, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if model.config._attn_implementation != impl_name:
        sys.exit(f"hf_train_bench: transformers chose attention "
                 f"{model.config._attn_implementation!r}, not {impl_name!r}")
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    return model


def measure(model, T, steps, seed):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda", generator=gen)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up: compilation (flex), cuBLAS heuristics, optimizer states
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"step_s": round(s, 4), "tok_s": round(T / s, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss": round(losses[-1], 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", default="16384,32768")
    ap.add_argument("--impl", default="sdpa,cca,flex-cca")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    seqs = [int(x) for x in a.seq.split(",") if x]
    impls = [x for x in a.impl.split(",") if x]
    for i in impls:
        if i not in ("sdpa", "cca", "flex-cca", "no-attn"):
            ap.error(f"--impl: unknown {i!r} (sdpa, cca, flex-cca, no-attn)")
    if a.layers < 1 or a.steps < 1 or not seqs or min(seqs) < 1:
        ap.error("--layers, --steps and every --seq must be >= 1")
    if not torch.cuda.is_available():
        sys.exit("hf_train_bench: needs a CUDA GPU (torch.cuda.is_available() is false)")
    import transformers
    from transformers import AttentionInterface

    names = {"sdpa": "sdpa"}
    if "cca" in impls:
        import cca.transformers
        names["cca"] = cca.transformers.register(group=a.group, window=a.window)
    if "flex-cca" in impls:
        AttentionInterface.register("cca_flex", make_flex_cca(a.group, a.window))
        names["flex-cca"] = "cca_flex"
    if "no-attn" in impls:
        AttentionInterface.register("no_attn", no_attention)
        names["no-attn"] = "no_attn"
    rows = [{"torch": torch.__version__, "transformers": transformers.__version__,
             "gpu": torch.cuda.get_device_name(0),
             "date": datetime.date.today().isoformat(), "layers": a.layers}]
    for impl in impls:
        model = build_model(names[impl], a.layers, seed=0)
        for T in seqs:
            row = {"impl": impl, "T": T}
            try:
                row.update(measure(model, T, a.steps, seed=T))
            except Exception as e:  # noqa: BLE001 (oom and refusals are results, go on)
                if not is_oom(e):
                    raise
                row["status"] = "oom"
            gc.collect()
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"training step, Llama-3-8B shape with {a.layers} layers, bf16, batch 1, "
          f"{rows[0]['gpu']}, torch {torch.__version__}, transformers {transformers.__version__}")
    print("%-9s %7s %9s %10s %9s %9s" % ("impl", "T", "step_s", "tok/s", "peak_GiB", "vs_sdpa"))
    for r in rows[1:]:
        base = [b for b in rows[1:] if b["impl"] == "sdpa" and b["T"] == r["T"] and "tok_s" in b]
        if "tok_s" not in r:
            print("%-9s %7d %9s" % (r["impl"], r["T"], r.get("status", "-")))
            continue
        x = "%.2fx" % (r["tok_s"] / base[0]["tok_s"]) if base else "-"
        print("%-9s %7d %9.3f %10.1f %9.2f %9s" % (r["impl"], r["T"], r["step_s"], r["tok_s"],
                                                  r["peak_gib"], x))


if __name__ == "__main__":
    sys.exit(main())

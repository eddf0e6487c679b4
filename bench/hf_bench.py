#!/usr/bin/env python3
"""Hugging Face transformers on one GPU, the peer of `cca bench model` in issue 9's benchmark
(bench/gpu_vs_hf.sh). Loads a Llama checkpoint in bfloat16 and times, with --impl
  sdpa      full attention through torch SDPA (transformers' own "sdpa"): prefill, decode, batch;
  flex-cca  CCA (docs/cca-semantics.md, pool=cca, pool_heads=kv) as a transformers attention
            function "cca_flex": core tokens pooled in PyTorch, then one compiled FlexAttention
            call over [core tokens; raw keys] with a block mask. Prefill only (decode: n/a).
Prefill: `model(ids[1, T], use_cache=False, logits_to_keep=1)`, TTFT = the whole forward, median
of 3 runs up to 32K tokens, 1 run above; untimed warm-up at the first length (flex-cca: at every
length, each one compiles its own kernel and block mask). Decode (sdpa): prefill C tokens into a
DynamicCache, 2 untimed greedy steps, then --steps greedy steps timed together: ITL = time/steps;
batch: --batch sequences of --batch-context tokens, tok/s = batch*steps/time. Peak memory =
torch.cuda.max_memory_allocated over the measurement (weights included). Out of memory is
recorded as "oom" and the run goes on. Prints a table; --json writes the rows (first row: versions).
    python3 bench/hf_bench.py --model /tmp/cca-gpu-vs-hf/llama3-8b --impl flex-cca \
        --prompts 4096,16384,32768,65536,131072 --decode 32768,131072 --batch 8 \
        --batch-context 32768 --json out/hf-flex-cca-llama3-8b.json"""
import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

REPEAT_UP_TO = 32768  # prompts up to this length are timed 3 times (median), longer ones once
WARMUP_STEPS = 2


# ---- CCA in PyTorch: the pooling and the block mask of docs/cca-semantics.md ------------------
def core_count(T, g, s):
    """Core tokens a prefill of T tokens needs: m = max(0, floor((T - s) / g))."""
    return max(0, (T - s) // g)


def cca_pool(query, key, value, m, g, scale):
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] (post-RoPE) -> core keys and values
    [B, Hkv, m, D]. Group i = positions [i*g, (i+1)*g); weights = softmax over the group of
    scale * q[last of group, h] . k[n, kv head of h], averaged over the query heads of each KV
    head (pool=cca, pool_heads=kv). In float32, as the contract's reference."""
    B, hq, _, d = query.shape
    hkv = key.shape[1]
    if m == 0:
        return key.new_zeros(B, hkv, 0, d), value.new_zeros(B, hkv, 0, d)
    kg = key[:, :, : m * g].float().reshape(B, hkv, m, g, d)
    # Query head h = c*r + j reads KV head c, so the head axis splits as (Hkv, r).
    q_last = query[:, :, g - 1: m * g: g].float().reshape(B, hkv, hq // hkv, m, d)
    w = (torch.einsum("bcrmd,bcmnd->bcrmn", q_last, kg) * scale).softmax(dim=-1).mean(dim=2)
    kc = torch.einsum("bcmn,bcmnd->bcmd", w, kg).to(key.dtype)
    del kg
    vg = value[:, :, : m * g].float().reshape(B, hkv, m, g, d)
    vc = torch.einsum("bcmn,bcmnd->bcmd", w, vg).to(value.dtype)
    return kc, vc


def cca_mask_mod(m, g, s):
    """FlexAttention mask over [m core tokens; T raw keys] for queries 0..T-1: core token i is
    visible to query t iff i < j(t) = max(0, floor((t + 1 - s) / g)); raw key k (at kv index
    m + k) iff j(t)*g <= k <= t."""
    def mask_mod(b, h, q_idx, kv_idx):
        # Where t + 1 - s < 0, floor and truncating division differ, but both clamp to 0.
        j = torch.clamp((q_idx + 1 - s) // g, min=0)
        core = (kv_idx < m) & (kv_idx < j)
        k = kv_idx - m
        raw = (kv_idx >= m) & (k >= j * g) & (k <= q_idx)
        return core | raw
    return mask_mod


class FlexCCA:
    """A transformers attention function (module, query, key, value, attention_mask, scaling=...,
    **kwargs) -> (out [B, T, Hq, D], None) computing CCA with one FlexAttention call. flex and
    make_block_mask are torch's flex_attention (compiled) and create_block_mask; block masks are
    built once per length and shared by all layers."""

    def __init__(self, g, s, flex, make_block_mask):
        self.g, self.s = g, s
        self.flex, self.make_block_mask = flex, make_block_mask
        self.masks = {}
        self.calls = 0

    def block_mask(self, T, device):
        key = (T, str(device))
        if key not in self.masks:
            m = core_count(T, self.g, self.s)
            self.masks[key] = self.make_block_mask(cca_mask_mod(m, self.g, self.s), None, None,
                                                   T, m + T, device=device)
        return self.masks[key]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):
        T = query.shape[2]
        if key.shape[2] != T:
            raise ValueError(f"cca_flex computes a prefill without a cache (queries {T}, keys "
                             f"{key.shape[2]}); run it with use_cache=False")
        if attention_mask is not None:  # a dense mask would be built at O(T^2) memory
            raise ValueError("transformers passed an attention mask to cca_flex; this benchmark "
                             "expects none (unpadded batch, custom attention without a mask "
                             f"function), got {type(attention_mask).__name__}")
        self.calls += 1
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        kc, vc = cca_pool(query, key, value, core_count(T, self.g, self.s), self.g, scale)
        out = self.flex(query, torch.cat([kc, key], dim=2), torch.cat([vc, value], dim=2),
                        block_mask=self.block_mask(T, query.device), scale=scale,
                        enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None


def make_flex_cca(g, s):
    """FlexCCA over torch's compiled flex_attention (one compilation per length)."""
    import torch._dynamo
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise SystemExit(f"hf_bench: --impl flex-cca needs torch with FlexAttention "
                         f"(torch {torch.__version__}: {e})")
    # Past the recompile limit dynamo falls back to eager flex_attention, which materialises the
    # score matrix (out of memory at 64K); each length is one compilation.
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)

    def make_block_mask(mask_mod, B, H, q_len, kv_len, device):
        return create_block_mask(mask_mod, B, H, q_len, kv_len, device=device, _compile=True)
    return FlexCCA(g, s, flex, make_block_mask)


# ---- measurements ----------------------------------------------------------------------------
def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def guarded(fn):
    """Runs fn() -> dict of results; returns (status, results): "ok", "oom" or "error: ...".
    Memory is released after the exception is gone (its traceback holds the tensors)."""
    status, res = "ok", {}
    try:
        res = fn()
    except Exception as e:  # one failed length must not lose the others
        if is_oom(e):
            status = "oom"
        else:
            status = "error: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            traceback.print_exc()
    gc.collect()
    torch.cuda.empty_cache()
    return status, res


def random_ids(batch, tokens, vocab, seed):
    gen = torch.Generator().manual_seed(seed * 1000003 + tokens * 31 + batch)
    return torch.randint(0, vocab, (batch, tokens), generator=gen).to("cuda")


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure_prefill(model, ids, runs, warmup):
    forward = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)
    warm_s = timed(forward)[0] if warmup else None
    torch.cuda.reset_peak_memory_stats()
    times = [timed(forward)[0] for _ in range(runs)]
    return dict(seconds=statistics.median(times), runs=times, warmup_s=warm_s,
                peak_bytes=torch.cuda.max_memory_allocated())


def measure_decode(model, ids, steps):
    torch.cuda.reset_peak_memory_stats()
    prefill_s, out = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
    cache = out.past_key_values  # a DynamicCache, grown in place by every step
    nxt = out.logits[:, -1:].argmax(-1)
    del out

    def run(n):
        tok = nxt
        for _ in range(n):
            o = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = o.logits[:, -1:].argmax(-1)  # greedy, stays on the GPU: no sync per step
        return tok

    nxt = run(WARMUP_STEPS)
    seconds = timed(lambda: run(steps))[0]
    B = ids.shape[0]
    return dict(seconds=seconds / steps, steps=steps, tok_s=B * steps / seconds,
                prefill_s=prefill_s, peak_bytes=torch.cuda.max_memory_allocated())


# ---- driver ----------------------------------------------------------------------------------
def int_list(text, what):
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: not a comma-separated list of integers: "
                                         f"{text!r}")
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{what}: lengths must be >= 1: {text!r}")
    return vals


def shape_name(cfg):
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if (hq, hkv) == (32, 8):
        return "llama3-8b"
    if (hq, hkv) == (32, 32):
        return "llama2-7b"
    return f"llama-{hq}q{hkv}kv"


def save_json(path, rows):
    """Whole file or nothing: written next to the target, then renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def describe(r):
    if r["status"] != "ok":
        return r["status"]
    if r["kind"] == "prefill":
        return f"{r['seconds']:.3f} s"
    return f"{1e3 * r['seconds']:.2f} ms/step, {r['tok_s']:.1f} tok/s"


def print_table(rows):
    print("| system | kind | batch | tokens | time | peak memory | runs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        peak = f"{r['peak_bytes'] / 1e9:.1f} GB" if r.get("peak_bytes") else ""
        runs = " ".join(f"{x:.3f}" for x in r.get("runs", []))
        print(f"| {r['system']} | {r['kind']} | {r['batch']} | {r['tokens']} | {describe(r)} | "
              f"{peak} | {runs} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    ap.add_argument("--impl", required=True, choices=["sdpa", "flex-cca"])
    ap.add_argument("--prompts", default="4096,16384,32768,65536,131072",
                    type=lambda t: int_list(t, "--prompts"))
    ap.add_argument("--decode", default="32768,131072", type=lambda t: int_list(t, "--decode"),
                    help="decode contexts, batch 1 (empty: none)")
    ap.add_argument("--batch", type=int, default=8, help="batched decode: sequences (0: none)")
    ap.add_argument("--batch-context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--group", type=int, default=16, help="CCA group size g")
    ap.add_argument("--window", type=int, default=1024, help="CCA local window s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape-name", default="", help="default: from the head counts")
    ap.add_argument("--json", default="", help="write the rows here")
    a = ap.parse_args()
    for name, v, lo in (("--batch", a.batch, 0), ("--batch-context", a.batch_context, 1),
                        ("--steps", a.steps, 1), ("--group", a.group, 1),
                        ("--window", a.window, 1)):
        if v < lo:
            ap.error(f"{name} must be >= {lo}, got {v}")
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        ap.error(f"--model {a.model!r}: no config.json there")
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        ap.error(f"--json {a.json!r}: its directory does not exist")
    if not torch.cuda.is_available():
        sys.exit("hf_bench: needs a CUDA GPU (torch.cuda.is_available() is false)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local checkpoint; the GPU host has no network
    import transformers
    from transformers import AttentionInterface, AutoModelForCausalLM

    attn = "sdpa"
    flex_cca = None
    if a.impl == "flex-cca":
        # A registered name without a mask function: transformers builds no mask and passes
        # attention_mask=None (masking_utils: custom attention "without equivalent mask creation").
        flex_cca = make_flex_cca(a.group, a.window)
        AttentionInterface.register("cca_flex", flex_cca)
        attn = "cca_flex"
    load_start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16,
                                                     attn_implementation=attn, device_map="cuda")
    except (ImportError, ValueError, TypeError) as e:  # device_map may need accelerate
        print(f"note: device_map='cuda' refused ({str(e).splitlines()[0][:120]}); loading on the "
              "CPU, then moving", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16,
                                                     attn_implementation=attn).to("cuda")
    model.eval()
    if model.config._attn_implementation != attn:
        sys.exit(f"hf_bench: transformers chose attention {model.config._attn_implementation!r}, "
                 f"not {attn!r}")
    cfg = model.config
    system = "hf-" + a.impl
    shape = a.shape_name or shape_name(cfg)
    env = dict(system=system, shape=shape, kind="env", torch=torch.__version__,
               transformers=transformers.__version__, cuda=torch.version.cuda,
               gpu=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
               model=os.path.abspath(a.model), attn_implementation=attn, dtype="bfloat16",
               load_s=round(time.perf_counter() - load_start, 1), steps=a.steps, seed=a.seed)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if flex_cca:
        env.update(group=a.group, window=a.window, pool="cca", pool_heads="kv")
    print(f"{system} {shape}: torch {env['torch']}, transformers {env['transformers']}, "
          f"triton {env.get('triton', '-')}, CUDA {env['cuda']}, {env['gpu']}, "
          f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/{cfg.num_key_value_heads} "
          f"heads" + (f", g={a.group} s={a.window}" if flex_cca else ""), flush=True)
    rows = [env]
    if a.json:
        save_json(a.json, rows)
    failed = False

    def record(kind, batch, tokens, status, res):
        nonlocal failed
        row = dict(system=system, shape=shape, kind=kind, batch=batch, tokens=tokens,
                   seconds=res.get("seconds"), peak_bytes=res.get("peak_bytes"), status=status,
                   **{k: v for k, v in res.items() if k not in ("seconds", "peak_bytes")})
        rows.append(row)
        failed |= status.startswith("error")
        print(f"{kind} batch {batch} x {tokens}: {describe(row)}"
              + (f", peak {row['peak_bytes'] / 1e9:.1f} GB" if row["peak_bytes"] else ""),
              flush=True)
        if a.json:
            save_json(a.json, rows)

    vocab = cfg.vocab_size
    with torch.no_grad():
        for i, T in enumerate(a.prompts):
            ids = random_ids(1, T, vocab, a.seed)
            runs = 3 if T <= REPEAT_UP_TO else 1
            calls = flex_cca.calls if flex_cca else 0
            status, res = guarded(lambda: measure_prefill(model, ids, runs,
                                                          warmup=i == 0 or flex_cca is not None))
            if flex_cca and status == "ok" and flex_cca.calls == calls:
                sys.exit("hf_bench: the model never called cca_flex; the timing would be of "
                         "another attention")
            record("prefill", 1, T, status, res)
        decodes = [(1, C) for C in a.decode] + ([(a.batch, a.batch_context)] if a.batch else [])
        for B, C in decodes:
            if flex_cca:  # CCA decode needs the compressed cache; HF has none
                record("decode", B, C, "n/a", {})
                continue
            ids = random_ids(B, C, vocab, a.seed)
            status, res = guarded(lambda: measure_decode(model, ids, a.steps))
            record("decode", B, C, status, res)
    print()
    print_table(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

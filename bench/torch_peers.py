#!/usr/bin/env python3
"""PyTorch peers of the cca cuda backend (issue 3), timed in the same run on the same GPU.

Prints one JSON line per measurement, like bench/cuda_bench.cu:
  sdpa_cudnn / sdpa_flash  full causal attention, torch SDPA restricted to one backend
  flex_cca_pool            CCA core-token pooling in plain PyTorch (softmax weights, einsum)
  flex_cca_attend          FlexAttention over [core tokens; raw keys] with a CCA block mask
  flex_cca_fwd             both (what a FlexAttention user would run)
  --bwd: full_fwd_bwd (SDPA per backend) and flex cca_fwd_bwd (pooling + FlexAttention under
  autograd), forward + backward with the backward counted as 2.5x the forward's useful FLOPs
  sdpa_decode              one query over the full (uncompressed) KV cache
  decode_full_cache_ragged one query per sequence of a ragged batch, SDPA per sequence over its
                           full cache (B = sequences, T = their total length)
Shapes: B=1, D=128, bf16, g=16, s=1024. Times: CUDA events, median of repetitions after warm-up.
"""
import argparse
import json
import math
import sys

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

G, S, D = 16, 1024, 128


def median_ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def visible_sum_cca(T):
    # sum over t of j(t) + (t + 1 - j(t) g), j(t) = max(0, (t + 1 - s) // g)
    t = torch.arange(T, dtype=torch.int64)
    j = torch.clamp_min(torch.div(t + 1 - S, G, rounding_mode="floor"), 0)
    return float((j + t + 1 - j * G).sum())


def emit(impl, op, B, T, hq, hkv, ms, flops=0.0, nbytes=0.0, note=""):
    rec = {"impl": impl, "op": op, "B": B, "T": T, "Hq": hq, "Hkv": hkv, "ms": round(ms, 5),
           "tflops": round(flops / ms / 1e9, 2) if flops else 0.0,
           "gbps": round(nbytes / ms / 1e6, 1) if nbytes else 0.0}
    if note:
        rec["note"] = note
    print(json.dumps(rec), flush=True)


def cca_pool_torch(q, k, v, m):
    """q [B,Hq,T,D], k/v [B,Hkv,T,D] -> core k/v [B,Hkv,m,D] (pool=cca, pool_heads=kv)."""
    B, hq, T, d = q.shape
    hkv = k.shape[1]
    r = hq // hkv
    kg = k[:, :, : m * G].reshape(B, hkv, m, G, d)
    vg = v[:, :, : m * G].reshape(B, hkv, m, G, d)
    ql = q[:, :, G - 1: m * G: G].reshape(B, hkv, r, m, d)  # last query of each group
    logits = torch.einsum("bcrmd,bcmnd->bcrmn", ql.float(), kg.float()) * (d ** -0.5)
    w = torch.softmax(logits, dim=-1).mean(dim=2)  # [B, hkv, m, G]
    kc = torch.einsum("bcmn,bcmnd->bcmd", w, kg.float()).to(k.dtype)
    vc = torch.einsum("bcmn,bcmnd->bcmd", w, vg.float()).to(v.dtype)
    return kc, vc


def cca_block_mask(create_block_mask, T, m):
    """FlexAttention block mask over [m core tokens; T raw keys] for the CCA policy."""
    def mask_mod(b, h, q_idx, kv_idx):
        j = torch.clamp_min((q_idx + 1 - S) // G, 0)
        core = (kv_idx < m) & (kv_idx < j)
        p = kv_idx - m
        raw = (kv_idx >= m) & (p >= j * G) & (p <= q_idx)
        return core | raw
    return create_block_mask(mask_mod, None, None, T, m + T, device="cuda", _compile=True)


def prefill(args, flex_attention, create_block_mask):
    for hq, hkv in args.heads:
        for T in args.t_list:
            B = 1
            gen = torch.Generator(device="cuda").manual_seed(T + hq + hkv)
            q = torch.randn(B, hq, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(B, hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(B, hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            reps = args.reps if T < 65536 else max(2, args.reps // 2)
            full_flops = 4.0 * D * hq * B * T * (T + 1) / 2
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel([backend]):
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                    enable_gqa=hkv != hq)
                        ms = median_ms(fn, reps)
                    emit(name, "full_fwd", B, T, hq, hkv, ms, full_flops)
                except Exception as e:  # a backend that refuses the shape: say so, go on
                    print(json.dumps({"impl": name, "op": "full_fwd", "T": T, "Hq": hq,
                                      "Hkv": hkv, "error": str(e)[:200]}), flush=True)
            if flex_attention is None:
                continue
            m = max(0, (T - S) // G)
            try:
                bm = cca_block_mask(create_block_mask, T, m)
                kc, vc = cca_pool_torch(q, k, v, m)
                kcat, vcat = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
                pool_ms = median_ms(lambda: cca_pool_torch(q, k, v, m), reps)
                att = lambda: flex_attention(q, kcat, vcat, block_mask=bm, enable_gqa=hkv != hq)
                att_ms = median_ms(att, reps)

                def fwd():
                    a, b = cca_pool_torch(q, k, v, m)
                    return flex_attention(q, torch.cat([a, k], 2), torch.cat([b, v], 2),
                                          block_mask=bm, enable_gqa=hkv != hq)
                fwd_ms = median_ms(fwd, reps)
                useful = 4.0 * D * hq * B * visible_sum_cca(T)
                emit("flex", "cca_pool", B, T, hq, hkv, pool_ms)
                emit("flex", "cca_attend", B, T, hq, hkv, att_ms, useful)
                emit("flex", "cca_fwd", B, T, hq, hkv, fwd_ms, useful)
                del kc, vc, kcat, vcat, bm
            except Exception as e:
                print(json.dumps({"impl": "flex", "op": "cca_fwd", "T": T, "Hq": hq, "Hkv": hkv,
                                  "error": str(e)[:300]}), flush=True)
            del q, k, v
            torch.cuda.empty_cache()


def prefill_bwd(args, flex_attention, create_block_mask):
    """Forward + backward (issue 10): SDPA full causal per backend, and CCA as a FlexAttention
    user writes it (PyTorch pooling + flex_attention under autograd, gradients through both).
    Useful FLOPs: the forward's, times 3.5 (the backward counted as 2.5x the forward)."""
    for hq, hkv in args.heads:
        for T in args.t_list:
            B = 1
            gen = torch.Generator(device="cuda").manual_seed(T + hq + hkv)
            mk = lambda h: torch.randn(B, h, T, D, device="cuda", dtype=torch.bfloat16,
                                       generator=gen).requires_grad_()
            q, k, v = mk(hq), mk(hkv), mk(hkv)
            do = torch.randn(B, hq, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            reps = args.reps if T < 65536 else max(2, args.reps // 2)
            full_flops = 3.5 * 4.0 * D * hq * B * T * (T + 1) / 2
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel([backend]):
                        def step():
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=hkv != hq)
                            torch.autograd.grad(o, (q, k, v), do)
                        ms = median_ms(step, reps)
                    emit(name, "full_fwd_bwd", B, T, hq, hkv, ms, full_flops)
                except Exception as e:
                    print(json.dumps({"impl": name, "op": "full_fwd_bwd", "T": T, "Hq": hq,
                                      "Hkv": hkv, "error": str(e)[:200]}), flush=True)
            if flex_attention is not None:
                m = max(0, (T - S) // G)
                try:
                    bm = cca_block_mask(create_block_mask, T, m)

                    def step():
                        a, b = cca_pool_torch(q, k, v, m)
                        o = flex_attention(q, torch.cat([a, k], 2), torch.cat([b, v], 2),
                                           block_mask=bm, enable_gqa=hkv != hq)
                        torch.autograd.grad(o, (q, k, v), do)
                    ms = median_ms(step, reps)
                    emit("flex", "cca_fwd_bwd", B, T, hq, hkv, ms,
                         3.5 * 4.0 * D * hq * B * visible_sum_cca(T))
                    del bm
                except Exception as e:
                    print(json.dumps({"impl": "flex", "op": "cca_fwd_bwd", "T": T, "Hq": hq,
                                      "Hkv": hkv, "error": str(e)[:300]}), flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()


def decode(args):
    for hq, hkv in args.heads:
        for ctx in args.decode_ctx:
            for B in args.decode_batch:
                q = torch.randn(B, hq, 1, D, device="cuda", dtype=torch.bfloat16)
                nbytes = 2.0 * B * hkv * ctx * D * 2
                copies = max(1, math.ceil(256e6 / nbytes))
                kv = [(torch.randn(B, hkv, ctx, D, device="cuda", dtype=torch.bfloat16),
                       torch.randn(B, hkv, ctx, D, device="cuda", dtype=torch.bfloat16))
                      for _ in range(copies)]
                state = {"i": 0}
                inner = 20

                def step():
                    for _ in range(inner):
                        k, v = kv[state["i"] % copies]
                        state["i"] += 1
                        F.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != hq)
                ms = median_ms(step, args.reps) / inner
                emit("sdpa", "decode_full_cache", B, ctx, hq, hkv, ms, 4.0 * D * hq * B * ctx,
                     nbytes)
                del kv
                torch.cuda.empty_cache()


def decode_ragged(args):
    if not args.ragged:
        return
    for hq, hkv in args.heads:
        q = torch.randn(1, hq, 1, D, device="cuda", dtype=torch.bfloat16)
        kv = [(torch.randn(1, hkv, L, D, device="cuda", dtype=torch.bfloat16),
               torch.randn(1, hkv, L, D, device="cuda", dtype=torch.bfloat16)) for L in args.ragged]
        inner = 20

        def step():
            for _ in range(inner):
                for k, v in kv:
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != hq)
        ms = median_ms(step, args.reps) / inner
        total = sum(args.ragged)
        emit("sdpa", "decode_full_cache_ragged", len(args.ragged), total, hq, hkv, ms,
             4.0 * D * hq * total, 2.0 * hkv * total * D * 2)
        del kv
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t-list", default="4096,16384,32768,65536,131072")
    ap.add_argument("--heads", default="32:32,32:8")
    ap.add_argument("--decode-ctx", default="32768,131072")
    ap.add_argument("--decode-batch", default="1,8")
    ap.add_argument("--ragged", default="131072,98304,65536,32768,16384,8192,4096,1024")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--bwd", action="store_true",
                    help="forward+backward peers only (issue 10), no decode rows")
    args = ap.parse_args()
    args.t_list = [int(x) for x in args.t_list.split(",") if x]
    args.heads = [tuple(int(y) for y in x.split(":")) for x in args.heads.split(",")]
    args.decode_ctx = [int(x) for x in args.decode_ctx.split(",") if x]
    args.decode_batch = [int(x) for x in args.decode_batch.split(",") if x]
    args.ragged = [int(x) for x in args.ragged.split(",") if x]
    print(json.dumps({"impl": "env", "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name(0)}), flush=True)
    flex_attention = create_block_mask = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        # One compilation per shape: past the default limit (8) dynamo falls back to eager
        # flex_attention, which materialises the score matrix (out of memory at 64K).
        torch._dynamo.config.cache_size_limit = 256
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 256
        flex_attention = torch.compile(flex_attention, dynamic=False)
    if args.bwd:
        prefill_bwd(args, flex_attention, create_block_mask)
        return 0
    prefill(args, flex_attention, create_block_mask)
    decode(args)
    decode_ragged(args)


if __name__ == "__main__":
    sys.exit(main())

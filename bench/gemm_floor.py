#!/usr/bin/env python3
"""The matrix-product floor of a Llama layer on this GPU, measured with PyTorch (cuBLAS) on the
shapes the engine runs: y[n, out] = x[n, in] W[out, in]^T in bfloat16 for the q|k|v, o, gate|up
and down projections and the LM head. Prints, per shape and row count n, the time, TFLOP/s and the
weight-read bandwidth (GB/s), and the time of one whole layer's GEMMs (32 layers + head for a
prefill of --tokens tokens, one decode step). JSON with --json.
    python3 bench/gemm_floor.py --shape llama3-8b --rows 1,8,8192 --tokens 131072"""
import argparse
import json

import torch

SHAPES = {  # hidden, q heads, kv heads, head dim, MLP, vocab, layers
    "llama3-8b": (4096, 32, 8, 128, 14336, 128256, 32),
    "llama2-7b": (4096, 32, 32, 128, 11008, 32000, 32),
}


def time_ms(fn, reps):
    for _ in range(3):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    ap.add_argument("--rows", default="1,8,8192")
    ap.add_argument("--tokens", type=int, default=131072, help="prefill length for the totals")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    H, hq, hkv, D, I, V, L = SHAPES[a.shape]
    mats = {"gemm qkv": ((hq + 2 * hkv) * D, H), "gemm o": (H, hq * D),
            "gemm gate_up": (2 * I, H), "gemm down": (H, I), "gemm lm_head": (V, H)}
    torch.manual_seed(0)
    weights = {k: torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.02
               for k, (o, i) in mats.items()}
    rows = []
    for n in [int(r) for r in a.rows.split(",")]:
        layer_ms = 0.0
        for name, w in weights.items():
            x = torch.randn(n, w.shape[1], device="cuda", dtype=torch.bfloat16)
            ms = time_ms(lambda: torch.matmul(x, w.t()), 20 if n > 1024 else 200)
            flops = 2.0 * n * w.shape[0] * w.shape[1]
            rows.append(dict(shape=a.shape, gemm=name, n=n, ms=ms, tflops=flops / ms / 1e9,
                             weight_gbs=w.numel() * 2 / ms / 1e6))
            if name != "gemm lm_head":
                layer_ms += ms
        head = [r for r in rows if r["n"] == n and r["gemm"] == "gemm lm_head"][0]["ms"]
        total = (layer_ms * L * (a.tokens / n) + head) if n > 1 else layer_ms * L + head
        rows.append(dict(shape=a.shape, gemm="all layers" if n == 1 else
                         f"all layers, {a.tokens} tokens in chunks of {n}", n=n, ms=total))
    if a.json:
        print(json.dumps(rows))
        return
    dev = torch.cuda.get_device_name()
    print(f"GEMM floor with torch {torch.__version__} on {dev} ({a.shape}, bf16)")
    print(f"{'gemm':<44} {'n':>6} {'ms':>10} {'TFLOP/s':>8} {'weights GB/s':>12}")
    for r in rows:
        print(f"{r['gemm']:<44} {r['n']:>6} {r['ms']:>10.4f} {r.get('tflops', 0):>8.1f} "
              f"{r.get('weight_gbs', 0):>12.0f}")


if __name__ == "__main__":
    main()

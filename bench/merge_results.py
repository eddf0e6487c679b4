#!/usr/bin/env python3
"""Merges the JSON lines of cca_cuda_bench and torch_peers.py into one table (issue 3 targets).

usage: merge_results.py ours.jsonl peers.jsonl
"""
import json
import sys


def load(path):
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def main():
    rows = load(sys.argv[1]) + load(sys.argv[2])
    env = [r for r in rows if r.get("impl") == "env"]
    rows = [r for r in rows if "ms" in r]
    idx = {(r["impl"], r["op"], r.get("B", 1), r["T"], r["Hq"], r["Hkv"]): r for r in rows}

    def get(impl, op, B, T, hq, hkv):
        return idx.get((impl, op, B, T, hq, hkv))

    if env:
        print(f"# {env[0].get('gpu')}  torch {env[0].get('torch')}")
    print("\n## Prefill, B=1, D=128, bf16, g=16, s=1024 (ms; TFLOP/s = useful FLOPs / time)")
    hdr = ("Hq:Hkv", "T", "pool", "attend", "cca fwd", "TF/s att", "full (ours)", "cudnn",
           "flash", "flex cca fwd", "cudnn/cca", "flex/cca", "ours full/cudnn")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    keys = sorted({(r["Hq"], r["Hkv"], r["T"]) for r in rows if "decode" not in r["op"]},
                  key=lambda x: (-x[1], x[2]))
    f = lambda r: f"{r['ms']:.3f}" if r else "-"
    for hq, hkv, T in keys:
        pool = get("cca_cuda", "cca_pool", 1, T, hq, hkv)
        att = get("cca_cuda", "cca_attend", 1, T, hq, hkv)
        fwd = get("cca_cuda", "cca_fwd", 1, T, hq, hkv)
        full = get("cca_cuda", "full_fwd", 1, T, hq, hkv)
        cud = get("sdpa_cudnn", "full_fwd", 1, T, hq, hkv)
        fl = get("sdpa_flash", "full_fwd", 1, T, hq, hkv)
        flex = get("flex", "cca_fwd", 1, T, hq, hkv)
        ratio = lambda a, b: f"{a['ms'] / b['ms']:.2f}x" if a and b else "-"
        print(f"| {hq}:{hkv} | {T} | {f(pool)} | {f(att)} | {f(fwd)} | "
              f"{att['tflops'] if att else '-'} | {f(full)} | {f(cud)} | {f(fl)} | {f(flex)} | "
              f"{ratio(cud, fwd)} | {ratio(flex, fwd)} | {ratio(full, cud)} |")
    print("\n## Decode, one token per sequence (ms per layer; GB/s = cache bytes / time)")
    hdr = ("Hq:Hkv", "ctx", "B", "cca cache", "GB/s", "cca (graph)", "GB/s", "sdpa full cache",
           "GB/s", "sdpa/cca")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    dkeys = sorted({(r["Hq"], r["Hkv"], r["T"], r["B"]) for r in rows
                    if r["op"] in ("cca_decode", "decode_full_cache")}, key=lambda x: (-x[1], x[2], x[3]))
    for hq, hkv, T, B in dkeys:
        a = get("cca_cuda", "cca_decode", B, T, hq, hkv)
        ag = get("cca_cuda", "cca_decode_graph", B, T, hq, hkv)
        b = get("sdpa", "decode_full_cache", B, T, hq, hkv)
        gb = lambda r: r["gbps"] if r else "-"
        ratio = f"{b['ms'] / a['ms']:.1f}x" if a and b else "-"
        print(f"| {hq}:{hkv} | {T} | {B} | {f(a)} | {gb(a)} | {f(ag)} | {gb(ag)} | {f(b)} | "
              f"{gb(b)} | {ratio} |")
    print("\n## Ragged decode step: B sequences of total length T, each its own cache (ms)")
    hdr = ("Hq:Hkv", "B", "T", "cca fused", "GB/s", "cca per sequence", "GB/s",
           "sdpa full caches", "GB/s", "loop/fused", "sdpa/fused")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    rkeys = sorted({(r["Hq"], r["Hkv"], r["T"], r["B"]) for r in rows
                    if r["op"] == "cca_decode_ragged"}, key=lambda x: (-x[1], x[2]))
    for hq, hkv, T, B in rkeys:
        a = get("cca_cuda", "cca_decode_ragged", B, T, hq, hkv)
        lp = get("cca_cuda", "cca_decode_ragged_loop", B, T, hq, hkv)
        b = get("sdpa", "decode_full_cache_ragged", B, T, hq, hkv)
        gb = lambda r: r["gbps"] if r else "-"
        ratio = lambda x, y: f"{x['ms'] / y['ms']:.1f}x" if x and y else "-"
        print(f"| {hq}:{hkv} | {B} | {T} | {f(a)} | {gb(a)} | {f(lp)} | {gb(lp)} | {f(b)} | "
              f"{gb(b)} | {ratio(lp, a)} | {ratio(b, a)} |")
    errs = [r for r in load(sys.argv[1]) + load(sys.argv[2]) if "error" in r]
    for e in errs:
        print("error:", json.dumps(e))


if __name__ == "__main__":
    main()

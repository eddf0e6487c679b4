#!/usr/bin/env python3
"""Table and plots of issue 9's benchmark from what bench/gpu_vs_hf.sh leaves in --dir:
  ours-<shape>.json, ours-long-<shape>.json, ours-batch-<shape>.json   `cca bench model --json`
  hf-sdpa-<shape>.json, hf-flex-cca-<shape>.json                        bench/hf_bench.py --json
  gemm-<shape>.json                                                     bench/gemm_floor.py --json
Missing or unreadable files are skipped with a note. Writes, per shape, a markdown table (TTFT per
prompt length, ITL per context at batch 1, batched decode tokens/s, peak GPU memory, speedups of
ours-cca over HF at the longest common prompt) to stdout and DIR/table.md, and DIR/ttft.png
(TTFT against prompt length) and DIR/itl.png (ITL against context), log-log, one line per system,
measured points only.
    python3 bench/plot_vs_hf.py --dir out/gpu_vs_hf"""
import argparse
import glob
import json
import os
import re
import sys

# File prefixes, longest first: "ours-" also begins "ours-long-...".
SOURCES = [("ours-long-", "ours"), ("ours-batch-", "ours"), ("ours-", "ours"),
           ("hf-flex-cca-", "hf"), ("hf-sdpa-", "hf"), ("gemm-", "gemm")]
SYSTEMS = ["ours cca", "ours full", "HF SDPA", "HF Flex-CCA"]
STYLE = {"ours cca": ("C0", "o", "-"), "ours full": ("C0", "s", "--"),
         "HF SDPA": ("C1", "^", "-"), "HF Flex-CCA": ("C2", "v", "-")}
SHAPE_ORDER = ["llama3-8b", "llama2-7b"]


def note(msg):
    print("note: " + msg, file=sys.stderr)


def tokens_label(n):
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


def ours_system(name):
    return {"cca": "ours cca", "full": "ours full"}.get(name, "ours " + name)


def hf_system(system):
    return {"hf-sdpa": "HF SDPA", "hf-flex-cca": "HF Flex-CCA"}.get(system, system)


def from_ours(rows, shape):
    """A `cca bench model` row is a prefill (TTFT) and a decode whose ITL is at the prompt's end."""
    out = []
    for r in rows:
        base = dict(system=ours_system(r["name"]), shape=shape, batch=r["batch"],
                    tokens=r["prompt_tokens"], peak_bytes=r.get("peak_memory_bytes"), status="ok")
        out.append(dict(base, kind="prefill", seconds=r["ttft_s"]))
        if r.get("decode_steps", 1):
            out.append(dict(base, kind="decode", seconds=r["itl_s"], tok_s=r["decode_tok_s"]))
    return out


def from_hf(rows, shape):
    env = [r for r in rows if r.get("kind") == "env"]
    meas = [dict(system=hf_system(r["system"]), shape=shape, kind=r["kind"],
                 batch=int(r["batch"]), tokens=int(r["tokens"]), seconds=r.get("seconds"),
                 tok_s=r.get("tok_s"), peak_bytes=r.get("peak_bytes"), status=r["status"])
            for r in rows if r.get("kind") in ("prefill", "decode")]
    return meas, env


def from_gemm(rows, shape):
    """The matrix-product floor: a prefill (all layers over N tokens in chunks, N from the label)
    and a decode step at batch 1 (all layers, one row)."""
    out = []
    for r in rows:
        m = re.match(r"all layers, (\d+) tokens in chunks of (\d+)$", r.get("gemm", ""))
        if m and int(m.group(2)) >= 1024:
            out.append(dict(system="GEMM floor", shape=shape, kind="prefill", batch=1,
                            tokens=int(m.group(1)), seconds=r["ms"] / 1e3, status="ok"))
        elif r.get("gemm") == "all layers" and r.get("n") == 1:
            out.append(dict(system="GEMM floor", shape=shape, kind="decode", batch=1, tokens=0,
                            seconds=r["ms"] / 1e3, status="ok"))
    return out


def load(directory):
    meas, env, seen = [], [], []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        fname = os.path.basename(path)
        match = next(((p, kind) for p, kind in SOURCES if fname.startswith(p)), None)
        if not match:
            continue
        shape = fname[len(match[0]):-len(".json")]
        try:
            with open(path) as f:
                rows = json.load(f)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError("not a JSON array of objects")
            if match[1] == "ours":
                meas += from_ours(rows, shape)
            elif match[1] == "hf":
                m, e = from_hf(rows, shape)
                meas += m
                env += e
            else:
                meas += from_gemm(rows, shape)
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            note(f"{fname} skipped ({type(e).__name__}: {str(e)[:120]})")
            continue
        seen.append(fname)
    return meas, env, seen


# ---- the table -------------------------------------------------------------------------------
def find(meas, system, kind, batch, tokens):
    for r in meas:
        if (r["system"], r["kind"], r["batch"], r["tokens"]) == (system, kind, batch, tokens):
            return r
    return None


def ok(r):
    return r is not None and r.get("status") == "ok" and r.get("seconds") is not None


def cell(r, fmt):
    if r is None:
        return "-"
    if not ok(r):
        return str(r.get("status", "?")).split(":")[0]  # oom, n/a, error
    return fmt(r)


def gb(r):
    return f"{r['peak_bytes'] / 1e9:.1f}" if r.get("peak_bytes") else "-"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def speedup(meas, kind, batch, tokens, fast, slow):
    a, b = find(meas, fast, kind, batch, tokens), find(meas, slow, kind, batch, tokens)
    return b["seconds"] / a["seconds"] if ok(a) and ok(b) else None


def shape_table(meas, shape):
    meas = [r for r in meas if r["shape"] == shape]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in meas)]
    systems += sorted({r["system"] for r in meas} - set(systems) - {"GEMM floor"})
    prompts = sorted({r["tokens"] for r in meas if r["kind"] == "prefill" and r["batch"] == 1})
    contexts = sorted({r["tokens"] for r in meas if r["kind"] == "decode" and r["batch"] == 1
                       and r["system"] != "GEMM floor"})
    batches = sorted({(r["batch"], r["tokens"]) for r in meas if r["batch"] > 1})
    lines = [f"## {shape}", ""]

    lines.append("TTFT in seconds, batch 1 (the whole prefill of the prompt):")
    rows = [[s] + [cell(find(meas, s, "prefill", 1, T), lambda r: f"{r['seconds']:.3f}")
                   for T in prompts] for s in systems]
    floor = [find(meas, "GEMM floor", "prefill", 1, T) for T in prompts]
    if any(floor):
        rows.append(["GEMM floor (cuBLAS, linear layers only)"] +
                    [f"{r['seconds']:.3f}" if r else "" for r in floor])
    lines += md_table(["system"] + [tokens_label(T) for T in prompts], rows) + [""]

    lines.append("Decode: ms per generated token at batch 1 (context = prompt length); batched "
                 "decode in generated tokens/s over all sequences:")
    head = ["system"] + [f"ITL {tokens_label(C)}" for C in contexts] + \
        [f"batch {B} x {tokens_label(C)} tok/s" for B, C in batches]
    rows = [[s] + [cell(find(meas, s, "decode", 1, C), lambda r: f"{1e3 * r['seconds']:.2f}")
                   for C in contexts] +
            [cell(find(meas, s, "decode", B, C), lambda r: f"{r['tok_s']:.0f}")
             for B, C in batches] for s in systems]
    floor = find(meas, "GEMM floor", "decode", 1, 0)
    if floor:
        rows.append(["GEMM floor (weights only, any context)"] +
                    [f"{1e3 * floor['seconds']:.2f}"] * len(contexts) + [""] * len(batches))
    lines += md_table(head, rows) + [""]

    lines.append("Peak GPU memory in GB (ours: one run, prefill then decode; HF prefill: "
                 "use_cache=False; HF decode: prefill into a cache, then the steps):")
    cols = [("prefill", 1, T, "prefill " + tokens_label(T)) for T in prompts] + \
        [("decode", 1, C, "decode " + tokens_label(C)) for C in contexts] + \
        [("decode", B, C, f"batch {B} x {tokens_label(C)}") for B, C in batches]
    rows = [[s] + [cell(find(meas, s, k, B, T), gb) for k, B, T, _ in cols] for s in systems]
    lines += md_table(["system"] + [c[3] for c in cols], rows) + [""]

    # Speedups at the longest length both systems measured (128K in the full run).
    lengths = {("prefill", 1): prompts, ("decode", 1): contexts}
    for B, C in batches:
        lengths.setdefault(("decode", B), []).append(C)
    for (kind, batch), lens in lengths.items():
        what = "TTFT" if kind == "prefill" else "ITL" if batch == 1 else f"batch {batch} decode"
        for fast, slow in (("ours cca", "HF SDPA"), ("ours cca", "HF Flex-CCA"),
                           ("ours full", "HF SDPA")):
            both = [T for T in lens if speedup(meas, kind, batch, T, fast, slow)]
            if both:
                x = speedup(meas, kind, batch, both[-1], fast, slow)
                lines.append(f"- {what} at {tokens_label(both[-1])}: {slow} / {fast} = {x:.2f}x")
    return lines + [""]


def versions(env):
    seen = []
    for e in env:
        line = (f"{e.get('gpu', '?')}: torch {e.get('torch', '?')}, transformers "
                f"{e.get('transformers', '?')}, triton {e.get('triton', '-')}, CUDA "
                f"{e.get('cuda', '?')}, {e.get('date', '?')}")
        if line not in seen:
            seen.append(line)
    return seen


# ---- the plots -------------------------------------------------------------------------------
def plot(meas, shapes, kind, ylabel, scale, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        xs_all = set()
        pts = [r for r in meas if r["shape"] == shape and r["kind"] == kind and r["batch"] == 1
               and ok(r) and r["tokens"] > 0]
        for s in [s for s in SYSTEMS if s != "GEMM floor"] + \
                sorted({r["system"] for r in pts} - set(SYSTEMS) - {"GEMM floor"}):
            xy = sorted((r["tokens"], scale * r["seconds"]) for r in pts if r["system"] == s)
            if not xy:
                continue
            color, marker, ls = STYLE.get(s, (None, "x", ":"))
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker=marker, linestyle=ls,
                    color=color, label=s)
            xs_all |= {x for x, _ in xy}
        floor = [r for r in pts if r["system"] == "GEMM floor"]
        if floor:
            ax.scatter([r["tokens"] for r in floor], [scale * r["seconds"] for r in floor],
                       marker="x", color="k", label="GEMM floor", zorder=3)
            xs_all |= {r["tokens"] for r in floor}
        step_floor = find([r for r in meas if r["shape"] == shape], "GEMM floor", kind, 1, 0)
        if step_floor and xs_all:
            ax.axhline(scale * step_floor["seconds"], color="k", linestyle=":",
                       label="GEMM floor (weights, any context)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        if xs_all:
            ax.xaxis.set_major_locator(FixedLocator(sorted(xs_all)))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([tokens_label(x) for x in sorted(xs_all)])
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no measured points", ha="center", transform=ax.transAxes)
        ax.set_title(shape)
        ax.set_xlabel("prompt tokens" if kind == "prefill" else "context tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path[:-len(".png")] + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="bench/gpu_vs_hf.sh's output directory")
    a = ap.parse_args()
    if not os.path.isdir(a.dir):
        ap.error(f"--dir {a.dir!r} is not a directory")
    meas, env, seen = load(a.dir)
    shapes = sorted({r["shape"] for r in meas},
                    key=lambda s: (SHAPE_ORDER.index(s) if s in SHAPE_ORDER else 99, s))
    for shape in shapes:
        for prefix, _ in SOURCES:
            if not os.path.exists(os.path.join(a.dir, f"{prefix}{shape}.json")) and \
                    not (prefix == "ours-long-" and shape != "llama3-8b"):
                note(f"{prefix}{shape}.json missing")
    if not meas:
        sys.exit(f"plot_vs_hf: no results in {a.dir} (expected ours-*.json, hf-*.json, "
                 "gemm-*.json)")

    lines = ["# GPU engine against Hugging Face transformers (issue 9)", ""]
    lines += [f"- {v}" for v in versions(env)]
    lines += [f"- from: {', '.join(seen)}", ""]
    for shape in shapes:
        lines += shape_table(meas, shape)
    text = "\n".join(lines)
    print(text)
    tmp = os.path.join(a.dir, "table.md.tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, os.path.join(a.dir, "table.md"))
    try:
        plot(meas, shapes, "prefill", "TTFT (s)", 1.0, os.path.join(a.dir, "ttft.png"))
        plot(meas, shapes, "decode", "ms per token (batch 1)", 1e3, os.path.join(a.dir, "itl.png"))
    except ImportError as e:
        sys.exit(f"plot_vs_hf: no plots, matplotlib is missing ({e}); the table is in "
                 f"{os.path.join(a.dir, 'table.md')}")
    print(f"wrote {os.path.join(a.dir, 'table.md')}, ttft.png, itl.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

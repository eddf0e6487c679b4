#!/usr/bin/env python3
"""Per-kernel GPU time of the last decode step of a run profiled with Nsight Compute:
    ncu --metrics gpu__time_duration.sum --csv <cca generate ... --no-cuda-graphs> > step.csv
    python3 bench/ncu_step.py step.csv
The step is the kernels after the second-to-last argmax (the previous token's choice) up to the
last one. Kernels are timed one at a time (no gaps, no overlap): the sum is the step's floor
when replayed from a CUDA graph."""
import collections
import re
import csv
import sys

rows = list(csv.reader(open(sys.argv[1])))
hi = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
h = rows[hi]
ki, mi, vi, idi = (h.index(x) for x in ("Kernel Name", "Metric Name", "Metric Value", "ID"))
ks = sorted((int(r[idi]), r[ki], float(r[vi].replace(",", ""))) for r in rows[hi + 1:]
            if len(r) > vi and r[mi] == "gpu__time_duration.sum")
ends = [i for i, k in enumerate(ks) if "argmax" in k[1]]
step = ks[ends[-2] + 1:ends[-1] + 1] if len(ends) >= 2 else ks
agg = collections.OrderedDict()
for _, k, t in step:
    key = k.replace("<unnamed>::", "").replace("(anonymous namespace)::", "")
    key = re.sub(r"<.*>", "", key.split("(")[0]).replace("void ", "").split("::")[-1].strip()[:60]
    c, s = agg.get(key, (0, 0.0))
    agg[key] = (c + 1, s + t)
total = sum(s for c, s in agg.values())
print(f"decode step: {len(step)} kernels, {total / 1e3:.1f} us of kernel time")
for k, (c, s) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"  {k:<60} {c:>4} {s / 1e3:>9.1f} us {s / 1e3 / c:>7.2f} us/call")

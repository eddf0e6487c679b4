#!/usr/bin/env bash
# Issue 10's GPU run for the cuda backward, in one go: build; the GPU tests (the backward against
# the float64 reference and the consistency driver's grad mode, determinism, errors; the forward's
# cuda tests again, since the kernels share helpers); compute-sanitizer memcheck and racecheck on
# small backward cases; then timings: `cca bench attention --bwd --backend cuda` (whole calls)
# and cca_cuda_bench --bwd (kernels through the backend interface, float32 gradients), printed
# last as one table. Run from anywhere on a machine with a GPU, nvcc and CMake; logs and JSON go
# to $OUT (default out/gpu_backward).
#   STAGES="build test sanitize bench peers" (default); peers: bench/torch_peers.py --bwd (SDPA
#   and FlexAttention-CCA forward+backward, same shapes) in the summary table; QUICK=1: T = 8K and 32K only;
#   T_LIST / HEADS / TEST_FILTER / TEST_TIMEOUT override.
#   Debian .debs in .deps/ are unpacked to /opt/deps first where the machine lacks them
#   (bench/deps_env.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_backward}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test sanitize bench peers"}
BUILD=${BUILD_DIR:-build-gpu}
has() { [[ " $STAGES " == *" $1 "* ]]; }
if [ -n "${QUICK:-}" ]; then T_LIST=${T_LIST:-8192,32768}; fi
T_LIST=${T_LIST:-8192,16384,32768,65536,131072}
HEADS=${HEADS:-"32:32 32:8"}

source bench/deps_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/gpu.txt"

if has build; then
  echo "== build ($BUILD)"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCCA_CUDA=ON \
    -DCCA_CUDA_ARCHS=${CCA_CUDA_ARCHS:-90a} ${PREFIX:-} >"$OUT/configure.log" 2>&1 ||
    { tail -30 "$OUT/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"$(nproc)" --target cca cca_tests cca_cuda_bench >"$OUT/build.log" 2>&1 ||
    { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; exit 1; }
fi

if has test; then
  echo "== GPU tests"
  timeout ${TEST_TIMEOUT:-480} "$BUILD/cca_tests" \
    --gtest_filter="${TEST_FILTER:-*CudaBwd*:*Cuda*:*cuda*:*Consistency*}" >"$OUT/tests.log" 2>&1
  echo "tests exit $?"
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |tests? ran|FAILED TEST" "$OUT/tests.log" | tail -15
  grep -B8 "^\[  FAILED  \]" "$OUT/tests.log" | grep -v "^\[ RUN\|^\[       OK" | head -60
  # Worst backward errors per backend and dtype (the consistency driver's summary).
  grep -E "^grad " "$OUT/tests.log" | tail -12
fi

if has sanitize; then
  small="*CudaBwd.PoolBackwardMatchesRef:*CudaBwd.Float32Gradients*:Gpu/CudaBwd.MatchesRef/lminfinite*:Gpu/CudaBwd.MatchesRef/cca_g3*"
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool (small backward cases)"
    timeout ${SANITIZE_TIMEOUT:-300} compute-sanitizer --tool $tool --error-exitcode 9 "$BUILD/cca_tests" \
      --gtest_filter="${SANITIZE_FILTER:-$small}" >"$OUT/$tool.log" 2>&1
    echo "$tool exit $?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|hazard|PASSED|FAILED" "$OUT/$tool.log" | head -8
  done
fi

if has bench; then
  echo "== timings: cca bench attention --bwd --backend cuda (B=1, D=128, bf16, g=16, s=1024)"
  : >"$OUT/cli.jsonl"
  for hp in $HEADS; do
    "$BUILD/cca" bench attention --backend cuda --bwd --json --variants cca --group 16 \
      --window 1024 --heads "${hp%:*}" --kv-heads "${hp#*:}" --dim 128 --dtype bfloat16 \
      --reps 3 --t-list "$T_LIST" | tee -a "$OUT/cli.jsonl"
  done
  echo "== timings: cca_cuda_bench --bwd (kernels, float32 gradients)"
  : >"$OUT/kernels.jsonl"
  for hp in $HEADS; do
    "$BUILD/cca_cuda_bench" --bwd --skip-full --decode-ctx "" --ragged "" --heads "$hp" \
      --t-list "$T_LIST" | tee -a "$OUT/kernels.jsonl"
  done
fi

if has peers; then
  echo "== peers: torch_peers.py --bwd (SDPA cuDNN/flash full causal, FlexAttention-CCA)"
  LD_LIBRARY_PATH=$ORIG_LD python3 bench/torch_peers.py --bwd --reps 3 --t-list "$T_LIST" \
    --heads "${HEADS// /,}" >"$OUT/peers.jsonl" 2>"$OUT/peers.log" || tail -20 "$OUT/peers.log"
fi

if has bench || has peers; then
  echo "== summary ($(head -1 "$OUT/gpu.txt"))"
  python3 - "$OUT" <<'EOF'
import json, sys, os
out = sys.argv[1]
def jsonl(name):
    path = os.path.join(out, name)
    return [json.loads(l) for l in open(path) if l.startswith("{")] if os.path.exists(path) else []
rows = jsonl("cli.jsonl")
print("cca bench attention (whole attn_fwd / attn_bwd calls, bf16 gradients):")
print("%-6s %7s %9s %9s %9s %9s %8s" % ("Hq:Hkv", "T", "fwd_ms", "fwd_TF/s", "bwd_ms", "bwd_TF/s", "bwd/fwd"))
for r in rows:
    print("%-6s %7d %9.2f %9.1f %9.2f %9.1f %8.2f" % ("%d:%d" % (r["Hq"], r["Hkv"]), r["T"], r["ms"],
          r["gflops"] / 1e3, r["bwd_ms"], r["bwd_gflops"] / 1e3, r["bwd_over_fwd"]))
ks = jsonl("kernels.jsonl")
ops = ["cca_fwd", "cca_bwd_attend", "cca_bwd_pool", "cca_bwd", "cca_fwd_bwd"]
print("cca_cuda_bench (kernels; ms, and useful TFLOP/s where the op has FLOPs):")
print("%-6s %7s " % ("Hq:Hkv", "T") + " ".join("%19s" % o for o in ops))
keys = sorted({(k["Hq"], k["Hkv"], k["T"]) for k in ks})
for hq, hkv, t in keys:
    cells = []
    for o in ops:
        m = [k for k in ks if (k["Hq"], k["Hkv"], k["T"], k["op"]) == (hq, hkv, t, o)]
        cells.append("%19s" % ("%.2f ms %.0f TF/s" % (m[0]["ms"], m[0]["tflops"]) if m and m[0]["tflops"]
                               else "%.2f ms" % m[0]["ms"] if m else "-"))
    print("%-6s %7d " % ("%d:%d" % (hq, hkv), t) + " ".join(cells))
ps = [p for p in jsonl("peers.jsonl") if "ms" in p]
if ps:
    print("forward+backward, same run (ms; useful TFLOP/s; x = peer time / ours):")
    print("%-6s %7s %16s %22s %22s %22s" % ("Hq:Hkv", "T", "ours cca", "flex cca", "sdpa cudnn full",
                                            "sdpa flash full"))
    for hq, hkv, t in sorted({(p["Hq"], p["Hkv"], p["T"]) for p in ps} | set(keys)):
        ours = [k for k in ks if (k["Hq"], k["Hkv"], k["T"], k["op"]) == (hq, hkv, t, "cca_fwd_bwd")]
        o = ours[0]["ms"] if ours else None
        cells = ["%16s" % ("%.2f %4.0fTF" % (o, ours[0]["tflops"]) if o else "-")]
        for impl, op in (("flex", "cca_fwd_bwd"), ("sdpa_cudnn", "full_fwd_bwd"),
                         ("sdpa_flash", "full_fwd_bwd")):
            m = [p for p in ps if (p["impl"], p["op"], p["Hq"], p["Hkv"], p["T"]) == (impl, op, hq, hkv, t)]
            cells.append("%22s" % ("%.2f %4.0fTF %5.2fx" % (m[0]["ms"], m[0]["tflops"], m[0]["ms"] / o)
                                   if m and o else "%.2f" % m[0]["ms"] if m else "-"))
        print("%-6s %7d " % ("%d:%d" % (hq, hkv), t) + " ".join(cells))
EOF
fi

#!/usr/bin/env bash
# The Hopper wgmma backward (src/attn/cuda/attend_bwd_wgmma.cu) on a GPU machine, from prebuilt
# binaries: the backward GPU tests (the wgmma path by default, then the mma.sync path again
# under CCA_CUDA_BWD=mma); CudaBwd.WgmmaAgreesWithMma and MatchesRef with only one of the two
# wgmma kernels on (CCA_CUDA_BWD=dkdv, =dq) and with the dQ kernel's overlap off
# (CCA_CUDA_BWD_OVERLAP=0), to bisect a failure; compute-sanitizer memcheck and racecheck on
# small backward cases; then `cca bench attention --backend cuda --bwd` with CCA_CUDA_BWD unset
# (wgmma dK/dV and dQ) and =mma (the mma.sync kernels), alternating per length, and
# cca_cuda_bench --bwd (the kernels alone) where built, printed last as tables. Logs and JSON
# go to $OUT (default out/gpu_bwd_wgmma).
#   BUILD_DIR (default build-gpu): where cca and cca_tests are. DO_BUILD=1 configures and builds
#   them there first (CCA_CUDA_ARCHS=90a). STAGES="test testmma bisect sanitize bench" (default;
#   test: the wgmma path, testmma: CCA_CUDA_BWD=mma; split them over calls of a 10-minute limit);
#   T_LIST (default 8192,32768,131072), HEADS (default "32:32"; e.g. "32:32 32:8"), REPS
#   (default 3), TEST_FILTER, TEST_TIMEOUT, SANITIZE_FILTER override.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_bwd_wgmma}
mkdir -p "$OUT"
BUILD=${BUILD_DIR:-build-gpu}
STAGES=${STAGES:-"test testmma bisect sanitize bench"}
T_LIST=${T_LIST:-8192,32768,131072}
HEADS=${HEADS:-"32:32"}
REPS=${REPS:-3}
FILTER=${TEST_FILTER:-'*CudaBwd*:ConsistencyCuda.GradMatchesRef:Backward.*:ApiErrors.AttnBwd*'}
has() { [[ " $STAGES " == *" $1 "* ]]; }

[ -f bench/deps_env.sh ] && source bench/deps_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/gpu.txt"
git log --oneline -1 2>/dev/null | tee -a "$OUT/gpu.txt"

if [ "${DO_BUILD:-0}" = 1 ]; then
  echo "== build ($BUILD)"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCCA_CUDA=ON \
    -DCCA_CUDA_ARCHS=${CCA_CUDA_ARCHS:-90a} >"$OUT/configure.log" 2>&1 ||
    { tail -30 "$OUT/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"$(nproc)" --target cca cca_tests cca_cuda_bench >"$OUT/build.log" 2>&1 ||
    { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; exit 1; }
fi
for bin in cca cca_tests; do
  [ -x "$BUILD/$bin" ] || { echo "missing $BUILD/$bin (set BUILD_DIR, or DO_BUILD=1)"; exit 1; }
done

summary_tests() {  # log
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |tests? ran|FAILED TEST" "$1" | tail -12
  grep -B10 "^\[  FAILED  \]" "$1" | grep -v "^\[ RUN\|^\[       OK" | head -40
  grep -E "^\[  SKIPPED \]|Skipped" -A1 "$1" | grep -i "wgmma" | head -3
}

if has test || has testmma; then
  for mode in wgmma mma; do
    if [ $mode = wgmma ] && ! has test; then continue; fi
    if [ $mode = mma ] && ! has testmma; then continue; fi
    echo "== GPU backward tests, CCA_CUDA_BWD=${mode/wgmma/(unset)}"
    if [ $mode = mma ]; then export CCA_CUDA_BWD=mma; else unset CCA_CUDA_BWD; fi
    timeout ${TEST_TIMEOUT:-540} "$BUILD/cca_tests" --gtest_filter="$FILTER" \
      >"$OUT/tests_$mode.log" 2>&1
    echo "tests ($mode) exit $?"
    summary_tests "$OUT/tests_$mode.log"
    unset CCA_CUDA_BWD
  done
fi

if has bisect; then
  for mode in dkdv dq nooverlap; do
    if [ $mode = nooverlap ]; then
      echo "== the same with the dQ kernel's overlap off (CCA_CUDA_BWD_OVERLAP=0)"
      export CCA_CUDA_BWD_OVERLAP=0
    else
      echo "== CudaBwd.WgmmaAgreesWithMma, MatchesRef with only $mode on wgmma (CCA_CUDA_BWD=$mode)"
      export CCA_CUDA_BWD=$mode
    fi
    timeout 300 "$BUILD/cca_tests" \
      --gtest_filter='CudaBwd.WgmmaAgreesWithMma:Gpu/CudaBwd.MatchesRef/*' \
      >"$OUT/bisect_$mode.log" 2>&1
    echo "bisect ($mode) exit $?"
    summary_tests "$OUT/bisect_$mode.log"
    unset CCA_CUDA_BWD CCA_CUDA_BWD_OVERLAP
  done
fi

if has sanitize; then
  # Small shapes that take the wgmma kernels (D 64 and 128, core tokens, sinks, GQA, partial
  # tiles). racecheck follows shared-memory accesses; the bulk tensor copies (TMA) write through
  # the async proxy and are ordered by mbarriers, which it may not model: read its hazards
  # against the kernel before believing them.
  small=${SANITIZE_FILTER:-"Gpu/CudaBwd.MatchesRef/lminfinite*:Gpu/CudaBwd.MatchesRef/cca_g3*:CudaBwd.Float32GradientsRoundToThe16BitOnes"}
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool ($small)"
    timeout ${SANITIZE_TIMEOUT:-600} compute-sanitizer --tool $tool --error-exitcode 9 \
      "$BUILD/cca_tests" --gtest_filter="$small" >"$OUT/$tool.log" 2>&1
    echo "$tool exit $?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|hazard|PASSED|FAILED" "$OUT/$tool.log" | head -8
  done
fi

if has bench; then
  echo "== timings: cca bench attention --backend cuda --bwd (B=1, D=128, bf16, g=16, s=1024)"
  : >"$OUT/cli.jsonl"
  for hp in $HEADS; do
    for T in ${T_LIST//,/ }; do
      for mode in wgmma mma; do
        if [ $mode = mma ]; then export CCA_CUDA_BWD=mma; else unset CCA_CUDA_BWD; fi
        "$BUILD/cca" bench attention --backend cuda --bwd --json --variants cca --group 16 \
          --window 1024 --heads "${hp%:*}" --kv-heads "${hp#*:}" --dim 128 --dtype bfloat16 \
          --reps "$REPS" --t-list "$T" 2>>"$OUT/bench.err" |
          sed "s/^{/{\"bwd_path\": \"$mode\", /" | tee -a "$OUT/cli.jsonl"
        unset CCA_CUDA_BWD
      done
    done
  done
  : >"$OUT/kernels.jsonl"
  if [ -x "$BUILD/cca_cuda_bench" ]; then
    echo "== timings: cca_cuda_bench --bwd (kernels through the backend; cca_bwd_attend = dK/dV + dQ)"
    for hp in $HEADS; do
      for mode in wgmma mma; do
        if [ $mode = mma ]; then export CCA_CUDA_BWD=mma; else unset CCA_CUDA_BWD; fi
        "$BUILD/cca_cuda_bench" --bwd --skip-full --decode-ctx "" --ragged "" --heads "$hp" \
          --t-list "$T_LIST" 2>>"$OUT/bench.err" | grep '^{' |
          sed "s/^{/{\"bwd_path\": \"$mode\", /" | tee -a "$OUT/kernels.jsonl"
        unset CCA_CUDA_BWD
      done
    done
  fi
  echo "== summary ($(head -1 "$OUT/gpu.txt"))"
  python3 - "$OUT/cli.jsonl" "$OUT/kernels.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("cca bench attention, bf16, D=128, g=16, s=1024 (whole attn_fwd / attn_bwd calls; useful"
      " TFLOP/s, bwd counted as 2.5x fwd):")
print("%-6s %7s %9s %8s | %10s %8s | %10s %8s | %7s %12s" % (
    "Hq:Hkv", "T", "fwd_ms", "fwd_TF", "bwd_mma_ms", "mma_TF", "bwd_wg_ms", "wg_TF", "speedup",
    "fwd+bwd_wg_ms"))
keys = sorted({(r["Hq"], r["Hkv"], r["T"]) for r in rows})
for hq, hkv, t in keys:
    by = {r["bwd_path"]: r for r in rows if (r["Hq"], r["Hkv"], r["T"]) == (hq, hkv, t)}
    w, m = by.get("wgmma"), by.get("mma")
    f = w or m
    cell = lambda r, k, s=1.0: "%.2f" % (r[k] * s) if r else "-"
    sp = "%.2fx" % (m["bwd_ms"] / w["bwd_ms"]) if w and m else "-"
    tot = "%.1f" % (w["ms"] + w["bwd_ms"]) if w else "-"
    print("%-6s %7d %9s %8s | %10s %8s | %10s %8s | %7s %12s" % (
        "%d:%d" % (hq, hkv), t, cell(f, "ms"), cell(f, "gflops", 1e-3), cell(m, "bwd_ms"),
        cell(m, "bwd_gflops", 1e-3), cell(w, "bwd_ms"), cell(w, "bwd_gflops", 1e-3), sp, tot))
ks = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
if ks:
    print("cca_cuda_bench kernels (ms, useful TFLOP/s; cca_bwd_attend = dK/dV + dQ kernels):")
    ops = ["cca_bwd_attend", "cca_bwd", "cca_fwd_bwd"]
    print("%-6s %7s " % ("Hq:Hkv", "T") + " ".join("%18s %18s" % (o + " mma", "wgmma") for o in ops))
    for hq, hkv, t in sorted({(k["Hq"], k["Hkv"], k["T"]) for k in ks}):
        cells = []
        for o in ops:
            for path in ("mma", "wgmma"):
                m = [k for k in ks if (k["Hq"], k["Hkv"], k["T"], k["op"], k["bwd_path"]) ==
                     (hq, hkv, t, o, path)]
                cells.append("%18s" % ("%.2f ms %.0f TF" % (m[0]["ms"], m[0]["tflops"]) if m else "-"))
        print("%-6s %7d " % ("%d:%d" % (hq, hkv), t) + " ".join(cells))
EOF
fi

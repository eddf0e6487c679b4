#!/usr/bin/env bash
# Issue 10's Python run on the GPU machine in one go (parts 2-4: the package, the transformers
# integration, the fine-tuning command). Needs PyTorch (2.4+ for the custom-op and compile
# checks) and transformers 5.x in python3, nvcc, CMake. Prints a PASS/FAIL table last; logs go to
# $OUT (default out/gpu_python).
#   build   libcca.so (with CUDA) and the cca CLI into $BUILD_DIR (default build-gpu)
#   unit    python/tests on CUDA tensors (CCA_TEST_DEVICE=cuda: forward, gradients, decode cache,
#           errors, torch.compile fullgraph) and on CPU tensors (the custom-op path of torch 2.x)
#   hf      python/tests/hf_checks.py: tiny random Llama/Mistral/Qwen2 with attn_implementation
#           "cca" against the contract in PyTorch, training steps, CCACache decode and
#           generate, error cases, torch.compile of the model, then python -m cca.finetune end
#           to end and `cca logits` / `cca generate` on its output
#   bench   bench/hf_train_bench.py: one training step of a Llama-3-8B-shaped model (8 layers)
#           with TRAIN_IMPL (default sdpa,cca,flex-cca,no-attn; no-attn: attention costs nothing,
#           the floor of the rest) at TRAIN_SEQ (default 16384,32768): tokens/s, peak memory
#   STAGES="build unit hf" (default; bench is asked for by name); HF_ONLY=forward,decode,... limits hf_checks. Each stage
#   fits a 10-minute call: STAGES=build, then STAGES=unit, then STAGES=hf (build-gpu is kept).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_python}
mkdir -p "$OUT"
STAGES=${STAGES:-"build unit hf"}
BUILD=${BUILD_DIR:-build-gpu}
WORK=${WORK:-/tmp/cca-gpu-python}
mkdir -p "$WORK"
has() { [[ " $STAGES " == *" $1 "* ]]; }
source bench/deps_env.sh
DEPS_LD=${LD_LIBRARY_PATH:-}
rows=()
row() { rows+=("$(printf '%-4s  %-50s %s' "$1" "$2" "$3")"); }

if has build; then
  echo "== build ($BUILD)"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCCA_CUDA_ARCHS=${CCA_CUDA_ARCHS:-90a} \
    $PREFIX >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
  if cmake --build "$BUILD" -j"$(nproc)" --target cca_shared cca >"$OUT/build.log" 2>&1; then
    row PASS "build libcca.so + cca (CUDA)" "$BUILD"
  else
    grep -E "error|Error" -A3 "$OUT/build.log" | head -60
    row FAIL "build libcca.so + cca (CUDA)" "see $OUT/build.log"
  fi
fi

# Python runs with the library path it had before the carried .debs; the cca CLI with them.
export CCA_LIBRARY="$PWD/$BUILD/libcca.so" PYTHONUNBUFFERED=1
printf '#!/bin/sh\nLD_LIBRARY_PATH="%s" exec "%s" "$@"\n' "$DEPS_LD" "$PWD/$BUILD/cca" >"$WORK/cca"
chmod +x "$WORK/cca"
export CCA_CLI="$WORK/cca"  # python/tests/test_train_tiny.py compares with `cca logits`

if has unit; then
  for dev in cuda cpu; do
    echo "== python/tests on $dev tensors"
    LD_LIBRARY_PATH=$ORIG_LD CCA_TEST_DEVICE=$dev timeout ${UNIT_TIMEOUT:-280} \
      python3 python/tests/run.py >"$OUT/unit-$dev.log" 2>&1
    rc=$?
    ran=$(grep -E "^Ran [0-9]+ tests" "$OUT/unit-$dev.log" | tail -1)
    res=$(tail -1 "$OUT/unit-$dev.log")
    grep -E "^(FAIL|ERROR):|Error:|skipped '" "$OUT/unit-$dev.log" | head -20
    row "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "python/tests, $dev tensors" "$ran: $res"
  done
fi

if has hf; then
  echo "== transformers integration and cca.finetune"
  LD_LIBRARY_PATH=$ORIG_LD timeout ${HF_TIMEOUT:-560} python3 python/tests/hf_checks.py \
    --device cuda --work "$WORK/hf" --cca "$WORK/cca" --only "${HF_ONLY:-}" \
    >"$OUT/hf.log" 2>&1
  rc=$?
  grep -E "^(PASS|FAIL|SKIP) " "$OUT/hf.log"
  while IFS= read -r line; do
    status=${line%% *}; rest=${line#* }; detail=${rest#*: }
    row "$status" "${rest%%: *}" "${detail:0:120}"
  done < <(grep -E "^(PASS|FAIL|SKIP) " "$OUT/hf.log")
  [ $rc -eq 0 ] || [ -n "$(grep -E '^FAIL ' "$OUT/hf.log")" ] ||
    row FAIL "hf_checks.py" "exit $rc: $(tail -3 "$OUT/hf.log" | tr '\n' ' ')"
fi

if has bench; then
  echo "== training step: bench/hf_train_bench.py (sdpa, cca, flex-cca)"
  LD_LIBRARY_PATH=$ORIG_LD timeout ${BENCH_TIMEOUT:-560} python3 bench/hf_train_bench.py \
    --seq "${TRAIN_SEQ:-16384,32768}" --impl "${TRAIN_IMPL:-sdpa,cca,flex-cca,no-attn}" --json "$OUT/hf-train.json" 2>"$OUT/hf-train.log" |
    tee "$OUT/hf-train.txt" | grep -v '^{'
  rc=${PIPESTATUS[0]}
  [ $rc -eq 0 ] || tail -5 "$OUT/hf-train.log"
  row "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "training-step benchmark ran" "exit $rc"
fi

echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), \
$(python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null), $(date -u +%F))"
printf '%s\n' "${rows[@]}"
! printf '%s\n' "${rows[@]}" | grep -q '^FAIL'

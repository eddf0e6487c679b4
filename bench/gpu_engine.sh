#!/usr/bin/env bash
# Issue 8's GPU run in one go (the GPU inference engine): build; the GPU tests (ops against the
# cpu ops, the engine on the GPU against the CPU model, the cuda attention tests); parity with
# Hugging Face transformers in bfloat16 (scripts/hf_parity.py); then a random Llama-3-8B-shaped
# checkpoint (written here, not committed) generating from a 128K-token and a 1M-token prompt.
# Prints a short table last. Logs go to $OUT (default out/gpu_engine).
#   STAGES="build test parity long" (default); TEST_FILTER, PROMPTS ("131072 1048576") override.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_engine}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test parity long"}
BUILD=${BUILD_DIR:-build-gpu}
WORK=${WORK:-/tmp/cca-gpu-engine}
has() { [[ " $STAGES " == *" $1 "* ]]; }
source bench/deps_env.sh
summary=()

if has build; then
  echo "== build ($BUILD)"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCCA_CUDA_ARCHS=${CCA_CUDA_ARCHS:-90a} \
    $PREFIX >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"$(nproc)" --target cca cca_tests >"$OUT/build.log" 2>&1 ||
    { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; exit 1; }
fi

if has test; then
  echo "== GPU tests"
  timeout ${TEST_TIMEOUT:-300} "$BUILD/cca_tests" \
    --gtest_filter="${TEST_FILTER:-*Ops*:*Engine*:*Cuda*:*KvCache*:Model*}" >"$OUT/tests.log" 2>&1
  rc=$?
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |tests? ran|FAILED TEST" "$OUT/tests.log" | tail -12
  grep -B8 "^\[  FAILED  \]" "$OUT/tests.log" | grep -v "^\[ RUN\|^\[       OK" | head -60
  summary+=("GPU tests: exit $rc, $(grep -E '^\[  PASSED' "$OUT/tests.log" | head -1)")
fi

if has parity; then
  echo "== parity with Hugging Face (bf16)"
  LD_LIBRARY_PATH=$ORIG_LD PYTHONUNBUFFERED=1 timeout ${PARITY_TIMEOUT:-240} python3 \
    scripts/hf_parity.py --cca "$BUILD/cca" --work "$WORK/parity" 2>"$OUT/parity.err" |
    tee "$OUT/parity.log"
  summary+=("HF parity: exit ${PIPESTATUS[0]}")
  tail -5 "$OUT/parity.err"
fi

if has long; then
  echo "== random Llama-3-8B-shaped checkpoint, long prompts"
  M="$WORK/llama3-8b"
  [ -f "$M/config.json" ] || LD_LIBRARY_PATH=$ORIG_LD python3 bench/make_random_checkpoint.py \
    --shape llama3-8b --out "$M" >"$OUT/checkpoint.log" 2>&1 || { tail "$OUT/checkpoint.log"; exit 1; }
  "$BUILD/cca" info --model "$M" --device cuda | head -8
  for T in ${PROMPTS:-131072 1048576}; do
    python3 -c "import random; random.seed($T); print(' '.join(str(random.randrange(3, 128000)) for _ in range($T)))" >"$WORK/p$T.ids"
    N=$([ "$T" -gt 200000 ] && echo 8 || echo 64)
    timeout 300 "$BUILD/cca" generate --model "$M" --ids "$WORK/p$T.ids" -n $N --greedy \
      --ignore-eos --allow-long-prompt --device cuda --stats --no-progress \
      >"$OUT/gen$T.out" 2>"$OUT/gen$T.err"
    echo "prompt $T: exit $?"; tail -2 "$OUT/gen$T.err"
    summary+=("$(tail -2 "$OUT/gen$T.err" | head -1)")
    if [ "$T" -le 200000 ]; then  # the same decode without CUDA graphs: what replaying saves
      timeout 300 "$BUILD/cca" generate --model "$M" --ids "$WORK/p$T.ids" -n $N --greedy \
        --ignore-eos --allow-long-prompt --device cuda --no-progress --no-cuda-graphs \
        >"$OUT/gen$T-eager.out" 2>"$OUT/gen$T-eager.err"
      cmp -s "$OUT/gen$T.out" "$OUT/gen$T-eager.out" && same=same || same=different
      summary+=("eager (no graphs), tokens $same: $(tail -1 "$OUT/gen$T-eager.err")")
    fi
  done
fi

echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(date -u +%F))"
printf '%s\n' "${summary[@]}"

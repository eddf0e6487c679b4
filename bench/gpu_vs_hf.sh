#!/usr/bin/env bash
# Issue 9's benchmark on one GPU: the engine against Hugging Face transformers in the same run.
# Writes random checkpoints of the Llama-3-8B and Llama-2-7B shapes (bench/make_random_checkpoint.py,
# not committed) and times, per shape:
#   ours   `cca bench model --json`: cca and full, prefill at $PROMPTS (+ $LONG for cca), decode
#          at the prompt's end (ITL) with batch 1, and batch $BATCH at $BATCH_CONTEXT;
#   hf     bench/hf_bench.py: transformers + SDPA (full attention; prefill at $PROMPTS, decode at
#          32K and 128K, batch $BATCH) and CCA as FlexAttention (PyTorch pooling + a block mask,
#          registered through AttentionInterface; prefill at $FLEX_PROMPTS);
#   gemm   bench/gemm_floor.py: cuBLAS (through torch) on the layer's GEMM shapes, the floor;
#   profile `cca bench model --profile`: where the engine's time goes at 32K and 128K;
#   plot   bench/plot_vs_hf.py: a markdown table and PNGs (TTFT and ITL against length).
# Logs and JSON go to $OUT (default out/gpu_vs_hf); the table is printed last. The whole run takes
# about 20 minutes of an H200; split it by STAGES and SHAPES where a call is limited (the plot
# stage reads every JSON file left in $OUT).
#   STAGES="build ckpt ours hf gemm profile plot" SHAPES="llama3-8b llama2-7b" CCA=path/to/cca
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_vs_hf}
mkdir -p "$OUT"
STAGES=${STAGES:-"build ckpt ours hf gemm profile plot"}
SHAPES=${SHAPES:-"llama3-8b llama2-7b"}
PROMPTS=${PROMPTS:-"4096,16384,32768,65536,131072"}
FLEX_PROMPTS=${FLEX_PROMPTS:-"4096,32768,131072"}  # each length compiles its own kernel
LONG=${LONG:-1048576}  # cca only (full attention cannot hold its cache next to the weights)
BATCH=${BATCH:-8}  # 0: no batched decode
BATCH_CONTEXT=${BATCH_CONTEXT:-32768}
GEN=${GEN:-64}
WORK=${WORK:-/tmp/cca-gpu-vs-hf}
BUILD=${BUILD_DIR:-build-gpu}
has() { [[ " $STAGES " == *" $1 "* ]]; }
source bench/deps_env.sh
py() { LD_LIBRARY_PATH=$ORIG_LD PYTHONUNBUFFERED=1 python3 "$@"; }
if has build; then
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCCA_CUDA_ARCHS=90a $PREFIX >"$OUT/configure.log" 2>&1 &&
    cmake --build "$BUILD" -j"$(nproc)" --target cca >"$OUT/build.log" 2>&1 ||
    { grep -E "error" -A3 "$OUT/build.log" | head -40; exit 1; }
fi
CCA=${CCA:-$BUILD/cca}
echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1); $(date -u +%F)"

for S in $SHAPES; do
  M="$WORK/$S"
  if has ckpt && [ ! -f "$M/config.json" ]; then
    start=$SECONDS
    py bench/make_random_checkpoint.py --shape "$S" --out "$M" >"$OUT/ckpt-$S.log" 2>&1 ||
      { tail "$OUT/ckpt-$S.log"; exit 1; }
    echo "$S checkpoint written in $((SECONDS - start)) s"
  fi
  if has gemm; then
    py bench/gemm_floor.py --shape "$S" --rows 1,8,8192 | tee "$OUT/gemm-$S.txt"
    py bench/gemm_floor.py --shape "$S" --rows 1,8,8192 --json >"$OUT/gemm-$S.json"
  fi
  if has profile; then
    "$CCA" bench model --model "$M" --device cuda --prompt 32768,131072 --variants cca,full \
      -n 32 --repeat 1 --profile 2>"$OUT/profile-$S.err" | tee "$OUT/profile-$S.txt"
  fi
  if has ours; then
    "$CCA" bench model --model "$M" --device cuda --prompt "$PROMPTS" --variants cca,full \
      -n "$GEN" --repeat 1 --json 2>"$OUT/ours-$S.err" >"$OUT/ours-$S.json" ||
      tail -5 "$OUT/ours-$S.err"
    if [ -n "$LONG" ] && [ "$S" = llama3-8b ]; then
      "$CCA" bench model --model "$M" --device cuda --prompt "$LONG" --variants cca -n 16 \
        --repeat 1 --json 2>"$OUT/ours-long-$S.err" >"$OUT/ours-long-$S.json" ||
        tail -5 "$OUT/ours-long-$S.err"
    fi
    if [ "$BATCH" -gt 0 ]; then
      "$CCA" bench model --model "$M" --device cuda --prompt "$BATCH_CONTEXT" --batch "$BATCH" \
        --variants cca,full -n "$GEN" --repeat 1 --json 2>"$OUT/ours-batch-$S.err" \
        >"$OUT/ours-batch-$S.json" || tail -5 "$OUT/ours-batch-$S.err"
    fi
  fi
  if has hf; then
    for impl in sdpa flex-cca; do
      if [ "$impl" = sdpa ]; then P=$PROMPTS D="32768,131072" NB=$BATCH; else P=$FLEX_PROMPTS D="" NB=0; fi
      py bench/hf_bench.py --model "$M" --impl "$impl" --shape-name "$S" --prompts "$P" \
        --decode "$D" --batch "$NB" --batch-context "$BATCH_CONTEXT" \
        --json "$OUT/hf-$impl-$S.json" 2>"$OUT/hf-$impl-$S.err" | tee "$OUT/hf-$impl-$S.txt" ||
        tail -5 "$OUT/hf-$impl-$S.err"
    done
  fi
done
if has plot; then py bench/plot_vs_hf.py --dir "$OUT"; fi

#!/usr/bin/env bash
# Issue 12's GPU benchmark: `cca serve` on a random Llama-3-8B-shaped checkpoint (written by
# bench/make_random_checkpoint.py, not committed), cca against --variant full in the same run:
#   load:     1, 8 and 32 concurrent clients, 32K-token prompts, 256 generated tokens each:
#             output tokens/s, TTFT and ITL percentiles (bench/serve_load.py);
#   capacity: how many concurrent 128K-token conversations the server admits within its cache
#             budget (the GPU's free memory after loading, less 1 GiB), each then checked to
#             produce its first token.
# Prints a markdown table last; logs and JSON go to $OUT (default out/gpu_serve).
#   STAGES="build load capacity" (default); VARIANTS ("cca full"), CLIENTS ("1,8,32"),
#   PROMPT (32768), GEN (256), LONG (131072), CAP_REQUESTS (200), SERVE_FLAGS override;
#   VERIFY=0: capacity counts the admitted conversations without waiting for their first tokens.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_serve}
mkdir -p "$OUT"
STAGES=${STAGES:-"build load capacity"}
BUILD=${BUILD_DIR:-build-gpu}
WORK=${WORK:-/tmp/cca-gpu-engine}
VARIANTS=${VARIANTS:-"cca full"}
CLIENTS=${CLIENTS:-1,8,32}
PROMPT=${PROMPT:-32768}
GEN=${GEN:-256}
LONG=${LONG:-131072}
CAP_REQUESTS=${CAP_REQUESTS:-200}
has() { [[ " $STAGES " == *" $1 "* ]]; }
source bench/deps_env.sh

if has build; then
  echo "== build ($BUILD)"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCCA_CUDA_ARCHS=${CCA_CUDA_ARCHS:-90a} \
    $PREFIX >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"$(nproc)" --target cca >"$OUT/build.log" 2>&1 ||
    { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; exit 1; }
fi

M="$WORK/llama3-8b"
[ -f "$M/config.json" ] || LD_LIBRARY_PATH=$ORIG_LD python3 bench/make_random_checkpoint.py \
  --shape llama3-8b --out "$M" >"$OUT/checkpoint.log" 2>&1 || { tail "$OUT/checkpoint.log"; exit 1; }
# A small byte-level tokenizer so that outputs are decoded as a real server decodes them (its
# ids cover few of the model's; prompts are sent as token ids).
[ -f "$M/tokenizer.json" ] || cp tests/data/tokenizer/llama3_bl.json "$M/tokenizer.json"

# Starts `cca serve` with the given flags; sets PORT and SERVER_PID. Waits for it to listen.
start_server() {
  local log=$1; shift
  "$BUILD/cca" serve --model "$M" --device cuda --port 0 $SERVE_FLAGS "$@" >"$log" 2>&1 &
  SERVER_PID=$!
  PORT=
  for _ in $(seq 1 600); do
    PORT=$(grep -o "listening on http://127.0.0.1:[0-9]*" "$log" | grep -o "[0-9]*$")
    [ -n "$PORT" ] && break
    kill -0 $SERVER_PID 2>/dev/null || break
    sleep 1
  done
  [ -n "$PORT" ] || { echo "cca serve did not start:"; tail -20 "$log"; return 1; }
  head -1 "$log"
}
stop_server() {
  kill -TERM $SERVER_PID 2>/dev/null
  wait $SERVER_PID
  echo "cca serve exited with $?"
}
SERVE_FLAGS=${SERVE_FLAGS:-}

results=()
for V in $VARIANTS; do
  vflag=$([ "$V" = cca ] && echo "" || echo "--variant $V")
  if has load; then
    echo "== load: $V, clients $CLIENTS, prompts $PROMPT, $GEN tokens"
    start_server "$OUT/serve-load-$V.log" $vflag --parallel 32 --queue 256 \
      --max-context $((PROMPT + GEN)) || continue
    timeout ${LOAD_TIMEOUT:-3600} python3 bench/serve_load.py --url "http://127.0.0.1:$PORT" \
      --label "$V" --clients "$CLIENTS" --prompt-tokens "$PROMPT" --max-tokens "$GEN" \
      --vocab 128000 --json "$OUT/load-$V.json" 2>&1 | tee "$OUT/load-$V.txt" | tail -4
    stop_server
    results+=("$OUT/load-$V.json")
  fi
  if has capacity; then
    echo "== capacity: $V, conversations of $LONG tokens"
    start_server "$OUT/serve-capacity-$V.log" $vflag --parallel 512 --queue 1024 \
      --max-context $((LONG + 64)) || continue
    timeout ${CAP_TIMEOUT:-3600} python3 bench/serve_load.py --url "http://127.0.0.1:$PORT" \
      --label "$V" --capacity --capacity-requests "$CAP_REQUESTS" --prompt-tokens "$LONG" \
      --max-tokens 64 --vocab 128000 $([ "${VERIFY:-1}" = 1 ] && echo --verify-first-token) \
      --verify-timeout ${VERIFY_TIMEOUT:-2400} \
      --json "$OUT/capacity-$V.json" 2>&1 | tee "$OUT/capacity-$V.txt" | tail -3
    stop_server
    results+=("$OUT/capacity-$V.json")
  fi
done

echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(date -u +%F))"
python3 bench/serve_load.py --table "${results[@]}"

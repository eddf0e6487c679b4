#!/usr/bin/env bash
# The CPU model runtime of two builds side by side, interleaved so that drift in machine load hits
# both alike: `cca bench model` (random Llama, 4 layers, hidden 256; full and cca) on one thread,
# each build's rows printed per round. Usage: bench/model_ab.sh OLD_CCA NEW_CCA [rounds]
set -euo pipefail
old=$1 new=$2 rounds=${3:-2}
echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  for b in "$old" "$new"; do
    echo "-- round $r: $b"
    "$b" bench model --prompt ${PROMPT:-16384} -n 32 --variants full,cca --repeat 1 --threads 1 \
      --device cpu 2>/dev/null || "$b" bench model --prompt ${PROMPT:-16384} -n 32 \
      --variants full,cca --repeat 1 --threads 1
  done
done

#!/usr/bin/env bash
# Model runtime benchmark (issue 4), recorded in docs/perf.md:
#  1. a random Llama (4 layers, hidden 256, 4 heads of 64, MLP 688, vocab 4096) written by
#     `cca bench model` itself: prefill of a 16K-token prompt and 32 generated tokens, full
#     attention against cca (g=16, s=1024), each run in its own process for its peak RSS; on all
#     cores and on one (wall time on a shared machine is noisy; one thread's CPU time is not);
#  2. prefill and generation tokens/s of the committed test checkpoints (tests/data/models).
# Usage: bench/model_bench.sh [path/to/cca]   (default build/cca; build with scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
cca=${1:-build/cca}
[ -x "$cca" ] || { echo "no cca binary at $cca (build first, or pass its path)" >&2; exit 1; }

echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo
echo "== random Llama, 4 layers, hidden 256: 16K-token prompt, full vs cca, all cores =="
"$cca" bench model --prompt 16384 -n 32 --variants full,cca --repeat 5
echo
echo "== the same on 1 thread (CPU time = wall time: robust on a shared machine) =="
"$cca" bench model --prompt 16384 -n 32 --variants full,cca --repeat 3 --threads 1
echo
echo "== test checkpoints: 200-token prompt, 50 new tokens (1 thread; the models are tiny) =="
for m in llama mistral qwen2; do
  echo "-- $m"
  "$cca" bench model --model "tests/data/models/$m" --prompt 200 -n 50 --variants full,cca \
    --threads 1 --repeat 3
done

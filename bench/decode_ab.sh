#!/usr/bin/env bash
# Decode A/B in one binary: programmatic dependent launch on (default) and off
# (CCA_CUDA_PDL=0), the default again last (drift check). One compact line per measurement.
# Run after bench/gpu_bench.sh has built build-gpu/ (STAGES=build).
#   bash bench/decode_ab.sh [extra cca_cuda_bench arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
BENCH=${BUILD_DIR:-build-gpu}/cca_cuda_bench
for cfg in "" "CCA_CUDA_PDL=0" ""; do
  echo "== [${cfg:-default}]"
  env $cfg "$BENCH" --t-list , --reps 7 "$@" | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l)
    if 'ms' in r:
        print('%-24s %s:%s B=%-2s T=%-7s %8.4f ms %7.1f GB/s'
              % (r['op'], r['Hq'], r['Hkv'], r['B'], r['T'], r['ms'], r['gbps']))"
done

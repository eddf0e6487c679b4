#!/usr/bin/env bash
# How the decode attention slices its keys (issue 9), swept on a GPU: each setting
# "blocks_per_sm:min_keys" (CCA_DECODE_BLOCKS_PER_SM, CCA_DECODE_MIN_KEYS; DecodeTile's defaults
# are 2:256) times the decode kernel from CUDA graph replays (cca_cuda_bench, 32:8 and 32:32
# heads, 32K and 128K contexts, batch 1 and 8), then, with MODEL=1, `cca bench model` decodes
# at 128K on a random Llama-3-8B-shaped checkpoint with the default and with the best setting
# of the 32:8 128K batch-1 case. Prints one table per part last; logs go to $OUT.
#   BIN_DIR (default build-gpu: cca, cca_cuda_bench), SETTINGS, MODEL=1, WORK (checkpoint dir)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN_DIR:-build-gpu}
OUT=${OUT:-out/decode_sweep}
WORK=${WORK:-/tmp/cca-decode-sweep}
SETTINGS=${SETTINGS:-"2:256 1:256 3:256 4:256 8:256 2:128 4:128 8:128 4:64"}
mkdir -p "$OUT" "$WORK"
source bench/deps_env.sh
: >"$OUT/kernels.jsonl"
for st in $SETTINGS; do
  CCA_DECODE_BLOCKS_PER_SM=${st%:*} CCA_DECODE_MIN_KEYS=${st#*:} "$BIN/cca_cuda_bench" \
    --skip-full --t-list "" --heads 32:8,32:32 --decode-ctx 32768,131072 --decode-batch 1,8 \
    --ragged "" --reps 20 2>>"$OUT/kernels.err" |
    sed -n "s/^\({\"impl\": \"cca_cuda\", \"op\": \"cca_decode_graph\".*\)}$/\1, \"setting\": \"$st\"}/p" \
      >>"$OUT/kernels.jsonl"
done
best=$(python3 - "$OUT/kernels.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
settings = list(dict.fromkeys(r["setting"] for r in rows))
cases = sorted({(r["Hq"], r["Hkv"], r["T"], r["B"]) for r in rows})
print("decode kernel from graph replays, us (GB/s of cache read); columns: blocks_per_sm:min_keys",
      file=sys.stderr)
print("%-6s %7s %2s " % ("Hq:Hkv", "ctx", "B") + " ".join("%15s" % s for s in settings),
      file=sys.stderr)
for c in cases:
    cells = []
    for s in settings:
        m = [r for r in rows if (r["Hq"], r["Hkv"], r["T"], r["B"]) == c and r["setting"] == s]
        cells.append("%15s" % ("%.1f (%.0f)" % (m[0]["ms"] * 1e3, m[0]["gbps"]) if m else "-"))
    print("%-6s %7d %2d " % ("%d:%d" % c[:2], c[2], c[3]) + " ".join(cells), file=sys.stderr)
key = [r for r in rows if (r["Hq"], r["Hkv"], r["T"], r["B"]) == (32, 8, 131072, 1)]
print(min(key, key=lambda r: r["ms"])["setting"] if key else "2:256")
EOF
)
if [ -n "${MODEL:-}" ]; then
  M="$WORK/llama3-8b"
  if [ ! -f "$M/config.json" ]; then
    LD_LIBRARY_PATH=$ORIG_LD python3 bench/make_random_checkpoint.py --shape llama3-8b \
      --out "$M" >"$OUT/ckpt.log" 2>&1 || { tail "$OUT/ckpt.log"; exit 1; }
  fi
  echo "model decode at 128K, Llama-3-8B shape, cca g=16 s=1024 (ITL ms; default then best $best)"
  for st in 2:256 "$best" 2:256 "$best"; do
    CCA_DECODE_BLOCKS_PER_SM=${st%:*} CCA_DECODE_MIN_KEYS=${st#*:} "$BIN/cca" bench model \
      --model "$M" --device cuda --prompt 131072 --variants cca -n 64 --repeat 1 --json \
      2>>"$OUT/model.err" >"$OUT/model.json" || tail -3 "$OUT/model.err"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))[0]; print("%-8s itl %.3f ms  ttft %.3f s" % (sys.argv[2], r["itl_s"]*1e3, r["ttft_s"]))' \
      "$OUT/model.json" "$st"
  done
fi

#!/usr/bin/env bash
# The main job: build, make random q/k/v with `cca random`, run CCA attention as a one-shot
# prefill, token by token through the compressed KV cache, and in chunks; check that all three
# agree with each other and with the float64 reference backend, that CCA with a window covering
# the whole sequence equals full causal attention; then time every variant over a few lengths.
# Files go to out/demo/ (or $DEMO_DIR). Any failed check stops the script with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh >/dev/null
cca="${BUILD_DIR:-build}/cca"
dir="${DEMO_DIR:-out/demo}"
mkdir -p "$dir"

# One layer's post-RoPE q, k, v: B=1, T=2048, Hq=8 query heads sharing Hkv=2 KV heads, D=64.
step() { echo; echo "== $*"; }
step "inputs"
"$cca" random --shape 1,2048,8,64 --seed 1 --out "$dir/q.npy"
"$cca" random --shape 1,2048,2,64 --seed 2 --out "$dir/k.npy"
"$cca" random --shape 1,2048,2,64 --seed 3 --out "$dir/v.npy"
qkv=(--q "$dir/q.npy" --k "$dir/k.npy" --v "$dir/v.npy")
cca_args=(--variant cca --group 16 --window 256)

step "CCA attention (g=16, s=256): prefill, decode through the KV cache, chunks of 100, float64 reference"
"$cca" attention "${qkv[@]}" "${cca_args[@]}" --mode prefill --out "$dir/prefill.npy" --lse "$dir/prefill_lse.npy"
"$cca" attention "${qkv[@]}" "${cca_args[@]}" --mode decode --out "$dir/decode.npy" --lse "$dir/decode_lse.npy"
"$cca" attention "${qkv[@]}" "${cca_args[@]}" --mode chunked:100 --out "$dir/chunked.npy"
"$cca" attention "${qkv[@]}" "${cca_args[@]}" --backend ref --out "$dir/ref.npy"

step "decode and chunked reproduce prefill; the cpu backend matches the reference"
"$cca" compare "$dir/decode.npy" "$dir/prefill.npy" --tol 1e-5
"$cca" compare "$dir/decode_lse.npy" "$dir/prefill_lse.npy" --tol 1e-5
"$cca" compare "$dir/chunked.npy" "$dir/prefill.npy" --tol 1e-5
"$cca" compare "$dir/prefill.npy" "$dir/ref.npy" --tol 1e-4

step "CCA with a window covering the sequence equals full causal attention"
"$cca" attention "${qkv[@]}" --variant cca --group 16 --window 2048 --out "$dir/cca_wide.npy"
"$cca" attention "${qkv[@]}" --variant full --out "$dir/full.npy"
"$cca" compare "$dir/cca_wide.npy" "$dir/full.npy" --tol 1e-5

step "benchmark: every variant, T = 1K, 2K, 4K (g=16, s=1024)"
"$cca" bench attention --t-list 1024,2048,4096 --reps 2

echo
echo "demo: all checks passed (outputs in $dir)"

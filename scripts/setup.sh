#!/usr/bin/env bash
# Installs the Debian 12 packages the build needs, and any packages named as arguments (the
# reliability job adds clang's). Idempotent and quiet: when every package is already installed it
# changes nothing and needs no network.
set -euo pipefail

packages=(
  build-essential cmake g++ pkg-config   # compiler and build system
  googletest libgtest-dev                # tests
  libcli11-dev nlohmann-json3-dev        # the cca command-line tool
  libcpp-httplib-dev                     # cca serve (HTTP)
  libopenblas-dev libpcre2-dev          # model runtime (CPU ops), tokenizer
  libhwy-dev                             # Google Highway: CPU vector code, run-time SIMD dispatch
  python3-torch python3-numpy           # the Python package (python/) and its tests
  "$@"
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  # Without a terminal (CI) sudo must not wait for a password.
  if [ -t 0 ]; then sudo_cmd=(sudo); else sudo_cmd=(sudo -n); fi
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

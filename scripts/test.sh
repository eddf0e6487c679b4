#!/usr/bin/env bash
# Builds (scripts/build.sh) and runs the whole test suite under CTest. Tests that need a GPU skip
# where there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
./scripts/build.sh
ctest --test-dir "$build_dir" --output-on-failure -j2

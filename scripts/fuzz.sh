#!/usr/bin/env bash
# The reliability job (docs/reliability.md): builds everything with clang, AddressSanitizer and
# UndefinedBehaviorSanitizer plus the libFuzzer harnesses into build-fuzz/ (or $BUILD_DIR), runs
# the test suite under the sanitizers (GPU tests skip; without the long cases of the backward
# consistency grid, see below), then each fuzz target for $FUZZ_SECONDS seconds
# (default 20) from the committed inputs of tests/data/fuzz/<target>/. Any sanitizer report,
# crash, hang (> $FUZZ_TIMEOUT s) or failed test stops it with a non-zero exit; a fuzzer's
# failing input is left in $BUILD_DIR/artifacts/<target>/ (commit it to tests/data/fuzz/<target>/
# with the fix).
#   FUZZ_RUNS=N       run each target for N executions instead of a time
#   FUZZ_TARGETS="a b" only these targets (default: all)
#   FUZZ_TIMEOUT=S    seconds of wall time one input may take before it counts as a hang
#                     (default 10; libFuzzer measures wall time, so a run under `nice` on a busy
#                     machine needs more: there an input can wait many seconds for a core)
#   SKIP_TESTS=1      fuzz only
#   SANITIZER_TESTS=F the gtest filter for the suite (default: all but the long backward grid)
#   CCA_CI_DEADLINE=T a time (seconds since 1970; .ci/run sets it to 80 minutes after CI started)
#                     by which the job must be done: a part that would not fit in what is left
#                     (build 40 min, suite 25 min, a target its time + 1 min) is skipped, saying
#                     so, so that CI ends inside its 90-minute limit on a slow runner
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build-fuzz}
seconds=${FUZZ_SECONDS:-20}
timeout=${FUZZ_TIMEOUT:-10}

# fits MINUTES: whether MINUTES are left before CCA_CI_DEADLINE (always, without one).
fits() {
  [ -z "${CCA_CI_DEADLINE:-}" ] || (($(date +%s) + 60 * $1 <= CCA_CI_DEADLINE)) && return 0
  echo "fuzz: skipping $2: less than $1 min left before CCA_CI_DEADLINE (the CI time limit)"
  return 1
}
fits 40 "the whole reliability job" || exit 0

./scripts/setup.sh clang-14 libclang-rt-14-dev  # and clang, its sanitizer and libFuzzer runtimes

CC=clang-14 CXX=clang++-14 cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCCA_CUDA=OFF -DCCA_SANITIZE=address,undefined -DCCA_FUZZ=ON >/dev/null
cmake --build "$build_dir" -j"$(nproc)"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

if [ -z "${SKIP_TESTS:-}" ] && fits 25 "the test suite under the sanitizers"; then
  # The suite as one gtest process per core (shards), not CTest's process per test: a process
  # of this build is slow to start, and the suite has over 700 tests (docs/reliability.md).
  # The backward consistency groups whose cases reach T = 700 (window 140/141, and full
  # attention) took 958 s of the 1,463 s that the suite's tests took in the two shards under the
  # sanitizers (docs/reliability.md, CI). They check numerics and parse nothing; their forward
  # cases, the backward's short cases and its finite-difference tests still run here, and the
  # whole grid runs in the Release suite.
  filter=${SANITIZER_TESTS:--Grid/ConsistencyGrad.MatchesRef/*14?*:Grid/ConsistencyGrad.MatchesRef/full}
  echo "fuzz: the test suite under ASan+UBSan, --gtest_filter=$filter"
  start=$SECONDS
  shards=$(nproc)
  pids=()
  for ((i = 0; i < shards; ++i)); do
    GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$i OMP_WAIT_POLICY=passive \
      "$build_dir/cca_tests" --gtest_filter="$filter" >"$build_dir/tests-$i.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for ((i = 0; i < shards; ++i)); do
    if ! wait "${pids[$i]}"; then
      grep -E '^\[  FAILED|Failure|ERROR: AddressSanitizer|runtime error' "$build_dir/tests-$i.log" | head -n 40
      tail -n 40 "$build_dir/tests-$i.log"
      failed=1
    fi
  done
  if ((failed)); then
    echo "fuzz: the test suite failed under ASan+UBSan (logs: $build_dir/tests-*.log)" >&2
    exit 1
  fi
  echo "fuzz: the test suite passed under ASan+UBSan in $((SECONDS - start)) s"
fi

targets=${FUZZ_TARGETS:-$(find "$build_dir" -maxdepth 1 -type f -executable -name 'fuzz_*' |
  sed 's|.*/fuzz_||' | sort)}
for t in $targets; do
  fits $((seconds / 60 + 1)) "fuzz_$t" || continue
  corpus="$build_dir/corpus/$t"
  artifacts="$build_dir/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  if [ -n "${FUZZ_RUNS:-}" ]; then limit=(-runs="$FUZZ_RUNS"); else limit=(-max_total_time="$seconds"); fi
  # Inputs up to 64 KB, but 16 KB for the tokenizer: its seeds are 7-12 KB of tokenizer.json and
  # what libFuzzer adds past them is text to encode, whose cost is linear in its length (a 64 KB
  # input takes some 0.2 s under the sanitizers) and which reaches no further code (150 s from the
  # same corpus: 3,575 edges at 65536 and 117 exec/s, 3,591 at 16384 and 516 exec/s;
  # docs/reliability.md). Long texts are the unit tests' business (the regex step budget, the
  # growth bounds).
  max_len=65536
  [ "$t" = tokenizer ] && max_len=16384
  # Request bodies are small seeds, and libFuzzer's length control kept them under ~420 bytes
  # in a million runs: without it long bodies are tried from the start (90 s: 421,127 runs,
  # inputs to 16 KB, clean; docs/reliability.md).
  len_control=()
  [ "$t" = server_request ] && len_control=(-len_control=0)
  echo "== fuzz_$t ${limit[*]} -max_len=$max_len ${len_control[*]}"
  # New inputs go to the work corpus; the committed ones are read as seeds (truncated to
  # max_len); $timeout s (10) for one input is a hang; 2 GB of memory an error.
  "$build_dir/fuzz_$t" "${limit[@]}" "${len_control[@]}" -timeout="$timeout" -rss_limit_mb=2048 \
    -max_len="$max_len" \
    -print_final_stats=1 -artifact_prefix="$artifacts" "$corpus" "tests/data/fuzz/$t" \
    2>"$build_dir/fuzz_$t.log" || {
    tail -n 60 "$build_dir/fuzz_$t.log"
    echo "fuzz: fuzz_$t failed; the input is in $artifacts" >&2
    exit 1
  }
  grep -E '^stat::number_of_executed_units|^Done' "$build_dir/fuzz_$t.log" | tr '\n' ' '
  echo
done
echo "fuzz: all targets clean"

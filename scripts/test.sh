#!/usr/bin/env bash
# The whole test suite from a fresh clone, as CI runs it:
#   1. scripts/bootstrap.sh (build and Python dependencies)
#   2. scripts/fetch-model.sh (the end-to-end and CLI tests need the default model)
#   3. release preset: build, ctest (gtest kvq_tests + the pytest suite)
#   4. asan preset (ASan + UBSan): build, ctest. Tests labelled `asan_skip` are
#      excluded there: that label is reserved for heavy whole-model runs that are
#      too slow under the sanitizers (they still run in the release stage).
#   5. scripts/fuzz.sh 60 (GGUF reader under libFuzzer), when present.
#   6. scripts/test-aarch64.sh: the tests of the portable (NEON/SVE) kernels,
#      cross-built for 64-bit Arm and run under QEMU.
# Prints the time of each stage and the ctest summaries; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc)
export KVQ_JOBS="$jobs"
logdir=build/test-logs
mkdir -p "$logdir"
summary=()
failed=0

# stage NAME COMMAND...: runs COMMAND, records its time and status; later stages still run.
stage() {
  local name=$1; shift
  echo
  echo "==> $name"
  local start=$SECONDS status=0
  "$@" || status=$?
  local took=$((SECONDS - start))
  if ((status == 0)); then
    summary+=("$(printf '%-28s %4ds  ok' "$name" "$took")")
  else
    summary+=("$(printf '%-28s %4ds  FAILED (exit %d)' "$name" "$took" "$status")")
    failed=1
  fi
  echo "<== $name: ${took}s"
  return 0
}

# ctest_preset PRESET [ARGS...]: ctest with its output kept for the summary.
ctest_preset() {
  local preset=$1; shift
  set -o pipefail
  ctest --preset "$preset" --parallel "$jobs" "$@" 2>&1 | tee "$logdir/ctest-$preset.log"
}

build_preset() {
  cmake --preset "$1" >/dev/null && cmake --build --preset "$1" -j"$jobs"
}

stage "bootstrap" scripts/bootstrap.sh
stage "fetch model" scripts/fetch-model.sh
if ((failed)); then
  printf '%s\n' "${summary[@]}"
  echo "kvq: test setup failed" >&2
  exit 1
fi

stage "release: build" build_preset release
if [[ ${summary[-1]} == *ok ]]; then stage "release: ctest" ctest_preset release; fi

stage "asan: build" build_preset asan
if [[ ${summary[-1]} == *ok ]]; then stage "asan: ctest" ctest_preset asan -LE asan_skip; fi

if [ -x scripts/fuzz.sh ]; then stage "fuzz (60 s)" scripts/fuzz.sh 60; fi
stage "aarch64: build, QEMU tests" scripts/test-aarch64.sh

echo
echo "==> ctest summaries"
for preset in release asan; do
  log="$logdir/ctest-$preset.log"
  [ -f "$log" ] || continue
  echo "[$preset]"
  grep -E "tests passed|tests failed|Total Test time|\*\*\*(Failed|Timeout|Exception)|Not Run|\((Failed|Timeout)\)" "$log" | sed 's/^/  /' || true
done
echo
echo "==> stages"
printf '  %s\n' "${summary[@]}"
echo "  total                        $((SECONDS))s"
if ((failed)); then
  echo "kvq: tests FAILED" >&2
  exit 1
fi
echo "kvq: all tests passed"

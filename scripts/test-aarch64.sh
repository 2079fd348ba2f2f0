#!/usr/bin/env bash
# The portable kernels on 64-bit Arm: cross-builds the test binary for aarch64
# (cmake/aarch64-linux-gnu.cmake) and runs the packed-cache decoder, attention,
# RoPE and cache tests under QEMU user-mode emulation, where Highway picks its
# NEON/SVE targets. Installs the cross compiler, QEMU and the arm64 libraries
# first when they are missing (Debian 12; adds the arm64 architecture to dpkg).
#
# The tests run under a time limit (KVQ_QEMU_TIMEOUT seconds, default 720):
# emulation speed differs a lot between hosts, and a stage must end, not hang.
# Each test's time is printed so the slow ones can be seen.
#
# usage: scripts/test-aarch64.sh [GTEST_FILTER]
set -euo pipefail
cd "$(dirname "$0")/.."

# The kernel-level tests; the whole-model AttentionPaths test (a tiny model
# through every format and kernel, ~2 min under QEMU on its own) stays on x86.
filter=${1:-'KvDecode.*:Attention.*:AttentionWindow.*:Rope*:KvCache*'}
scripts/install-debs.sh "for the aarch64 cross-build" \
  g++-aarch64-linux-gnu qemu-user libhwy-dev:arm64 libfmt-dev:arm64 libgtest-dev:arm64

build=build/aarch64
cmake -B "$build" -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DCMAKE_BUILD_TYPE=Release \
  -DKVQ_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" -j"${KVQ_JOBS:-$(nproc)}" --target kvq_tests
# The loader named explicitly (see the toolchain file: with -L, thread joins hung under QEMU 7.2).
limit=${KVQ_QEMU_TIMEOUT:-720}
status=0
timeout --kill-after=10 "$limit" qemu-aarch64 /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 \
  --library-path /usr/aarch64-linux-gnu/lib:/usr/lib/aarch64-linux-gnu \
  "$build/tests/kvq_tests" --gtest_filter="$filter" || status=$?
if ((status == 124 || status == 137)); then
  echo "test-aarch64: the QEMU tests ran past ${limit} s (KVQ_QEMU_TIMEOUT) and were stopped" >&2
fi
exit "$status"

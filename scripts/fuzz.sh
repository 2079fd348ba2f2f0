#!/usr/bin/env bash
# Fuzz the GGUF reader with libFuzzer (needs clang): configures and builds the
# "fuzz" preset, writes a small seed corpus, then fuzzes for SECONDS (default 60).
# Exits non-zero if the fuzzer finds a crash, leak, timeout or out-of-memory;
# the reproducer is left in build/fuzz/gguf-artifacts/.
set -euo pipefail
seconds=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

cmake --preset fuzz >/dev/null
cmake --build --preset fuzz --target gguf_fuzz -j "${KVQ_JOBS:-2}"

bin=build/fuzz/fuzz/gguf_fuzz
corpus=build/fuzz/gguf-corpus
seeds=build/fuzz/gguf-seeds
artifacts=build/fuzz/gguf-artifacts
mkdir -p "$corpus" "$seeds" "$artifacts"
"$bin" --write-seeds "$seeds"

"$bin" -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
  -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus" "$seeds"

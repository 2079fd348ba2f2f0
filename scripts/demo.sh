#!/usr/bin/env bash
# kvq's main job from a fresh clone: install the build dependencies, build the
# release preset, fetch the default model (SmolLM2-135M-Instruct, Q4_1), and let
# it answer one chat prompt greedily with the default (f16) KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc)
prompt="Explain in a few sentences why the sky is blue."

echo "==> installing dependencies (scripts/bootstrap.sh)"
scripts/bootstrap.sh

echo "==> building the release preset"
cmake --preset release >/dev/null
cmake --build --preset release -j"$jobs"

echo "==> fetching the default model (scripts/fetch-model.sh)"
model=$(scripts/fetch-model.sh)

kvq=build/release/kvq
stats=$(mktemp)
trap 'rm -f "$stats"' EXIT

echo "==> kvq run --chat -p \"$prompt\" -n 128 --temp 0"
echo
if ! "$kvq" run -m "$model" --chat -p "$prompt" -n 128 --temp 0 2>"$stats"; then
  cat "$stats" >&2
  exit 1
fi
echo

# The run's statistics lines look like "kvq: generated:   128 tokens in ... = X tokens/s".
echo "==> summary"
sed -n 's/^kvq: //p' "$stats"
echo
echo "More: '$kvq info' (model and KV cache sizes per format), '$kvq bench', '$kvq perplexity -f wiki.test.txt'."

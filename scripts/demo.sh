#!/usr/bin/env bash
# kvq's main job from a fresh clone: install the build dependencies, build the
# release preset, fetch the default model (SmolLM2-135M-Instruct, Q4_1),
# calibrate its quantized KV cache once (cached beside the model), and answer one
# chat prompt greedily with the default KVQuant cache (int4-ch-1%) and with f16,
# then compare their quality on a short text.
#
# usage: scripts/demo.sh [DATA_DIR]
#   DATA_DIR holds WikiText-2's wiki.valid.tokens (calibration) and wiki.test.txt
#   (the quality check); default ../shared/data/wikitext-2 next to the repository.
#   Without it the demo runs with the f16 cache and says how to calibrate.
set -euo pipefail
cd "$(dirname "$0")/.."

data=${1:-../shared/data/wikitext-2}
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
calib="$model.kvcalib.gguf"
if [[ ! -f $calib ]]; then
  if [[ -f $data/wiki.valid.tokens ]]; then
    # The default cache (int4-ch-1%) needs the per-channel key ranges only, which do
    # not depend on the k-means weighting: skip the backward pass of the Fisher default.
    echo "==> calibrating the KV cache once (16 x 2048 tokens of WikiText-2 validation; a few minutes)"
    "$kvq" calibrate -m "$model" -f "$data/wiki.valid.tokens" -o "$calib" --weighting scale2
  else
    echo "==> no $data/wiki.valid.tokens: skipping KV calibration (the cache stays f16)"
  fi
fi

stats=$(mktemp)
trap 'rm -f "$stats"' EXIT
run() {  # run LABEL [flags...]
  local label=$1
  shift
  echo "==> [$label] kvq run --chat -p \"$prompt\" -n 128 --temp 0 $*"
  echo
  if ! "$kvq" run -m "$model" --chat -p "$prompt" -n 128 --temp 0 "$@" 2>"$stats"; then
    cat "$stats" >&2
    exit 1
  fi
  echo
  echo "--- [$label] summary"
  sed -n 's/^kvq: //p' "$stats"
  echo
}
run "default KV cache"
run "f16 KV cache" -ctk f16 -ctv f16

if [[ -f $calib && -f $data/wiki.test.txt ]]; then
  echo "==> quality on a short text: the default cache vs f16 on the same 4 windows of 512 tokens (WikiText-2 test)"
  "$kvq" perplexity -m "$model" -f "$data/wiki.test.txt" -c 512 --chunks 4 -ctk auto -ctv auto --compare f16
fi
echo
echo "More: '$kvq info -c 32768' (KV cache bytes per format), '$kvq bench', '$kvq passkey', scripts/eval-kv.sh."

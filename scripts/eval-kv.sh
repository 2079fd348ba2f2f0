#!/usr/bin/env bash
# Quality sweep of the KV cache formats on the default model: WikiText-2 test,
# KVQuant protocol, every candidate against the f16 cache on the same windows
# (paired perplexity difference, KL divergence, top-1 agreement, bits as
# allocated). Writes docs/kv-eval-sweep.json, .md (table) and .png
# (perplexity delta vs bits per element).
#
# usage: scripts/eval-kv.sh [DATA_DIR]
#   DATA_DIR holds wiki.test.txt and wiki.valid.tokens (default ../shared/data/wikitext-2
#   next to the repository; WikiText-2 raw: rows of the test split joined with "\n\n",
#   the validation split likewise). Environment: CTX (2048), CHUNKS (32), MODEL,
#   THREADS, SWEEP (space-separated cache specs, overrides the default list), OUT (docs/kv-eval-sweep),
#   KV_CALIB (the calibration sidecar; default MODEL.kvcalib.gguf, made here when missing),
#   KVQ_BIN (build/release/kvq).
set -euo pipefail
cd "$(dirname "$0")/.."

data=${1:-../shared/data/wikitext-2}
ctx=${CTX:-2048}
chunks=${CHUNKS:-32}
out=${OUT:-docs/kv-eval-sweep}
kvq=${KVQ_BIN:-build/release/kvq}
model=${MODEL:-$(scripts/fetch-model.sh)}
threads=${THREADS:-$(nproc)}

for f in "$data/wiki.test.txt" "$data/wiki.valid.tokens"; do
  [[ -f $f ]] || { echo "eval-kv: $f not found (pass the WikiText-2 folder as the first argument)" >&2; exit 1; }
done
[[ -x $kvq ]] || { echo "eval-kv: build first: cmake --preset release && cmake --build --preset release" >&2; exit 1; }

calib=${KV_CALIB:-$model.kvcalib.gguf}
if [[ ! -f $calib ]]; then
  echo "==> calibrating (kvq calibrate, Fisher-weighted, 16 x 2048 tokens of the validation split; ~20 min) -> $calib"
  "$kvq" calibrate -m "$model" -f "$data/wiki.valid.tokens" -o "$calib" -t "$threads"
fi

# Baselines, the KVQuant presets, and the paper's ablation chain at 3 bits
# (int3 per token -> per-channel keys -> pre-RoPE -> nuq3 -> +1% outliers -> +sink).
default_sweep="q8_0 q8_0-rot q4_0 q4_0-rot int4 int4-rot int3 int3-rot int2 nuq4-1% nuq3-1% nuq2-1% int4-ch-1% int3-ch-1% int2-ch-1% \
int3-ch-post+sink0 int3-ch+sink0 nuq3+sink0 nuq3-1%+sink0"
read -r -a specs <<<"${SWEEP:-$default_sweep}"
args=()
for s in "${specs[@]}"; do args+=(--sweep "$s"); done

echo "==> kvq perplexity: $ctx-token windows x $chunks, f16 baseline + ${#specs[@]} caches"
"$kvq" perplexity -m "$model" -f "$data/wiki.test.txt" -c "$ctx" --chunks "$chunks" -t "$threads" \
  --kv-calib "$calib" --compare f16 "${args[@]}" --json >"$out.json"
python3 scripts/plot-kv-eval.py "$out.json" --md "$out.md" -o "$out.png" \
  --title "SmolLM2-135M, WikiText-2 test, ctx $ctx x $chunks windows: KV cache vs f16"
echo "==> wrote $out.json, $out.md, $out.png"

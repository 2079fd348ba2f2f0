#!/usr/bin/env bash
# Long-context decode speed per KV cache format on the default model: for each
# format (K and V alike) `kvq bench` generates N tokens after a context of each
# depth (filled by storing the model's own keys and values again, see
# `kvq bench --help`), R repetitions. Writes OUT.json (every run merged), OUT.md
# (tokens/s table, formats x depths, with the ratio to f16) and OUT.png (tokens/s
# against context, one line per format).
#
# usage: scripts/bench-decode.sh
#   Environment: FORMATS (space separated; default f16 q8_0 q4_0 int4-ch-1% nuq4-1%
#   nuq3-1% nuq2-1%), DEPTHS (comma separated; 1024,4096,16384), N_GEN (32), REPS (3),
#   THREADS, SIMD (a level for --simd, e.g. avx2: what a CPU without AVX-512 runs),
#   MODEL, OUT (docs/bench-decode), KVQ_BIN (build/release/kvq).
set -euo pipefail
cd "$(dirname "$0")/.."

formats=${FORMATS:-"f16 q8_0 q4_0 int4-ch-1% nuq4-1% nuq3-1% nuq2-1%"}
depths=${DEPTHS:-1024,4096,16384}
n_gen=${N_GEN:-32}
reps=${REPS:-3}
out=${OUT:-docs/bench-decode}
kvq=${KVQ_BIN:-build/release/kvq}
model=${MODEL:-$(scripts/fetch-model.sh)}
threads=${THREADS:-$(nproc)}
simd=${SIMD:-auto}
[[ -x $kvq ]] || { echo "bench-decode: build first: cmake --preset release && cmake --build --preset release" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
i=0
for f in $formats; do
  echo "==> $f: tg$n_gen at depths $depths, $reps repetitions"
  "$kvq" bench -m "$model" -t "$threads" -p 0 -n "$n_gen" -d "$depths" -r "$reps" -ctk "$f" -ctv "$f" \
    --simd "$simd" --json \
    >"$tmp/$i.json"
  i=$((i + 1))
done
python3 scripts/plot-bench.py "$tmp"/*.json -o "$out.png" --md "$out.md" --json "$out.json" \
  --title "SmolLM2-135M Q4_1, decode (tg$n_gen) vs context, $threads threads$([[ $simd == auto ]] || echo ", --simd $simd")"
echo "==> wrote $out.json, $out.md, $out.png"

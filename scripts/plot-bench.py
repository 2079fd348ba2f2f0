#!/usr/bin/env python3
"""Merge `kvq bench --json` outputs and plot decode speed against context.

Each input is the JSON object `kvq bench --json` prints ({"results": [{"kind":
"tg", "depth": ..., "type_k": ..., "type_v": ..., "avg_ts": ..., "stddev_ts": ...,
"kv_bytes": ...}, ...], ...}). Generation results (kind "tg") are grouped by
cache (type_k/type_v); --md writes a table of tokens/s per cache and depth with
the ratio to the f16 cache at the same depth, -o a PNG with one line per cache
(tokens/s against depth, log2 axis), --json the merged runs.

    scripts/plot-bench.py a.json b.json -o decode.png --md decode.md --json decode.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys


class InputError(Exception):
    pass


def load_runs(paths: list[pathlib.Path]) -> list[dict]:
    runs = []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(f"{path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise InputError(f"{path}: no 'results' list (is it `kvq bench --json` output?)")
        for r in data["results"]:
            for key in ("kind", "depth", "type_k", "type_v", "avg_ts"):
                if key not in r:
                    raise InputError(f"{path}: a result lacks '{key}'")
        runs.append(data)
    return runs


def cache_name(r: dict) -> str:
    return r["type_k"] if r["type_k"] == r["type_v"] else f'{r["type_k"]}/{r["type_v"]}'


def decode_table(runs: list[dict]) -> tuple[list[str], list[int], dict]:
    """(caches in input order, sorted depths, {(cache, depth): result})."""
    caches, depths, cell = [], set(), {}
    for run in runs:
        for r in run["results"]:
            if r["kind"] != "tg":
                continue
            name = cache_name(r)
            if name not in caches:
                caches.append(name)
            depths.add(int(r["depth"]))
            cell[(name, int(r["depth"]))] = r
    if not cell:
        raise InputError("no generation (tg) results in the input")
    return caches, sorted(depths), cell


def markdown(caches: list[str], depths: list[int], cell: dict) -> str:
    head = "| cache | KV bytes at the deepest | " + " | ".join(f"tg @ {d}" for d in depths) + " |\n"
    head += "| --- | ---: | " + " | ".join("---:" for _ in depths) + " |\n"
    rows = []
    for c in caches:
        deepest = max((d for d in depths if (c, d) in cell), default=None)
        kv = cell[(c, deepest)].get("kv_bytes") if deepest is not None else None
        parts = [c, f"{kv / 2**20:.1f} MiB" if kv else ""]
        for d in depths:
            r = cell.get((c, d))
            if r is None:
                parts.append("")
                continue
            text = f'{r["avg_ts"]:.1f} ± {r.get("stddev_ts", 0):.1f}'
            base = cell.get(("f16", d))
            if base and c != "f16" and base["avg_ts"] > 0:
                text += f' ({r["avg_ts"] / base["avg_ts"]:.2f}x)'
            parts.append(text)
        rows.append("| " + " | ".join(parts) + " |")
    return head + "\n".join(rows) + "\n"


def plot(caches: list[str], depths: list[int], cell: dict, out: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for c in caches:
        xs = [d for d in depths if (c, d) in cell]
        ys = [cell[(c, d)]["avg_ts"] for d in xs]
        es = [cell[(c, d)].get("stddev_ts", 0) for d in xs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=c,
                    linewidth=2.2 if c == "f16" else 1.4, color="black" if c == "f16" else None)
    if all(d > 0 for d in depths):
        ax.set_xscale("log", base=2)
    ax.set_xticks(depths)
    ax.set_xticklabels([f"{d // 1024}K" if d >= 1024 and d % 1024 == 0 else str(d) for d in depths])
    ax.set_xlabel("context (tokens in the cache)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=pathlib.Path, help="`kvq bench --json` outputs")
    ap.add_argument("-o", "--output", type=pathlib.Path, help="PNG to write")
    ap.add_argument("--md", type=pathlib.Path, help="markdown table to write")
    ap.add_argument("--json", type=pathlib.Path, help="merged runs to write")
    ap.add_argument("--title", default="decode speed vs context")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.inputs)
        caches, depths, cell = decode_table(runs)
    except InputError as e:
        print(f"plot-bench: error: {e}", file=sys.stderr)
        return 1
    table = markdown(caches, depths, cell)
    if args.md:
        args.md.write_text(table, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs}, indent=1) + "\n", encoding="utf-8")
    if args.output:
        plot(caches, depths, cell, args.output, args.title)
    if not args.md:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

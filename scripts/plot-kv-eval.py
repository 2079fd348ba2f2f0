#!/usr/bin/env python3
"""Plot a KV cache format evaluation: perplexity change against storage cost.

Reads a JSON file of the form

    {"baseline": {"name": "f16", "ppl": 21.7, ...},
     "ctx": 4096, "n_windows": 80,
     "candidates": [{"name": ..., "type_k": ..., "type_v": ..., "sink": ...,
                     "bits_per_element": ..., "bits_k": ..., "bits_v": ...,
                     "kv_bytes": ..., "ppl": ..., "ppl_delta_pct": ...,
                     "ppl_delta_pct_se": ..., "kld_mean": ..., "kld_p99": ...,
                     "top1_agreement": ...}, ...]}

and writes a PNG (-o) with one labelled point per candidate: perplexity delta in
percent against the baseline (the 0 line) versus bits per element, linear axes.
--md writes the same entries as a markdown table. Only the PNG needs matplotlib.

    scripts/plot-kv-eval.py eval.json -o eval.png --title "SmolLM2-135M, ctx 4096" --md eval.md
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

# Fields the plot cannot do without; the rest are shown when present.
REQUIRED = ("name", "bits_per_element", "ppl_delta_pct")


class InputError(Exception):
    pass


def load(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    base = data.get("baseline")
    if not isinstance(base, dict) or "name" not in base or "ppl" not in base:
        raise InputError(f"{path}: 'baseline' must be an object with 'name' and 'ppl'")
    cands = data.get("candidates")
    if not isinstance(cands, list):
        raise InputError(f"{path}: 'candidates' must be a list")
    for i, c in enumerate(cands):
        if not isinstance(c, dict):
            raise InputError(f"{path}: candidates[{i}] is not an object")
        for key in REQUIRED:
            if key not in c:
                raise InputError(f"{path}: candidates[{i}] ({c.get('name', '?')}) lacks '{key}'")
        for key in ("bits_per_element", "ppl_delta_pct"):
            if not isinstance(c[key], (int, float)) or not math.isfinite(c[key]):
                raise InputError(f"{path}: candidates[{i}].{key} is not a finite number: {c[key]!r}")
    return data


def fmt_num(value, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def fmt_bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def markdown(data: dict, title: str | None) -> str:
    base = data["baseline"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    ctx, windows = data.get("ctx"), data.get("n_windows")
    where = f" at ctx {ctx}" if ctx is not None else ""
    where += f" over {windows} windows" if windows is not None else ""
    lines.append(f"Baseline {base['name']}: PPL {fmt_num(base['ppl'], '.4f')}{where}.")
    lines.append("")
    lines.append("| name | K | V | sink | bits/elem | bits K | bits V | KV bytes | PPL | ΔPPL % | KLD mean "
                 "| KLD p99 | top-1 agree |")
    lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in data["candidates"]:
        se = c.get("ppl_delta_pct_se")
        delta = fmt_num(c["ppl_delta_pct"], "+.2f") + (f" ± {se:.2f}" if isinstance(se, (int, float)) else "")
        top1 = c.get("top1_agreement")
        lines.append(
            f"| {c['name']} | {c.get('type_k', '–')} | {c.get('type_v', '–')} | {fmt_num(c.get('sink'), 'd')} "
            f"| {fmt_num(c['bits_per_element'], '.2f')} | {fmt_num(c.get('bits_k'), '.2f')} "
            f"| {fmt_num(c.get('bits_v'), '.2f')} | {fmt_bytes(c.get('kv_bytes'))} | {fmt_num(c.get('ppl'), '.4f')} "
            f"| {delta} | {fmt_num(c.get('kld_mean'), '.5f')} | {fmt_num(c.get('kld_p99'), '.4f')} "
            f"| {fmt_num(100 * top1, '.2f') + ' %' if isinstance(top1, (int, float)) else '–'} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, out: pathlib.Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = data["baseline"]
    cands = data["candidates"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.axhline(0.0, color="0.4", linewidth=1, linestyle="--",
               label=f"baseline {base['name']} (PPL {base['ppl']:.4g})")
    xs = [c["bits_per_element"] for c in cands]
    ys = [c["ppl_delta_pct"] for c in cands]
    errs = [c.get("ppl_delta_pct_se") if isinstance(c.get("ppl_delta_pct_se"), (int, float)) else 0.0
            for c in cands]
    if cands:
        ax.errorbar(xs, ys, yerr=errs, fmt="o", color="tab:blue", ecolor="tab:blue", elinewidth=1, capsize=3)
    for c, x, y in zip(cands, xs, ys):
        ax.annotate(c["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if isinstance(base.get("bits_per_element"), (int, float)):
        ax.plot([base["bits_per_element"]], [0.0], "s", color="0.4")
        ax.annotate(base["name"], (base["bits_per_element"], 0.0), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    ax.set_xlabel("bits per element (K and V averaged, metadata included)")
    ylabel = f"perplexity change vs {base['name']} (%)"
    # A broken format (int2: +78,000 %) would flatten every other point onto the
    # axis: past 1000 % the axis is logarithmic beyond +-1 %.
    if ys and max(abs(y) for y in ys) > 1000:
        ax.set_yscale("symlog", linthresh=1.0)
        ylabel += ", symlog scale"
    ax.set_ylabel(ylabel)
    ctx = data.get("ctx")
    ax.set_title(title or (f"KV cache formats, ctx {ctx}" if ctx is not None else "KV cache formats"))
    ax.grid(True, linewidth=0.5, alpha=0.5)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Plot perplexity delta vs bits per element of KV cache formats.")
    ap.add_argument("input", type=pathlib.Path, help="evaluation JSON (baseline, ctx, n_windows, candidates)")
    ap.add_argument("-o", "--out", type=pathlib.Path,
                    help="PNG to write (default: the input with .png, unless only --md is given)")
    ap.add_argument("--title", help="plot title (and markdown heading)")
    ap.add_argument("--md", type=pathlib.Path, metavar="OUT.md", help="also write the entries as a markdown table")
    args = ap.parse_args(argv)

    png = args.out if args.out is not None else (None if args.md else args.input.with_suffix(".png"))
    if png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("plot-kv-eval: error: matplotlib is not installed: pip install matplotlib "
                  "(or write only the table with --md OUT.md)", file=sys.stderr)
            return 1
    try:
        data = load(args.input)
    except InputError as e:
        print(f"plot-kv-eval: error: {e}", file=sys.stderr)
        return 1
    if args.md:
        args.md.write_text(markdown(data, args.title), encoding="utf-8")
        print(f"wrote {args.md}")
    if png is not None:
        plot(data, png, args.title)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

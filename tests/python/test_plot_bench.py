"""scripts/plot-bench.py: merged decode table with ratios to f16, PNG, clear errors."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "plot-bench.py"


def bench_json(cache: str, speeds: dict[int, float]) -> dict:
    results = [{"test": f"pp8 @ d{d}", "kind": "pp", "depth": d, "type_k": cache, "type_v": cache,
                "avg_ts": 999.0, "stddev_ts": 0.0} for d in speeds]
    results += [{"test": f"tg16 @ d{d}", "kind": "tg", "depth": d, "type_k": cache, "type_v": cache,
                 "avg_ts": ts, "stddev_ts": 0.5, "kv_bytes": d * 1000} for d, ts in speeds.items()]
    return {"results": results, "threads": 2}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_table_has_every_cache_and_ratio_to_f16(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(bench_json("f16", {4096: 40.0, 16384: 20.0})))
    b.write_text(json.dumps(bench_json("nuq4-1%", {4096: 50.0, 16384: 60.0})))
    md, merged, png = tmp_path / "t.md", tmp_path / "m.json", tmp_path / "p.png"
    p = run_script(str(a), str(b), "--md", str(md), "--json", str(merged), "-o", str(png))
    assert p.returncode == 0, p.stderr
    lines = md.read_text().splitlines()
    assert "tg @ 4096" in lines[0] and "tg @ 16384" in lines[0]
    row = next(line for line in lines if line.startswith("| nuq4-1%"))
    assert "50.0 ± 0.5 (1.25x)" in row and "60.0 ± 0.5 (3.00x)" in row  # ratios to f16 at the same depth
    assert "15.6 MiB" in row  # KV bytes at the deepest context
    assert len(json.loads(merged.read_text())["runs"]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    p = run_script(str(bad))
    assert p.returncode == 1 and p.stderr.startswith("plot-bench: error:") and "not JSON" in p.stderr
    no_tg = tmp_path / "pp.json"
    no_tg.write_text(json.dumps({"results": [{"kind": "pp", "depth": 0, "type_k": "f16", "type_v": "f16",
                                              "avg_ts": 1.0}]}))
    p = run_script(str(no_tg))
    assert p.returncode == 1 and "no generation" in p.stderr
    p = run_script(str(tmp_path / "missing.json"))
    assert p.returncode == 1 and "missing.json" in p.stderr

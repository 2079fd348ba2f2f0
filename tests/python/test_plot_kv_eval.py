"""scripts/plot-kv-eval.py: the markdown table always, the PNG when matplotlib is there."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "plot-kv-eval.py"

EVAL = {
    "baseline": {"name": "f16", "ppl": 21.7034, "bits_per_element": 16.0},
    "ctx": 4096,
    "n_windows": 7,
    "candidates": [
        {"name": "q8-demo", "type_k": "q8_demo", "type_v": "q8_demo", "sink": 0, "bits_per_element": 8.5,
         "bits_k": 8.5, "bits_v": 8.5, "kv_bytes": 47185920, "ppl": 21.7211, "ppl_delta_pct": 0.0816,
         "ppl_delta_pct_se": 0.0123, "kld_mean": 0.00042, "kld_p99": 0.0061, "top1_agreement": 0.9912},
        {"name": "nuq3-demo", "type_k": "nuq3_demo", "type_v": "nuq3_demo", "sink": 1, "bits_per_element": 3.25,
         "bits_k": 3.5, "bits_v": 3.0, "kv_bytes": 18040320, "ppl": 22.9876, "ppl_delta_pct": 5.9171,
         "ppl_delta_pct_se": 0.3456, "kld_mean": 0.0612, "kld_p99": 0.7788, "top1_agreement": 0.8765},
    ],
}


def run_script(*args: str, python_prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *python_prefix] if python_prefix else [sys.executable, str(SCRIPT)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def eval_json(tmp_path) -> pathlib.Path:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(EVAL))
    return path


def test_markdown_table(eval_json, tmp_path):
    md = tmp_path / "eval.md"
    p = run_script(str(eval_json), "--md", str(md), "--title", "demo formats")
    assert p.returncode == 0, p.stderr
    out = md.read_text()
    assert "demo formats" in out
    assert "f16" in out and "21.7034" in out and "4096" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(EVAL["candidates"])  # header + one row each
    for c, row in zip(EVAL["candidates"], rows[1:]):
        assert row.startswith(f"| {c['name']} |"), row
        for piece in (c["type_k"], f"{c['bits_per_element']:.2f}", f"{c['ppl']:.4f}",
                      f"{c['ppl_delta_pct']:+.2f} ± {c['ppl_delta_pct_se']:.2f}", f"{c['kld_mean']:.5f}",
                      f"{100 * c['top1_agreement']:.2f} %"):
            assert piece in row, (piece, row)
    # --md alone does not need matplotlib and writes no PNG.
    assert not eval_json.with_suffix(".png").exists()


def test_png(eval_json, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "eval.png"
    p = run_script(str(eval_json), "-o", str(png), "--title", "demo formats")
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_says_how_to_install(eval_json, tmp_path):
    # Block the import in the child, whether or not matplotlib is installed here.
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = [{str(SCRIPT)!r}, {str(eval_json)!r}, '-o', {str(tmp_path / 'x.png')!r}]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    p = run_script(python_prefix=("-c", code))
    assert p.returncode == 1
    assert "pip install matplotlib" in p.stderr
    assert not (tmp_path / "x.png").exists()


def test_bad_input_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"baseline": {"name": "f16", "ppl": 20.0},
                               "candidates": [{"name": "x", "bits_per_element": 4.0}]}))
    p = run_script(str(bad), "--md", str(tmp_path / "bad.md"))
    assert p.returncode == 1
    assert "candidates[0]" in p.stderr and "ppl_delta_pct" in p.stderr
    p = run_script(str(tmp_path / "absent.json"), "--md", str(tmp_path / "x.md"))
    assert p.returncode == 1 and "absent.json" in p.stderr

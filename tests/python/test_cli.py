"""The `kvq` command line as users meet it.

Bad input must end in one line `kvq: error: ...` on stderr and a non-zero exit
code, never a crash (signal, sanitizer report). With the default model (fetched
by scripts/fetch-model.sh; scripts/test.sh does that first) the subcommands must
work end to end: deterministic greedy generation, a sane perplexity, the model's
shape in `info`, a parseable `bench`.

KVQ_BIN (set by ctest) is the binary under test.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess

import gguf  # a missing package must fail the test, not skip it
import make_tiny_llama
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TIMEOUT_S = 900  # generous: the suite also runs under ASan


def kvq_bin() -> str:
    path = os.environ.get("KVQ_BIN")
    if path:
        return path
    for cand in sorted(REPO.glob("build/*/kvq")):
        if os.access(cand, os.X_OK):
            return str(cand)
    pytest.fail("KVQ_BIN is not set and no build/*/kvq exists: build first (cmake --preset release && "
                "cmake --build --preset release)")


def run_kvq(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # No automatic KV calibration unless a test asks for it (it would sample
    # text from the real model on a machine where it has no sidecar yet).
    return subprocess.run([kvq_bin(), *args], capture_output=True, timeout=TIMEOUT_S,
                          env={**os.environ, "KVQ_AUTO_CALIB": "0", **(env or {})})


def text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def assert_not_crashed(p: subprocess.CompletedProcess) -> None:
    err = text(p.stderr)
    assert 0 <= p.returncode < 128, f"killed by a signal (exit {p.returncode}): {err}"
    assert "Sanitizer" not in err and "runtime error:" not in err, err


def assert_clean_error(p: subprocess.CompletedProcess, *, code: int | None = None,
                       mentions: tuple[str, ...] = ()) -> str:
    """One `kvq: error:` line, a non-zero exit below 128; returns the message."""
    assert_not_crashed(p)
    err = text(p.stderr)
    assert p.returncode != 0, f"expected failure, got exit 0; stderr: {err}"
    if code is not None:
        assert p.returncode == code, f"exit {p.returncode}, expected {code}: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("kvq: error: "), lines[0]
    for word in mentions:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def default_model() -> pathlib.Path:
    cache = os.environ.get("KVQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvq")
    return pathlib.Path(cache) / MODEL_NAME


@pytest.fixture(scope="module")
def model() -> str:
    path = default_model()
    if not path.is_file():
        pytest.fail(f"default model missing at {path}: run scripts/fetch-model.sh")
    return str(path)


@pytest.fixture(scope="module")
def wiki_20k(tmp_path_factory) -> str:
    data = pathlib.Path(os.environ.get("KVQ_DATA_DIR") or REPO.parent / "shared" / "data")
    wiki = data / "wikitext-2" / "wiki.test.txt"
    if not wiki.is_file():
        pytest.fail(f"{wiki} missing: WikiText-2's raw test split, rows joined with \"\\n\\n\" "
                    "(set KVQ_DATA_DIR to the folder holding wikitext-2/)")
    out = tmp_path_factory.mktemp("wiki") / "wiki.test.20k.txt"
    out.write_bytes(wiki.read_bytes()[:20000])
    return str(out)


def write_small_gguf(path: pathlib.Path) -> None:
    """A valid GGUF, but no model kvq can run: metadata plus one f32 tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("not-a-model")
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_norm.weight", np.arange(4096, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- usage errors: exit code 2 -------------------------------------------------

def test_unknown_subcommand():
    assert_clean_error(run_kvq("frobnicate"), code=2, mentions=("frobnicate", "run"))


def test_no_subcommand_prints_help_and_fails():
    p = run_kvq()
    assert_not_crashed(p)
    assert p.returncode == 2
    assert "run" in text(p.stderr) and "perplexity" in text(p.stderr)


@pytest.mark.parametrize("sub", ["run", "perplexity", "info", "bench", "passkey"])
def test_help_succeeds(sub):
    p = run_kvq(sub, "--help")
    assert p.returncode == 0, text(p.stderr)
    assert "--model" in text(p.stdout)


def test_unknown_flag():
    assert_clean_error(run_kvq("run", "-p", "hi", "--no-such-flag"), code=2, mentions=("--no-such-flag",))


def test_bad_cache_type_lists_valid_ones():
    msg = assert_clean_error(run_kvq("run", "-p", "hi", "-ctk", "q9_bogus"), code=2, mentions=("q9_bogus",))
    assert "f16" in msg and "f32" in msg, msg
    assert_clean_error(run_kvq("perplexity", "-f", "x", "--cache-type-v", "nope"), code=2, mentions=("f16",))


def test_negative_n_predict():
    assert_clean_error(run_kvq("run", "-p", "hi", "-n", "-5"), code=2, mentions=("-5",))


@pytest.mark.parametrize("flags", [["-t", "0"], ["-t", "5000"], ["-c", "2"], ["--top-p", "0"],
                                   ["--top-p", "1.5"], ["--temp", "-1"], ["-n", "abc"], ["--simd", "neon"]])
def test_bad_values(flags):
    assert_clean_error(run_kvq("run", "-p", "hi", *flags), code=2)


def test_system_needs_chat():
    assert_clean_error(run_kvq("run", "-p", "hi", "--system", "be brief"), code=2, mentions=("--chat",))


@pytest.mark.parametrize("flags,names", [
    (["--lengths", "32"], "--lengths"), (["--lengths", "2048,63"], "--lengths"), (["--lengths", "abc"], "--lengths"),
    (["--depths", "1.5"], "--depths"), (["--depths", "0.5,-0.25"], "--depths"), (["--depths", "x"], "--depths"),
    (["--trials", "0"], "--trials"), (["--kv-sink", "-2"], "--kv-sink"), (["--kv-window", "-1"], "--kv-window"),
    (["-ctk", "nope"], "--cache-type-k")])
def test_passkey_bad_flags(flags, names):
    # Checked while parsing: no model is loaded, so this needs none.
    assert_clean_error(run_kvq("passkey", *flags), code=2, mentions=(names,))


def test_perplexity_needs_a_text_file():
    assert_clean_error(run_kvq("perplexity"), code=2, mentions=("-f", "WikiText-2"))


def test_perplexity_unreadable_text_file(tmp_path):
    assert_clean_error(run_kvq("perplexity", "-f", str(tmp_path / "missing.txt")), code=1,
                       mentions=("missing.txt",))


# ---- bad model files: exit code 1 ----------------------------------------------

def test_missing_model_file(tmp_path):
    assert_clean_error(run_kvq("info", "-m", str(tmp_path / "absent.gguf")), code=1, mentions=("absent.gguf",))


def test_missing_default_model_says_how_to_fetch(tmp_path):
    p = run_kvq("run", "-p", "hi", env={"KVQ_CACHE_DIR": str(tmp_path)})
    assert_clean_error(p, code=1, mentions=("scripts/fetch-model.sh",))


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "notes.gguf"
    f.write_text("this is plain text, not a model\n" * 100)
    assert_clean_error(run_kvq("info", "-m", str(f)), code=1)
    assert_clean_error(run_kvq("run", "-m", str(f), "-p", "hi"), code=1)


def test_empty_and_directory_model(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_clean_error(run_kvq("info", "-m", str(empty)), code=1)
    assert_clean_error(run_kvq("info", "-m", str(tmp_path)), code=1)


def test_valid_gguf_that_is_not_a_model(tmp_path):
    f = tmp_path / "small.gguf"
    write_small_gguf(f)
    assert_clean_error(run_kvq("info", "-m", str(f)), code=1)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_truncated_gguf(tmp_path, keep):
    f = tmp_path / "small.gguf"
    write_small_gguf(f)
    data = f.read_bytes()
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    assert_clean_error(run_kvq("info", "-m", str(cut)), code=1)
    assert_clean_error(run_kvq("run", "-m", str(cut), "-p", "hi"), code=1)


def test_truncated_real_model(tmp_path, model):
    # Keep the header and metadata, lose most of the tensor data.
    cut = tmp_path / "truncated-model.gguf"
    with open(model, "rb") as src:
        cut.write_bytes(src.read(4 * 1024 * 1024))
    assert_clean_error(run_kvq("run", "-m", str(cut), "-p", "hi", "-n", "1"), code=1)


# ---- the real default model -----------------------------------------------------

def test_prompt_longer_than_context(model):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 20
    assert_clean_error(run_kvq("run", "-m", model, "-c", "16", "-p", long_prompt), code=1,
                       mentions=("context",))


def test_run_greedy_is_deterministic(model):
    args = ("run", "-m", model, "-p", "The capital of France is", "-n", "24", "--temp", "0")
    a, b = run_kvq(*args), run_kvq(*args)
    assert a.returncode == 0, text(a.stderr)
    assert b.returncode == 0, text(b.stderr)
    assert a.stdout == b.stdout
    assert text(a.stdout).strip(), "no text generated"
    assert "tokens/s" in text(a.stderr)


def test_run_chat_json(model):
    # The default cache is "auto": without a calibration sidecar it is f16.
    p = run_kvq("run", "-m", model, "--chat", "--system", "You are a helpful assistant.",
                "-p", "What is the capital of France?", "-n", "16", "--temp", "0", "--json",
                "--kv-calib", "/nonexistent/kvcalib.gguf")
    assert p.returncode == 0, text(p.stderr)
    out = json.loads(p.stdout)
    assert out["text"].strip()
    assert 1 <= out["generated_tokens"] <= 16
    assert out["prompt_tokens"] > 5
    assert out["kv_bytes"] > 0 and out["kv_type_k"] == "f16"
    assert out["kv_bytes"] == out["kv_bytes_k"] + out["kv_bytes_v"] + out["kv_bytes_positions"]
    assert out["stop_reason"] in ("length", "end_of_generation")
    assert out["simd"] in ("avx512", "avx2", "scalar") and out["attention_kernel"]


def test_perplexity_on_wikitext_head(model, wiki_20k):
    p = run_kvq("perplexity", "-m", model, "-f", wiki_20k, "-c", "256", "--chunks", "4", "--json")
    assert p.returncode == 0, text(p.stderr)
    out = json.loads(p.stdout)
    assert out["n_windows"] == 4 and out["ctx"] == 256 and out["protocol"] == "kvquant"
    assert out["n_tokens_scored"] == 4 * 255
    ppl = out["ppl"]
    assert math.isfinite(ppl)
    # Observed: PPL 37.44 +/- 4.22 (f16 cache). A broken engine (wrong RoPE, bad
    # dequantisation, tokenizer drift) gives hundreds to thousands.
    assert 5 < ppl < 100, ppl
    assert 0 < out["ppl_stderr"] < ppl
    assert math.isclose(math.exp(out["mean_nll"]), ppl, rel_tol=1e-9)


def test_perplexity_compare_against_itself_is_exactly_zero(model, wiki_20k):
    # The same cache twice: the paired difference, KL divergence and top-1
    # disagreement must be exactly zero (the computation is deterministic).
    p = run_kvq("perplexity", "-m", model, "-f", wiki_20k, "-c", "128", "--chunks", "2",
                "-ctk", "f16", "-ctv", "f16", "--compare", "f16", "--json")
    assert p.returncode == 0, text(p.stderr)
    out = json.loads(p.stdout)
    (c,) = out["candidates"]
    assert out["baseline"]["ppl"] == c["ppl"]
    assert c["ppl_delta_pct"] == 0 and c["kld_mean"] == 0 and c["kld_p99"] == 0
    assert c["top1_agreement"] == 1


def test_perplexity_sweep_orders_formats_by_damage(model, wiki_20k):
    p = run_kvq("perplexity", "-m", model, "-f", wiki_20k, "-c", "128", "--chunks", "2",
                "--compare", "f16", "--sweep", "f32", "--sweep", "q8_0", "--sweep", "int2", "--json")
    assert p.returncode == 0, text(p.stderr)
    out = json.loads(p.stdout)
    c = {x["name"]: x for x in out["candidates"]}
    assert list(c) == ["f32", "q8_0", "int2"]
    # Fewer bits, more damage: f32 vs f16 differs only by binary16 rounding.
    assert c["f32"]["kld_mean"] < c["q8_0"]["kld_mean"] < c["int2"]["kld_mean"]
    assert c["int2"]["top1_agreement"] < c["f32"]["top1_agreement"] <= 1
    assert c["int2"]["ppl_delta_pct"] > c["q8_0"]["ppl_delta_pct"]
    # Bits as allocated: a 128-token window fills two whole pages.
    assert c["f32"]["bits_per_element"] == 32 and out["baseline"]["bits_per_element"] == 16
    assert c["q8_0"]["bits_per_element"] == 8.5  # 34 bytes per 32 elements
    assert 2 < c["int2"]["bits_per_element"] < 2.3
    for x in c.values():
        assert x["kld_p99"] >= 0 and x["ppl_delta_pct_se"] >= 0
        assert x["kv_bytes"] == x["kv_bytes_codes"] + x["kv_bytes_scales"] + x["kv_bytes_outliers"] \
            + x["kv_bytes_full_precision"] + x["kv_bytes_calibration"] + x["kv_bytes_positions"]


def test_perplexity_rotated_caches(model, wiki_20k):
    # The rotated baseline and values rotated under another format: both run,
    # say so in the JSON, hold the bytes of their unrotated formats, and stay
    # closer to f16 than 2-bit codes do.
    p = run_kvq("perplexity", "-m", model, "-f", wiki_20k, "-c", "128", "--chunks", "2",
                "--compare", "f16", "--sweep", "q4_0", "--sweep", "q4_0-rot", "--sweep", "int4+rotv",
                "--sweep", "int2", "--json")
    assert p.returncode == 0, text(p.stderr)
    c = {x["name"]: x for x in json.loads(p.stdout)["candidates"]}
    assert c["q4_0-rot"]["kv_bytes"] == c["q4_0"]["kv_bytes"]
    assert c["q4_0-rot"]["values_rotated"] and c["int4+rotv"]["values_rotated"]
    assert not c["q4_0"]["values_rotated"]
    for name in ("q4_0-rot", "int4+rotv"):
        assert c[name]["kld_mean"] < c["int2"]["kld_mean"]


@pytest.mark.parametrize("spec", ["nope", "f16/nope", "f16+sink", "f16+bogus3", "f16+win-1", "f16+rotk"])
def test_perplexity_bad_sweep_spec(spec):
    assert_clean_error(run_kvq("perplexity", "-f", "x", "--compare", "f16", "--sweep", spec), code=2,
                       mentions=(spec,))


def test_perplexity_llamacpp_protocol(model, wiki_20k):
    p = run_kvq("perplexity", "-m", model, "-f", wiki_20k, "-c", "128", "--chunks", "2",
                "--protocol", "llamacpp", "--json")
    assert p.returncode == 0, text(p.stderr)
    out = json.loads(p.stdout)
    assert out["protocol"] == "llamacpp"
    assert out["n_tokens_scored"] == 2 * (128 - 1 - 64)
    assert math.isfinite(out["ppl"]) and out["ppl"] > 1


def test_info_json(model):
    p = run_kvq("info", "-m", model, "--json")
    assert p.returncode == 0, text(p.stderr)
    out = json.loads(p.stdout)
    hp = out["hparams"]
    assert (hp["n_layer"], hp["n_head"], hp["n_head_kv"]) == (30, 9, 3)
    assert out["architecture"] == "llama"
    assert out["n_params"] > 100_000_000
    kv = {f["type"]: f for f in out["kv_cache"]["formats"]}
    assert "f16" in kv and "f32" in kv
    ctx = out["kv_cache"]["ctx"]
    # Bytes as allocated: whole 64-token pages of K and V, plus each token's
    # position (int32) shared by the layers; a post-RoPE format (f16) keeps no
    # angles (keys are rotated on the way in).
    assert ctx % 64 == 0
    assert kv["f16"]["bytes_k"] == kv["f16"]["bytes_v"] == 16 * 30 * 3 * hp["head_dim"] * ctx // 8
    assert kv["f16"]["bytes_positions"] == ctx * 4
    assert kv["f16"]["bytes"] == kv["f16"]["bytes_k"] + kv["f16"]["bytes_v"] + kv["f16"]["bytes_positions"]
    # A KVQuant preset holds codes, outliers, scales, one sink token and constants.
    q = kv["nuq4-1%"]
    # Pre-RoPE keys also hold the angles (n_rot/2 cos and sin floats) of each
    # page's first position and of the 64 offsets in a page, no per-token table.
    assert q["bytes_positions"] == ctx * 4 + (ctx // 64 + 64) * hp["n_rot"] * 4
    assert q["sink_tokens"] == 1 and q["bytes_outliers"] > 0 and q["bytes_full_precision"] > 0
    assert q["bytes"] == (q["bytes_codes"] + q["bytes_scales"] + q["bytes_outliers"] + q["bytes_full_precision"]
                          + q["bytes_calibration"] + q["bytes_positions"])
    assert 3.5 < kv["f16"]["bytes_k"] / q["bytes_k"] < 3.8
    # Which kernel decode runs, per value format: at this head size (64) every
    # format takes the kernel of the CPU's SIMD level (the portable one without SIMD).
    assert out["simd"] in ("avx512", "avx2", "scalar")
    want = {"avx512": "avx512", "avx2": "avx2", "scalar": "portable"}[out["simd"]]
    assert all(f["decode_attention_kernel"].split("/")[0] == want for f in kv.values()), kv["f16"]
    if out["simd"] != "scalar":  # lowered with --simd, the kernels follow
        low = json.loads(run_kvq("info", "-m", model, "--json", "--simd", "scalar").stdout)
        assert low["simd"] == "scalar"
        assert {f["decode_attention_kernel"] for f in low["kv_cache"]["formats"]} == {"scalar"}


def test_info_text(model):
    p = run_kvq("info", "-m", model, "--tensors")
    assert p.returncode == 0, text(p.stderr)
    assert "token_embd.weight" in text(p.stdout)


def test_bench_json(model):
    p = run_kvq("bench", "-m", model, "-p", "32", "-n", "8", "-d", "0", "-r", "1", "--json")
    assert p.returncode == 0, text(p.stderr)
    out = json.loads(p.stdout)
    tests = {r["test"]: r for r in out["results"]}
    assert set(tests) == {"pp32", "tg8"}
    assert tests["pp32"]["avg_ts"] > 0 and tests["tg8"]["avg_ts"] > 0
    assert tests["tg8"]["bytes_per_token"] > out["weight_bytes"] * 0.99


def test_bench_simd_caps_the_kernels(model):
    """--simd lowers the level every kernel dispatches on, and the JSON says which ran."""
    def bench(*flags):
        p = run_kvq("bench", "-m", model, "-p", "0", "-n", "2", "-d", "0", "-r", "1", "--json", *flags)
        assert p.returncode == 0, text(p.stderr)
        return json.loads(p.stdout)
    best = bench()["simd"]
    assert best in ("avx512", "avx2", "scalar")
    assert bench("--simd", "auto")["simd"] == best
    levels = ["scalar", "avx2", "avx512"]
    for level in levels[:levels.index(best) + 1]:
        out = bench("--simd", level)
        assert out["simd"] == level
        kernel = out["results"][0]["attention_kernel"]
        # On a CPU without AVX2 the portable (Highway) kernel is its best, not a lowering.
        expected = {"avx512": "avx512", "avx2": "avx2", "scalar": "scalar" if best != "scalar" else "portable"}[level]
        assert kernel.split("/")[0] == expected, (level, kernel)
    for level in levels[levels.index(best) + 1:]:
        msg = assert_clean_error(run_kvq("bench", "-m", model, "-n", "2", "--simd", level), code=2,
                                 mentions=("--simd",))
        assert best in msg, msg


def test_bench_depth_fill_copy_holds_what_prefill_holds(model):
    """A copy fill must leave the cache exactly as large as a real prefill of the same depth."""
    out = {}
    for how in ("copy", "prefill"):
        p = run_kvq("bench", "-m", model, "-p", "0", "-n", "2", "-d", "600", "-r", "1",
                    "-ctk", "q4_0", "-ctv", "f16", "--depth-fill", how, "--json")
        assert p.returncode == 0, text(p.stderr)
        out[how] = json.loads(p.stdout)
        assert out[how]["depth_fill"] == how
    copy, prefill = out["copy"]["results"][0], out["prefill"]["results"][0]
    assert copy["test"] == prefill["test"] == "tg2 @ d600"
    assert copy["kv_bytes"] == prefill["kv_bytes"] > 0


def test_bench_depth_fill_rejects_unknown(model):
    p = run_kvq("bench", "-m", model, "-d", "64", "--depth-fill", "zeros")
    assert p.returncode == 2
    assert "depth-fill" in text(p.stderr)


FIVE_DIGITS = re.compile(r"(?<![0-9])[0-9]{5}(?![0-9])")


def test_passkey_json_is_honest(model):
    p = run_kvq("passkey", "-m", model, "--lengths", "256", "--depths", "0.5",
                "-ctk", "f16", "-ctv", "f16", "--seed", "7", "--json")
    assert p.returncode == 0, text(p.stderr)
    out = json.loads(p.stdout)
    assert (out["type_k"], out["type_v"]) == ("f16", "f16")
    assert out["lengths"] == [256] and out["depths"] == [0.5] and out["trials"] == 1
    assert out["kv_sink"] == -1 and out["kv_window"] == 0 and out["seed"] == 7
    assert out["chat_template"] is False and out["warnings"] == []
    results = out["results"]
    assert len(results) == 1
    for r in results:
        assert (r["length"], r["depth"]) == (256, 0.5)
        assert re.fullmatch(r"[1-9][0-9]{4}", r["expected"]), r
        # As much filler as fits: close to the length, never over it.
        assert 200 < r["prompt_tokens"] <= 256, r
        assert 0 < r["needle_position"] < r["prompt_tokens"], r
        # 'got' is what the model really wrote: the first 5-digit number of its output.
        m = FIVE_DIGITS.search(r["output"])
        assert r["got"] == (m.group(0) if m else None), r
        assert r["found"] == (r["got"] == r["expected"]), r
        assert r["prefill_seconds"] > 0
    (per,) = out["per_length"]
    n_found = sum(r["found"] for r in results)
    assert per["length"] == 256 and per["n_ctx"] == 256 + out["answer_tokens"]
    assert per["trials"] == 1 and per["found"] == n_found
    assert math.isclose(per["accuracy"], n_found)
    assert per["prefill_tokens"] == sum(r["prompt_tokens"] for r in results)
    assert per["prefill_tokens_per_s"] > 0 and per["kv_bytes"] > 0
    assert out["found"] == n_found and out["total"] == 1
    assert math.isclose(out["accuracy"], n_found)
    assert out["seconds"] > 0


def test_passkey_table(model):
    p = run_kvq("passkey", "-m", model, "--lengths", "96", "--depths", "1")
    assert p.returncode == 0, text(p.stderr)
    out = text(p.stdout)
    assert "| length | prompt tokens | depth 1 | accuracy | prefill tokens/s |" in out, out
    assert "| 96 |" in out and "overall:" in out, out


def test_passkey_past_training_context_warns_and_runs(tmp_path):
    # The tiny random model has a 256-token training context and a byte-level
    # tokenizer: a 300-token prompt is warned about, not refused, and its (random)
    # answer is still reported honestly.
    tiny = tmp_path / "tiny.gguf"
    make_tiny_llama.write_tiny_llama(str(tiny), "f32", seed=7)
    p = run_kvq("passkey", "-m", str(tiny), "--lengths", "300", "--depths", "0.5", "--trials", "3", "--json")
    assert p.returncode == 0, text(p.stderr)
    assert "warning" in text(p.stderr) and "256" in text(p.stderr)
    out = json.loads(p.stdout)
    assert len(out["warnings"]) == 1 and "300" in out["warnings"][0]
    results = out["results"]
    assert len({r["expected"] for r in results}) == 3, "each trial draws its own key"
    for r in results:
        assert 250 < r["prompt_tokens"] <= 300, r
        m = FIVE_DIGITS.search(r["output"])
        assert r["got"] == (m.group(0) if m else None), r
        assert r["found"] == (r["got"] == r["expected"]), r


def test_passkey_length_too_short_for_the_prompt(tmp_path):
    tiny = tmp_path / "tiny.gguf"
    make_tiny_llama.write_tiny_llama(str(tiny), "f32", seed=7)
    # Byte-level tokens: instruction, needle and question alone take ~200.
    assert_clean_error(run_kvq("passkey", "-m", str(tiny), "--lengths", "64"), code=2, mentions=("--lengths",))

"""kvq's forward pass against an independent NumPy (float64) llama reference.

kvq's logits come from the C++ test ForwardFixture.DumpLogits (in kvq_tests,
driven through environment variables); the reference is llama_ref.py, with the
weights dequantized from the same GGUF by the `gguf` package.

Error measure throughout: max |kvq - ref| / max |ref| over every logit.
"""
from __future__ import annotations

import os
import pathlib
import subprocess

import numpy as np
import pytest

import llama_ref
import make_tiny_llama

REPO = pathlib.Path(__file__).resolve().parents[1].parent

# --- bounds (why each is what it is) -------------------------------------------
# kvq (like other GGUF engines) rounds the activations entering a Q4_1/Q8_0
# matmul to 8 bits per 32-block (Q8_1/Q8_0) and dots them in integers; F32/F16
# weights see exact float activations. The reference reproduces that rounding
# when asked (act_q8=True, a no-op for float weights), so on the tiny models it
# is compared with the engine's arithmetic, not just "close to float".
#
# f32 cache: what remains is float32 vs float64 arithmetic. kvq accumulates in
# float32 over <= 96 terms per dot product (n_ff) and softmax over <= 70 keys;
# eps(float32) = 6e-8, so each op adds ~sqrt(96)*6e-8 ~ 1e-6 relative and two or
# three layers compound it to ~1e-6..1e-5 (measured: ~1e-6). 1e-4 leaves margin
# and still catches any real mistake (pairing, head mapping, mask: O(1) changes).
# A rounding-boundary flip of one 8-bit activation would cost ~1e-3 here; with
# float32 activations agreeing to ~1e-7 such flips are rare and, for these
# seeded inputs, measured absent.
TINY_F32_BOUND = 1e-4
# f16 cache vs a reference without fp16 K/V: K (post-RoPE) and V are rounded to
# half precision (relative 2^-11 = 4.9e-4 per element), which moves logits by a
# few times that through attention (measured ~1e-3); 5e-3 = 10 ulp(fp16).
TINY_F16_CACHE_BOUND = 5e-3
# f16 cache vs a reference that also rounds K/V to fp16: float32 effects plus
# the occasional fp16 rounding-boundary flip (one element moves 4.9e-4, measured
# ~7e-5 in the logits); bound 1e-3.
TINY_F16_EMULATED_BOUND = 1e-3
# Default model (SmolLM2-135M-Instruct: Q4_1 layers, Q8_0 tied embedding, 30
# layers), f32 cache, vs the float64 reference on the dequantized weights.
# kvq rounds every Q4_1/Q8_0 matmul input to 8 bits; over 30 layers that moves
# the logits by a few percent of max|logit| -- the reference itself, with the
# same rounding emulated (act_q8), moves by ~5e-2 (measured 0.050), and kvq
# lands at 0.040. Bit-faithful emulation is impossible here: the Q8_0 embedding
# grid puts activations exactly on rounding ties (x/d = k + 0.5), which float32
# vs float64 break either way, and 30 layers amplify each flip. (Checked by
# experiment: with the same weights converted to F32, and with only the Q8_0
# head quantized, kvq matches the reference to ~2e-7.) Bound 8e-2 = 2x measured;
# the wrong RoPE pairing (NeoX) moves logits by ~0.7 (> 5x the bound).
REAL_FLOAT_BOUND = 8e-2
# The same weights stored as F16 (kvq dots F16 weights with exact F32
# activations): only float32 accumulation (<= 1536 terms, 30 layers) remains,
# so the float bound 1e-4 applies (measured 7.8e-7, ppl equal to 7 digits).
REAL_F16_BOUND = 1e-4
# Perplexity over ~55 tokens: the 8-bit activation rounding alone moves the
# reference's perplexity by ~2.4% (measured 65.76 -> 67.32); kvq measures 66.59
# (+1.3%), so 1% cannot hold for the quantized model. 3% for it; 1e-4 for the
# F16 copy, where only float32 rounding remains.
REAL_PPL_REL = 0.03
REAL_F16_PPL_REL = 1e-4
REAL_ARGMAX_AGREE = 0.95

THREADS = os.environ.get("KVQ_FORWARD_THREADS", "2")


def find_tests_binary() -> str:
    path = os.environ.get("KVQ_TESTS_BIN")
    if path:
        return path
    for cand in sorted(REPO.glob("build/*/tests/kvq_tests")):
        if os.access(cand, os.X_OK):
            return str(cand)
    pytest.fail("KVQ_TESTS_BIN is not set and no build/*/tests/kvq_tests exists")


def run_kvq(tmp: pathlib.Path, model: str, *, tokens=None, text=None, cache="f32", split=0, decode=False,
            tag="run") -> tuple[np.ndarray, np.ndarray]:
    """Runs ForwardFixture.DumpLogits; returns (tokens, logits[n, vocab])."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVQ_FORWARD_")}
    out = tmp / tag
    env.update(KVQ_FORWARD_MODEL=model, KVQ_FORWARD_OUT=str(out), KVQ_FORWARD_CACHE=cache,
               KVQ_FORWARD_THREADS=THREADS)
    if tokens is not None:
        tok_path = tmp / f"{tag}.in_tokens"
        np.asarray(tokens, dtype="<i4").tofile(tok_path)
        env["KVQ_FORWARD_TOKENS"] = str(tok_path)
    else:
        text_path = tmp / f"{tag}.txt"
        text_path.write_text(text, encoding="utf-8")
        env["KVQ_FORWARD_TEXT"] = str(text_path)
    if split:
        env["KVQ_FORWARD_SPLIT"] = str(split)
    if decode:
        env["KVQ_FORWARD_DECODE"] = "1"
    proc = subprocess.run([find_tests_binary(), "--gtest_filter=ForwardFixture.DumpLogits"], env=env,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "[  PASSED  ] 1 test" in log and "SKIPPED" not in log, log
    toks = np.fromfile(str(out) + ".tokens", dtype="<i4")
    logits = np.fromfile(str(out) + ".logits", dtype="<f4").reshape(len(toks), -1)
    return toks, logits


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


# --- tiny random models ----------------------------------------------------------

TINY_N_TOKENS = 70  # crosses kvq's 64-token KV page boundary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """variant -> dict(path, ref, tokens, want (f32 cache), want_f16 (fp16 K/V), plain (no act rounding))."""
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for variant in make_tiny_llama.VARIANTS:
        path = d / f"{variant}.gguf"
        make_tiny_llama.write_tiny_llama(str(path), variant, seed=7)
        ref = llama_ref.LlamaRef(str(path))
        toks = np.random.default_rng(11).integers(0, ref.hp.n_vocab, TINY_N_TOKENS)
        out[variant] = dict(path=str(path), ref=ref, toks=toks, want=ref.forward(toks, act_q8=True),
                            want_f16=ref.forward(toks, act_q8=True, kv_f16=True), plain=ref.forward(toks))
    return out


MODES = {"prompt": {}, "split": {"split": 23}, "decode": {"decode": True}}


@pytest.mark.parametrize("cache", ["f32", "f16"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", list(make_tiny_llama.VARIANTS))
def test_tiny_model_matches_reference(tiny, tmp_path, variant, mode, cache):
    t = tiny[variant]
    toks, want = t["toks"], t["want"]
    got_toks, got = run_kvq(tmp_path, t["path"], tokens=toks, cache=cache, **MODES[mode])
    np.testing.assert_array_equal(got_toks, toks)
    assert got.shape == want.shape
    quant = variant.startswith("quant")
    bound = TINY_F32_BOUND if cache == "f32" else TINY_F16_CACHE_BOUND
    err = rel_diff(got, want)
    print(f"{variant} {mode} {cache}: max rel diff {err:.3g} (bound {bound:g}); "
          f"8-bit activation rounding alone moves the reference by {rel_diff(t['plain'], want):.3g}")
    # With quantized weights the fp16 K/V rounding feeds the 8-bit activation
    # rounding of the next matmuls, and this random model amplifies such
    # changes chaotically (8-bit rounding alone moves its logits ~0.1); only the
    # comparison with fp16 K/V emulated (below) is meaningful there.
    if not (quant and cache == "f16"):
        assert err <= bound, f"{variant}/{mode}/{cache}: max rel diff {err:.3g} > {bound:g}"
    if cache == "f16":
        err16 = rel_diff(got, t["want_f16"])
        print(f"  vs reference with fp16 K/V: {err16:.3g} (bound {TINY_F16_EMULATED_BOUND:g})")
        assert err16 <= TINY_F16_EMULATED_BOUND, err16
    # A wrong RoPE pairing must be far outside the bound (the comparison has teeth).
    wrong = rel_diff(t["ref"].forward(toks, neox=True, act_q8=True), want)
    assert wrong > 20 * bound, wrong

    ppl_want = t["want_f16"] if cache == "f16" else want
    ppl_kvq, ppl_ref = llama_ref.perplexity(got, toks), llama_ref.perplexity(ppl_want, toks)
    print(f"  ppl kvq {ppl_kvq:.6f} ref {ppl_ref:.6f}")
    assert abs(ppl_kvq / ppl_ref - 1) <= (1e-4 if cache == "f32" else 1e-3), (ppl_kvq, ppl_ref)


def test_tiny_modes_agree_with_each_other(tiny, tmp_path):
    """Prompt-at-once, split and token-by-token decode see the same numbers."""
    t = tiny["quant_mixed"]
    runs = {m: run_kvq(tmp_path, t["path"], tokens=t["toks"], tag=m, **kw)[1] for m, kw in MODES.items()}
    for m in ("split", "decode"):
        err = rel_diff(runs[m], runs["prompt"].astype(np.float64))
        print(f"{m} vs prompt: {err:.3g}")
        assert err <= TINY_F32_BOUND, (m, err)


def test_tiny_model_text_input(tiny, tmp_path):
    """The fixture's text path: kvq's tokenizer on the tiny BPE vocabulary."""
    path, ref = tiny["f32"]["path"], tiny["f32"]["ref"]
    toks, got = run_kvq(tmp_path, path, text="the cat sat on the mat in the sun")
    assert len(toks) > 5 and toks.max() < ref.hp.n_vocab
    assert rel_diff(got, ref.forward(toks)) <= TINY_F32_BOUND


# --- the real default model ------------------------------------------------------

def default_model_path() -> str:
    if os.environ.get("KVQ_MODEL"):
        return os.environ["KVQ_MODEL"]
    cache = os.environ.get("KVQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvq")
    return os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")


def first_paragraph(max_words: int = 45) -> str:
    data = pathlib.Path(os.environ.get("KVQ_DATA_DIR") or REPO.parent / "shared" / "data")
    path = data / "wikitext-2" / "wiki.test.txt"
    if not path.exists():
        pytest.fail(f"{path} is missing (set KVQ_DATA_DIR)")
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("="):
            return " ".join(line.split()[:max_words])
    pytest.fail(f"{path} has no paragraph")


def write_f16_copy(src: str, dst: str) -> None:
    """The model with every matrix dequantized and stored as F16 (norms stay F32)."""
    import gguf
    from gguf import GGUFValueType as VT
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if f.types[0] == VT.ARRAY:
            w.add_key_value(name, f.contents(), VT.ARRAY, sub_type=f.types[1])
        else:
            w.add_key_value(name, f.contents(), f.types[0])
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, gguf.quants.dequantize(data, t.tensor_type).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    model = default_model_path()
    if not os.path.exists(model):
        pytest.fail(f"default model {model} is missing: run scripts/fetch-model.sh")
    tmp = tmp_path_factory.mktemp("real")
    toks, got = run_kvq(tmp, model, text=first_paragraph(), cache="f32")
    ref = llama_ref.LlamaRef(model)
    out = dict(tokens=toks, kvq=got, ref=ref.forward(toks), ref_q8=ref.forward(toks, act_q8=True),
               ref_neox=ref.forward(toks, neox=True))
    del ref
    f16 = tmp / "f16.gguf"
    write_f16_copy(model, str(f16))
    out["kvq_f16"] = run_kvq(tmp, str(f16), tokens=toks, cache="f32", tag="f16")[1]
    out["ref_f16"] = llama_ref.LlamaRef(str(f16)).forward(toks)
    f16.unlink()
    return out


def test_real_model_logits(real):
    toks, got, want = real["tokens"], real["kvq"], real["ref"]
    assert 40 <= len(toks) <= 80, len(toks)
    err = rel_diff(got, want)
    act_effect = rel_diff(real["ref_q8"], want)
    wrong = rel_diff(real["ref_neox"], want)
    print(f"real model: {len(toks)} tokens; max rel diff vs float64 reference {err:.3g} "
          f"(bound {REAL_FLOAT_BOUND:g}); 8-bit activations alone move the reference by {act_effect:.3g}; "
          f"kvq vs reference with 8-bit activations {rel_diff(got, real['ref_q8']):.3g}; "
          f"wrong (NeoX) pairing vs correct reference: {wrong:.3g}")
    assert err <= REAL_FLOAT_BOUND
    # The bound still catches a real bug: the reference with the wrong pairing is far outside it.
    assert wrong > 5 * REAL_FLOAT_BOUND


def test_real_model_f16_copy_logits(real):
    """Same weights without activation rounding: kvq must match to float32 precision."""
    err = rel_diff(real["kvq_f16"], real["ref_f16"])
    ppl_kvq = llama_ref.perplexity(real["kvq_f16"], real["tokens"])
    ppl_ref = llama_ref.perplexity(real["ref_f16"], real["tokens"])
    print(f"real model as F16: max rel diff {err:.3g} (bound {REAL_F16_BOUND:g}); ppl kvq {ppl_kvq:.5f} "
          f"numpy {ppl_ref:.5f}")
    assert err <= REAL_F16_BOUND
    assert abs(ppl_kvq / ppl_ref - 1) <= REAL_F16_PPL_REL
    assert np.mean(real["kvq_f16"].argmax(axis=1) == real["ref_f16"].argmax(axis=1)) == 1.0


def test_real_model_perplexity(real):
    toks = real["tokens"]
    ppl_kvq = llama_ref.perplexity(real["kvq"], toks)
    ppl_ref = llama_ref.perplexity(real["ref"], toks)
    ppl_q8 = llama_ref.perplexity(real["ref_q8"], toks)
    ppl_wrong = llama_ref.perplexity(real["ref_neox"], toks)
    print(f"real model ppl: kvq {ppl_kvq:.4f} numpy {ppl_ref:.4f} numpy+8-bit activations {ppl_q8:.4f} "
          f"(wrong pairing {ppl_wrong:.4f})")
    assert abs(ppl_kvq / ppl_ref - 1) <= REAL_PPL_REL
    assert abs(ppl_wrong / ppl_ref - 1) > 10 * REAL_PPL_REL


def test_real_model_argmax(real):
    agree = float(np.mean(real["kvq"].argmax(axis=1) == real["ref"].argmax(axis=1)))
    print(f"real model argmax agreement: {agree:.3f}")
    assert agree >= REAL_ARGMAX_AGREE

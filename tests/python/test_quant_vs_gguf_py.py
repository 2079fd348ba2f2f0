"""Independent check of kvq's block formats against the `gguf` Python package.

The gguf package's numpy code (gguf.quants) quantizes and dequantizes the GGUF
block types on its own. This test builds a fixture GGUF with, per case NAME:

  NAME           the raw tensor (quantized bytes stored as-is via raw_dtype)
  NAME.expected  gguf.quants.dequantize(NAME) as F32
  NAME.input     (only where python quantized) the F32 rows it quantized

and runs the C++ side (`$KVQ_TESTS_BIN --gtest_filter=QuantFixture.*` with
KVQ_QUANT_FIXTURE=<file>), which requires bit-exact dequantization (reference
and dispatched paths) and byte-identical quantization. The test fails, never
skips, when the C++ binary is missing, skips, or fails.

Types: python quantizes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16; it can only
dequantize Q4_K, Q5_K, Q6_K, so those get random valid raw blocks (random bytes
with finite f16 scale fields). Every quantizable type also gets random raw
blocks (all bit patterns of the quant fields).

Two deliberate exclusions, both about NaN bit patterns only:
  - F16 quantization inputs contain no NaN: numpy keeps the NaN payload without
    quieting, kvq (like ggml's portable code) writes the canonical quiet NaN.
  - F16 dequantization covers all 65536 halves except signaling NaNs: numpy
    keeps them signaling, F16C hardware conversion quiets them.
"""

import os
import subprocess

import numpy as np

import gguf  # a hard requirement: this check must never be skipped
from gguf import GGMLQuantizationType as QT
from gguf import quants

QUANTIZABLE = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.F16, QT.BF16]
DEQUANT_ONLY = [QT.Q4_K, QT.Q5_K, QT.Q6_K]

# Byte offsets of the f16 scale fields that must be finite in a valid block.
SCALE_FIELDS = {
    QT.Q4_0: [0], QT.Q5_0: [0], QT.Q8_0: [0],
    QT.Q4_1: [0, 2], QT.Q5_1: [0, 2],
    QT.Q4_K: [0, 2], QT.Q5_K: [0, 2],
    QT.Q6_K: [208],
}


def _block_elems(qt):
    return gguf.GGML_QUANT_SIZES[qt][0]


def _type_size(qt):
    return gguf.GGML_QUANT_SIZES[qt][1]


def _rows_for_quantization(rng):
    """Named f32 row sets (rows, cols); cols are multiples of 32."""
    cases = {}
    cases["normal"] = rng.standard_normal((8, 256)).astype(np.float32)
    cases["heavy"] = (rng.standard_t(2.0, (6, 512)) * 0.02).astype(np.float32)
    cases["cauchy"] = np.clip(rng.standard_cauchy((4, 224)) * 1e-2, -3e4, 3e4).astype(np.float32)
    cases["tiny"] = (rng.standard_normal((4, 96)) * 1e-6).astype(np.float32)  # fp16-subnormal scales
    cases["one_block"] = rng.uniform(-1, 1, (5, 32)).astype(np.float32)
    # Each block at its own magnitude, 1e-8 .. 1e3.
    x = rng.standard_normal((4, 32 * 16)).astype(np.float32)
    scales = 10.0 ** rng.uniform(-8, 3, (4, 16, 1))
    cases["block_scales"] = (x.reshape(4, 16, 32) * scales).reshape(4, 512).astype(np.float32)
    # Hand-made blocks: zeros, constants, a lone value, symmetric extremes in
    # both orders (first-of-largest-magnitude rule), exact .5 ties for Q8.
    special = np.zeros((1, 32 * 10), dtype=np.float32)
    b = special.reshape(10, 32)
    b[1, :] = 0.375
    b[2, :] = -2.5
    b[3, 7] = -1.0
    b[4, 0], b[4, 1] = -3.0, 3.0
    b[5, 0], b[5, 1] = 3.0, -3.0
    b[6, :9] = [127, -127, 63.5, -63.5, 0.5, -0.5, 1.5, 2.5, -2.5]
    b[7, :] = np.arange(32) - 15.5
    b[8, :] = (np.arange(32) - 16) * 0.5
    b[9, :] = rng.integers(-8, 8, 32) * 0.25
    cases["special"] = special
    return cases


def _f16_specials(rng):
    """F32 values around every fp16 rounding boundary, no NaN."""
    halves = np.arange(0, 0x7C00, dtype=np.uint32)
    lo = halves.astype(np.uint16).view(np.float16).astype(np.float32)
    hi = (halves + 1).astype(np.uint16).view(np.float16).astype(np.float32)
    mid = ((lo.astype(np.float64) + hi.astype(np.float64)) / 2).astype(np.float32)  # exact ties
    mid_up = np.nextafter(mid, np.float32(np.inf))
    mid_dn = np.nextafter(mid, np.float32(0))
    bits = rng.integers(0, 2**32, 40000, dtype=np.uint64).astype(np.uint32)
    rand = bits.view(np.float32)
    rand = rand[~np.isnan(rand)]
    extra = np.array([np.inf, -np.inf, 65504, 65519.996, 65520, 1e30, 1e-30, 2.0**-25, 2.0**-24,
                      -0.0, 0.0, 3 * 2.0**-25, 1023.5 * 2.0**-24], dtype=np.float32)
    v = np.concatenate([lo, mid, mid_up, mid_dn, -mid, rand, extra]).astype(np.float32)
    pad = (-len(v)) % 256
    v = np.concatenate([v, np.zeros(pad, dtype=np.float32)])
    return v.reshape(-1, 256)


def _bf16_specials(rng):
    """Random f32 bit patterns including NaN/inf/subnormals, plus exact ties."""
    bits = rng.integers(0, 2**32, 60000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**16, 4000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    edge = np.array([0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x00008000,
                     0x00018000, 0x80000001, 0x7F800000, 0xFF800000], dtype=np.uint32)
    v = np.concatenate([bits, ties, edge])
    pad = (-len(v)) % 256
    v = np.concatenate([v, np.zeros(pad, dtype=np.uint32)])
    return v.view(np.float32).reshape(-1, 256)


def _random_raw_blocks(rng, qt, n_rows, blocks_per_row):
    ts = _type_size(qt)
    raw = rng.integers(0, 256, (n_rows, blocks_per_row, ts), dtype=np.uint8)
    for off in SCALE_FIELDS[qt]:
        # Finite scales across magnitudes, both signs, some zero and subnormal.
        mag = 10.0 ** rng.uniform(-7, 1, (n_rows, blocks_per_row))
        sign = rng.choice([-1.0, 1.0], (n_rows, blocks_per_row), p=[0.2, 0.8])
        val = (mag * sign).astype(np.float16)
        val[rng.random((n_rows, blocks_per_row)) < 0.03] = 0
        raw[:, :, off:off + 2] = val.view(np.uint8).reshape(n_rows, blocks_per_row, 2)
    return raw.reshape(n_rows, blocks_per_row * ts)


def _all_halves_except_snan():
    h = np.arange(0, 0x10000, dtype=np.uint32).astype(np.uint16)
    snan = ((h & 0x7C00) == 0x7C00) & ((h & 0x03FF) != 0) & ((h & 0x0200) == 0)
    h = h.copy()
    h[snan] |= 0x0200  # make them quiet (payload otherwise kept)
    return h.reshape(256, 256)


def _write_fixture(path, rng):
    w = gguf.GGUFWriter(str(path), "kvq-quant-fixture")
    entries = []  # (name, raw array, raw_dtype or None, expected f32, input f32 or None)

    def add(name, raw, qt, x=None):
        raw_dtype = None if qt in (QT.F16, QT.F32) else qt
        expected = np.asarray(quants.dequantize(raw, qt), dtype=np.float32)
        entries.append((name, raw, raw_dtype, expected, x))

    # Python quantizes: byte-identical quantization is required of kvq.
    row_sets = _rows_for_quantization(rng)
    for qt in QUANTIZABLE:
        for case, x in row_sets.items():
            add(f"{qt.name.lower()}.{case}", quants.quantize(x, qt), qt, x)
    x = _f16_specials(rng)
    add("f16.rounding", quants.quantize(x, QT.F16), QT.F16, x)
    x = _bf16_specials(rng)
    add("bf16.rounding", quants.quantize(x, QT.BF16), QT.BF16, x)

    # Dequantization only: random valid raw blocks (also for the quantizable
    # types, to cover bit patterns their quantizer never writes).
    for qt in DEQUANT_ONLY + [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]:
        for n_blocks in (1, 3, 7):
            add(f"{qt.name.lower()}.raw{n_blocks}", _random_raw_blocks(rng, qt, 5, n_blocks), qt)
    add("f16.all_halves", _all_halves_except_snan().view(np.float16), QT.F16)
    add("bf16.all", np.arange(0, 0x10000, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(256, 512), QT.BF16)
    add("f32.rand", rng.standard_normal((3, 64)).astype(np.float32), QT.F32)

    n_quant = sum(1 for e in entries if e[4] is not None)
    w.add_uint32("kvq.quant_fixture.n_dequant", len(entries))
    w.add_uint32("kvq.quant_fixture.n_quantize", n_quant)
    for name, raw, raw_dtype, expected, x in entries:
        if raw_dtype is None:
            w.add_tensor(name, raw)
        else:
            w.add_tensor(name, raw, raw_dtype=raw_dtype)
        w.add_tensor(name + ".expected", expected)
        if x is not None:
            w.add_tensor(name + ".input", np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(entries), n_quant


def test_quant_matches_gguf_py(tmp_path):
    bin_path = os.environ.get("KVQ_TESTS_BIN")
    assert bin_path, "KVQ_TESTS_BIN must point at the built kvq_tests binary"
    assert os.path.isfile(bin_path) and os.access(bin_path, os.X_OK), f"not an executable: {bin_path}"

    rng = np.random.default_rng(20240611)
    fixture = tmp_path / "quant_fixture.gguf"
    n_dequant, n_quant = _write_fixture(fixture, rng)
    assert n_dequant > 50 and n_quant > 40

    env = dict(os.environ, KVQ_QUANT_FIXTURE=str(fixture))
    proc = subprocess.run([bin_path, "--gtest_filter=QuantFixture.*"], env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-20000:]
    assert "SKIPPED" not in out, out[-20000:]
    assert "[       OK ] QuantFixture.DequantMatchesPython" in out, out[-20000:]
    assert "[       OK ] QuantFixture.QuantizeMatchesPython" in out, out[-20000:]

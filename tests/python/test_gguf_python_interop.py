"""Cross-check kvq's GGUF reader and writer against the PyPI `gguf` package.

kvq -> Python: a file written by gguf.GGUFWriter is read by kvq (the C++ test
GgufInterop.Check, driven through environment variables) and compared with an
expectation JSON written here from the values we put in.
Python -> kvq: the same C++ test writes a file with kvq's Writer, which
gguf.GGUFReader must read back with the values the C++ side put in.
"""
import json
import math
import os
import pathlib
import subprocess

import gguf  # a missing package must fail the test, not skip it
import numpy as np
import pytest

from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

REPO = pathlib.Path(__file__).resolve().parents[2]


def find_tests_binary() -> str:
    path = os.environ.get("KVQ_TESTS_BIN")
    if path:
        return path
    for cand in sorted(REPO.glob("build/*/tests/kvq_tests")):
        if os.access(cand, os.X_OK):
            return str(cand)
    pytest.fail("KVQ_TESTS_BIN is not set and no build/*/tests/kvq_tests exists")


def run_interop(env_extra: dict) -> None:
    env = dict(os.environ)
    for k in ("KVQ_GGUF_INTEROP_FILE", "KVQ_GGUF_INTEROP_EXPECT", "KVQ_GGUF_INTEROP_WRITE"):
        env.pop(k, None)
    env.update(env_extra)
    proc = subprocess.run([find_tests_binary(), "--gtest_filter=GgufInterop.*"], env=env,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[  PASSED  ] 1 test" in out, out
    assert "SKIPPED" not in out, out


def f32(x: float) -> float:
    return float(np.float32(x))


def test_kvq_reads_python_written_file(tmp_path):
    path = tmp_path / "py.gguf"
    w = gguf.GGUFWriter(str(path), "pytest")
    w.add_custom_alignment(64)
    expect_meta = [
        {"key": "general.architecture", "type": "string", "value": "pytest"},
        {"key": "general.alignment", "type": "uint32", "value": 64},
    ]

    def scalar(key, vtype, name, value, add):
        add(key, value)
        expect_meta.append({"key": key, "type": name, "value": value})

    scalar("py.u8", VT.UINT8, "uint8", 250, w.add_uint8)
    scalar("py.i8", VT.INT8, "int8", -120, w.add_int8)
    scalar("py.u16", VT.UINT16, "uint16", 65000, w.add_uint16)
    scalar("py.i16", VT.INT16, "int16", -32000, w.add_int16)
    scalar("py.u32", VT.UINT32, "uint32", 4_000_000_000, w.add_uint32)
    scalar("py.i32", VT.INT32, "int32", -2_000_000_000, w.add_int32)
    scalar("py.u64", VT.UINT64, "uint64", 2**64 - 1, w.add_uint64)
    scalar("py.i64", VT.INT64, "int64", -(2**62), w.add_int64)
    scalar("py.f32", VT.FLOAT32, "float32", f32(0.1), w.add_float32)
    scalar("py.f64", VT.FLOAT64, "float64", 0.1, w.add_float64)
    scalar("py.true", VT.BOOL, "bool", True, w.add_bool)
    scalar("py.false", VT.BOOL, "bool", False, w.add_bool)
    scalar("py.str", VT.STRING, "string", "h\u00e9llo \u4e16\u754c", w.add_string)

    def array(key, values, sub_type, sub_name, expect_values=None):
        w.add_key_value(key, values, VT.ARRAY, sub_type=sub_type)
        expect_meta.append({"key": key, "type": "array", "array_type": sub_name,
                            "value": values if expect_values is None else expect_values})

    array("py.strs", ["<unk>", "", "\u00e9t\u00e9", "a b"], VT.STRING, "string")
    array("py.i32s", [1, -2, 2_000_000_000], VT.INT32, "int32")
    array("py.u8s", [0, 128, 255], VT.UINT8, "uint8")
    array("py.i16s", [-32768, 32767], VT.INT16, "int16")
    array("py.u64s", [0, 2**63 - 1], VT.UINT64, "uint64")
    array("py.f32s", [0.5, 0.1, -3.25], VT.FLOAT32, "float32", [0.5, f32(0.1), -3.25])
    array("py.f64s", [1e-300, -0.1], VT.FLOAT64, "float64")
    array("py.bools", [True, False, True], VT.BOOL, "bool")

    rng = np.random.default_rng(1234)
    a = rng.standard_normal((3, 5)).astype(np.float32)     # ggml dims [5, 3]
    h = rng.standard_normal((2, 4, 6)).astype(np.float16)  # ggml dims [6, 4, 2]
    qsrc = rng.standard_normal((2, 64)).astype(np.float32)
    q = gguf.quants.quantize(qsrc, QT.Q8_0)                # bytes, shape (2, 68)
    w.add_tensor("t.f32", a)
    w.add_tensor("t.f16", h)
    w.add_tensor("t.q8_0", q, raw_dtype=QT.Q8_0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    tensors = []
    offset = 0
    for name, typ, dims, data in (("t.f32", "f32", [5, 3], a.tobytes()),
                                  ("t.f16", "f16", [6, 4, 2], h.tobytes()),
                                  ("t.q8_0", "q8_0", [64, 2], q.tobytes())):
        tensors.append({"name": name, "type": typ, "dims": dims, "offset": offset, "data_hex": data.hex()})
        offset += (len(data) + 63) // 64 * 64
    assert len(q.tobytes()) == 2 * 2 * 34

    # The reference reader agrees with what we expect to be in the file.
    r = gguf.GGUFReader(str(path))
    assert [t.name for t in r.tensors] == [t["name"] for t in tensors]
    assert [list(map(int, t.shape)) for t in r.tensors] == [t["dims"] for t in tensors]
    assert [k for k in r.fields if not k.startswith("GGUF.")] == [m["key"] for m in expect_meta]

    expect = {"version": 3, "alignment": 64, "metadata": expect_meta, "tensors": tensors}
    expect_path = tmp_path / "expect.json"
    expect_path.write_text(json.dumps(expect))
    run_interop({"KVQ_GGUF_INTEROP_FILE": str(path), "KVQ_GGUF_INTEROP_EXPECT": str(expect_path)})


def test_python_reads_kvq_written_file(tmp_path):
    path = tmp_path / "kvq.gguf"
    run_interop({"KVQ_GGUF_INTEROP_WRITE": str(path)})
    r = gguf.GGUFReader(str(path))

    def val(key):
        return r.fields[key].contents()

    def vtypes(key):
        return r.fields[key].types

    assert val("general.architecture") == "kvqtest"
    expect = {
        "kvq.u8": (VT.UINT8, 7), "kvq.i16": (VT.INT16, -300), "kvq.u32": (VT.UINT32, 123456),
        "kvq.i32": (VT.INT32, -42), "kvq.u64": (VT.UINT64, 1 << 40), "kvq.i64": (VT.INT64, -(1 << 40)),
        "kvq.f32": (VT.FLOAT32, 0.125), "kvq.f64": (VT.FLOAT64, 1e-300), "kvq.bool": (VT.BOOL, True),
        "kvq.str": (VT.STRING, "caf\u00e9"),
    }
    for key, (vt, v) in expect.items():
        assert vtypes(key) == [vt], key
        got = val(key)
        if isinstance(v, float):
            assert math.isclose(got, v, rel_tol=0, abs_tol=0) or got == v, (key, got)
        else:
            assert got == v, (key, got)
    assert vtypes("kvq.strs") == [VT.ARRAY, VT.STRING] and val("kvq.strs") == ["x", "yy", ""]
    assert vtypes("kvq.ints") == [VT.ARRAY, VT.INT32] and val("kvq.ints") == [3, -1, 4]
    assert vtypes("kvq.floats") == [VT.ARRAY, VT.FLOAT32] and val("kvq.floats") == [1.0, -0.5]

    by_name = {t.name: t for t in r.tensors}
    assert list(by_name) == ["kvq.f32_tensor", "kvq.q8_tensor"]
    t = by_name["kvq.f32_tensor"]
    assert t.tensor_type == QT.F32 and list(map(int, t.shape)) == [4, 3]
    np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), np.arange(12, dtype=np.float32) - 5.5)
    t = by_name["kvq.q8_tensor"]
    assert t.tensor_type == QT.Q8_0 and list(map(int, t.shape)) == [32, 2]
    raw = bytearray(range(68))
    raw[0:2] = b"\x00\x3c"
    raw[34:36] = b"\x00\x38"
    assert bytes(np.asarray(t.data).tobytes()) == bytes(raw)
    deq = gguf.quants.dequantize(np.asarray(t.data), QT.Q8_0)
    assert deq.shape == (2, 32)
    np.testing.assert_array_equal(deq[0], np.array(raw[2:34], dtype=np.uint8).view(np.int8).astype(np.float32))

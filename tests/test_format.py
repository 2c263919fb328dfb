"""Our safetensors reader and writer against the safetensors package, both ways, byte for byte."""

import json
import struct

import numpy as np
import pytest
import torch
from conftest import assert_bit_equal, save_st
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pysoup
from pysoup.errors import FormatError
from pysoup.io.format import build_header, parse_header
from pysoup.io.reader import SafetensorsReader

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.int16,
]


def mixed_state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, dt in enumerate(ALL_DTYPES):
        x = torch.randn(3, i + 1, generator=g) * 50
        sd[f"t{i}.{str(dt)[6:]}"] = x.to(dt)
    sd["scalar"] = torch.tensor(1.5)
    sd["empty"] = torch.empty(0, 4)
    return sd


def test_reader_reads_safetensors_package_files(tmp_path):
    sd = mixed_state_dict()
    path = save_st(tmp_path / "a.safetensors", sd, metadata={"format": "pt", "note": "hé"})
    with pysoup.open(path) as ckpt:
        assert set(ckpt.keys()) == set(sd)
        assert ckpt.metadata == {"format": "pt", "note": "hé"}
        for k, v in sd.items():
            assert ckpt.infos[k].shape == tuple(v.shape)
            got = ckpt[k]
            assert got.dtype == v.dtype and torch.equal(got, v)
        assert ckpt.numpy("t0.float32").dtype == np.float32
        assert ckpt.numpy("t2.bfloat16").dtype == np.uint16  # raw bits: numpy has no bfloat16


def test_header_is_byte_identical_to_safetensors(tmp_path):
    from safetensors.torch import save

    sd = mixed_state_dict()
    want = save(sd, metadata={"format": "pt"})
    entries = [(k, pysoup.dtypes.from_torch(v.dtype), tuple(v.shape)) for k, v in sd.items()]
    header, offsets, _ = build_header(entries, {"format": "pt"})
    assert want[: len(header)] == header
    for k, v in sd.items():
        b, e = offsets[k]
        assert want[b:e] == v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_merged_file_is_byte_identical_to_safetensors_save(tmp_path, models):
    """Our writer's whole output equals safetensors.save_file of the same merged tensors."""
    paths, _ = models
    out = tmp_path / "soup.safetensors"
    pysoup.merge(paths, out, weights=[0.2, 0.3, 0.5])
    from safetensors.torch import load_file

    again = save_st(tmp_path / "again.safetensors", load_file(str(out)))
    assert open(out, "rb").read() == open(again, "rb").read()


def write_raw(path, header_obj, data=b"", raw_header=None, pad=True):
    text = raw_header if raw_header is not None else json.dumps(header_obj).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def good_entry(begin=0, shape=(2,), dtype="F32"):
    size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + size * int(np.prod(shape))]}


ZEROS = b"\0" * 8

BAD_HEADERS = {
    "empty file": (lambda p: p.write_bytes(b""), "empty or truncated"),
    "short file": (lambda p: p.write_bytes(b"\x01\x02"), "empty or truncated"),
    "absurd header length": (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "absurdly large"),
    "header past end": (lambda p: p.write_bytes(struct.pack("<Q", 500) + b"{}"), "past the end of the file"),
    "not utf-8": (lambda p: write_raw(p, None, raw_header=b'{"a\xff":1}'), "not valid UTF-8"),
    "not json": (lambda p: write_raw(p, None, raw_header=b"{not json"), "not valid JSON"),
    "not an object": (lambda p: write_raw(p, [1, 2]), "not a JSON object"),
    "unknown dtype": (lambda p: write_raw(p, {"w": {**good_entry(), "dtype": "F12"}}, b"\0" * 8), "unknown dtype"),
    "negative dim": (lambda p: write_raw(p, {"w": {**good_entry(), "shape": [-2]}}, b"\0" * 8), "negative"),
    "float dim": (lambda p: write_raw(p, {"w": {**good_entry(), "shape": [2.0]}}, b"\0" * 8), "list of integers"),
    "overflow": (lambda p: write_raw(p, {"w": {**good_entry(), "shape": [2**40, 2**40]}}, b"\0" * 8), "overflows"),
    "range mismatch": (lambda p: write_raw(p, {"w": {**good_entry(), "data_offsets": [0, 4]}}, b"\0" * 8), "needs 8"),
    "past data end": (lambda p: write_raw(p, {"w": good_entry(begin=4)}, b"\0" * 8), "past the end of the data"),
    "overlap": (lambda p: write_raw(p, {"a": good_entry(0, (2,)), "b": good_entry(4, (2,))}, b"\0" * 12), "overlap"),
    "missing key": (lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "exactly the keys"),
    "bad metadata": (lambda p: write_raw(p, {"__metadata__": {"a": 1}}), "__metadata__"),
    "duplicate key": (lambda p: write_raw(p, None, raw_header=b'{"w":1,"w":2}'), "duplicate"),
    # Values that Python's json module turns into foreign exceptions, or that only fail later (issue 9, 7-12).
    "deep nesting": (lambda p: write_raw(p, None, raw_header=b'{"w":' + b"[" * 1100 + b"]" * 1100 + b"}"), "nested"),
    "5000-digit integer": (
        lambda p: write_raw(p, None, raw_header=b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"a":1}}'),
        "number too large",
    ),
    "list dtype": (lambda p: write_raw(p, {"w": {**good_entry(), "dtype": ["F32"]}}, b"\0" * 8), "unknown dtype"),
    "object dtype": (lambda p: write_raw(p, {"w": {**good_entry(), "dtype": {"F": 1}}}, b"\0" * 8), "unknown dtype"),
    "lone surrogate name": (
        lambda p: write_raw(p, None, raw_header=b'{"\\ud800":' + json.dumps(good_entry()).encode() + b"}", data=ZEROS),
        "lone surrogate",
    ),
    "lone surrogate metadata": (
        lambda p: write_raw(p, None, raw_header=b'{"__metadata__":{"a":"\\udfff"}}'),
        "surrogate",
    ),
    "zero dim then 2^64": (
        lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}),
        "overflows",
    ),
    "2^63 then zero dim": (
        lambda p: write_raw(p, {"w": {"dtype": "U8", "shape": [2**63, 0], "data_offsets": [0, 0]}}),
        "overflows",
    ),
    "huge dims around zero": (
        lambda p: write_raw(p, {"w": {"dtype": "U8", "shape": [2**62, 0, 2**62], "data_offsets": [0, 0]}}),
        "overflows",
    ),
    "65 dimensions": (
        lambda p: write_raw(p, {"w": {"dtype": "U8", "shape": [1] * 65, "data_offsets": [0, 1]}}, b"\0" * 8),
        "65 dimensions",
    ),
    # Bytes that belong to no tensor, as the safetensors package refuses them (found by tests/fuzzing.py).
    "trailing bytes": (lambda p: write_raw(p, {"w": good_entry()}, ZEROS + b"\0" * 8), "after the last tensor"),
    "no tensors, some data": (lambda p: write_raw(p, {}, ZEROS), "after the last tensor"),
    "gap before a tensor": (lambda p: write_raw(p, {"w": good_entry(begin=4, shape=(1,))}, ZEROS), "before tensor"),
    "empty tensor inside another": (
        lambda p: write_raw(p, {"a": good_entry(0, (2,)), "e": good_entry(4, (0,))}, ZEROS),
        "overlap",
    ),
    "integer -0": (
        lambda p: write_raw(p, None, raw_header=b'{"w":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'),
        "-0 is not an integer",
    ),
    "offset past 2^63": (
        lambda p: write_raw(p, {"w": {"dtype": "U8", "shape": [1], "data_offsets": [2**64, 2**64 + 1]}}, b"\0" * 8),
        "64-bit offsets",
    ),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_headers_raise_format_error(tmp_path, case):
    make, match = BAD_HEADERS[case]
    p = tmp_path / "bad.safetensors"
    make(p)
    with pytest.raises(FormatError, match=match) as info:
        SafetensorsReader(str(p))
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_empty_tensor_with_huge_dimension_reads(tmp_path):
    """A zero dimension beside one that fits in int64 is a valid empty tensor; safetensors reads it too."""
    p = write_raw(tmp_path / "e.safetensors", {"w": {"dtype": "U8", "shape": [0, 2**62], "data_offsets": [0, 0]}})
    with pysoup.open(p) as ckpt:
        assert ckpt["w"].shape == (0, 2**62) and ckpt.numpy("w").shape == (0, 2**62)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=300))
def test_fuzzed_files_never_crash(tmp_path, blob, data_len):
    """Any byte string either parses or raises FormatError; never another exception."""
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(blob)
    try:
        SafetensorsReader(str(p)).close()
    except FormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.tuples(st.sampled_from(["F32", "F16", "BF16", "I64", "U8"]), st.lists(st.integers(0, 5), max_size=3)),
        max_size=6,
    )
)
def test_fuzzed_headers_roundtrip(entries):
    """build_header's output always parses back to the same tensors."""
    entries = [(k, d, tuple(s)) for k, (d, s) in entries.items() if k != "__metadata__"]
    header, offsets, _ = build_header(entries, {"format": "pt"})
    data_len = max((e for _, e in offsets.values()), default=len(header)) - len(header)
    meta, infos, start = parse_header("x", header[:8], len(header) + data_len, lambda n: header[8 : 8 + n])
    assert meta == {"format": "pt"} and start == len(header)
    assert {t.name: (t.dtype, t.shape, (t.begin, t.end)) for t in infos} == {
        k: (d, s, offsets[k]) for k, d, s in entries
    }


def test_zero_copy_views_do_not_write_the_file(tmp_path):
    sd = {"w": torch.arange(6, dtype=torch.float32)}
    path = save_st(tmp_path / "a.safetensors", sd)
    before = open(path, "rb").read()
    with pysoup.open(path) as ckpt:
        t = ckpt["w"]
        t += 1  # copy-on-write mapping
        assert_bit_equal(t, sd["w"] + 1)
    assert open(path, "rb").read() == before


def test_sharded_directory_reader(tmp_path, models):
    _, sds = models
    d = tmp_path / "hf"
    d.mkdir()
    keys = list(sds[0])
    half = len(keys) // 2
    save_st(d / "model-00001-of-00002.safetensors", {k: sds[0][k] for k in keys[:half]})
    save_st(d / "model-00002-of-00002.safetensors", {k: sds[0][k] for k in keys[half:]})
    wm = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pysoup.open(str(d)) as ckpt:
        assert set(ckpt.keys()) == set(keys) and len(ckpt.files) == 2
        for k in keys:
            assert_bit_equal(ckpt[k], sds[0][k])

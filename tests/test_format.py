"""Our safetensors reader and writer against the safetensors package, both ways, byte for byte."""

import json

import numpy as np
import pytest
import torch
from helpers.checkpoints import save_st, write_raw
from helpers.faults import BAD_HEADERS
from helpers.tensors import assert_bit_equal
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

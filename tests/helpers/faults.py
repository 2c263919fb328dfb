"""Things that go wrong under a merge: malformed safetensors files (one table, read by the format tests and the
end-to-end bad-input tests) and a disk that fills up mid-write."""

import errno
import json
import os
import struct

import numpy as np

from helpers.checkpoints import write_raw


def good_entry(begin=0, shape=(2,), dtype="F32"):
    size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + size * int(np.prod(shape))]}


ZEROS = b"\0" * 8

# name -> (write the file at a pathlib.Path, a part of the FormatError's message)
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


def disk_full_after(monkeypatch, writes=1):
    """Makes pysoup's writer fail with ENOSPC after `writes` pwrite calls went through (the first: a header).
    Returns a function that starts the count again."""
    import pysoup.io.writer as writer

    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full)
    return lambda: calls.update(n=0)

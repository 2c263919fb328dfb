"""A fuzzer for pysoup's reading and merging of safetensors files.

Every case starts from a small valid file written by the `safetensors` package (every dtype, 0-d and empty
tensors, metadata, unicode names), mutates it at the JSON level (dtypes, shapes, offsets, nesting, duplicate
keys, names, lengths, padding) or at the byte level (bit flips, truncation, appended or inserted bytes), and
checks pysoup against the contract of the README's "Broken input" section:

- `pysoup.open` and `pysoup.merge` either succeed or raise a `SoupError` with a one-line message; any other
  exception, a signal (SIGBUS, SIGSEGV, ...) or a hang is a failure;
- what pysoup opens, it reads exactly as `safetensors` does (keys, dtypes, shapes, bytes, metadata);
- a merge that succeeds wrote a file that `safetensors` loads, equal byte for byte to the reference merge of
  the same inputs as `safetensors` reads them;
- pysoup never accepts a file `safetensors` refuses (the reverse is recorded as an informational outcome);
- afterwards there is no debris (`*.pysoup-tmp-*`), the inputs are unchanged and an older output is intact.

Cases run in persistent worker processes (a process per case would spend ~0.1 s starting python), so a crash
or a hang fails only its case; the worker is restarted. A case is a pure function of (seed, index).

    python tests/fuzzing.py --cases 2000 --seed 1 --workers 2 [--json PATH] [--markdown PATH]
    python tests/fuzzing.py --replay SEED:INDEX      # one case in this process, with its header and traceback
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import functools
import hashlib
import json
import math
import os
import pickle
import platform
import random
import re
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

FUZZER_PATH = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(FUZZER_PATH))

DEFAULT_DEADLINE_S = 20.0  # a case takes ~20 ms; 20 s is a hang, not a slow machine
WORKER_STARTUP_S = 180.0  # importing torch on a loaded 2-core machine can take several seconds
OLD_OUTPUT = b"an older merge result that must survive a refused merge"
# An older directory output: weight files a new merge replaces or removes as stale, and a file it must keep.
OLD_DIRECTORY = {
    "model.safetensors": OLD_OUTPUT,
    "model-00001-of-00009.safetensors": OLD_OUTPUT,
    "model.safetensors.index.json": b'{"weight_map": {"x": "model-00001-of-00009.safetensors"}}',
    "README.md": b"# notes the merge must not touch",
}
# A worker may map this much beyond what it held after its imports: a runaway allocation becomes a MemoryError
# (a reported failure) instead of pushing a shared machine into swap.
WORKER_EXTRA_ADDRESS_SPACE = 4 << 30

# Every dtype name the safetensors format knows (pysoup accepts the first 15 in a header and merges F32, F16,
# BF16). Element sizes are written out here rather than taken from pysoup: the oracle must not share its tables.
ELEMENT_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "C64": 8,
}  # fmt: skip
SUB_BYTE_DTYPES = ["F4", "F6_E2M3", "F6_E3M2"]
TORCH_TO_SAFETENSORS = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0",
    "complex64": "C64",
}  # fmt: skip
HUGE = [2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100]


# -- corpus: valid files written by the safetensors package --------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A valid file to mutate and an unmutated partner with the same tensors (other values) to merge it with."""

    name: str
    base: bytes
    partner: bytes
    weight: float  # share of the cases


def _mergeable_tensors(seed):
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g)

    return {
        "w.f32": randn(2, 3),
        "w.f16": randn(3).half(),
        "w.bf16": randn(2, 2).bfloat16(),
        "scalar.f32": randn(),
        "empty.f32": torch.empty(0),
        "empty.bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "position_ids": torch.arange(3, dtype=torch.int64) + seed,
        "mask": torch.tensor([[True, False], [seed % 2 == 0, True]]),
        "bytes.u8": torch.tensor([7, 200 + seed], dtype=torch.uint8),
        "bytes.i8": torch.tensor([-3, seed], dtype=torch.int8),
        "count.i16": torch.tensor([seed - 1000], dtype=torch.int16),
        "none.i32": torch.empty(0, dtype=torch.int32),
        "層.重み": randn(2),
        "emoji.😀.bias": randn(1).half(),
    }


def _every_dtype_tensors(seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, generator=g) * 4
    out = {}
    for name in ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"):
        out[f"t.{name}"] = x.to(getattr(torch, name))
    for name in ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64"):
        dtype = getattr(torch, name, None)
        if dtype is not None:  # unsigned 16-64 bit tensors exist from torch 2.3
            out[f"t.{name}"] = torch.arange(3, dtype=torch.int64).add(seed).to(dtype)
    out["t.bool"] = x > 0
    out["scalar.f64"] = torch.tensor(1.5 + seed, dtype=torch.float64)
    out["empty.f8"] = torch.empty(0, dtype=torch.float8_e5m2)
    out["empty.u8"] = torch.empty(2, 0, dtype=torch.uint8)
    return out


def _exotic_tensors(seed):
    """dtypes the safetensors package reads and pysoup does not know (their cases are informational at best)."""
    import torch

    x = torch.arange(2, dtype=torch.float32) + seed
    out = {"w": x}
    for name in ("complex64", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        dtype = getattr(torch, name, None)
        if dtype is not None:
            out[f"t.{name}"] = x.to(dtype)
    return out


def _numpy_arrays(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((2, 2)).astype(np.float32),
        "h": rng.standard_normal(3).astype(np.float16),
        "step": np.array(seed, dtype=np.int64),
        "ids": np.arange(2, dtype=np.uint32) + seed,
        "flags": np.array([True, False, seed % 2 == 1]),
        "e": np.zeros(0, dtype=np.float32),
        "z": np.zeros((2, 0), dtype=np.int16),
    }


@functools.cache
def corpus() -> dict:
    """The valid files every case starts from, by family name (deterministic: fixed seeds)."""
    from safetensors.numpy import save as save_numpy
    from safetensors.torch import save as save_torch

    def torch_pair(make, metadata):
        return _stable(save_torch(make(0), metadata=metadata)), _stable(save_torch(make(1), metadata=metadata))

    def numpy_pair(make, metadata):
        return _stable(save_numpy(make(0), metadata=metadata)), _stable(save_numpy(make(1), metadata=metadata))

    meta = {"format": "pt", "note": "hé ∑ 😀", "": "empty key"}
    families = [
        Family("mergeable", *torch_pair(_mergeable_tensors, meta), 0.32),
        Family("small", *torch_pair(lambda s: dict(list(_mergeable_tensors(s).items())[:3]), None), 0.22),
        Family("numpy", *numpy_pair(_numpy_arrays, {"format": "np"}), 0.14),
        Family("every-dtype", *torch_pair(_every_dtype_tensors, {"format": "pt", "dtypes": "all"}), 0.2),
        Family("exotic", *torch_pair(_exotic_tensors, None), 0.06),
        Family("empty", save_torch({}, metadata={"format": "pt"}), save_torch({}, metadata={"format": "pt"}), 0.06),
    ]  # fmt: skip
    return {f.name: f for f in families}


def _stable(raw: bytes) -> bytes:
    """The file with its metadata keys sorted: the safetensors writer orders them as a Rust HashMap iterates,
    which changes from process to process, and a case must be the same bytes in every run."""
    n, text, data = split_file(raw)
    header = json.loads(text)
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    body = dump_json(header).encode("utf-8")
    body += b" " * (n - len(body))
    assert len(body) == n, "re-serialising changed the header's length"
    return raw[:8] + body + data


def split_file(raw: bytes) -> tuple:
    """(header length field, header text bytes, data) of a file whose first 8 bytes are a length (any length)."""
    if len(raw) < 8:
        return None, raw, b""
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8 : 8 + n], raw[8 + n :]


# -- JSON text with what json.dumps cannot write ---------------------------------------------------------------
@dataclass(frozen=True)
class Raw:
    """JSON text inserted verbatim (a 5000-digit integer, NaN, 1100 brackets, invalid tokens)."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """A JSON object written from a list of pairs, so that a key can appear twice."""

    items: tuple


def dump_json(node, ensure_ascii: bool = False, separators: tuple = (",", ":")) -> str:
    """Compact JSON like the safetensors writer's (other `separators` space it out), with Raw and Pairs nodes."""
    if isinstance(node, Raw):
        return node.text
    item_sep, key_sep = separators
    if isinstance(node, (dict, Pairs)):
        items = node.items if isinstance(node, Pairs) else node.items()
        return (
            "{"
            + item_sep.join(
                json.dumps(k, ensure_ascii=ensure_ascii) + key_sep + dump_json(v, ensure_ascii, separators)
                for k, v in items
            )
            + "}"
        )
    if isinstance(node, (list, tuple)):
        return "[" + item_sep.join(dump_json(v, ensure_ascii, separators) for v in node) + "]"
    return json.dumps(node, ensure_ascii=ensure_ascii)


def serialise(header, data: bytes, ensure_ascii: bool = False) -> bytes:
    """The header as safetensors writes it (compact, UTF-8, space-padded to 8 bytes), then the data."""
    body = dump_json(header, ensure_ascii).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


# -- mutators --------------------------------------------------------------------------------------------------
@dataclass
class Draft:
    """A file being mutated: a JSON tree and data, and how to write them (or, at the byte level, the bytes)."""

    header: object
    data: bytes
    raw: bytes  # the unmutated file
    partner_header: object = None  # a mutator that renames in both files sets this
    partner_data: bytes = b""
    ensure_ascii: bool = False
    separators: tuple = (",", ":")  # between items, between a key and its value
    prefix: bytes = b""  # before the JSON text
    tail: bytes = b""  # after the JSON text, before the space padding
    align: bool = True  # pad the header with spaces to a multiple of 8
    cut: int | None = None  # keep only this many bytes of the header text
    replace: tuple = ()  # (marker, bytes): invalid UTF-8 spliced into the encoded text
    length: int | None = None  # the header length field; None: the true one
    relayout: bool = False  # re-pack data_offsets and data to match the mutated dtypes and shapes
    file: bytes | None = None  # a byte-level mutation's result: replaces everything above
    partner_raw: bytes = b""  # the unmutated partner file

    def render(self) -> bytes:
        if self.file is not None:
            return self.file
        data = self.data
        if self.relayout and isinstance(self.header, dict):
            data = relayout(self.header, data)
        body = self.prefix + dump_json(self.header, self.ensure_ascii, self.separators).encode("utf-8", "surrogatepass")
        for marker, bad in self.replace:
            body = body.replace(marker, bad)
        if self.cut is not None:
            body = body[: self.cut]
        body += self.tail
        if self.align:
            body += b" " * (-len(body) % 8)
        n = len(body) if self.length is None else self.length
        return struct.pack("<Q", n % 2**64) + body + data

    # helpers for mutators
    def tensor_names(self) -> list:
        return [k for k in self.header if k != "__metadata__"] if isinstance(self.header, dict) else []

    def pick(self, rng, nonempty=False):
        names = self.tensor_names()
        if nonempty:
            names = [k for k in names if _entry_nbytes(self.header[k])]
        return rng.choice(names) if names else None


def _entry_nbytes(entry) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


def relayout(header: dict, data: bytes, order=None) -> bytes:
    """Packs every tensor contiguously (in `order`, default header order), resizing each one's bytes to its
    dtype and shape, so that a mutated dtype or shape gives a consistent file. Entries that cannot be laid out
    (malformed, sub-byte or huge) leave the file as it was."""
    names = order or [k for k in header if k != "__metadata__"]
    plan = []
    for name in names:
        entry = header[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            return data
        size, shape = ELEMENT_BYTES.get(entry["dtype"]), entry.get("shape")
        if size is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return data
        nbytes = size * math.prod(shape)
        if nbytes > 1 << 16:
            return data
        old = b""
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
            if 0 <= offsets[0] <= offsets[1] <= len(data):
                old = data[offsets[0] : offsets[1]]
        plan.append((entry, nbytes, (old * (nbytes // max(len(old), 1) + 1))[:nbytes] if old else bytes(nbytes)))
    out = bytearray()
    for entry, nbytes, chunk in plan:
        entry["data_offsets"] = [len(out), len(out) + nbytes]
        out += chunk
    return bytes(out)


MUTATORS = {}


def mutator(name: str, relaid: bool = False):
    """Registers a mutation under `name` (and `name/relaid`, with data_offsets and data re-packed after it)."""

    def register(fn):
        MUTATORS[name] = (fn, False)
        if relaid:
            MUTATORS[name + "/relaid"] = (fn, True)
        return fn

    return register


def _set_in_shape(rng, shape: list, value) -> list:
    shape = list(shape)
    if shape and rng.random() < 0.8:
        shape[rng.randrange(len(shape))] = value
    else:
        shape.insert(rng.randrange(len(shape) + 1), value)
    return shape


def _with_shape(fn):
    """A mutator that rewrites one tensor's shape with fn(rng, shape)."""

    def mutate(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        d.header[name]["shape"] = fn(rng, d.header[name]["shape"])

    return mutate


def _with_offsets(fn):
    """A mutator that rewrites one tensor's data_offsets with fn(rng, draft, name, [begin, end])."""

    def mutate(rng, d):
        name = d.pick(rng, nonempty=rng.random() < 0.8) or d.pick(rng)
        if name is None:
            return False
        d.header[name]["data_offsets"] = fn(rng, d, name, list(d.header[name]["data_offsets"]))

    return mutate


def _nested(rng) -> str:
    depth = rng.choice([64, 129, 500, 990, 1100, 3000, 100_000])
    return rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "0" + "}" * depth])


def _big_int(rng) -> Raw:
    digits = rng.choice([4300, 4301, 5000, 20_000])
    return Raw(rng.choice(["", "-"]) + "1" + "0" * (digits - 1))


def _metadata(d):
    md = d.header.get("__metadata__") if isinstance(d.header, dict) else None
    if not isinstance(md, dict):
        md = {"format": "pt"}
        d.header = {"__metadata__": md, **d.header}
    return md


def _rename(d, old: str, new: str, partner_too: bool, partner_new: str | None = None) -> None:
    """Renames tensor `old` to `new` in the mutated file (keeping its place), and to `partner_new` (default: the
    same) in the partner when `partner_too`."""
    d.header = {(new if k == old else k): v for k, v in d.header.items()}
    if partner_too:
        n, text, data = split_file(d.partner_raw)
        partner = json.loads(text)
        partner_new = new if partner_new is None else partner_new
        d.partner_header = {(partner_new if k == old else k): v for k, v in partner.items()}
        d.partner_data = data


def _register_mutators():  # noqa: C901 - one table of small mutations reads better than 80 functions
    reg = mutator

    reg("none")(lambda rng, d: None)

    # dtype
    def dtype_valid(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        current = d.header[name]["dtype"]
        d.header[name]["dtype"] = rng.choice([t for t in [*ELEMENT_BYTES, *SUB_BYTE_DTYPES] if t != current])

    reg("dtype.valid", relaid=True)(dtype_valid)

    def dtype_set(values):
        def mutate(rng, d):
            name = d.pick(rng)
            if name is None:
                return False
            d.header[name]["dtype"] = rng.choice(values)

        return mutate

    unknown = ["F33", "", "f32", "float32", "BF16 ", " F16", "F8_E4M3FN", "I128", "Q4_0", "F32\x00", "__metadata__"]
    reg("dtype.unknown")(dtype_set(unknown))
    reg("dtype.non_string")(dtype_set([["F32"], {"F32": "F32"}, 4, None, True, 4.5, [], {}, Raw("1e400")]))
    reg("dtype.nested")(dtype_set([Raw("[" * n + "]" * n) for n in (990, 1100, 5000)]))

    # shape
    reg("shape.negative")(_with_shape(lambda rng, s: _set_in_shape(rng, s, rng.choice([-1, -2, -(2**31), -(2**63)]))))
    reg("shape.zero", relaid=True)(_with_shape(lambda rng, s: _set_in_shape(rng, s, 0)))
    reg("shape.scalar", relaid=True)(_with_shape(lambda rng, s: []))
    reg("shape.resize", relaid=True)(_with_shape(lambda rng, s: _set_in_shape(rng, s, rng.choice([1, 2, 3, 5]))))
    reg("shape.huge")(_with_shape(lambda rng, s: _set_in_shape(rng, s, rng.choice(HUGE))))

    def zero_and_huge(rng, shape):
        h = rng.choice(HUGE)
        return rng.choice([[0, h], [h, 0], [h, 0, h], [0, h, h], [2, h, 0], [h, h, 0]])

    reg("shape.zero_and_huge", relaid=True)(_with_shape(zero_and_huge))

    def many_dims(rng, shape):
        dims = [1] * rng.choice([33, 63, 64, 65, 100, 1000])
        dims[rng.randrange(len(dims))] = math.prod(shape)  # same element count: the byte range still matches
        return dims

    reg("shape.many_dims")(_with_shape(many_dims))
    floats = [2.0, 0.5, 1e3, Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("-0.0"), Raw("1E0"), Raw("2e0")]
    reg("shape.float")(_with_shape(lambda rng, s: _set_in_shape(rng, s, rng.choice(floats))))
    forms = [Raw("-0"), Raw("02"), Raw("+2"), Raw("0x2"), Raw("2."), Raw(".5"), Raw("1_0")]
    reg("shape.number_forms")(_with_shape(lambda rng, s: _set_in_shape(rng, s, rng.choice(forms))))
    reg("shape.bool")(_with_shape(lambda rng, s: _set_in_shape(rng, s, rng.choice([True, False]))))
    reg("shape.string")(_with_shape(lambda rng, s: rng.choice([_set_in_shape(rng, s, "2"), "2,3", "[]", ""])))
    reg("shape.big_int")(_with_shape(lambda rng, s: _set_in_shape(rng, s, _big_int(rng))))
    reg("shape.not_list")(_with_shape(lambda rng, s: rng.choice([2, None, {"0": 2}, True, 2.5])))
    reg("shape.nested")(_with_shape(lambda rng, s: rng.choice([[s], [[]], [[2], [3]], Raw(_nested(rng))])))

    # data_offsets
    reg("offsets.shift")(_with_offsets(lambda rng, d, n, o: [x + rng.choice([-8, -4, -2, -1, 1, 2, 4, 8]) for x in o]))
    reg("offsets.swap")(_with_offsets(lambda rng, d, n, o: [o[1], o[0]]))

    def overlap(rng, d, name, offsets):
        others = [k for k in d.tensor_names() if k != name and _entry_nbytes(d.header[k])]
        if not others:
            return [offsets[0], offsets[1] + 1]
        b, e = d.header[rng.choice(others)]["data_offsets"]
        size = offsets[1] - offsets[0]
        start = rng.choice([b, b + (e - b) // 2, max(0, b - size + 1)])
        return [start, start + size]

    reg("offsets.overlap")(_with_offsets(overlap))

    def past_end(rng, d, name, o):
        n, size = len(d.data), o[1] - o[0]
        return rng.choice([[n, n + size], [o[0], n + 1], [n + 1, n + 1], [n - size + 1, n + 1]])

    reg("offsets.past_end")(_with_offsets(past_end))
    reg("offsets.negative")(
        _with_offsets(lambda rng, d, n, o: rng.choice([[-4, o[1] - 4 - o[0]], [o[0], -1], [-1, -1]]))
    )
    reg("offsets.arity")(
        _with_offsets(lambda rng, d, n, o: rng.choice([[], [o[0]], [*o, o[1]], [*o, 0], [o], [[o[0]], [o[1]]]]))
    )
    non_int = [None, True, "0", 1.0, Raw("1e1"), {}, Raw("NaN"), Raw("-0")]
    reg("offsets.non_int")(_with_offsets(lambda rng, d, n, o: _set_in_shape(rng, o, rng.choice(non_int))[:2]))
    reg("offsets.big_int")(_with_offsets(lambda rng, d, n, o: _set_in_shape(rng, o, _big_int(rng))[:2]))

    def huge_offsets(rng, d, name, o):
        size = o[1] - o[0]
        return rng.choice([[2**64 - size, 2**64], [2**63, 2**63 + size], [o[0] + 2**64, o[1] + 2**64], [2**64, 2**64]])

    reg("offsets.huge")(_with_offsets(huge_offsets))

    def empty_elsewhere(rng, d):
        if not isinstance(d.header, dict):
            return False
        at = rng.randrange(len(d.data) + 1)
        d.header[f"empty.at.{at}"] = {
            "dtype": rng.choice(["F32", "BF16", "I64"]),
            "shape": [0],
            "data_offsets": [at, at],
        }

    reg("offsets.empty_elsewhere")(empty_elsewhere)

    def permute(rng, d):
        names = d.tensor_names()
        if len(names) < 2:
            return False
        order = sorted(names, key=lambda k: d.header[k]["data_offsets"])
        rng.shuffle(order)
        d.data = relayout(d.header, d.data, order)

    reg("offsets.permute")(permute)

    # nesting
    def nest_value(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        d.header[name] = Raw(_nested(rng))

    reg("nesting.value")(nest_value)
    reg("nesting.header")(lambda rng, d: setattr(d, "header", Raw(_nested(rng))))
    reg("nesting.metadata")(lambda rng, d: _metadata(d).__setitem__("nested", Raw(_nested(rng))))

    # keys
    def duplicate_tensor(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        twin = copy.deepcopy(d.header[name])
        if rng.random() < 0.5:
            twin["dtype"] = rng.choice(["F32", "I32", "U8", "BF16"])
        items = list(d.header.items())
        items.insert(rng.randrange(len(items) + 1), (name, twin))
        d.header = Pairs(tuple(items))

    reg("keys.duplicate_tensor")(duplicate_tensor)

    def duplicate_field(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        items = list(d.header[name].items())
        key, value = rng.choice(items)
        items.insert(rng.randrange(len(items) + 1), (key, value if rng.random() < 0.5 else copy.deepcopy(value)))
        d.header[name] = Pairs(tuple(items))

    reg("keys.duplicate_field")(duplicate_field)

    def duplicate_metadata(rng, d):
        md = _metadata(d)
        key = rng.choice(list(md) or ["format"])
        items = [*md.items(), (key, rng.choice(["pt", "other"]))]
        if rng.random() < 0.5:
            d.header["__metadata__"] = Pairs(tuple(items))
        else:
            d.header = Pairs((*d.header.items(), ("__metadata__", {"format": "pt"})))

    reg("keys.duplicate_metadata")(duplicate_metadata)

    def remove_field(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        del d.header[name][rng.choice(["dtype", "shape", "data_offsets"])]

    reg("keys.remove_field")(remove_field)

    def extra_field(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        d.header[name][rng.choice(["extra", "offsets", "dtype ", "Dtype", "", "__metadata__"])] = rng.choice(
            [1, "x", None, [0, 0]]
        )

    reg("keys.extra_field")(extra_field)

    def rename_field(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        old = rng.choice(["dtype", "shape", "data_offsets"])
        new = rng.choice([old.upper(), old + " ", old.replace("_", "-"), old[:-1]])
        d.header[name] = {(new if k == old else k): v for k, v in d.header[name].items()}

    reg("keys.rename_field")(rename_field)

    def remove_tensor(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        del d.header[name]

    reg("keys.remove_tensor", relaid=True)(remove_tensor)

    def extra_tensor(rng, d):
        if not isinstance(d.header, dict):
            return False
        dtype = rng.choice(list(ELEMENT_BYTES))
        shape = rng.choice([[], [0], [2], [1, 3], [2, 0]])
        nbytes = ELEMENT_BYTES[dtype] * math.prod(shape)
        d.header[rng.choice(["extra", "w.f32", "zz", "aa"]) + ".new"] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(d.data), len(d.data) + nbytes],
        }

    reg("keys.extra_tensor", relaid=True)(extra_tensor)

    def reorder_fields(rng, d):
        names = d.tensor_names()
        if not names:
            return False
        for name in names:
            items = list(d.header[name].items())
            rng.shuffle(items)
            d.header[name] = dict(items)
        if "__metadata__" in d.header and rng.random() < 0.5:
            d.header["__metadata__"] = d.header.pop("__metadata__")  # last, not first

    reg("keys.reorder_fields")(reorder_fields)

    def metadata_as_tensor(rng, d):
        name = d.pick(rng)
        entry = copy.deepcopy(d.header[name]) if name else {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        d.header["__metadata__"] = entry

    reg("keys.metadata_as_tensor")(metadata_as_tensor)

    # __metadata__
    reg("metadata.non_string")(
        lambda rng, d: _metadata(d).__setitem__("k", rng.choice([1, None, True, 1.5, ["a"], {}]))
    )
    reg("metadata.nested")(lambda rng, d: _metadata(d).__setitem__("k", rng.choice([{"a": "b"}, [["a", "b"]]])))

    def metadata_not_object(rng, d):
        if not isinstance(d.header, dict):
            return False
        d.header["__metadata__"] = rng.choice(["pt", [], 1, None, True, [["format", "pt"]]])

    reg("metadata.not_object")(metadata_not_object)

    def metadata_unicode(rng, d):
        md = _metadata(d)
        md[rng.choice(["ключ", "😀", "", "a\x00b", "\n"])] = rng.choice(
            ["значение \U0001f600", "", "\x00", "\ufeff", "x" * 50_000]
        )

    reg("metadata.unicode")(metadata_unicode)

    def metadata_lone_surrogate(rng, d):
        md = _metadata(d)
        if rng.random() < 0.5:
            md["k"] = "\ud800"
        else:
            md["\udfff"] = "v"
        d.ensure_ascii = rng.random() < 0.7  # escaped (valid UTF-8, invalid JSON string) or raw (invalid UTF-8)

    reg("metadata.lone_surrogate")(metadata_lone_surrogate)

    def metadata_many(rng, d):
        md = _metadata(d)
        for k in range(rng.choice([100, 2000])):
            md[f"key{k}"] = str(k)

    reg("metadata.many")(metadata_many)

    def metadata_remove(rng, d):
        if not isinstance(d.header, dict) or "__metadata__" not in d.header:
            return False
        del d.header["__metadata__"]

    reg("metadata.remove")(metadata_remove)

    # tensor names
    def name_to(values, partner_chance):
        def mutate(rng, d):
            name = d.pick(rng)
            if name is None:
                return False
            new = rng.choice(values)
            new = new(rng) if callable(new) else new
            _rename(d, name, new, partner_too=rng.random() < partner_chance)

        return mutate

    surrogates = ["\ud800", "\udfff", "w\udc00", "\ud83d", "\ude00\ud83d", "a\ud800b"]

    def lone_surrogate(rng, d):
        d.ensure_ascii = True  # "\ud800" escaped: valid UTF-8 text, an invalid JSON string
        return name_to(surrogates, 0.5)(rng, d)

    reg("name.lone_surrogate")(lone_surrogate)  # in the partner too at times: then the writer sees the name
    reg("name.surrogate_bytes")(name_to(surrogates, 0))
    reg("name.empty")(name_to([""], 0.5))
    reg("name.long")(name_to([lambda rng: "n" * rng.choice([4096, 65_536, 300_000])], 0.5))
    unicode_names = [
        "😀",
        "층.가중치",
        "a\x00b",
        "\n",
        "e\u0301",
        "\U0010ffff",
        "\ufeff",
        "a/../b",
        " ",
        "__metadata__ ",
    ]
    reg("name.unicode")(name_to(unicode_names, 0.7))
    reg("name.metadata")(name_to(["__metadata__"], 0))
    reg("name.escaped")(lambda rng, d: setattr(d, "ensure_ascii", True))  # same header, \uXXXX everywhere

    def escape_forms(rng, d):
        """A name written with an escape json.dumps never writes (\\/, \\u0041, an escaped surrogate pair)."""
        name = d.pick(rng)
        if name is None:
            return False
        forms = [("a/b", "a\\/b"), ('q"uote', 'q\\"uote'), ("back\\slash", "back\\\\slash"), ("A", "\\u0041")]
        forms += [("é", "\\u00E9"), ("😀", "\\uD83D\\uDE00"), ("nul\x00", "nul\\u0000"), ("tab\tname", "tab\\tname")]
        new, text = rng.choice(forms)
        marker = "\x07ESCAPED\x07"
        _rename(d, name, marker, partner_too=rng.random() < 0.7, partner_new=new)
        d.replace = ((json.dumps(marker).strip('"').encode(), text.encode()),)

    reg("name.escape_forms")(escape_forms)

    # the header length field, padding and framing
    reg("length.small")(lambda rng, d: setattr(d, "length", len(d.render()) - len(d.data) - 8 - rng.randint(1, 64)))
    reg("length.large")(lambda rng, d: setattr(d, "length", len(d.render()) - len(d.data) - 8 + rng.randint(1, 64)))
    reg("length.absurd")(
        lambda rng, d: setattr(d, "length", rng.choice([2**63, 2**64 - 1, 100_000_001, 10**12, 2**32, 2**31]))
    )
    reg("length.zero")(lambda rng, d: setattr(d, "length", 0))
    reg("length.unaligned")(lambda rng, d: setattr(d, "align", False))
    reg("padding.nul")(lambda rng, d: setattr(d, "tail", b"\x00" * rng.randint(1, 8)))
    others = [b"x", b"\x01", b"}", b"\xa0", b"\xc2\xa0", b"\x0b", b"\x0c", b"/", b"\xff", b","]
    reg("padding.other")(lambda rng, d: setattr(d, "tail", rng.choice(others) * rng.randint(1, 8)))
    reg("padding.whitespace")(
        lambda rng, d: setattr(d, "tail", bytes(rng.choice(b" \t\n\r") for _ in range(rng.randint(1, 9))))
    )
    reg("padding.leading")(
        lambda rng, d: setattr(d, "prefix", rng.choice([b" ", b"\t\n", b"\x0c", b"\xef\xbb\xbf", b"\x00"]))
    )
    reg("header.pretty")(
        lambda rng, d: setattr(d, "separators", rng.choice([(", ", ": "), (",\n", " : "), ("\t,\r\n", ":\t")]))
    )
    reg("header.not_object")(
        lambda rng, d: setattr(d, "header", Raw(rng.choice(["[]", '"x"', "1", "null", "true", "[{}]", ""])))
    )

    def header_empty(rng, d):
        d.header = {}
        if rng.random() < 0.5:
            d.data = b""

    reg("header.empty")(header_empty)
    reg("header.trailing")(lambda rng, d: setattr(d, "tail", rng.choice([b"x", b"{}", b"]", b",", b"\x00{", b"//x"])))
    reg("header.cut")(lambda rng, d: setattr(d, "cut", rng.randrange(len(dump_json(d.header).encode()) or 1)))

    def invalid_utf8(rng, d):
        name = d.pick(rng)
        if name is None:
            return False
        marker = "\x07MARK\x07"
        _rename(d, name, name + marker, partner_too=False)
        bad = rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"])
        d.replace = ((json.dumps(marker).strip('"').encode(), bad),)

    reg("header.invalid_utf8")(invalid_utf8)

    # whole files and bytes
    reg("file.empty")(lambda rng, d: setattr(d, "file", b""))
    reg("file.short")(lambda rng, d: setattr(d, "file", d.raw[: rng.randint(1, 7)]))
    reg("file.header_only")(lambda rng, d: setattr(d, "file", d.raw[: len(d.raw) - len(d.data)]))
    reg("file.random")(
        lambda rng, d: setattr(d, "file", struct.pack("<Q", rng.randint(0, 64)) + rng.randbytes(rng.randint(0, 64)))
    )

    def flip(region):
        def mutate(rng, d):
            raw = bytearray(d.raw)
            n = struct.unpack("<Q", d.raw[:8])[0]
            lo, hi = {"length": (0, 8), "header": (8, 8 + n), "data": (8 + n, len(raw)), "any": (0, len(raw))}[region]
            if hi <= lo:
                return False
            for _ in range(rng.choice([1, 1, 2, 4, 8])):
                raw[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
            d.file = bytes(raw)

        return mutate

    for region in ("length", "header", "data", "any"):
        reg(f"bytes.flip_{region}")(flip(region))
    reg("bytes.truncate")(lambda rng, d: setattr(d, "file", d.raw[: rng.randrange(len(d.raw))]))

    def truncate_data(rng, d):
        if not d.data:
            return False
        d.file = d.raw[: len(d.raw) - rng.randint(1, len(d.data))]

    reg("bytes.truncate_data")(truncate_data)
    reg("bytes.append")(
        lambda rng, d: setattr(
            d, "file", d.raw + rng.choice([bytes(rng.randint(1, 64)), rng.randbytes(rng.randint(1, 64))])
        )
    )

    def splice(rng, d, delete):
        at = rng.randrange(len(d.raw) + 1)
        size = rng.randint(1, 16)
        d.file = d.raw[:at] + (b"" if delete else rng.randbytes(size)) + d.raw[at + (size if delete else 0) :]

    reg("bytes.insert")(lambda rng, d: splice(rng, d, delete=False))
    reg("bytes.delete")(lambda rng, d: splice(rng, d, delete=True))

    def overwrite(rng, d):
        at = rng.randrange(len(d.raw))
        junk = rng.randbytes(rng.randint(1, 16))
        d.file = (d.raw[:at] + junk + d.raw[at + len(junk) :])[: len(d.raw)]

    reg("bytes.overwrite")(overwrite)


_register_mutators()


# -- cases ---------------------------------------------------------------------------------------------------
def make_case(seed: int, index: int) -> dict:
    """Case `index` of run `seed`: a mutated file, its partner, the merge order and the output kind.

    Returns:
        A dict of plain values (it crosses a pipe to a worker): seed, index, family, mutator, data (the
        mutated file), partner, mutated_first, in_directory (the mutated file is a Hugging Face directory's
        model.safetensors), output ("file", "dir" or "shards"), old_output, inject.
    """
    rng = random.Random(f"pysoup-fuzz:{seed}:{index}")  # str seeds hash with sha512: stable across runs
    families = corpus()
    family = rng.choices(list(families.values()), weights=[f.weight for f in families.values()])[0]
    names = list(MUTATORS)
    for _attempt in range(50):
        name = rng.choice(names)
        fn, relaid = MUTATORS[name]
        _, text, data = split_file(family.base)
        draft = Draft(json.loads(text), data, family.base, relayout=relaid, partner_raw=family.partner)
        if fn(rng, draft) is not False:
            break
    else:  # pragma: no cover - "none" always applies
        raise AssertionError("no mutator applied")
    output = rng.choices(["file", "dir", "shards"], weights=[0.7, 0.2, 0.1])[0]
    partner = (
        family.partner
        if draft.partner_header is None
        else serialise(draft.partner_header, draft.partner_data, draft.ensure_ascii)
    )
    return {
        "seed": seed,
        "index": index,
        "family": family.name,
        "mutator": name,
        "data": draft.render(),
        "partner": partner,
        "mutated_first": rng.random() < 0.7,
        "in_directory": rng.random() < 0.15,
        "output": output,
        "old_output": rng.random() < 0.3,
        "inject": None,
    }


def cases_digest(seed: int, count: int) -> str:
    """A hash of cases 0..count-1 of `seed`: equal in every process when cases are deterministic."""
    digest = hashlib.sha256()
    for index in range(count):
        digest.update(pickle.dumps(sorted(make_case(seed, index).items()), protocol=4))
    return digest.hexdigest()


def describe_header(raw: bytes, limit: int = 4000) -> str:
    """The header length field and text of a (possibly broken) file, for a reproducer."""
    n, text, data = split_file(raw)
    if n is None:
        return f"{len(raw)}-byte file: {raw!r}"
    shown = text[:limit].decode("utf-8", "backslashreplace")
    more = f" ... ({len(text) - limit} more header bytes)" if len(text) > limit else ""
    return f"header length field {n}, file {len(raw)} bytes, data {len(data)} bytes\n{shown}{more}"


# -- the oracle: one case, in a worker -----------------------------------------------------------------------
def _one_line(exc) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _where(exc) -> str:
    """The innermost pysoup frame of a traceback (else the innermost frame), as path:line."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}pysoup{os.sep}" in f.filename] or frames
    if not ours:
        return "?"
    f = ours[-1]
    return f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} ({f.name})"


def tensor_bytes(t) -> bytes:
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def safetensors_read(path: str):
    """(tensors, metadata, None) as the safetensors package reads the file, or (None, None, why it refused)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, metadata, None
    except Exception as exc:  # the package's refusal, whatever its type
        return None, None, f"{type(exc).__name__}: {_one_line(exc)}"


@dataclass
class Stage:
    """What pysoup did in one stage: "ok" (value), "refused" (a SoupError) or "foreign" (any other exception)."""

    kind: str
    value: object = None
    error: BaseException | None = None

    @property
    def error_class(self) -> str:
        return type(self.error).__name__


@dataclass
class CaseCheck:
    """Runs one case in a fresh directory and judges it; `result()` is what goes back to the parent."""

    case: dict
    work: str
    debug: bool = False
    failures: list = field(default_factory=list)  # (label, detail)
    info: str | None = None

    def fail(self, label: str, detail: str) -> None:
        self.failures.append((label, detail.replace(self.work + os.sep, "")))  # the case directory is gone after

    def run(self) -> dict:
        import pysoup

        case, work = self.case, self.work
        self.mutated = os.path.join(work, "mutated.safetensors")
        source = self.mutated  # what pysoup is given: the file, or a model directory holding it
        if case.get("in_directory"):
            source = os.path.join(work, "mutated")
            os.mkdir(source)
            self.mutated = os.path.join(source, "model.safetensors")
        self.partner = os.path.join(work, "partner.safetensors")
        with open(self.mutated, "wb") as f:
            f.write(case["data"])
        with open(self.partner, "wb") as f:
            f.write(case["partner"])
        self.inputs = [source, self.partner] if case["mutated_first"] else [self.partner, source]
        self.out = os.path.join(work, "soup.safetensors" if case["output"] == "file" else "soup")
        if case["old_output"] and case["output"] == "file":
            with open(self.out, "wb") as f:
                f.write(OLD_OUTPUT)
        elif case["old_output"]:
            os.mkdir(self.out)
            for name, content in OLD_DIRECTORY.items():
                with open(os.path.join(self.out, name), "wb") as f:
                    f.write(content)
        self.old_snapshot = _snapshot(self.out)
        hashes = {p: _sha256(p) for p in (self.mutated, self.partner)}

        self.st_tensors, self.st_metadata, self.st_refusal = safetensors_read(self.mutated)
        # The partner is valid unless a mutator renamed a tensor in both files (e.g. to a lone surrogate).
        self.st_partner, _, self.st_partner_refusal = safetensors_read(self.partner)
        self._inject("before")

        opened = self._stage("open", lambda: _pysoup_read(source))
        kwargs = {"progress": False, "threads": 1}  # one thread: two workers share two cores
        if case["output"] == "shards":
            kwargs["shard_size"] = 64  # a few tensors per shard: the sharded writer and its index
        merged = self._stage("merge", lambda: pysoup.merge(self.inputs, self.out, **kwargs))
        self._inject("after")

        label = self._judge(opened, merged)
        self._check_leftovers(merged.kind == "ok")
        for p, digest in hashes.items():
            if not os.path.exists(p) or _sha256(p) != digest:
                self.fail("FAIL input changed", f"{os.path.basename(p)} changed during the case")
        if self.failures:
            label = self.failures[0][0]
        return {
            "label": label,
            "failures": sorted({lab for lab, _ in self.failures}),
            # The first failure's label is the case's: its detail alone; any further one with its label.
            "detail": "; ".join(det if k == 0 else f"{lab}: {det}" for k, (lab, det) in enumerate(self.failures)),
            "info": self.info,
        }

    def _inject(self, when: str) -> None:
        """Harness self-tests make a case misbehave on purpose, to show the harness reports it."""
        inject = self.case.get("inject")
        if inject == "sigbus" and when == "before":
            os.kill(os.getpid(), signal.SIGBUS)
        elif inject == "hang" and when == "before":
            time.sleep(3600)
        elif inject == "debris" and when == "after":
            open(os.path.join(self.work, ".soup.safetensors.pysoup-tmp-1-feedbeef"), "wb").close()
        elif inject == "modify_input" and when == "after":
            with open(self.partner, "ab") as f:
                f.write(b"\0")
        elif inject == "corrupt_output" and when == "after" and os.path.isfile(self.out):
            with open(self.out, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([last[0] ^ 1]))

    def _stage(self, name: str, fn) -> Stage:
        import pysoup

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # non-finite merges, ignored extra tensors: not the oracle's concern
                if self.case.get("inject") == "foreign" and name == "merge":
                    raise KeyError("injected foreign exception")
                return Stage("ok", fn())
        except pysoup.SoupError as exc:
            message = str(exc)
            if "\n" in message or not message.strip():
                self.fail("FAIL error message not one line", f"{name}: {type(exc).__name__}: {message[:300]!r}")
            elif isinstance(exc, pysoup.FormatError) and self.mutated not in message and self.partner not in message:
                self.fail("FAIL error does not name the file", f"{name}: {message[:300]}")
            return Stage("refused", error=exc)
        except Exception as exc:
            if self.debug:
                traceback.print_exc()
            where = _where(exc)
            self.fail(f"FAIL {name} raised {type(exc).__name__}", f"{_one_line(exc)[:300]} at {where}")
            return Stage("foreign", error=exc)

    def _judge(self, opened: Stage, merged: Stage) -> str:
        st_ok = self.st_refusal is None  # safetensors loads the mutated file
        both_ok = st_ok and self.st_partner_refusal is None  # ... and the partner: a reference merge exists
        if not st_ok and opened.kind == "ok":
            self.fail(_accepted_label(self.st_refusal), f"open; safetensors: {self.st_refusal}")
        if not both_ok and merged.kind == "ok":
            refusal = self.st_refusal or self.st_partner_refusal
            self.fail(_accepted_label(refusal), f"merge; safetensors: {refusal}")
        if st_ok and opened.kind == "ok":
            self._compare_open(*opened.value)
        if opened.kind == "refused" and merged.kind == "ok":
            self.fail("FAIL merge accepts what open refuses", _one_line(opened.error))
        if opened.kind == "ok" and merged.kind == "refused" and merged.error_class == "FormatError":
            if self.partner not in str(merged.error):  # the partner's own fault (a dtype pysoup lacks) is not one
                self.fail("FAIL merge refuses with FormatError what open accepts", _one_line(merged.error))
        if merged.kind == "ok":
            self._check_output(both_ok)
        elif _snapshot(self.out) != self.old_snapshot:
            self.fail("FAIL older output changed", "after a merge that did not succeed")

        if opened.kind == "ok" and merged.kind == "ok":
            return "merged"
        if opened.kind == "ok" and merged.kind == "refused":
            if both_ok and self._reference_merge() is not None:
                self.info = self._normalise(merged.error)
                return f"info: merge refuses what the reference merges ({merged.error_class})"
            return f"opened; merge refused ({merged.error_class})"
        if opened.kind == "refused":
            if st_ok:
                self.info = self._normalise(opened.error)
                return f"info: refuses what safetensors loads ({opened.error_class})"
            return f"refused ({opened.error_class})"
        return "FAIL"  # a foreign exception: replaced by the failure's own label

    def _normalise(self, error) -> str:
        """The message with the case's paths replaced, numbers and quoted names abstracted: messages of one kind
        count as one."""
        message = str(error).replace(self.mutated, "MUTATED").replace(self.partner, "PARTNER")
        message = re.sub(r"'[^']*'", "'…'", message)
        return re.sub(r"(?<!\w)\d+", "N", message)[:200]

    def _compare_open(self, got: dict, metadata) -> None:
        want = self.st_tensors
        if set(got) != set(want):
            self.fail("FAIL open disagrees with safetensors", f"keys {sorted(set(got) ^ set(want))[:5]!r} differ")
            return
        if (metadata or None) != (self.st_metadata or None):
            self.fail("FAIL open disagrees with safetensors", f"metadata {metadata!r} != {self.st_metadata!r}"[:300])
        for name, (dtype, shapes, data, torch_dtype) in got.items():
            t = want[name]
            st_dtype = TORCH_TO_SAFETENSORS[str(t.dtype).replace("torch.", "")]
            if dtype != st_dtype or str(t.dtype) != torch_dtype or any(s != tuple(t.shape) for s in shapes):
                self.fail(
                    "FAIL open disagrees with safetensors",
                    f"{name!r}: {dtype} {shapes} ({torch_dtype}) != {st_dtype} {tuple(t.shape)}",
                )
            elif any(b != tensor_bytes(t) for b in data):
                self.fail("FAIL open disagrees with safetensors", f"{name!r}: bytes differ")

    def _reference_merge(self):
        """The reference backend's merge of the inputs as safetensors reads them (None when it refuses)."""
        import pysoup

        sds = [self.st_tensors, self.st_partner] if self.case["mutated_first"] else [self.st_partner, self.st_tensors]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pysoup.merge(sds, backend="reference", threads=1)
        except pysoup.SoupError:
            return None
        except Exception as exc:
            self.fail(f"FAIL reference merge raised {type(exc).__name__}", f"{_one_line(exc)[:300]} at {_where(exc)}")
            return None

    def _output_files(self) -> list:
        if self.case["output"] == "file":
            return [self.out]
        names = sorted(os.listdir(self.out))
        index = os.path.join(self.out, "model.safetensors.index.json")
        shards = [os.path.join(self.out, n) for n in names if n.endswith(".safetensors")]
        if self.case["old_output"] and _read(os.path.join(self.out, "README.md")) != OLD_DIRECTORY["README.md"]:
            self.fail("FAIL older output changed", "README.md beside the older weights was lost")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    listed = set(json.load(f)["weight_map"].values())
            except (ValueError, KeyError, AttributeError) as exc:
                self.fail("FAIL output does not load in safetensors", f"index: {exc}")
                return shards
            if listed != {os.path.basename(s) for s in shards}:
                self.fail("FAIL output does not load in safetensors", f"index lists {sorted(listed)}, dir has {names}")
        elif [os.path.basename(s) for s in shards] != ["model.safetensors"]:
            self.fail("FAIL output does not load in safetensors", f"directory output holds {names}")
        return shards

    def _check_output(self, st_ok: bool) -> None:
        from safetensors.torch import save

        merged = {}
        for path in self._output_files():
            tensors, _, refusal = safetensors_read(path)
            if refusal:
                self.fail("FAIL output does not load in safetensors", f"{os.path.basename(path)}: {refusal}")
                return
            merged.update(tensors)
        if not st_ok:
            return  # already a failure: there is no independent reading of the input to compare with
        reference = self._reference_merge()
        if reference is None:
            self.fail("FAIL merged what the reference merge refuses", f"{len(merged)} tensors written")
            return
        difference = _difference(merged, reference)
        if difference is None and self.case["output"] == "file":
            if _read(self.out) != save(reference, metadata={"format": "pt"}):
                difference = "file bytes differ from safetensors.save"
        if difference is not None:
            self.fail("FAIL output differs from the reference merge", difference)

    def _check_leftovers(self, merged: bool) -> None:
        allowed = {self.mutated, self.partner, os.path.dirname(self.mutated)}
        if merged or self.case["old_output"]:
            allowed.add(self.out)
        if self.case["output"] != "file" and merged:
            weights = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|README\.md")
            allowed.update(os.path.join(self.out, n) for n in os.listdir(self.out) if weights.fullmatch(n))
        elif self.case["output"] != "file" and self.case["old_output"]:
            allowed.update(os.path.join(self.out, n) for n in OLD_DIRECTORY)
        found = []
        for root, dirs, files in os.walk(self.work):
            found += [os.path.join(root, n) for n in files + dirs]
        debris = sorted(os.path.relpath(p, self.work) for p in found if p not in allowed)
        if debris:
            self.fail("FAIL debris", ", ".join(debris[:5]))


def _difference(merged: dict, reference: dict):
    """How a merged state dict differs from the reference merge (keys, dtype, shape or bits), or None."""
    if set(merged) != set(reference):
        return f"keys {sorted(set(merged) ^ set(reference))[:5]!r}"
    for name, want in reference.items():
        got = merged[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"tensor {name!r}: {got.dtype} {list(got.shape)} != {want.dtype} {list(want.shape)}"
        if tensor_bytes(got) != tensor_bytes(want):
            return f"tensor {name!r}: {_first_difference(got, want)}"
    return None


def _first_difference(got, want) -> str:
    """Where two tensors of one dtype and shape first differ, as raw element bits (NaN payloads show)."""
    size = got.element_size()
    a, b = tensor_bytes(got), tensor_bytes(want)
    k = next(i for i in range(0, len(a), size) if a[i : i + size] != b[i : i + size])

    def bits(raw):
        return "0x" + raw[k : k + size][::-1].hex()  # the little-endian element, most significant byte first

    return f"element {k // size} is {bits(a)}, the reference merge has {bits(b)}"


def _pysoup_read(path: str) -> tuple:
    """Every tensor of a file as pysoup.open reads it: {name: (dtype, shapes, byte strings, torch dtype)}."""
    import pysoup

    with pysoup.open(path) as ckpt:
        metadata = ckpt.metadata
        out = {}
        for name in ckpt.keys():
            info = ckpt.infos[name]
            array = ckpt.numpy(name)
            tensor = ckpt.torch(name)
            shapes = (tuple(info.shape), tuple(array.shape), tuple(tensor.shape))
            out[name] = (info.dtype, shapes, (array.tobytes(), tensor_bytes(tensor)), str(tensor.dtype))
            del array, tensor  # views of the mapping: dropped before close
    return out, metadata


def _accepted_label(refusal: str) -> str:
    """ "FAIL accepted what safetensors refuses (its reason)", the reason shortened so that cases group by it."""
    reason = refusal.split("Error while deserializing header: ")[-1]
    reason = re.sub(r" at line \d+ column \d+$", "", reason)
    reason = re.sub(r"`[^`]*`", "…", reason)
    return f"FAIL accepted what safetensors refuses ({reason[:70]})"


def _snapshot(path: str) -> dict:
    """{relative path: bytes} of a file or of every file under a directory; {} when there is nothing."""
    if os.path.isfile(path):
        return {"": _read(path)}
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = _read(full)
    return out


def _sha256(path: str) -> str:
    return hashlib.sha256(_read(path)).hexdigest()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def check_case(case: dict, root: str, debug: bool = False) -> dict:
    """Runs one case in a fresh directory under `root` and judges it.

    Returns:
        {"label": the outcome, "failures": failure labels, "detail": what went wrong, "info": a normalised
        message for informational outcomes, "seconds"}
    """
    start = time.perf_counter()
    work = tempfile.mkdtemp(prefix=f"case{case['index']}-", dir=root)
    try:
        result = CaseCheck(case, work, debug).run()
    except Exception:  # a bug of this harness: reported as a failure, never hidden
        if debug:
            traceback.print_exc()
        result = {"label": "FAIL harness error", "failures": ["FAIL harness error"], "info": None}
        result["detail"] = traceback.format_exc(limit=-2).strip().replace("\n", " / ")[-600:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - start
    return result


# -- workers -------------------------------------------------------------------------------------------------
def _send(stream, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def _receive_blocking(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(stream.read(n))


def worker_main(root: str) -> int:
    """A worker: reads cases from stdin, answers with results on stdout, until stdin closes."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash is reported; its core dump is not wanted
    faulthandler.enable()  # a fatal signal prints the Python stack into the worker log, then kills as before
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to the log, never into the channel
    import safetensors.torch  # noqa: F401 - warm imports: the first case's deadline must not pay for them
    import torch

    import pysoup  # noqa: F401

    torch.set_num_threads(1)
    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = held + WORKER_EXTRA_ADDRESS_SPACE
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _send(channel, {"ready": os.getpid()})
    while True:
        case = _receive_blocking(sys.stdin.buffer)
        if case is None:
            return 0
        _send(channel, check_case(case, root))


class Worker:
    """One worker process, as the parent sees it: starting, idle or busy with a case until a deadline."""

    def __init__(self, slot: int, root: str):
        self.slot, self.root = slot, root
        self.log_path = os.path.join(root, f"worker{slot}.log")
        self.proc = None
        self.state = "stopped"
        self.case = None
        self.deadline = math.inf
        self.buffer = bytearray()

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, FUZZER_PATH, "--worker", self.root],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        self.state, self.case, self.buffer = "starting", None, bytearray()
        self.deadline = time.monotonic() + WORKER_STARTUP_S

    def assign(self, case: dict, deadline_s: float) -> bool:
        """Sends a case; False when the worker is already dead."""
        self.state, self.case = "busy", case
        self.deadline = time.monotonic() + deadline_s
        try:
            _send(self.proc.stdin, case)
            return True
        except (BrokenPipeError, OSError):
            return False

    def receive(self) -> tuple:
        """(complete messages, whether the worker closed its end)."""
        chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
        self.buffer += chunk
        messages = []
        while len(self.buffer) >= 8:
            (n,) = struct.unpack("<Q", self.buffer[:8])
            if len(self.buffer) < 8 + n:
                break
            messages.append(pickle.loads(bytes(self.buffer[8 : 8 + n])))
            del self.buffer[: 8 + n]
        return messages, not chunk

    def log_tail(self, limit: int = 800) -> str:
        text = (_read(self.log_path) or b"")[-limit:].decode("utf-8", "replace")
        return " / ".join(line for line in text.splitlines() if line.strip())

    def stop(self, kill: bool = False) -> int:
        if self.proc is None:
            return 0
        if kill:
            self.proc.kill()
        else:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.proc, self.state = None, "stopped"
        return rc


def _death(rc: int) -> str:
    if rc < 0:
        try:
            return f"FAIL crash: {signal.Signals(-rc).name}"
        except ValueError:
            return f"FAIL crash: signal {-rc}"
    return f"FAIL crash: exit status {rc}"


def scratch_dir() -> str:
    """/dev/shm when there is one: cases write and delete thousands of small files."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def run_cases(cases, workers: int = 2, deadline_s: float = DEFAULT_DEADLINE_S):
    """Runs cases in `workers` persistent worker processes; yields (case, result) as they finish.

    A worker that dies by a signal or exits makes its case "FAIL crash: ..."; one past the deadline is killed
    and its case is "FAIL hang". Either way the worker is restarted and the run goes on.
    """
    root = tempfile.mkdtemp(prefix="pysoup-fuzz-", dir=scratch_dir())
    pool = [Worker(k, root) for k in range(workers)]
    selector = selectors.DefaultSelector()

    def launch(w):
        w.start()
        selector.register(w.proc.stdout, selectors.EVENT_READ, w)

    def retire(w, kill):
        selector.unregister(w.proc.stdout)
        return w.stop(kill=kill)

    todo = iter(cases)
    exhausted = False
    try:
        for w in pool:
            launch(w)
        while True:
            for w in pool:
                if w.state == "idle" and not exhausted:
                    case = next(todo, None)
                    if case is None:
                        exhausted = True
                    elif not w.assign(case, deadline_s):
                        pass  # the worker's end of the pipe is closed: its EOF comes through the selector
            if not any(w.state == "busy" for w in pool) and (exhausted or not any(w.state == "starting" for w in pool)):
                break
            timeout = max(0.0, min(w.deadline for w in pool) - time.monotonic())
            for key, _ in selector.select(timeout):
                w = key.data
                messages, closed = w.receive()
                for message in messages:
                    if w.state == "starting":
                        w.state, w.deadline = "idle", math.inf
                    else:
                        case, w.case, w.state, w.deadline = w.case, None, "idle", math.inf
                        yield case, message
                if closed:
                    tail = w.log_tail()
                    was, case = w.state, w.case
                    rc = retire(w, kill=True)
                    if was == "starting":
                        raise RuntimeError(f"fuzz worker failed to start ({_death(rc)}): {tail}")
                    if case is not None:
                        label = _death(rc)
                        yield case, {"label": label, "failures": [label], "detail": tail, "info": None, "seconds": 0}
                    launch(w)
            now = time.monotonic()
            for w in pool:
                if w.state in ("busy", "starting") and now > w.deadline:
                    was, case = w.state, w.case
                    retire(w, kill=True)
                    if was == "starting":
                        raise RuntimeError(f"fuzz worker did not start in {WORKER_STARTUP_S:.0f} s: {w.log_tail()}")
                    detail = f"no answer in {deadline_s:g} s; worker killed"
                    yield (
                        case,
                        {
                            "label": "FAIL hang",
                            "failures": ["FAIL hang"],
                            "detail": detail,
                            "info": None,
                            "seconds": deadline_s,
                        },
                    )
                    launch(w)
    finally:
        for w in pool:
            if w.proc is not None:
                retire(w, kill=w.state == "busy")
        selector.close()
        shutil.rmtree(root, ignore_errors=True)


# -- counting and reporting ----------------------------------------------------------------------------------
CATEGORIES = ["merged", "opened", "refused", "info", "fail"]


def category(label: str) -> str:
    if label.startswith("FAIL"):
        return "fail"
    if label.startswith("info"):
        return "info"
    if label == "merged":
        return "merged"
    return "opened" if label.startswith("opened") else "refused"


@dataclass
class Tally:
    """Counts per outcome and per mutator, the failures (with what replays them) and the slowest cases."""

    seed: int | None = None
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_mutator: dict = field(default_factory=lambda: defaultdict(Counter))
    failures: list = field(default_factory=list)
    failure_count: int = 0
    info_messages: Counter = field(default_factory=Counter)
    slowest: list = field(default_factory=list)
    _examples: Counter = field(default_factory=Counter)

    def add(self, case: dict, result: dict) -> None:
        self.cases += 1
        label = result["label"]
        self.outcomes[label] += 1
        self.by_mutator[case["mutator"]][category(label)] += 1
        if result.get("info"):
            self.info_messages[f"{label.split('(')[-1].rstrip(')')}: {result['info']}"] += 1
        if category(label) == "fail":
            self.failure_count += 1
            key = (label, case["mutator"])
            self._examples[key] += 1
            if self._examples[key] <= 3 and len(self.failures) < 300:  # a few reproducers per kind suffice
                self.failures.append(
                    {
                        "replay": f"{case['seed']}:{case['index']}",
                        "mutator": case["mutator"],
                        "family": case["family"],
                        "label": label,
                        "detail": result.get("detail", ""),
                        "inject": case.get("inject"),
                    }
                )
        self.slowest = sorted(
            [*self.slowest, (result.get("seconds", 0.0), f"{case['seed']}:{case['index']}", case["mutator"])],
            reverse=True,
        )[:10]

    def outcome_rows(self) -> list:
        order = {c: k for k, c in enumerate(CATEGORIES)}
        return sorted(self.outcomes.items(), key=lambda kv: (order[category(kv[0])], -kv[1], kv[0]))

    def table(self) -> str:
        lines = [f"{'outcome':<66} {'cases':>8}"]
        lines += [f"{label:<66} {count:>8}" for label, count in self.outcome_rows()]
        lines += ["", f"{'mutator':<30}" + "".join(f"{c:>9}" for c in ["cases", *CATEGORIES])]
        for name in sorted(self.by_mutator):
            row = self.by_mutator[name]
            lines.append(f"{name:<30}{sum(row.values()):>9}" + "".join(f"{row[c]:>9}" for c in CATEGORIES))
        if self.failures:
            lines += ["", "failures (replay with: python tests/fuzzing.py --replay SEED:INDEX):"]
            lines += [f"  {f['replay']:>12}  {f['mutator']:<28} {f['detail'][:400]}" for f in self.failures]
        return "\n".join(lines)


def pysoup_commit() -> str:
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "pysoup", "csrc", "CMakeLists.txt")
    return head + ("+uncommitted changes" if dirty else "")


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem:.1f} GiB, Python {platform.python_version()}, {system}"


def report(tally: Tally, wall_s: float, command: str, workers: int) -> dict:
    import safetensors
    import torch

    import pysoup

    return {
        "command": command,
        "seed": tally.seed,
        "cases": tally.cases,
        "workers": workers,
        "wall_s": round(wall_s, 1),
        "cases_per_s": round(tally.cases / wall_s, 1) if wall_s else None,
        "machine": machine_line(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "pysoup": pysoup.__version__,
        "commit": pysoup_commit(),
        "safetensors": safetensors.__version__,
        "torch": torch.__version__,
        "failures": tally.failure_count,
        "outcomes": dict(tally.outcome_rows()),
        "mutators": {
            name: {"cases": sum(row.values()), **{c: row[c] for c in CATEGORIES}}
            for name, row in sorted(tally.by_mutator.items())
        },
        "failure_examples": tally.failures,
        "informational_messages": dict(tally.info_messages.most_common(40)),
        "slowest_cases": [{"seconds": round(s, 3), "replay": r, "mutator": m} for s, r, m in tally.slowest],
    }


def markdown(rep: dict) -> str:
    lines = [
        "# pysoup fuzzer: outcome counts",
        "",
        f"Command: `{rep['command']}`",
        "",
        f"Machine: {rep['machine']}; {rep['date']}",
        "",
        f"pysoup {rep['pysoup']} ({rep['commit']}), safetensors {rep['safetensors']}, torch {rep['torch']}",
        "",
        f"Seed {rep['seed']}, {rep['cases']} cases, {rep['workers']} workers, {rep['wall_s']} s "
        f"({rep['cases_per_s']} cases/s). **Failures: {rep['failures']}.**",
        "",
        "Outcomes: `merged` (opened and merged, output equal to the reference merge), `opened; merge refused` "
        "(e.g. F64 cannot be merged), `refused` (pysoup and safetensors both refuse the file), `info` (pysoup "
        "refuses what safetensors loads: stricter, not a failure), `FAIL ...` (a crash, hang, foreign "
        "exception, wrong result, debris, changed input, or a file accepted that safetensors refuses).",
        "",
        "| outcome | cases |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {count} |" for label, count in rep["outcomes"].items()]
    lines += ["", "| mutator | cases | " + " | ".join(CATEGORIES) + " |", "|---|" + "---:|" * (len(CATEGORIES) + 1)]
    for name, row in rep["mutators"].items():
        lines.append(f"| {name} | {row['cases']} | " + " | ".join(str(row[c]) for c in CATEGORIES) + " |")
    if rep["failure_examples"]:
        lines += [
            "",
            "## Failures (replay: `python tests/fuzzing.py --replay SEED:INDEX`)",
            "",
            "| replay | mutator | outcome | detail |",
            "|---|---|---|---|",
        ]
        for f in rep["failure_examples"]:
            detail = f["detail"][:300].replace("|", "\\|")
            lines.append(f"| {f['replay']} | {f['mutator']} | {f['label']} | {detail} |")
    if rep["informational_messages"]:
        lines += [
            "",
            "## Informational: what pysoup refuses and safetensors loads (most frequent)",
            "",
            "| cases | message |",
            "|---:|---|",
        ]
        lines += [f"| {n} | {m.replace('|', chr(92) + '|')} |" for m, n in rep["informational_messages"].items()]
    lines += [
        "",
        "Slowest cases: "
        + ", ".join(f"{s['replay']} {s['mutator']} {s['seconds']} s" for s in rep["slowest_cases"][:5]),
        "",
    ]
    return "\n".join(lines)


def fuzz(seed: int, cases: int, workers: int = 2, deadline_s: float = DEFAULT_DEADLINE_S, progress=None) -> Tally:
    """Runs cases 0..cases-1 of `seed` and counts their outcomes.

    Args:
        seed: the run's seed; a case is a pure function of (seed, index).
        cases: how many cases.
        workers: worker processes.
        deadline_s: seconds a case may take before it counts as a hang.
        progress: a stream to print a line to every 10% (None: quiet).

    Returns:
        A Tally (`failure_count`, `outcomes`, `by_mutator`, `failures` with replay handles, `table()`).

    Example:
        >>> tally = fuzz(seed=1, cases=200)   # doctest: +SKIP
        >>> assert tally.failure_count == 0, tally.table()   # doctest: +SKIP
    """
    tally = Tally(seed=seed)
    start = time.perf_counter()
    step = max(cases // 10, 1)
    for case, result in run_cases((make_case(seed, i) for i in range(cases)), workers, deadline_s):
        tally.add(case, result)
        if progress is not None and tally.cases % step == 0:
            elapsed = time.perf_counter() - start
            print(
                f"{tally.cases}/{cases} cases, {elapsed:.0f} s, {tally.failure_count} failures",
                file=progress,
                flush=True,
            )
    return tally


def replay(handle: str) -> int:
    """Prints case SEED:INDEX (its header) and runs it in this process, with tracebacks."""
    seed, index = (int(x) for x in handle.split(":"))
    case = make_case(seed, index)
    print(
        f"case {handle}: family {case['family']}, mutator {case['mutator']}, output {case['output']}, "
        f"mutated {'first' if case['mutated_first'] else 'second'}{' in a directory' * case['in_directory']}, "
        f"older output {case['old_output']}"
    )
    print("mutated file:", describe_header(case["data"]))
    if case["partner"] != corpus()[case["family"]].base and case["partner"] != corpus()[case["family"]].partner:
        print("partner file:", describe_header(case["partner"]))
    root = tempfile.mkdtemp(prefix="pysoup-fuzz-replay-", dir=scratch_dir())
    try:
        result = check_case(case, root, debug=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"outcome: {result['label']}")
    if result.get("detail"):
        print(f"detail: {result['detail']}")
    return 1 if category(result["label"]) == "fail" else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz pysoup's reader and merger with mutated safetensors files.")
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="seconds per case before a hang")
    parser.add_argument("--json", help="write the counts as JSON here")
    parser.add_argument("--markdown", help="write the counts as a markdown table here")
    parser.add_argument("--replay", metavar="SEED:INDEX", help="run one case in this process and show its header")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.replay:
        return replay(args.replay)
    command = "python tests/fuzzing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    tally = fuzz(args.seed, args.cases, args.workers, args.deadline, progress=sys.stderr)
    wall = time.perf_counter() - start
    print(tally.table())
    rate = tally.cases / wall
    print(f"\n{tally.cases} cases in {wall:.1f} s ({rate:.0f}/s), seed {args.seed}: {tally.failure_count} failures")
    rep = report(tally, wall, command, args.workers)
    for path, text in (
        (args.json, json.dumps(rep, indent=1, ensure_ascii=False) + "\n"),
        (args.markdown, markdown(rep)),
    ):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    return 1 if tally.failure_count else 0


if __name__ == "__main__":
    sys.exit(main())

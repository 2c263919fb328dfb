"""The safetensors format: parse and fully validate a header, and build one byte-identical to the
`safetensors` package's own writer.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (padded with spaces to a multiple
of 8), then the data; each tensor's `data_offsets` are relative to the start of the data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from pysoup.dtypes import SAFETENSORS_ORDER, SAFETENSORS_SIZES
from pysoup.errors import FormatError
from pysoup.io.table import parse_plain_header, table_from_infos

# The safetensors package refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
_MAX_BYTES = 2**63 - 1
# numpy's limit (torch allows more); no real checkpoint comes near it.
MAX_DIMS = 64


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `begin`/`end` are absolute byte offsets in its file."""

    name: str
    dtype: str
    shape: tuple
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return SAFETENSORS_SIZES[self.dtype]


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise FormatError(f"duplicate key {key!r} in the header")
        seen[key] = value
    return seen


def load_json(path: str, raw: bytes, what: str):
    """Parses JSON from an untrusted file: every failure is one FormatError naming the file.

    Besides syntax, this refuses what Python's parser turns into foreign exceptions: nesting deeper than
    the interpreter's recursion limit (RecursionError), integers of more than 4,300 digits (ValueError),
    duplicate keys, and strings holding lone surrogates, which no UTF-8 writer (ours or the `safetensors`
    package's) can write back.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: {what} is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates, parse_int=_parse_int)
    except FormatError as exc:
        raise FormatError(f"{path}: {what}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: {what} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise FormatError(f"{path}: {what} is nested too deeply to be a safetensors header or index") from None
    except ValueError as exc:  # int() past sys.get_int_max_str_digits()
        raise FormatError(f"{path}: {what} holds a number too large to read ({str(exc).split(';')[0]})") from None
    return obj


def _parse_int(text: str) -> int:
    # JSON has no integer -0 (serde_json, which the safetensors package uses, reads it as the float -0.0).
    if text == "-0":
        raise FormatError("-0 is not an integer")
    return int(text)


def _check_text(path: str, text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{path}: {what} {text!r} is not valid Unicode (a lone surrogate)") from None


def parse_header(path: str, prefix: bytes, file_size: int, read_header) -> tuple:
    """Validates everything about a header before any tensor is touched.

    Args:
        path: the file's name, for messages.
        prefix: the file's first 8 bytes (fewer if the file is shorter).
        file_size: the file's size in bytes.
        read_header: read_header(n) returns the n header bytes after the prefix.

    Returns:
        (metadata dict or None, list of TensorInfo in file order, data start offset)
    """
    n = _header_length(path, prefix, file_size)
    return _parse_json_header(path, read_header(n), n, file_size)


def parse_header_table(path: str, prefix: bytes, file_size: int, read_header) -> tuple:
    """parse_header's result as a TensorTable (pysoup/io/table.py), for files of any number of tensors.

    A plain header, as every writer makes them, is parsed and checked in C++: 0.05 s for 10^5 tensors, where
    json.loads alone took 0.43 s (0.64 s with the duplicate-key hook) and parse_header 2.1 s. Any other header goes
    through parse_header, which accepts it with the same result or raises the error that names the problem.

    Returns:
        (metadata dict or None, TensorTable of the tensors in file order, data start offset)
    """
    n = _header_length(path, prefix, file_size)
    raw = read_header(n)
    plain = parse_plain_header(raw, 8 + n, file_size - 8 - n)
    if plain is not None:
        pairs, table = plain
        return (None if pairs is None else dict(pairs)), table, 8 + n
    metadata, infos, data_start = _parse_json_header(path, raw, n, file_size)
    return metadata, table_from_infos(infos), data_start


def _header_length(path: str, prefix: bytes, file_size: int) -> int:
    if file_size < 8 or len(prefix) < 8:
        raise FormatError(
            f"{path}: empty or truncated file ({file_size} bytes; a safetensors file starts with an "
            "8-byte header length)"
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise FormatError(
            f"{path}: header length {n} is absurdly large (limit {MAX_HEADER_BYTES}): not a safetensors file?"
        )
    if 8 + n > file_size:
        raise FormatError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes): truncated?")
    return n


# Every check below has a twin in parse_header_fast (csrc/io/tensor_table.cpp), which must decline any header these
# refuse: a new check here needs one there (or a reason there to decline), and tests/test_many_tensors.py compares
# the two on mutated headers.
def _parse_json_header(path: str, raw: bytes, n: int, file_size: int) -> tuple:
    obj = load_json(path, raw, "header")
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not (
            isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise FormatError(f"{path}: __metadata__ must map strings to strings")
        for k, v in metadata.items():
            _check_text(path, k, "metadata key")
            _check_text(path, v, "metadata value")
    infos = [_parse_entry(path, name, entry, data_start, data_len) for name, entry in obj.items()]
    _check_layout(path, infos, data_start, data_len)
    infos.sort(key=lambda t: (t.begin, t.end))
    return metadata, infos, data_start


def _parse_entry(path, name, entry, data_start, data_len) -> TensorInfo:
    _check_text(path, name, "tensor name")
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{where}: entry must have exactly the keys dtype, shape, data_offsets")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_SIZES:
        raise FormatError(f"{where}: unknown dtype {_short(dtype)} (known: {', '.join(SAFETENSORS_SIZES)})")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise FormatError(f"{where}: shape {_short(shape)} must be a list of integers")
    if len(shape) > MAX_DIMS:
        raise FormatError(f"{where}: shape has {len(shape)} dimensions (at most {MAX_DIMS} are supported)")
    if any(d < 0 for d in shape):
        raise FormatError(f"{where}: negative dimension in shape {_short(shape)}")
    # Every dimension must fit in int64 even when another is 0, and the size check must not depend on the
    # order of the dimensions: the product is taken over the non-zero ones.
    nbytes = SAFETENSORS_SIZES[dtype]
    for d in shape:
        nbytes *= max(d, 1)
        if d > _MAX_BYTES or nbytes > _MAX_BYTES:
            raise FormatError(f"{where}: element count of shape {_short(shape)} overflows")
    if 0 in shape:
        nbytes = 0
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise FormatError(f"{where}: data_offsets {_short(offsets)} must be two integers")
    begin, end = offsets
    if begin < 0 or end < begin or end > _MAX_BYTES:
        raise FormatError(f"{where}: data_offsets {_short(offsets)} are not an increasing pair of 64-bit offsets")
    if end - begin != nbytes:
        raise FormatError(
            f"{where}: byte range [{begin}, {end}) holds {end - begin} bytes but shape {shape} of "
            f"{dtype} needs {nbytes}"
        )
    if end > data_len:
        raise FormatError(
            f"{where}: byte range [{begin}, {end}) runs past the end of the data ({data_len} bytes): truncated file?"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _short(value, limit: int = 80) -> str:
    """repr() cut to `limit` characters: a hostile header can hold megabytes in one value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_layout(path, infos, data_start, data_len):
    """The tensors tile the data exactly, as the safetensors package requires: in (begin, end) order the first
    starts at the data's start, each where the one before ended, and the last ends at the end of the file. An
    overlap would alias two tensors; bytes that belong to no tensor mean the header does not describe the file."""
    expected, prev = data_start, None
    for t in sorted(infos, key=lambda t: (t.begin, t.end)):
        if t.begin < expected:
            raise FormatError(f"{path}: tensors {prev.name!r} and {t.name!r} overlap in the file")
        if t.begin > expected:
            raise FormatError(
                f"{path}: {t.begin - expected} bytes before tensor {t.name!r} belong to no tensor "
                "(the header does not describe the data)"
            )
        expected, prev = t.end, t
    if expected != data_start + data_len:
        raise FormatError(
            f"{path}: {data_start + data_len - expected} bytes after the last tensor belong to no tensor "
            "(the header does not describe the data)"
        )


def canonical_order(entries):
    """The order the safetensors package writes tensors in: dtype (its enum, descending), then name."""
    rank = {d: i for i, d in enumerate(SAFETENSORS_ORDER)}
    return sorted(entries, key=lambda e: (-rank[e[1]], e[0]))


def build_header(entries, metadata=None) -> tuple:
    """Lays out a file whose bytes equal what `safetensors.*.save_file` writes for the same tensors.

    Args:
        entries: (name, dtype, shape) triples, in any order.
        metadata: optional str -> str mapping.

    Returns:
        (header bytes including the 8-byte length and padding, {name: (begin, end)} absolute offsets,
        the ordered entries)
    """
    ordered = canonical_order(entries)
    header = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    relative = {}
    for name, dtype, shape in ordered:
        nbytes = SAFETENSORS_SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        relative[name] = (offset, offset + nbytes)
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    absolute = {name: (start + b, start + e) for name, (b, e) in relative.items()}
    return struct.pack("<Q", len(text)) + text, absolute, ordered

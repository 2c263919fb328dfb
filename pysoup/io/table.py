"""TensorTable: a checkpoint's tensors as columns (name, dtype, shape, byte range, group), and TensorInfos, the
name -> TensorInfo mapping that users and the planner read, made per lookup from the table.

Why columns: MoE checkpoints hold 10^5-10^6 tensors in one file. A TensorInfo per tensor cost ~370 bytes and the
parsed JSON ~580 more while it lived, so two 10^6-tensor inputs took 2.4 GiB and a merge spent 130 us a tensor in
per-tensor Python (parse, validate, plan, lay out). The table costs ~80 bytes a tensor, and what runs over every
tensor (lookups by name, shape checks, the write order, the output header) runs over the columns in C++.

`pysoup._C.TensorTable` is the table; `PyTensorTable` below is its plain-Python reference (the same methods and
results, tested against each other), used when the C++ module is missing so that opening files and in-memory merges
still work. Row lists cross as bytes of int32 (`rows(b)` reads them), dtypes as codes: an index into
SAFETENSORS_SIZES.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import ItemsView, Mapping, ValuesView

from pysoup import _native
from pysoup.dtypes import SAFETENSORS_ORDER, SAFETENSORS_SIZES

DTYPES = list(SAFETENSORS_SIZES)
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
_RANK = [SAFETENSORS_ORDER.index(d) for d in DTYPES]


def rows(data):
    """A memoryview of int32 over a row list (bytes, or any buffer of 4-byte items)."""
    return memoryview(data).cast("B").cast("i")


def _name_key(name: str) -> bytes:
    # The C++ table compares UTF-8 bytes, which order like code points; surrogatepass keeps state-dict keys that
    # are not valid Unicode comparable too.
    return name.encode("utf-8", "surrogatepass")


class PyTensorTable:
    """The reference TensorTable: one Python list per column."""

    def __init__(self, names, dtypes, shapes, begins, ends, groups=None):
        self._names, self._dtypes, self._shapes = list(names), list(dtypes), [tuple(s) for s in shapes]
        self._begins, self._ends = list(begins), list(ends)
        self._groups = list(groups) if groups else [0] * len(self._names)
        self._index = None

    @staticmethod
    def from_entries(names, dtypes, shapes, begins, ends, groups=()):
        if any(d not in DTYPE_CODE for d in dtypes):
            raise ValueError("TensorTable: unknown dtype")
        return PyTensorTable(names, [DTYPE_CODE[d] for d in dtypes], shapes, begins, ends, groups)

    @staticmethod
    def gather(tables, picks: bytes):
        pairs = memoryview(picks).cast("I")
        cols = ([], [], [], [], [], [])
        for j in range(0, len(pairs), 2):
            g, i = pairs[j], pairs[j + 1]
            t = tables[g]
            for col, v in zip(cols, (t._names[i], t._dtypes[i], t._shapes[i], t._begins[i], t._ends[i], g)):
                col.append(v)
        return PyTensorTable(*cols)

    def __len__(self):
        return len(self._names)

    def find(self, name) -> int:
        if self._index is None:
            self._index = {}
            for i, n in enumerate(self._names):
                self._index.setdefault(n, i)
        return self._index.get(name, -1) if isinstance(name, str) else -1

    def name(self, i):
        return self._names[self._row(i)]

    def names(self, start=0, stop=-1):
        return self._names[start : len(self) if stop < 0 else stop]

    def info(self, i):
        i = self._row(i)
        return self._names[i], DTYPES[self._dtypes[i]], self._shapes[i], self._begins[i], self._ends[i]

    def dtype(self, i):
        return DTYPES[self._dtypes[self._row(i)]]

    def shape(self, i):
        return self._shapes[self._row(i)]

    def begin(self, i):
        return self._begins[self._row(i)]

    def end(self, i):
        return self._ends[self._row(i)]

    def group(self, i):
        return self._groups[self._row(i)]

    def numel(self, i):
        return math.prod(self._shapes[self._row(i)])

    def nbytes(self, i):
        return self.numel(i) * SAFETENSORS_SIZES[self.dtype(i)]

    def dtype_codes(self, rows_, count):
        r = range(count) if rows_ is None else rows(rows_)
        return bytes(self._dtypes[self._row(k)] for k in r)

    def numels(self):
        return array("q", (math.prod(s) for s in self._shapes)).tobytes()

    def rows_of(self, ref):
        out = array("i", (self.find(n) for n in ref._names))
        absent = out.count(-1)
        return out.tobytes(), absent, (out.index(-1) if absent else -1)

    def first_shape_mismatch(self, ref, rows_):
        r = range(len(ref)) if rows_ is None else rows(rows_)
        return next((k for k, i in enumerate(r) if self._shapes[i] != ref._shapes[k]), -1)

    def canonical_order(self, dtypes=None):
        codes = self._dtypes if dtypes is None else list(dtypes)
        order = sorted(range(len(self)), key=lambda i: (-_RANK[codes[i]], _name_key(self._names[i])))
        return array("i", order).tobytes()

    def permuted(self, order, dtypes=None):
        o = rows(order)
        codes = self._dtypes if dtypes is None else list(dtypes)
        return PyTensorTable(
            [self._names[i] for i in o],
            [codes[i] for i in o],
            [self._shapes[i] for i in o],
            [self._begins[i] for i in o],
            [self._ends[i] for i in o],
            [self._groups[i] for i in o],
        )

    def shard_bounds(self, max_bytes):
        bounds, cur = [0], 0
        for i in range(len(self)):
            nbytes = self.nbytes(i)
            if i > bounds[-1] and cur + nbytes > max_bytes:
                bounds.append(i)
                cur = 0
            cur += nbytes
        return bounds + [len(self)]

    def write_header(self, start, stop, metadata):
        from pysoup.io.format import build_header

        entries = [(self._names[i], DTYPES[self._dtypes[i]], self._shapes[i]) for i in range(start, stop)]
        header, offsets, _ = build_header(entries, _metadata_from_member(metadata))
        for i in range(start, stop):
            self._begins[i], self._ends[i] = offsets[self._names[i]]
        return header

    def set_range(self, i, begin, end):
        i = self._row(i)
        self._begins[i], self._ends[i] = begin, end

    def _row(self, i):
        if not 0 <= i < len(self._names):
            raise IndexError(f"TensorTable: row {i} out of range")
        return i


def _metadata_from_member(member: str):
    import json

    return json.loads("{" + member + "}")["__metadata__"] if member else None


def py_batch_end(sources, out, kinds, k0, k1, max_span, out_room, max_numel):
    """The reference of pysoup._C.batch_end."""
    spans, groups, out_bytes, k = None, None, 0, k0
    kind = None if kinds is None else memoryview(kinds).cast("B").cast("I")
    while k < k1:
        if kind is not None and kind[k] != kind[k0]:
            break
        if out.numel(k) > max_numel or out_bytes + out.nbytes(k) > out_room:
            break
        nxt, grp = [], []
        for table, rows_ in sources:
            r = k if rows_ is None else rows(rows_)[k]
            nxt.append((table.begin(r), table.end(r)))
            grp.append(table.group(r))
        if spans is not None:
            if grp != groups:
                break
            nxt = [(min(a, c), max(b, d)) for (a, b), (c, d) in zip(spans, nxt)]
        if any(hi - lo > max_span for lo, hi in nxt):
            break
        spans, groups = nxt, grp
        out_bytes += out.nbytes(k)
        k += 1
    return k, spans or [(0, 0)] * len(sources)


def py_take(values, itemsize: int, order) -> bytes:
    """The reference of pysoup._C.take: values[order[j]] (items of 1 or 4 bytes) for each int32 order[j]."""
    v = memoryview(values).cast("B")
    v = v.cast("i") if itemsize == 4 else v
    return array("i" if itemsize == 4 else "B", map(v.__getitem__, rows(order))).tobytes()


def py_sum_by_group(values, groups, count: int) -> list:
    """The reference of pysoup._C.sum_by_group: per group g < count, the sum of the int64 values in group g."""
    sums = [0] * count
    for v, g in zip(memoryview(values).cast("B").cast("q"), memoryview(groups).cast("B").cast("I")):
        sums[g] += v
    return sums


if _native.available:
    TensorTable = _native.native.TensorTable
    parse_plain_header = _native.native.parse_safetensors_header
    batch_end = _native.native.batch_end
    take = _native.native.take
    sum_by_group = _native.native.sum_by_group
else:  # pragma: no cover - depends on the installation
    TensorTable = PyTensorTable
    batch_end = py_batch_end
    take = py_take
    sum_by_group = py_sum_by_group

    def parse_plain_header(json, data_start, data_len):
        return None  # format.parse_header does it all


def table_from_infos(infos, groups=()):
    """A TensorTable of TensorInfo-like rows (name, dtype, shape, begin, end)."""
    infos = list(infos)
    return TensorTable.from_entries(
        [t.name for t in infos],
        [t.dtype for t in infos],
        [list(t.shape) for t in infos],
        [t.begin for t in infos],
        [t.end for t in infos],
        list(groups),
    )


def metadata_member(metadata) -> str:
    """The JSON member `"__metadata__":{...}` as build_header writes it (keys sorted), or "" for no metadata."""
    if not metadata:
        return ""
    import json

    text = json.dumps(
        {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}, separators=(",", ":"), ensure_ascii=False
    )
    return text[1:-1]


class TensorInfos(Mapping):
    """name -> TensorInfo over a TensorTable, in the table's order; each TensorInfo is made when asked for."""

    __slots__ = ("table",)

    def __init__(self, table):
        self.table = table

    def __getitem__(self, name):
        i = self.table.find(name)
        if i < 0:
            raise KeyError(name)
        return self.at(i)

    def at(self, i: int):
        from pysoup.io.format import TensorInfo

        return TensorInfo(*self.table.info(i))

    def __contains__(self, name) -> bool:
        return self.table.find(name) >= 0

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self):
        return iter(self.table.names())

    def items(self):
        return _Items(self)

    def values(self):
        return _Values(self)

    def __repr__(self):
        return f"<TensorInfos: {len(self)} tensors>"


class _Items(ItemsView):
    """In table order without a lookup per tensor."""

    def __iter__(self):
        for info in map(self._mapping.at, range(len(self._mapping))):
            yield info.name, info


class _Values(ValuesView):
    def __iter__(self):
        return map(self._mapping.at, range(len(self._mapping)))

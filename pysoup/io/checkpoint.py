"""A model's tensors, wherever they live: one safetensors file, a Hugging Face directory (single file or
sharded with `model.safetensors.index.json`), or an in-memory state dict of torch tensors.

Every kind answers the same questions the planner and engine ask: `table` (its tensors as columns, see
pysoup/io/table.py), `infos` (name -> TensorInfo, made from the table per lookup) and `address_at(row, lo, hi)` (a
pointer to bytes [lo, hi) of the data of the table's row `row`, valid until the next call for the same file; the
tensors of one table group share the address space, so one call serves a batch of them).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Mapping

from pysoup.errors import FormatError, PlanError
from pysoup.io.format import MAX_HEADER_BYTES, load_json
from pysoup.io.reader import SafetensorsReader
from pysoup.io.table import TensorInfos, TensorTable

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files beside the weights that are not weights: copied to a directory output from the first input.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


class Checkpoint:
    """Common interface of file and in-memory checkpoints."""

    name: str
    table: TensorTable
    infos: TensorInfos
    metadata: dict | None = None
    files: tuple = ()  # real paths of the files holding the weights (for the output != input check)
    directory: str | None = None

    def address(self, name: str, lo: int, hi: int) -> int:
        row = self.table.find(name)
        if row < 0:
            raise KeyError(f"{self.name}: no tensor {name!r}")
        return self.address_at(row, lo, hi)

    def address_at(self, row: int, lo: int, hi: int) -> int:
        raise NotImplementedError

    def source_file(self, row: int):
        """(fd, path) of the file holding tensor `row`, for reads without a mapping; None for one in memory."""
        return None

    def release(self) -> None:
        """Drops any mapping held, keeping the checkpoint usable."""

    def check_unchanged(self) -> None:
        """Raises FormatError if a file of this checkpoint changed since it was opened."""

    def close(self) -> None:
        self.release()

    def aux_files(self) -> list:
        """Non-weight files (config, tokenizer) of a directory input, to copy beside a directory output."""
        if self.directory is None:
            return []
        out = []
        for entry in sorted(os.listdir(self.directory)):
            full = os.path.join(self.directory, entry)
            if entry.startswith(".") or not os.path.isfile(full) or entry.endswith(_WEIGHT_SUFFIXES):
                continue
            out.append(full)
        return out


class FileCheckpoint(Checkpoint):
    """A safetensors file, or the shards of a Hugging Face directory: a row's group is the index of its reader."""

    def __init__(self, name: str, readers: list, table, directory: str | None = None):
        self.name = name
        self._readers = readers
        self.table = table
        self.infos = TensorInfos(table)
        self.metadata = readers[0].metadata if readers else None
        self.files = tuple(os.path.realpath(r.path) for r in readers)
        self.directory = directory
        self._active = None

    def source_file(self, row):
        reader = self._readers[self.table.group(row)]
        return reader.fd, reader.path

    def address_at(self, row, lo, hi):
        reader = self._readers[self.table.group(row)]
        if reader is not self._active:
            # One mapped window per input, not per shard: moving to another shard releases the last one's.
            if self._active is not None:
                self._active.release()
            self._active = reader
        return reader.window_address(lo, hi)

    # -- the lazy reader users get from pysoup.open() -------------------------------------------------
    def keys(self) -> list:
        return list(self.infos)

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, name) -> bool:
        return name in self.infos

    def __getitem__(self, name):
        return self.torch(name)

    def numpy(self, name: str):
        """Zero-copy numpy view (bfloat16 as raw uint16 bits)."""
        return self._reader(name).numpy(name)

    def torch(self, name: str):
        """Zero-copy torch tensor (copy-on-write: writing to it never changes the file)."""
        return self._reader(name).torch(name)

    def _reader(self, name):
        row = self.table.find(name)
        if row < 0:
            raise KeyError(f"{self.name}: no tensor {name!r}")
        return self._readers[self.table.group(row)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<pysoup checkpoint {self.name!r}: {len(self.infos)} tensors in {len(self._readers)} file(s)>"

    def release(self):
        for r in self._readers:
            r.release()

    def check_unchanged(self):
        for r in self._readers:
            r.check_unchanged()

    def close(self):
        for r in self._readers:
            r.close()


class MemoryCheckpoint(Checkpoint):
    """A state dict of torch tensors; offsets are relative to each tensor's first byte, and every tensor is a group
    of its own (tensors live apart in memory)."""

    def __init__(self, state_dict: Mapping, name: str):
        from pysoup.dtypes import from_torch

        self.name = name
        self.tensors = {}
        columns = ([], [], [], [])  # dtype, shape, end, and the names are the keys of self.tensors
        for key, t in state_dict.items():
            if not hasattr(t, "data_ptr"):
                raise PlanError(f"{name}: {key!r} is a {type(t).__name__}, not a torch tensor")
            if t.device.type != "cpu":
                raise PlanError(
                    f"{name}: tensor {key!r} is on {t.device}; in-memory merges take CPU tensors "
                    "(use pysoup.ops with backend='reference' for other devices)"
                )
            t = t.detach().contiguous()
            self.tensors[key] = t
            for col, v in zip(columns, (from_torch(t.dtype), list(t.shape), t.numel() * t.element_size())):
                col.append(v)
        dtypes, shapes, ends = columns[:3]
        n = len(ends)
        self.table = TensorTable.from_entries(list(self.tensors), dtypes, shapes, [0] * n, ends, list(range(n)))
        self.infos = TensorInfos(self.table)
        self._by_row = list(self.tensors.values())

    def address_at(self, row, lo, hi):
        return self._by_row[row].data_ptr() + lo


def open_checkpoint(source, index: int = 0, window_bytes: int | None = None) -> Checkpoint:
    """Opens one merge input: a path (file or directory) or a mapping of torch tensors."""
    if isinstance(source, Mapping):
        return MemoryCheckpoint(source, name=f"input {index} (state dict)")
    path = os.fspath(source)
    kw = {} if window_bytes is None else {"window_bytes": window_bytes}
    if not os.path.exists(path):
        raise PlanError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return _open_directory(path, kw)
    reader = SafetensorsReader(path, **kw)
    return FileCheckpoint(path, [reader], reader.table)


def open_inputs(inputs, base, opened: list):
    """Opens a merge's inputs (numbered in order) and its base (numbered last) into `opened`, which the caller
    closes, also when this raises part way. Returns the base's checkpoint, or None."""
    for i, src in enumerate(inputs):
        opened.append(open_checkpoint(src, i))
    if base is None:
        return None
    opened.append(open_checkpoint(base, len(inputs)))
    return opened[-1]


def _open_directory(path: str, kw: dict) -> FileCheckpoint:
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index_path):
        return _open_index(path, index_path, kw)
    single = os.path.join(path, SINGLE_NAME)
    candidates = (
        [single]
        if os.path.isfile(single)
        else sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors") and not f.startswith(".")
        )
    )
    if not candidates:
        hint = ""
        if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
            hint = " (it has PyTorch pickles: convert them to safetensors first)"
        raise PlanError(f"{path}: directory has no safetensors checkpoint ({INDEX_NAME} or *.safetensors){hint}")
    if len(candidates) == 1:
        r = SafetensorsReader(candidates[0], **kw)
        return FileCheckpoint(path, [r], r.table, directory=path)
    readers, owner = [], {}
    picks = array("I")  # (reader, row) pairs, in the order of the readers
    try:
        for file in candidates:
            r = SafetensorsReader(file, **kw)
            readers.append(r)
            for row, k in enumerate(r.table.names()):
                if k in owner:
                    raise FormatError(f"{path}: tensor {k!r} is in both {owner[k].path} and {file}")
                owner[k] = r
                picks.extend((len(readers) - 1, row))
        table = _gather(readers, picks)
    except BaseException:
        for r in readers:
            r.close()
        raise
    return FileCheckpoint(path, readers, table, directory=path)


def _gather(readers: list, picks) -> TensorTable:
    return TensorTable.gather([r.table for r in readers], picks.tobytes())


def _open_index(path: str, index_path: str, kw: dict) -> FileCheckpoint:
    try:
        with open(index_path, "rb") as f:
            index = load_json(index_path, f.read(MAX_HEADER_BYTES + 1), "index")
    except OSError as exc:
        raise FormatError(f"{index_path}: cannot read ({exc.strerror})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index_path}: missing or malformed 'weight_map'")
    readers = {}  # shard -> (number, reader)
    picks = array("I")  # (reader, row) pairs, in the order of the weight map
    try:
        for key, shard in weight_map.items():
            if os.path.basename(shard) != shard:
                raise FormatError(f"{index_path}: shard name {shard!r} for tensor {key!r} is not a plain file name")
            if shard not in readers:
                shard_path = os.path.join(path, shard)
                if not os.path.isfile(shard_path):
                    raise FormatError(f"{index_path}: shard {shard!r} (holding {key!r}) does not exist")
                readers[shard] = (len(readers), SafetensorsReader(shard_path, **kw))
            number, reader = readers[shard]
            row = reader.table.find(key)
            if row < 0:
                raise FormatError(
                    f"{os.path.join(path, shard)}: tensor {key!r} is listed in the index but missing from the shard"
                )
            picks.extend((number, row))
        ordered = [r for _, r in readers.values()]
        table = _gather(ordered, picks)
    except BaseException:
        for _, r in readers.values():
            r.close()
        raise
    return FileCheckpoint(path, ordered, table, directory=path)

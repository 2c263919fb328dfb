"""The output side: lay out every output file before any data is computed, write through temporary files
beside the target, and rename them into place only when everything succeeded.

A single-file target is `OUT.safetensors`; any other target is a Hugging Face directory: one
`model.safetensors`, or shards `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`
(written last), and the first input's non-weight files copied beside them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pysoup.dtypes import SAFETENSORS_SIZES
from pysoup.errors import OutputError, PlanError
from pysoup.io.checkpoint import INDEX_NAME, SINGLE_NAME
from pysoup.io.format import build_header, canonical_order

DEFAULT_SHARD_BYTES = 5 * 1000**3  # what transformers' save_pretrained uses


@dataclass
class ShardLayout:
    path: str  # final path
    header: bytes
    offsets: dict  # name -> (begin, end), absolute
    names: list
    size: int = 0
    tmp: str | None = None  # named temporary path once linked
    fd: int = -1


def _shard_entries(entries, shard_bytes):
    shards, cur, cur_bytes = [], [], 0
    for e in canonical_order(entries):
        nbytes = SAFETENSORS_SIZES[e[1]] * math.prod(e[2])
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(e)
        cur_bytes += nbytes
    shards.append(cur)
    return shards


class OutputTarget:
    """Every file of one merge output, laid out up front, committed atomically.

    Args:
        out: a path ending in .safetensors (one file) or a directory.
        entries: (name, safetensors dtype, shape) of every output tensor.
        shard_size: max bytes of tensor data per shard (directory outputs only).
        metadata: the __metadata__ of every output file.
        input_files: real paths of every input file; writing over one is refused.
        aux_files: files to copy beside a directory output.
        durable: fsync files and directory before and after the renames.
    """

    def __init__(self, out, entries, *, shard_size=None, metadata=None, input_files=(), aux_files=(), durable=False):
        self.out = os.path.abspath(os.fspath(out))
        self.single = self.out.endswith(".safetensors")
        if self.single and shard_size is not None:
            raise PlanError(f"{out}: a shard size needs a directory output, not a single .safetensors file")
        self.directory = os.path.dirname(self.out) if self.single else self.out
        self.durable = durable
        self.aux_files = list(aux_files) if not self.single else []
        groups = [list(entries)] if self.single else _shard_entries(entries, shard_size or DEFAULT_SHARD_BYTES)
        n = len(groups)
        self.shards = []
        for i, group in enumerate(groups):
            if self.single:
                path = self.out
            elif n == 1:
                path = os.path.join(self.out, SINGLE_NAME)
            else:
                path = os.path.join(self.out, f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            header, offsets, ordered = build_header(group, metadata)
            size = len(header) + sum(e - b for b, e in offsets.values())
            self.shards.append(ShardLayout(path, header, offsets, [e[0] for e in ordered], size))
        self.shard_of = {name: s for s in self.shards for name in s.names}
        self.index_path = None if self.single or n == 1 else os.path.join(self.out, INDEX_NAME)
        self._check_not_inputs(input_files)
        self._created_dir = False

    @property
    def paths(self) -> list:
        return [s.path for s in self.shards] + ([self.index_path] if self.index_path else [])

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def _check_not_inputs(self, input_files):
        inputs = {os.path.realpath(p) for p in input_files}
        for p in self.paths:
            if os.path.realpath(p) in inputs:
                raise PlanError(f"{p}: the output would overwrite an input")
        if not self.single and any(os.path.dirname(p) == os.path.realpath(self.out) for p in inputs):
            raise PlanError(f"{self.out}: the output directory holds an input checkpoint")

    # -- files --------------------------------------------------------------------------------------
    def create(self) -> None:
        """Creates every output file as a temporary (unnamed where the OS allows) and writes its header."""
        try:
            if not os.path.isdir(self.directory):
                if os.path.exists(self.directory):
                    raise OutputError(f"{self.directory}: exists and is not a directory")
                os.makedirs(self.directory)
                self._created_dir = True
            for s in self.shards:
                self._open_temp(s)
                _pwrite_all(s.fd, s.header, 0, s.path)
                # Sizing the file up front makes a full disk fail here, before the merge does any work,
                # on file systems that allocate eagerly (tmpfs, ext4 via fallocate).
                os.ftruncate(s.fd, s.size)
                if hasattr(os, "posix_fallocate") and s.size > len(s.header):
                    try:
                        os.posix_fallocate(s.fd, len(s.header), s.size - len(s.header))
                    except OSError as exc:
                        if exc.errno == errno.ENOSPC:
                            raise
        except OSError as exc:
            self.abort()
            raise OutputError(f"{getattr(exc, 'filename', None) or self.out}: cannot write ({exc.strerror})") from None
        except BaseException:
            self.abort()
            raise

    def _open_temp(self, s: ShardLayout) -> None:
        # A named temporary beside the target (O_TMPFILE + linkat would survive a kill -9 without debris,
        # but linkat through /proc fails with EXDEV on overlay file systems, so it is not used).
        s.tmp = _temp_name(s.path)
        s.fd = os.open(s.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def commit(self) -> None:
        """Renames every file into place (index last); fsyncs first when durable."""
        try:
            for s in self.shards:
                if self.durable:
                    os.fsync(s.fd)
                os.close(s.fd)
                s.fd = -1
                os.replace(s.tmp, s.path)
                s.tmp = None
            for src in self.aux_files:
                _atomic_write(os.path.join(self.out, os.path.basename(src)), open(src, "rb").read(), self.durable)
            if self.index_path:
                index = {
                    "metadata": {"total_size": sum(s.size - len(s.header) for s in self.shards)},
                    "weight_map": {n: os.path.basename(s.path) for s in self.shards for n in sorted(s.names)},
                }
                index["weight_map"] = dict(sorted(index["weight_map"].items()))
                _atomic_write(self.index_path, (json.dumps(index, indent=2) + "\n").encode(), self.durable)
            if self.durable:
                _fsync_dir(self.directory)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.out}: cannot commit the output ({exc.strerror})") from None

    def abort(self) -> None:
        """Removes every temporary file (and a directory this target created); older files stay intact."""
        for s in self.shards:
            if s.fd >= 0:
                os.close(s.fd)
                s.fd = -1
            if s.tmp is not None:
                try:
                    os.unlink(s.tmp)
                except FileNotFoundError:
                    pass
                s.tmp = None
        if self._created_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._created_dir = False


def _pwrite_all(fd: int, data, offset: int, path: str = "") -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        written = os.pwrite(fd, view[done:], offset + done)
        if written <= 0:  # pragma: no cover - pwrite raises rather than returning 0 on a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        done += written


def _temp_name(path: str) -> str:
    """A hidden name beside `path`; `.pysoup-tmp-` marks it as ours."""
    return os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.pysoup-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    )


def _atomic_write(path: str, data: bytes, durable: bool) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Buffer:
    """Anonymous page-aligned memory (so the kernels can use streaming stores), without numpy."""

    def __init__(self, nbytes: int):
        self.mem = mmap.mmap(-1, nbytes)
        self.view = memoryview(self.mem)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))


class FileSink:
    """Streams computed bytes into the output files, in layout order, through two buffers: the kernel fills
    one while a writer thread hands the other to the kernel with pwrite (both release the GIL)."""

    def __init__(self, target: OutputTarget, buffer_bytes: int):
        self.target = target
        self.capacity = buffer_bytes
        self._bufs = [_Buffer(buffer_bytes) for _ in range(2)]
        self._pending = [None, None]
        self._cur = 0
        self._fill = 0
        self._shard = None
        self._offset = 0  # file offset where the current buffer starts
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pysoup-writer")

    def begin_tensor(self, name: str) -> None:
        shard = self.target.shard_of[name]
        begin = shard.offsets[name][0]
        if shard is not self._shard or begin != self._offset + self._fill:
            self._flush()
            self._shard = shard
            self._offset = begin

    def available(self) -> int:
        return self.capacity - self._fill

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.available():
            self._flush()
        return self._bufs[self._cur].address + self._fill

    def advance(self, nbytes: int) -> None:
        self._fill += nbytes

    def flush_if_full(self) -> None:
        if self._fill == self.capacity:
            self._flush()

    def _flush(self) -> None:
        if self._fill:
            shard, buf, fill, offset = self._shard, self._bufs[self._cur].view, self._fill, self._offset
            self._pending[self._cur] = self._pool.submit(_pwrite_all, shard.fd, buf[:fill], offset, shard.path)
            self._cur ^= 1
            self._offset += fill
            self._fill = 0
            self._wait(self._cur)

    def _wait(self, i: int) -> None:
        fut, self._pending[i] = self._pending[i], None
        if fut is not None:
            try:
                fut.result()
            except OSError as exc:
                raise OutputError(
                    f"{self._shard.path if self._shard else self.target.out}: write failed "
                    f"({exc.strerror}); nothing was written at the target"
                ) from None

    def finish(self) -> None:
        try:
            self._flush()
            self._wait(0)
            self._wait(1)
        finally:
            self._pool.shutdown(wait=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class MemorySink:
    """Writes each output tensor straight into a fresh torch tensor (the in-memory API's result)."""

    def __init__(self, entries):
        import torch

        from pysoup.dtypes import to_torch

        self.tensors = {name: torch.empty(shape, dtype=to_torch(dtype)) for name, dtype, shape in entries}
        self.capacity = 1 << 62
        self._name = None
        self._fill = 0

    def begin_tensor(self, name):
        self._name, self._fill = name, 0

    def available(self):
        return self.capacity

    def reserve(self, nbytes):
        return self.tensors[self._name].data_ptr() + self._fill

    def advance(self, nbytes):
        self._fill += nbytes

    def flush_if_full(self):
        pass

    def finish(self):
        pass

    def close(self):
        pass

"""The output side: lay out every output file before any data is computed, write through temporary files
beside the target, and rename them into place only when everything succeeded.

A single-file target is `OUT.safetensors`; any other target is a Hugging Face directory: one
`model.safetensors`, or shards `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`
(written last), and the first input's non-weight files copied beside them.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import json
import mmap
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pysoup.errors import OutputError, PlanError
from pysoup.io.checkpoint import INDEX_NAME, SINGLE_NAME
from pysoup.io.format import build_header
from pysoup.io.reader import changed_while_read
from pysoup.io.signals import deferred_termination
from pysoup.io.table import TensorTable, metadata_member
from pysoup.io.temporary import TempFile, _libc, remove_stale_temporaries

DEFAULT_SHARD_BYTES = 5 * 1000**3  # what transformers' save_pretrained uses


@dataclass
class ShardLayout:
    """One output file: rows [start, stop) of the output's layout table, whose begin / end are absolute offsets in
    this file once it is laid out."""

    path: str  # final path
    layout: object  # TensorTable of every output tensor, in write order
    start: int
    stop: int
    metadata: str  # the header's "__metadata__" member, as metadata_member() writes it
    header_size: int
    size: int = 0
    temp: TempFile | None = None  # while being written
    _written: bytes | None = None  # the header, when build_header made it

    @property
    def header(self) -> bytes:
        """The header bytes, made anew on each use: for 10^6 tensors they are 91 MB, not worth keeping for the
        whole merge once written (0.2 s to make)."""
        if self._written is not None:
            return self._written
        return self.layout.write_header(self.start, self.stop, self.metadata)

    @property
    def fd(self) -> int:
        return self.temp.fd

    @property
    def names(self) -> list:
        return self.layout.names(self.start, self.stop)


def _layout_table(entries):
    """The output tensors as a TensorTable in the safetensors package's write order: a plan's layout as it is
    (`entries.table`), other (name, dtype, shape) entries sorted."""
    table = getattr(entries, "table", None)
    if table is not None:
        return table
    entries = list(entries)
    zeros = [0] * len(entries)
    table = TensorTable.from_entries(
        [e[0] for e in entries], [e[1] for e in entries], [list(e[2]) for e in entries], zeros, zeros
    )
    return table.permuted(table.canonical_order(None))


def _lay_out_shard(path: str, layout, start: int, stop: int, metadata) -> ShardLayout:
    """Lays out rows [start, stop) as `safetensors` would (their offsets, the header's size): the header is written
    in C++ (0.2 s for 10^6 tensors where build_header took 2.5 s for 10^5)."""
    member = metadata_member(metadata)
    header = layout.write_header(start, stop, member)
    written = None
    if header is None:  # a name the C++ writer leaves to build_header (not valid UTF-8, or "__metadata__")
        entries = [(layout.name(i), layout.dtype(i), layout.shape(i)) for i in range(start, stop)]
        header, offsets, _ = build_header(entries, metadata)
        for i, (name, _, _) in zip(range(start, stop), entries):
            layout.set_range(i, *offsets[name])
        written = header
    size = layout.end(stop - 1) if stop > start else len(header)
    return ShardLayout(path, layout, start, stop, member, len(header), size, _written=written)


# Weight files a Hugging Face directory output may hold; an older output's ones that the new output does not
# have are removed after the new index is in place (else a reader could mix shards of two merges).
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|" + re.escape(INDEX_NAME))


class OutputTarget:
    """Every file of one merge output, laid out up front, committed atomically.

    Every byte of the output (weights, index, copied config and tokenizer files) is written to temporaries
    beside the targets before the first rename, so a full disk fails before anything is replaced; the renames
    come last, the index after the shards.

    Args:
        out: a path ending in .safetensors (one file) or a directory.
        entries: (name, safetensors dtype, shape) of every output tensor.
        shard_size: max bytes of tensor data per shard (directory outputs only).
        metadata: the __metadata__ of every output file.
        input_files: every input file; writing over one (by path, link or bind mount) is refused.
        aux_files: files beside a directory output: a path (copied under its own name) or a (name, bytes) pair
            (written: a config.json that states the merge's dtype, an adapter_config.json).
        durable: fsync files and directory before and after the renames.
        weights_name: the file name of a one-shard directory output (PEFT adapters: adapter_model.safetensors).
    """

    def __init__(
        self,
        out,
        entries,
        *,
        shard_size=None,
        metadata=None,
        input_files=(),
        aux_files=(),
        durable=False,
        weights_name=SINGLE_NAME,
    ):
        self.out = os.path.abspath(os.fspath(out))
        self.single = self.out.endswith(".safetensors")
        if self.single and shard_size is not None:
            raise PlanError(f"{out}: a shard size needs a directory output, not a single .safetensors file")
        self.directory = os.path.dirname(self.out) if self.single else self.out
        self.durable = durable
        self.aux_files = list(aux_files) if not self.single else []
        self.layout = _layout_table(entries)
        total = len(self.layout)
        bounds = [0, total] if self.single else self.layout.shard_bounds(shard_size or DEFAULT_SHARD_BYTES)
        n = len(bounds) - 1
        self.shards = []
        for i in range(n):
            if self.single:
                path = self.out
            elif n == 1:
                path = os.path.join(self.out, weights_name)
            else:
                path = os.path.join(self.out, f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            self.shards.append(_lay_out_shard(path, self.layout, bounds[i], bounds[i + 1], metadata))
        self._shard_starts = bounds[:-1]
        self.index_path = None if self.single or n == 1 else os.path.join(self.out, INDEX_NAME)
        self._check_not_inputs(input_files)
        self._created_dirs = []
        self._extras = []  # TempFiles of the index and the copied files
        self._stale = []

    def shard_at(self, k: int) -> ShardLayout:
        """The shard holding output tensor k (a row of `layout`)."""
        return self.shards[bisect.bisect_right(self._shard_starts, k) - 1]

    @property
    def paths(self) -> list:
        return [s.path for s in self.shards] + ([self.index_path] if self.index_path else [])

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def _aux_path(self, src) -> str:
        name = src[0] if isinstance(src, tuple) else os.path.basename(src)
        return os.path.join(self.out, name)

    def _check_not_inputs(self, input_files) -> None:
        # By device and inode, not by path: a bind mount, a hard link or a symlink of an input is the input.
        inputs = {}
        for p in input_files:
            key = _identity(p)
            if key is not None:  # an input removed since it was opened cannot be overwritten
                inputs[key] = p
        for p in self.paths + [self._aux_path(a) for a in self.aux_files]:
            key = _identity(p)
            if key in inputs:
                raise PlanError(f"{p}: the output would overwrite an input ({inputs[key]})")
        if not self.single:
            out_dir = _identity(self.out)
            held = next((p for p in inputs.values() if out_dir and _identity(os.path.dirname(p)) == out_dir), None)
            if held:
                raise PlanError(f"{self.out}: the output directory holds an input checkpoint ({held})")

    # -- files --------------------------------------------------------------------------------------
    def create(self) -> None:
        """Creates every output file as a temporary (unnamed where the OS allows) and writes its header, the
        index and the copied files, so that only the tensor data remains to be written."""
        # Signals wait while temporaries are made: one that lands between a file's creation and its recording
        # here would leave a file abort() does not know (the work is short: headers, fallocate, small copies).
        try:
            with deferred_termination():
                self._create()
        except BaseException:  # also a signal held back, raised on leaving the block
            self.abort()
            raise

    def _create(self) -> None:  # create() removes whatever this made when it fails
        where = self.out
        try:
            self._created_dirs = _make_directories(self.directory)
            remove_stale_temporaries(self.directory)
            sparse = []  # shards on tmpfs, not allocated up front: their free space is checked below
            for s in self.shards:
                where = s.path
                s.temp = TempFile(s.path)
                _pwrite_all(s.fd, s.header, 0, s.path)
                # Sizing the file up front makes a full disk fail here, before the merge does any work,
                # on file systems that allocate eagerly (ext4 via fallocate). Not on tmpfs: there fallocate only
                # zeroes every page up front, serially, which pwrite would do anyway page by page on the writer
                # thread, beside the kernels (a 1 GiB output on /dev/shm: fallocate 0.59 s + pwrite 0.44 s, pwrite
                # into the hole 1.02 s; a 1 GiB LoRA fold spent 0.56 s of its wall time in fallocate); its free
                # space is checked instead, below.
                os.ftruncate(s.fd, s.size)
                if s.size > s.header_size and _on_tmpfs(s.fd):
                    sparse.append(s)
                elif hasattr(os, "posix_fallocate") and s.size > s.header_size:
                    try:
                        os.posix_fallocate(s.fd, s.header_size, s.size - s.header_size)
                    except OSError as exc:
                        if exc.errno == errno.ENOSPC:
                            raise
            for src in self.aux_files:
                where = self._aux_path(src)
                written = isinstance(src, tuple)
                self._extras.append(_temp_bytes(src[1], where) if written else _temp_copy(src, where))
            if self.index_path:
                where = self.index_path
                self._extras.append(_temp_bytes(self._index_bytes(), where))
            if sparse:  # the tensor data not allocated above must fit in what the file system has left
                where = sparse[0].path
                st = os.fstatvfs(sparse[0].fd)
                if st.f_bavail * st.f_frsize < sum(s.size - s.header_size for s in sparse):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if not self.single:
                keep = {os.path.basename(p) for p in self.paths}
                self._stale = sorted(f for f in os.listdir(self.out) if _WEIGHT_FILE.fullmatch(f) and f not in keep)
        except OSError as exc:
            raise OutputError(f"{where}: cannot write ({exc.strerror})") from None

    def share(self) -> list:
        """Gives every shard's temporary its hidden name and returns the names, in shard order: other processes
        (the tasks of a distributed merge, pysoup.distributed) open them with attach() to write tensor data. They
        carry this process's host and PID, so the next merge into the directory removes them if it dies."""
        for s in self.shards:
            s.temp.materialize()
        return [s.temp.name for s in self.shards]

    def attach(self, names: dict) -> None:
        """Opens temporaries that another process's create() and share() made, {shard index: name}, so a FileSink
        writes this target's tensor data into them; detach() closes them. Committing or removing them is left to
        their maker."""
        for i, name in names.items():
            s = self.shards[i]
            try:
                s.temp = _Attached(name, os.open(name, os.O_RDWR | os.O_CLOEXEC))
            except OSError as exc:
                self.detach()
                raise OutputError(f"{s.path}: cannot open its temporary {name} ({exc.strerror})") from None
            if os.fstat(s.temp.fd).st_size != s.size:
                self.detach()
                raise OutputError(f"{s.path}: its temporary {name} is not laid out as this merge's output")

    def detach(self, durable: bool = False) -> None:
        """Closes the temporaries attach() opened (fsyncing them first when `durable`)."""
        for s in self.shards:
            if isinstance(s.temp, _Attached):
                try:
                    if durable:
                        os.fsync(s.temp.fd)
                finally:
                    os.close(s.temp.fd)
                    s.temp = None

    def _index_bytes(self) -> bytes:
        weight_map = {n: os.path.basename(s.path) for s in self.shards for n in s.names}
        index = {
            "metadata": {"total_size": sum(s.size - s.header_size for s in self.shards)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        return (json.dumps(index, indent=2) + "\n").encode()

    @contextlib.contextmanager
    def streaming(self, buffer_bytes: int):
        """create(), then a FileSink for the block to write through; commit() when the block ends, abort() (and
        nothing at the target changes) when it raises."""
        sink = None
        try:
            self.create()
            sink = FileSink(self, buffer_bytes)
            yield sink
            self.commit()
        except BaseException:
            if sink is not None:
                sink.close()
            self.abort()
            raise

    def commit(self) -> None:
        """Renames every file into place (the index last), then removes an older output's stale weight files;
        fsyncs first when durable. Termination signals wait from the first name given to the last rename."""
        temps = [s.temp for s in self.shards] + self._extras
        try:
            if self.durable:
                for temp in temps:
                    os.fsync(temp.fd)
            with deferred_termination():
                for temp in temps:
                    temp.materialize()  # may need space for a directory entry: before any rename
                for temp in temps:
                    temp.replace()
                for name in self._stale:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.out, name))
            for s in self.shards:
                s.temp = None
            self._extras = []
            if self.durable:
                _fsync_dir(self.directory)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.out}: cannot commit the output ({exc.strerror})") from None

    def abort(self) -> None:
        """Removes every temporary file and every directory this target created; older files stay intact."""
        with deferred_termination():  # a second signal must not cut the cleanup short
            self._abort()

    def _abort(self) -> None:
        for temp in [s.temp for s in self.shards] + self._extras:
            if temp is not None:
                temp.discard()
        for s in self.shards:
            s.temp = None
        self._extras = []
        for d in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only if still empty: never what another process put there
        self._created_dirs = []


@dataclass
class _Attached:
    """A temporary another process made, opened here to write into (OutputTarget.attach)."""

    name: str
    fd: int


def _identity(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _make_directories(directory: str) -> list:
    """Creates `directory` and its missing parents; returns the ones this call created, outermost first.
    Another process creating the same directory at the same time is not an error."""
    missing = []
    d = directory
    while not os.path.isdir(d):
        if os.path.lexists(d):
            raise OutputError(f"{d}: exists and is not a directory")
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    created = []
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d)
                created.append(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise OutputError(f"{d}: exists and is not a directory") from None
    except BaseException:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    return created


_TMPFS_MAGIC = 0x01021994  # linux/magic.h


def _on_tmpfs(fd: int) -> bool:
    """Whether fd's file system is tmpfs (Linux fstatfs's f_type, the first field of struct statfs, a long on
    x86-64 and arm64); False wherever that cannot be told, so the file is allocated eagerly."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on x86-64
        if _libc().fstatfs(fd, buf) != 0:
            return False
        return ctypes.c_long.from_buffer(buf).value == _TMPFS_MAGIC
    except (OSError, AttributeError):
        return False


def _pwrite_all(fd: int, data, offset: int, path: str = "") -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        written = os.pwrite(fd, view[done:], offset + done)
        if written <= 0:  # pragma: no cover - pwrite raises rather than returning 0 on a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        done += written


# copy_file_range's refusals that mean "not between these files" (other file systems before Linux 5.3 and again
# since 5.19, file systems without it, no such call): the bytes are then read and written here.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_COPY_STEP = 8 << 20


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int, source: str, path: str) -> None:
    """Copies nbytes from src at src_offset to dst at dst_offset, in the kernel where it can (no user-space
    buffer), else through an 8 MiB one. A source that ends early changed under the copy: a FormatError."""
    done = 0
    copy_range = getattr(os, "copy_file_range", None)
    while done < nbytes:
        if copy_range is not None:
            try:
                n = copy_range(src, dst, nbytes - done, src_offset + done, dst_offset + done)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                copy_range = None
                continue
        else:
            data = os.pread(src, min(_COPY_STEP, nbytes - done), src_offset + done)
            n = len(data)
            if n:
                _pwrite_all(dst, data, dst_offset + done, path)
        if n == 0:
            raise changed_while_read(source, "it ended early")
        done += n


def _temp_bytes(data: bytes, path: str) -> TempFile:
    temp = TempFile(path)
    try:
        _pwrite_all(temp.fd, data, 0, path)
    except BaseException:
        temp.discard()
        raise
    return temp


def _temp_copy(src: str, path: str) -> TempFile:
    temp = TempFile(path)
    try:
        with open(src, "rb") as f:
            offset = 0
            while chunk := f.read(1 << 20):
                _pwrite_all(temp.fd, chunk, offset, path)
                offset += len(chunk)
    except BaseException:
        temp.discard()
        raise
    return temp


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
    one while a writer thread hands the other to the kernel with pwrite (both release the GIL). Output tensors are
    addressed by their row in the target's layout; a run of them in one file lies back to back (`runs`)."""

    runs = True

    def __init__(self, target: OutputTarget, buffer_bytes: int):
        self.target = target
        self.capacity = buffer_bytes
        self._bufs = [_Buffer(buffer_bytes) for _ in range(2)]
        self._pending = [None, None]
        self._cur = 0
        self._fill = 0
        self._shard = None
        self._offset = 0  # file offset where the current buffer starts
        self._copies = []  # write_from's copies still queued or running on the writer thread
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pysoup-writer")

    def begin_tensor(self, k: int) -> None:
        shard = self.target.shard_at(k)
        begin = self.target.layout.begin(k)
        if shard is not self._shard or begin != self._offset + self._fill:
            self._flush()
            self._shard = shard
            self._offset = begin

    def run_end(self, k: int) -> int:
        """The end of the run of output tensors from k that lie back to back: the end of k's file."""
        return self.target.shard_at(k).stop

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

    def write_from(self, fd: int, offset: int, nbytes: int, source: str) -> None:
        """Writes `nbytes` of the file `fd` (named `source` in errors) from `offset` as the next bytes of the output,
        after whatever the buffers hold: copied file to file by the writer thread (copy_file_range: the source is
        neither mapped nor passed through a buffer), while the caller goes on filling buffers. An opt-in of the
        LoRA fold for the tensors it copies unchanged; the merges write every byte through the buffers. A failed
        copy raises here, at a later flush or at finish(), so nothing is committed."""
        if nbytes <= 0:
            return
        self._flush()
        self._check_copies(False)
        shard = self._shard
        self._copies.append(
            self._pool.submit(_copy_range, fd, offset, shard.fd, self._offset, nbytes, source, shard.path)
        )
        self._offset += nbytes

    def _check_copies(self, wait: bool) -> None:
        """Raises the error of a finished copy (of every copy, waiting for them, when `wait`)."""
        running = []
        for fut in self._copies:
            if wait or fut.done():
                self._result(fut)
            else:
                running.append(fut)
        self._copies = running

    def _wait(self, i: int) -> None:
        fut, self._pending[i] = self._pending[i], None
        if fut is not None:
            self._result(fut)
        if self._copies:
            self._check_copies(False)

    def _result(self, fut) -> None:
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
            self._check_copies(True)
        finally:
            self._pool.shutdown(wait=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class MemorySink:
    """Writes each output tensor straight into a fresh torch tensor (the in-memory API's result); tensor k is the
    k-th entry."""

    runs = False  # every tensor is memory of its own

    def __init__(self, entries):
        import torch

        from pysoup.dtypes import to_torch

        self.tensors = {name: torch.empty(shape, dtype=to_torch(dtype)) for name, dtype, shape in entries}
        self._by_row = list(self.tensors.values())
        self.capacity = 1 << 62
        self._tensor = None
        self._fill = 0

    def begin_tensor(self, k):
        self._tensor, self._fill = self._by_row[k], 0

    def available(self):
        return self.capacity

    def reserve(self, nbytes):
        return self._tensor.data_ptr() + self._fill

    def advance(self, nbytes):
        self._fill += nbytes

    def flush_if_full(self):
        pass

    def finish(self):
        pass

    def close(self):
        pass


def write_arrays(
    out,
    arrays: dict,
    dtypes: dict,
    *,
    shard_size=None,
    metadata=None,
    buffer_bytes=16 << 20,
    aux_files=(),
    weights_name=SINGLE_NAME,
) -> list:
    """Writes host arrays as a safetensors file (`out` ends in .safetensors) or a Hugging Face directory, through
    the merge's own OutputTarget: laid out up front, written to temporaries, renamed into place.

    Args:
        arrays: {name: numpy array} (bf16 as uint16 bits).
        dtypes: {name: safetensors dtype}.
        shard_size: max tensor bytes per shard (directory outputs).
        metadata: the files' __metadata__.
        aux_files, weights_name: as for OutputTarget (directory outputs).

    Returns:
        The paths written, the index last.
    """
    import numpy as np  # not at the top: a file merge imports neither numpy nor torch

    entries = [(name, dtypes[name], tuple(a.shape)) for name, a in arrays.items()]
    target = OutputTarget(
        out, entries, shard_size=shard_size, metadata=metadata, aux_files=aux_files, weights_name=weights_name
    )
    with target.streaming(buffer_bytes) as sink:
        for k in range(len(target.layout)):
            a = np.ascontiguousarray(arrays[target.layout.name(k)])
            if a.nbytes != target.layout.nbytes(k):
                name, want = target.layout.name(k), target.layout.nbytes(k)
                raise PlanError(f"tensor {name!r}: {a.nbytes} bytes, its dtype and shape take {want}")
            sink.begin_tensor(k)
            pos = 0
            while pos < a.nbytes:
                n = min(sink.capacity, a.nbytes - pos)
                ctypes.memmove(sink.reserve(n), a.ctypes.data + pos, n)
                sink.advance(n)
                sink.flush_if_full()
                pos += n
        sink.finish()
    return target.paths

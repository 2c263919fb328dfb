"""SafetensorsReader: a validated, lazily read safetensors file.

Two ways in: `window_address` serves the engine through a sliding read-only mapping (one window per reader,
moved forward as the merge proceeds and unmapped behind it, so resident memory stays bounded), and
`numpy` / `torch` give users zero-copy views through a whole-file mapping.
"""

from __future__ import annotations

import mmap
import os
import stat

from pysoup._native import native
from pysoup.errors import FormatError
from pysoup.io.format import TensorInfo, parse_header_table
from pysoup.io.table import TensorInfos

# 8 MiB per input, one bf16 chunk of the engine (execute.CHUNK_ELEMENTS; a larger chunk maps a larger window):
# mapping costs vanish (one mmap per 8 MiB), and 8 inputs stay under 64 MiB resident. 16 MiB windows held 32 MiB
# more for base + 3 inputs (task_arithmetic, base + 3 x 512 MiB: 127.9 against 94.3 MB peak RSS) at the same speed
# (in-process, 3 alternating pairs: 1.01-1.12 s with 8 MiB, 1.07-1.15 s with 16). Read when a reader is made, so
# that tests can shrink it.
DEFAULT_WINDOW_BYTES = 8 << 20


def changed_while_read(path: str, how: str = "another process wrote or truncated it") -> FormatError:
    """The error of an input that changed while it was being read (`how`: what was seen): nothing is written."""
    return FormatError(f"{path}: changed while being read ({how}); nothing was written")


def file_identity(st: os.stat_result) -> tuple:
    """What changes when a file is replaced, truncated or written: device, inode, size, mtime and ctime (ctime
    cannot be set back by a writer, unlike mtime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class SafetensorsReader:
    """One safetensors file, header validated on open; tensor data is read only when asked.

    Example:
        >>> r = SafetensorsReader("model.safetensors")   # doctest: +SKIP
        >>> r.infos["lm_head.weight"].shape               # doctest: +SKIP
    """

    def __init__(self, path: str, window_bytes: int | None = None):
        self.path = os.fspath(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a directory, not a safetensors file") from None
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot open ({exc.strerror})") from None
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{self.path}: not a regular file (a FIFO, socket or device cannot be a checkpoint)")
            self.file_size = st.st_size
            self.identity = file_identity(st)
            prefix = os.pread(self._fd, 8, 0)
            self.metadata, self.table, self.data_start = parse_header_table(
                self.path, prefix, self.file_size, lambda n: os.pread(self._fd, n, 8)
            )
        except BaseException:
            os.close(self._fd)
            raise
        self.infos = TensorInfos(self.table)  # name -> TensorInfo, in file order
        self._window_bytes = DEFAULT_WINDOW_BYTES if window_bytes is None else window_bytes
        self._window = None
        self._whole = None
        self._faulted = False  # a page of one of our windows went missing (see csrc/io/fault_guard.cpp)

    def check_unchanged(self) -> None:
        """Raises FormatError if the file changed since it was opened: its size, inode or modification time
        differ, or a mapped page vanished under a read (the file shrank). A merge calls this before it commits.
        """
        if self._window is not None and self._window.faulted():
            self._faulted = True
        if self._faulted or file_identity(os.fstat(self._fd)) != self.identity:
            raise changed_while_read(self.path)

    @property
    def fd(self) -> int:
        """The open file's descriptor (valid until close())."""
        return self._fd

    # -- engine path -------------------------------------------------------------------------------
    def window_address(self, lo: int, hi: int) -> int:
        """Address of file bytes [lo, hi), valid until the next call on this reader or close()."""
        w = self._window
        if w is not None and w.offset <= lo and hi <= w.offset + w.length:
            return w.address + (lo - w.offset)
        if w is not None:
            self.release()
            if self._faulted:  # fail at once rather than merge the rest of a truncated file
                self.check_unchanged()
        length = min(max(hi - lo, self._window_bytes), self.file_size - lo)
        # Not populated: the kernels' threads fault the pages in as they read them, in parallel and overlapped with
        # their arithmetic, where MAP_POPULATE faulted a whole window in on this thread while they waited (ramplus_tl,
        # base + 3 x 512 MiB, 3 alternating pairs: 3.5-5.1 s against 4.0-7.2 s; the linear merge unchanged).
        self._window = native.MappedRegion(self._fd, lo, length, False)
        return self._window.address

    def release(self) -> None:
        """Unmaps the current window (the page cache keeps the data; our resident memory drops)."""
        if self._window is not None:
            self._faulted = self._faulted or self._window.faulted()  # the mark goes with the mapping
            self._window.close()
            self._window = None

    # -- user path ---------------------------------------------------------------------------------
    def _mapping(self):
        if self._whole is None:
            # Copy-on-write: views are writable (torch wants that) yet the file is never modified.
            self._whole = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY) if self.file_size else b""
        return self._whole

    def numpy(self, name: str):
        """Zero-copy numpy view of a tensor. bfloat16 comes back as its raw uint16 bits (numpy has no bf16)."""
        import numpy as np

        t = self._info(name)
        np_dtype = {"BF16": "<u2", "F8_E5M2": "u1", "F8_E4M3": "u1", "BOOL": "?"}.get(t.dtype)
        if np_dtype is None:
            np_dtype = "<" + {"F": "f", "I": "i", "U": "u"}[t.dtype[0]] + str(t.itemsize)
        return np.frombuffer(self._mapping(), dtype=np_dtype, count=t.numel, offset=t.begin).reshape(t.shape)

    def torch(self, name: str):
        """Zero-copy torch tensor of a tensor (copy-on-write: writing to it never touches the file)."""
        import torch

        from pysoup.dtypes import to_torch

        t = self._info(name)
        if t.numel == 0:
            return torch.empty(t.shape, dtype=to_torch(t.dtype))
        flat = torch.frombuffer(self._mapping(), dtype=torch.uint8, count=t.nbytes, offset=t.begin)
        return flat.view(to_torch(t.dtype)).reshape(t.shape)

    def _info(self, name) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def close(self) -> None:
        self.release()
        if self._whole is not None and not isinstance(self._whole, bytes):
            try:
                self._whole.close()
            except BufferError:
                pass  # views are still alive; the mapping goes when they do
            self._whole = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if getattr(self, "_fd", -1) >= 0:
                self.close()
        except Exception:
            pass

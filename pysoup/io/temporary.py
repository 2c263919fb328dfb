"""Temporary files beside their final path, and the sweep of those a killed process left behind.

Where the file system supports it, a temporary has no name at all (O_TMPFILE) until the commit links it in
just before renaming it over the target: a process killed with SIGKILL while merging leaves nothing behind.
Linking an unnamed file takes linkat(fd, "", AT_EMPTY_PATH) (allowed with CAP_DAC_READ_SEARCH, and for a
file's own opener since Linux 6.10) or linkat("/proc/self/fd/N", AT_SYMLINK_FOLLOW) (fails with EXDEV on
overlay file systems and in some VMs). Where neither works, a temporary is a hidden file named
`.NAME.pysoup-tmp-HOST-PID-RANDOM`; the next merge into the same directory removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import secrets
import socket

# Which host wrote a temporary: on a directory shared between machines, a PID says nothing about another host.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(r"\..+\.pysoup-tmp-([0-9a-f]{8})-(\d+)-[0-9a-f]{8}")
_unnamed_works: dict = {}  # st_dev -> whether O_TMPFILE + linkat work there


def temp_name(path: str) -> str:
    """A hidden name beside `path`; `.pysoup-tmp-` marks it as ours, the host and PID as whose."""
    return os.path.join(
        os.path.dirname(path),
        f".{os.path.basename(path)}.pysoup-tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}",
    )


class TempFile:
    """A file being written that becomes `path` on `replace()`, or vanishes on `discard()`.

    Example:
        >>> t = TempFile("out/config.json")   # doctest: +SKIP
        >>> os.write(t.fd, b"{}"); t.materialize(); t.replace()   # doctest: +SKIP
    """

    def __init__(self, path: str):
        self.path = path
        self.name = None  # the temporary's name, once it has one
        directory = os.path.dirname(path) or "."
        if _unnamed_temporaries_work(directory):
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
        else:
            name = temp_name(path)
            self.fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            self.name = name

    def materialize(self) -> None:
        """Gives an unnamed temporary its hidden name (needed before a rename can replace the target)."""
        if self.name is None:
            name = temp_name(self.path)
            _link_unnamed(self.fd, name)
            self.name = name

    def replace(self) -> None:
        """Closes the file and renames it over its final path (atomic)."""
        self.materialize()
        self._close()
        os.replace(self.name, self.path)
        self.name = None

    def discard(self) -> None:
        """Closes and removes the temporary; never raises."""
        self._close()
        if self.name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.name)
            self.name = None

    def _close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000


@functools.cache
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _link_unnamed(fd: int, name: str) -> None:
    """Gives the O_TMPFILE file `fd` the name `name`, by either way of linkat that works here."""
    if _libc().linkat(fd, b"", _AT_FDCWD, os.fsencode(name), _AT_EMPTY_PATH) == 0:
        return
    os.link(f"/proc/self/fd/{fd}", name)


def _unnamed_temporaries_work(directory: str) -> bool:
    """Probes once per file system: O_TMPFILE, then linking it in through /proc (EXDEV on overlayfs, ENOENT
    without /proc, EOPNOTSUPP on file systems without O_TMPFILE)."""
    if not hasattr(os, "O_TMPFILE"):
        return False
    try:
        dev = os.stat(directory).st_dev
    except OSError:
        return False
    if dev not in _unnamed_works:
        works = False
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            fd = -1
        if fd >= 0:
            probe = temp_name(os.path.join(directory, "probe"))
            try:
                _link_unnamed(fd, probe)
                os.unlink(probe)
                works = True
            except OSError:
                pass
            finally:
                os.close(fd)
        _unnamed_works[dev] = works
    return _unnamed_works[dev]


def remove_stale_temporaries(directory: str) -> list:
    """Removes the temporaries that pysoup processes of this host left in `directory` when they were killed
    (their PID no longer runs). Returns the names removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_NAME.fullmatch(name)
        if m is None or m.group(1) != _HOST or _process_runs(int(m.group(2))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:
        return exc.errno == errno.EPERM  # it runs, as another user
    return True

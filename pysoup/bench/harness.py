"""The timing harness of the benchmark suites, and nothing about what they measure: whole processes timed by a
launcher that reports the child's own peak RSS, functions timed in rotated rounds, medians with their spread, the
machine line, and the work directory every suite writes into (removed afterwards, also on Ctrl-C and SIGTERM)."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# Runs one command and reports its wall time and its own peak RSS. It is a separate small process because
# Linux carries the peak RSS across fork+exec: a child forked straight from a large benchmark runner would
# report the runner's size.
_LAUNCHER = """
import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
dt = time.perf_counter() - t
sys.stderr.write(f"\\nPYSOUP_LAUNCHER {dt} {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_process(cmd: list, env: dict | None = None, timeout: float = 1800, cwd: str | None = None) -> dict:
    """Runs one command to completion and measures it.

    The launcher and the command run in a session of their own, so a Ctrl-C meant for the runner does not
    reach them halfway through a write; if the runner is interrupted, or the command outlives `timeout`, the
    whole session is killed before the exception propagates (nothing keeps writing into a directory that is
    being removed).

    Args:
        cmd: the command line (argv list).
        env: its environment (default: this process's).
        timeout: seconds before it is killed.
        cwd: its working directory.

    Returns:
        {"seconds": wall seconds, "peak_rss_bytes": the command's own peak RSS, "rc": its exit status,
        "stderr": the last 2,000 characters of its stderr}.

    Example:
        >>> run_process([sys.executable, "-c", "pass"])["rc"]
        0
    """
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", _LAUNCHER, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except BaseException:
        _kill_session(proc)
        raise
    stderr = err.decode(errors="replace")
    head, found, tail = stderr.rpartition("PYSOUP_LAUNCHER ")
    if not found:  # the launcher itself failed
        return {"seconds": float("nan"), "peak_rss_bytes": 0, "rc": proc.returncode or 1, "stderr": stderr[-2000:]}
    seconds, maxrss_kib = tail.split()
    return {
        "seconds": float(seconds),
        "peak_rss_bytes": int(maxrss_kib) * 1024,
        "rc": proc.returncode,
        "stderr": head[-2000:],
    }


def as_installed(env: dict) -> dict:
    """env for contenders that import pysoup as an installed pysoup does: its modules byte-compiled first (into their
    __pycache__ directories, which git ignores) and PYTHONDONTWRITEBYTECODE dropped. pip compiles a package's modules
    when it installs it (the other contenders' packages in site-packages were compiled so); where that variable is
    set, as in some sandboxes, an editable pysoup would compile its modules again in every run (~0.1 s of each)."""
    import compileall

    import pysoup

    compileall.compile_dir(os.path.dirname(pysoup.__file__), quiet=1)
    return {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}


def raise_on_failure(res: dict, contender: str, case: str) -> None:
    """A one-line error naming the contender, the case and the last line its stderr printed, if it failed."""
    if res["rc"] != 0:
        from pysoup.errors import SoupError

        lines = [line for line in res["stderr"].splitlines() if line.strip()]
        raise SoupError(f"{contender} failed on {case} (exit {res['rc']}): {lines[-1] if lines else 'no message'}")


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def summarize(values: list) -> dict:
    """Median, min, max, count and the relative spread (max - min) / median of a list of timings."""
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else 0.0,
        "n": len(values),
    }


def rotated(names: list, round_: int) -> list:
    """The order of round `round_`: who goes first changes every round, so no contender always follows another."""
    k = round_ % len(names) if names else 0
    return names[k:] + names[:k]


def interleaved(fns: dict, runs: int) -> dict:
    """Each function once to warm up, then `runs` rounds in rotated order; a summarize() of each one's times."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for r in range(runs):
        for name in rotated(list(fns), r):
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: summarize(ts) for name, ts in times.items()}


def sync() -> None:
    """Flushes dirty pages so one run's writeback does not land in the next run's timing."""
    os.sync()


def warm_page_cache(paths: list) -> None:
    """Reads every file once (the files of a directory, not recursively), so each contender starts warm."""
    for p in paths:
        files = [os.path.join(p, f) for f in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
        for path in files:
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    while f.read(64 << 20):
                        pass


def machine() -> dict:
    """What the results were measured on: CPU, cores, memory, Python, pysoup and its CPU ISA, the date."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import pysoup

    info = pysoup.info()
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "pysoup": info["version"],
        "cpu_isa": info["cpu_isa"],
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def machine_line(m: dict | None = None) -> str:
    """machine() in one line, as results files and the console show it."""
    m = m or machine()
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, pysoup {m['pysoup']} "
        f"({m['cpu_isa']}), {m['date']}"
    )


# tmpfs keeps the outputs' writeback out of the timings; below this much free space beyond what a suite needs,
# the system's temporary directory is used instead.
_SHM = "/dev/shm"
_SHM_MARGIN = 256 << 20


@contextlib.contextmanager
def work_dir(need_bytes: int):
    """A fresh directory for a suite's synthetic checkpoints and outputs, removed when the block ends however it
    ends (an exception, Ctrl-C, or SIGTERM where the caller turns it into an exception).

    Args:
        need_bytes: about how much the suite writes there at most.

    Yields:
        The directory's path: under /dev/shm when it has room, else under the system's temporary directory.

    Example:
        >>> with work_dir(64 << 20) as d:
        ...     os.path.isdir(d)
        True
    """
    parent = tempfile.gettempdir()
    if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(_SHM).free >= need_bytes + _SHM_MARGIN:
                parent = _SHM
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        from pysoup.errors import SoupError

        raise SoupError(
            f"the benchmark needs about {need_bytes / 2**30:.1f} GiB of scratch space; {parent} has "
            f"{free / 2**30:.1f} GiB free (set TMPDIR to a larger file system)"
        )
    path = tempfile.mkdtemp(prefix="pysoup-bench-", dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

"""Timing helpers shared by `pysoup bench` and benchmarks/: whole-process timing with per-child peak RSS,
medians with spread, and a line describing the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
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


def run_process(cmd: list, env: dict | None = None, timeout: float = 1800) -> dict:
    """Runs one command; returns its wall seconds, its own peak RSS, exit code and stderr tail."""
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCHER, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        timeout=timeout,
    )
    stderr = proc.stderr.decode(errors="replace")
    head, _, tail = stderr.rpartition("PYSOUP_LAUNCHER ")
    seconds, maxrss_kib = tail.split()
    return {
        "seconds": float(seconds),
        "peak_rss_bytes": int(maxrss_kib) * 1024,
        "rc": proc.returncode,
        "stderr": head[-2000:],
    }


def summarize(values: list) -> dict:
    """Median, min, max and the relative spread (max - min) / median."""
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else 0.0,
        "n": len(values),
    }


def machine() -> dict:
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


def machine_line() -> str:
    m = machine()
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, pysoup {m['pysoup']} "
        f"({m['cpu_isa']}), {m['date']}"
    )


def markdown_head(report: dict) -> list:
    """The lines every results file starts with: the suite, the machine, the command that made it."""
    return [
        f"# pysoup benchmarks: {report['suite']}",
        "",
        f"Machine: {report['machine_line']}",
        "",
        f"Command: `{report['command']}`",
        "",
    ]


def sync() -> None:
    """Flushes dirty pages so one run's writeback does not land in the next run's timing."""
    os.sync()


def run_suite(quick: bool = False, extra=None) -> int:
    """Runs benchmarks/run.py from the source tree (the suite ships with the repository, not the wheel)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "benchmarks", "run.py")
    if not os.path.isfile(script):
        from pysoup.errors import SoupError

        raise SoupError("the benchmark suite ships with the source tree: clone the repository and run `make bench`")
    cmd = [sys.executable, script] + (["--quick"] if quick else []) + list(extra or [])
    return subprocess.call(cmd)

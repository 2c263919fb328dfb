"""pysoup's benchmark suites, shipped with the package so that `pysoup bench` runs from an installed wheel.

    linear    N inputs x sizes, linear merge; contenders pysoup, the I/O floor, a naive script, mergekit when it is
              installed; plus the in-memory kernel and EMA cases when torch is installed
    methods   every merge method on base + 3 inputs, against the floor and mergekit where it has the method
    headers   files of 10^5 and 10^6 tiny tensors: opening (pysoup.open vs safe_open) and a 2-input merge

Modules: `harness` (timing, the process launcher that measures a child's own peak RSS, medians, the work
directory), `cases` (the file-merge cases), `many_tensors` (the headers suite), `in_memory` (the kernel and EMA
cases), `baselines` (the contenders that are not pysoup, run as scripts), `report` (console table, JSON, markdown,
PNG). The repository's benchmarks/run.py calls `run` and keeps the committed results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from dataclasses import dataclass

from pysoup.bench import cases as merge_cases
from pysoup.bench import in_memory, many_tensors, report
from pysoup.bench.harness import machine, machine_line, work_dir
from pysoup.errors import SoupError

SUITES = ("linear", "methods", "headers")
_LABELS = {"linear": "linear merge", "methods": "merge methods", "headers": many_tensors.SUITE}


@dataclass
class BenchResult:
    """What `run` produced: the report (as written to NAME.json) and the files written."""

    report: dict
    files: list


def default_out_dir() -> str:
    """A new folder under the current directory for one run's results: ./pysoup-bench-YYYYMMDD-HHMMSS."""
    return os.path.abspath(time.strftime("pysoup-bench-%Y%m%d-%H%M%S"))


def run(
    suite: str = "linear",
    out_dir: str | None = None,
    *,
    quick: bool = False,
    name: str | None = None,
    cases: list | None = None,
    methods: list | None = None,
    runs: int | None = None,
    only: list | None = None,
    mergekit: bool = True,
    in_memory_cases: bool = True,
    data_dir: str | None = None,
    force: bool = False,
    command: str | None = None,
    echo=None,
) -> BenchResult:
    """Runs one benchmark suite, prints its table, and writes NAME.json, NAME.md and (with matplotlib) NAME.png.

    Synthetic checkpoints and every contender's output go to a temporary directory (on /dev/shm when it has
    room) that is removed at the end, also after an error, Ctrl-C or SIGTERM.

    Args:
        suite: "linear", "methods" or "headers".
        out_dir: where the results go (created if missing; default: a new ./pysoup-bench-<timestamp>).
        quick: small cases, and torch's and mergekit's processes timed once: seconds instead of minutes.
        name: the results' file stem (default: the suite's name).
        cases: the cases to run instead of the suite's: "4x512MiB" (linear, methods: the size of the 3 inputs),
            "1e5" (headers). An empty list with the linear suite runs only the in-memory cases.
        methods: the methods suite's subset of merge methods.
        runs: timed runs per contender (default 5; 3 for quick runs, the methods suite and 10^6 tensors).
        only: the contenders to run (default all: pysoup, io_floor, naive, mergekit; headers: pysoup_open,
            safe_open, pysoup_merge, io_floor).
        mergekit: False leaves mergekit out even when it is installed.
        in_memory_cases: False leaves out the linear suite's in-memory kernel and EMA cases.
        data_dir: a directory to keep the synthetic checkpoints in between runs (default: the temporary one).
        force: overwrite earlier results of the same name in `out_dir`.
        command: the command line recorded in the results (default: this call).
        echo: where progress and the table go, one line per call (default: print).

    Returns:
        BenchResult with the report and the paths written.

    Raises:
        SoupError: an unknown suite, case or method, an `out_dir` that cannot take the results, or earlier results
            there without `force` (all checked before anything runs).

    Example:
        >>> res = pysoup.bench.run("linear", "bench-results", quick=True)  # doctest: +SKIP
        >>> res.report["cases"][0]["contenders"]["pysoup"]["seconds"]["median"]  # doctest: +SKIP
    """
    if suite not in SUITES:
        raise SoupError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if suite == "headers":
        todo = list(cases) if cases is not None else (many_tensors.QUICK_CASES if quick else many_tensors.FULL_CASES)
        need = many_tensors.scratch_bytes(todo)  # checks the cases
    else:
        todo = merge_cases.suite_cases(suite, quick, cases, methods)  # checks the cases and methods
        need = merge_cases.scratch_bytes(todo, cached_data=data_dir is not None)
    name = name or suite
    if os.path.basename(name) != name or name in (".", ".."):
        raise SoupError(f"results name {name!r}: a file stem without a folder (the folder is out_dir)")
    out_dir = os.path.abspath(out_dir or default_out_dir())
    created = report.check_out_dir(out_dir, name, force)
    req = _Request(suite, todo, quick, runs, only, mergekit, in_memory_cases, echo or _print)
    try:
        from pysoup.io.signals import cleanup_on_termination

        m = machine()
        rep = {
            "suite": _LABELS[suite] if todo or suite != "linear" else "in-memory kernel",
            "machine": m,
            "machine_line": machine_line(m),
            "command": command or f"pysoup.bench.run({suite!r}, quick={quick})",
            "quick": quick,
            "cases": [],
            "notes": [],
        }
        req.echo(rep["machine_line"])
        with cleanup_on_termination(), work_dir(need) as work:
            _measure(req, rep, data_dir or os.path.join(work, "data"), work)
        rep["targets"] = targets(rep)
        if not report.can_plot():
            rep["notes"].append("matplotlib is not installed: no chart")
        for line in rep["targets"] + [f"note: {note}" for note in rep["notes"]]:
            req.echo(line)
        files = report.save(rep, out_dir, name)
    except BaseException:
        if created:  # a folder this run made and did not fill (Ctrl-C, a contender's failure) is not left behind
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        raise
    req.echo(f"wrote {', '.join(files)}")
    return BenchResult(rep, files)


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass
class _Request:
    """What `run` was asked, checked."""

    suite: str
    cases: list  # (strategy, case) pairs; the headers suite: tensor counts
    quick: bool
    runs: int | None
    only: list | None
    mergekit: bool
    in_memory_cases: bool
    echo: object


def _measure(req: _Request, rep: dict, data: str, work: str) -> None:
    os.makedirs(data, exist_ok=True)
    if req.suite == "headers":
        _run_headers(req, rep, data, work)
        return
    _run_merges(req, rep, data, work)
    if req.suite == "linear" and req.in_memory_cases:
        _run_in_memory(req, rep)


def _run_merges(req: _Request, rep: dict, data: str, work: str) -> None:
    from pysoup.bench import baselines

    runs = rep["runs"] = req.runs or (3 if req.quick or req.suite == "methods" else 5)
    mergekit_exe = baselines.mergekit_executable() if req.mergekit else None
    if req.mergekit and mergekit_exe is None:
        rep["notes"].append("mergekit is not installed: not a contender")
    if req.suite == "linear" and not baselines.torch_and_safetensors_available():
        rep["notes"].append("torch or safetensors is not installed: the naive script is the numpy one (naive_numpy)")
    if req.cases:
        req.echo(report.table_header(rep["suite"]))
    for strategy, case in req.cases:
        res = merge_cases.run_case(
            case, runs, data, work, strategy, mergekit_exe, only=req.only, quick=req.quick, echo=req.echo
        )
        rep["cases"].append(res)
        for row in report.table_rows(res):
            req.echo(row)


def _run_headers(req: _Request, rep: dict, data: str, work: str) -> None:
    from pysoup.bench import baselines

    if not baselines.torch_and_safetensors_available():
        rep["notes"].append("torch or safetensors is not installed: no safe_open contender")
    req.echo(report.table_header(rep["suite"]))
    for case in req.cases:
        runs = req.runs or (3 if req.quick or many_tensors.tensor_count(case) >= 10**6 else 5)
        res = many_tensors.run_case(case, runs, data, work, only=req.only, echo=req.echo)
        rep["cases"].append(res)
        for row in report.table_rows(res):
            req.echo(row)


def _run_in_memory(req: _Request, rep: dict) -> None:
    import pysoup

    if importlib.util.find_spec("torch") is None:
        rep["notes"].append("torch is not installed: no in-memory kernel and EMA cases")
        return
    if "cpu" not in pysoup.info()["backends"]:
        rep["notes"].append("the C++ module did not load: no in-memory kernel and EMA cases")
        return
    k = rep["kernel"] = in_memory.kernel_case(
        in_memory.KERNEL_QUICK_ELEMENTS if req.quick else in_memory.KERNEL_ELEMENTS, max(rep["runs"], 5)
    )
    req.echo(
        f"kernel, 4 x {k['elements']:,} bf16: pysoup {k['pysoup']['gb_per_s']:.1f} GB/s, torch "
        f"{k['torch']['gb_per_s']:.1f} GB/s, triad {k['triad']['gb_per_s']:.1f} GB/s"
    )
    e = rep["ema"] = in_memory.ema_case(
        in_memory.EMA_QUICK_PARAMS if req.quick else in_memory.EMA_PARAMS, in_memory.EMA_TENSORS, max(rep["runs"], 5)
    )
    for label, cfg in e["configs"].items():
        req.echo(
            f"EMA step, {e['params']:,} {label} parameters: pysoup {cfg['pysoup']['seconds']['median'] * 1e3:.1f} ms, "
            f"torch._foreach_lerp_ {cfg['torch_foreach_lerp']['seconds']['median'] * 1e3:.1f} ms "
            f"({cfg['speedup_vs_foreach']:.2f}x)"
        )


def targets(rep: dict) -> list:
    """The targets a report is checked against (recomputed for a saved one after a change of their wording)."""
    if rep["suite"] == many_tensors.SUITE:
        return many_tensors.targets(rep)
    if rep["suite"] == "merge methods":
        return merge_cases.method_targets(rep)
    return merge_cases.linear_targets(rep) + in_memory.targets(rep)


__all__ = ["SUITES", "BenchResult", "default_out_dir", "run", "targets"]

"""Merge sweeps on Ray: many merges of the same inputs (a grid of densities or weights, a population of LCSC or
evolutionary candidates), one Ray task each, every one writing its own output with a local merge's guarantees
(temporaries, renamed on success), results and timings collected in the variants' order.

Every variant is planned on the driver first, from the headers alone, so a bad variant fails before any task runs.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from pysoup.errors import PlanError, SoupError

# What a variant may set: pysoup.merge's arguments that do not change where or how it runs.
VARIANT_KEYS = ("strategy", "weights", "base", "params", "model_params", "dtype", "shard_size", "name")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class SweepResult:
    """One variant's merge.

    Attributes:
        name: the variant's name (its output's stem).
        out: the output written.
        report: the MergeReport of the merge, as its task returned it.
        seconds: the task's wall time in its worker (the merge alone).
        host, pid: where it ran.
    """

    name: str
    out: str
    variant: dict
    report: object
    seconds: float
    host: str
    pid: int


def sweep(
    inputs,
    variants,
    out_dir,
    *,
    base=None,
    executor=None,
    suffix=".safetensors",
    progress=None,
    **common,
) -> list:
    """Runs one merge per variant as Ray tasks; each writes `out_dir/NAME.safetensors` (or a directory when
    `suffix` is "").

    Args:
        inputs: checkpoint paths every node sees (shared by every variant).
        variants: dicts of merge arguments (strategy, weights, base, params, model_params, dtype, shard_size) and
            an optional `name` (default: the variant's index, 000, 001, ...).
        out_dir: where the outputs go (created if missing).
        base: the base model for every variant that names none.
        executor: "ray" (default) or a RayExecutor: its address, and the CPUs (kernel threads) and memory each
            merge task declares.
        suffix: ".safetensors" for single-file outputs, "" for Hugging Face directories.
        common: merge arguments every variant shares unless it sets them.

    Returns:
        [SweepResult], in the variants' order. On a failed merge, the first failed variant's error is raised once
        every task has finished; the outputs of the others stay (each was committed on its own).

    Example:
        >>> grid = [dict(strategy="ties", base="base/", params={"density": d}) for d in (0.2, 0.4, 0.6, 0.8)]
        >>> results = pysoup.distributed.sweep(["a/", "b/"], grid, "sweep/")   # doctest: +SKIP
    """
    from pysoup.distributed import plan_merge, resolve_executor
    from pysoup.distributed.estimate import RAY_WORKER_BYTES
    from pysoup.distributed.ray_executor import _cancel_running, _remote
    from pysoup.engine.progress import progress_bar

    executor = resolve_executor(executor or "ray", list(inputs), base, os.fspath(out_dir))
    if isinstance(inputs, (str, os.PathLike, Mapping)):
        raise PlanError("inputs must be a list of checkpoint paths")
    inputs = [os.path.abspath(os.fspath(p)) for p in inputs]
    if isinstance(variants, Mapping) or not variants:
        raise PlanError("variants must be a non-empty list of dicts of merge arguments")
    out_dir = os.path.abspath(os.fspath(out_dir))
    for key in common:
        if key not in VARIANT_KEYS or key == "name":
            raise PlanError(
                f"sweep() has no argument {key!r} (variants and common settings take: {', '.join(VARIANT_KEYS[:-1])})"
            )
    jobs, names = [], set()
    for i, v in enumerate(variants):
        if not isinstance(v, Mapping):
            raise PlanError(f"variant {i}: expected a dict of merge arguments, got {type(v).__name__}")
        unknown = sorted(set(v) - set(VARIANT_KEYS))
        if unknown:
            raise PlanError(f"variant {i}: unknown argument(s) {', '.join(unknown)} (valid: {', '.join(VARIANT_KEYS)})")
        name = str(v.get("name", f"{i:03d}"))
        if not _NAME.fullmatch(name) or name in names:
            raise PlanError(f"variant {i}: name {name!r} must be unique, letters, digits, '.', '_' or '-'")
        names.add(name)
        kwargs = {**common, **{k: val for k, val in v.items() if k != "name"}}
        kwargs.setdefault("base", base)
        if kwargs["base"] is not None:
            kwargs["base"] = os.path.abspath(os.fspath(kwargs["base"]))
        out = os.path.join(out_dir, name + suffix)
        try:
            estimate = plan_merge(inputs, out, threads=executor.num_cpus, **kwargs)
        except SoupError as exc:
            raise type(exc)(f"variant {name}: {exc}") from None
        jobs.append((name, out, dict(v), kwargs, estimate.peak_memory_bytes + RAY_WORKER_BYTES))

    ray = executor.connect()
    memory = executor.memory or max(j[4] for j in jobs)
    executor._check_fits(ray, memory)
    remote = _remote(ray, run_variant).options(
        num_cpus=executor.num_cpus,
        memory=memory,
        max_retries=executor.max_retries,
        retry_exceptions=False,
        scheduling_strategy="SPREAD",
    )
    refs = [remote.remote(inputs, out, kwargs, executor.num_cpus) for _, out, _, kwargs, _ in jobs]
    bar = progress_bar(len(refs), progress, unit="merge", desc="sweep")
    results, errors = [None] * len(refs), {}
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            try:
                report, seconds, host, pid = ray.get(done[0])
                name, out, variant, _, _ = jobs[i]
                results[i] = SweepResult(name, out, variant, report, seconds, host, pid)
            except Exception as exc:  # noqa: BLE001 - the task's error, raised below once all are done
                errors[i] = _cause(exc, jobs[i][0])
            if bar is not None:
                bar.update(1)
    except BaseException:
        _cancel_running(ray, pending)
        raise
    finally:
        if bar is not None:
            bar.close()
    if errors:
        raise errors[min(errors)]
    return results


def _cause(exc, name):
    from ray.exceptions import RayTaskError, WorkerCrashedError

    if isinstance(exc, RayTaskError) and isinstance(exc.cause, SoupError):
        return type(exc.cause)(f"variant {name}: {exc.cause}")
    if isinstance(exc, WorkerCrashedError):
        return SoupError(f"variant {name}: its worker process died on every try (out of memory? killed?)")
    return SoupError(f"variant {name}: {str(exc).splitlines()[0]}")


def run_variant(inputs, out, kwargs, threads):
    """One variant's merge in a Ray worker: a local pysoup.merge."""
    import pysoup

    t0 = time.perf_counter()
    report = pysoup.merge(inputs, out, threads=threads, progress=False, **kwargs)
    return report, time.perf_counter() - t0, socket.gethostname(), os.getpid()

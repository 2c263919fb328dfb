"""Merges bigger than one machine (issue 15): the plan's output shards as tasks on a Ray cluster, merge sweeps as
tasks, and the dry run that says what a merge will cost before it runs.

Ray is optional (`pip install 'pysoup[ray]'`) and imported only when a merge runs on it: importing this package,
planning and dry runs never load it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from pysoup.distributed.estimate import MergeEstimate
from pysoup.distributed.ray_executor import ClusterError, RayExecutor
from pysoup.distributed.sweep import SweepResult, sweep
from pysoup.errors import PlanError

__all__ = ["ClusterError", "MergeEstimate", "RayExecutor", "SweepResult", "plan_merge", "resolve_executor", "sweep"]


def resolve_executor(executor, inputs, base, out, device=None, check_address=True):
    """The RayExecutor for merge(executor=...), after the checks that need no cluster: file inputs, a file
    output, the CPU, and (before any header is read) a well-formed address that answers."""
    if executor in ("ray",):
        executor = RayExecutor()
    elif isinstance(executor, str) and executor.startswith("ray:"):  # "ray:HOST:PORT", the command line's form
        executor = RayExecutor(address=executor[len("ray:") :])
    if not isinstance(executor, RayExecutor):
        raise PlanError(f"executor must be None, 'ray' or a pysoup.distributed.RayExecutor, got {executor!r}")
    if out is None:
        raise PlanError("a merge on Ray writes files: give an output path (every node must see it)")
    if device is not None:
        raise PlanError("a merge on Ray runs the CPU kernels in its tasks: device= is not supported with it")
    for src in [*inputs, *([base] if base is not None else [])]:
        if isinstance(src, Mapping) or not isinstance(src, (str, os.PathLike)):
            raise PlanError(
                "a merge on Ray reads its inputs in every task: give paths every node sees, not state dicts"
            )
    ray = sys.modules.get("ray")
    if check_address and (ray is None or not ray.is_initialized()):
        executor.check_address()
    return executor


def plan_merge(
    inputs,
    out,
    *,
    strategy="linear",
    weights=None,
    base=None,
    params=None,
    model_params=None,
    dtype=None,
    threads=None,
    shard_size=None,
    executor=None,
    workers=None,
    read_gbps=None,
    calibrate=False,
) -> MergeEstimate:
    """pysoup.plan: opens the headers, plans, lays out the output (creating nothing) and counts; see estimate.py."""
    from pysoup.dtypes import parse_dtype
    from pysoup.engine.plan import build_plan
    from pysoup.io.checkpoint import open_inputs
    from pysoup.io.units import parse_size
    from pysoup.io.writer import OutputTarget
    from pysoup.strategies import get_strategy

    if isinstance(inputs, (str, os.PathLike, Mapping)):
        raise PlanError("inputs must be a list of checkpoints (paths or state dicts)")
    inputs = list(inputs)
    if out is None or os.fspath(out) == "":
        raise PlanError("a dry run needs the output path (what it would write is what it counts)")
    strat = get_strategy(strategy)
    ray_executor = None
    if executor is not None:
        ray_executor = resolve_executor(executor, inputs, base, out, check_address=False)
    if shard_size is not None:
        shard_size = parse_size(shard_size)
    if ray_executor is not None:
        threads = ray_executor.num_cpus
    elif not threads:
        from pysoup.ops.cpu import default_threads

        threads = default_threads()
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise PlanError(f"workers must be a positive integer, got {workers!r}")
    if read_gbps is not None and not read_gbps > 0:
        raise PlanError(f"read_gbps must be positive, got {read_gbps!r}")
    opened = []
    try:
        base_ckpt = open_inputs(inputs, base, opened)
        plan = build_plan(
            strat,
            opened[: len(inputs)],
            base_ckpt,
            weights=weights,
            params=params,
            model_params=model_params,
            out_dtype=parse_dtype(dtype),
        )
        input_files = [f for c in opened for f in c.files]
        target = OutputTarget(
            out, plan.entries, shard_size=shard_size, metadata={"format": "pt"}, input_files=input_files
        )
        calibration = None
        if calibrate:
            from pysoup.distributed.estimate import calibrate as run_calibration

            merge_kwargs = dict(weights=weights, params=params, model_params=model_params, dtype=dtype)
            calibration = run_calibration(strat.name, len(inputs), base is not None, int(threads), merge_kwargs)
        from pysoup.distributed.estimate import estimate

        return estimate(
            plan,
            target,
            executor="ray" if ray_executor is not None else "local",
            task_bytes=ray_executor.task_size if ray_executor is not None else None,
            threads=int(threads),
            workers=workers or 1,
            read_gbps=read_gbps,
            calibration=calibration,
        )
    finally:
        for c in opened:
            c.close()

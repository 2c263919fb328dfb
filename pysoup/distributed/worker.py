"""One task of a distributed merge, as it runs on a worker: no Ray here, so it runs (and is tested) anywhere.

The task opens the inputs itself (paths every node sees), builds the same MergePlan and output layout as the driver
(planning is deterministic, and it is checked: the inputs' files and the layout's shard sizes must be the driver's),
opens the shard temporary the driver created and sized, and writes its tensors [start, stop) there through the
engine and the C++ kernels a local merge uses. The driver renames the temporaries into place once every task
succeeded; a task never creates, renames or removes a file.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field

from pysoup.errors import FormatError

# A test hook, not a mock: names a JSON file {"start": row, "action": "exit" | "sleep", "seconds": s}. The task
# whose range starts at that row takes the file (renames it away, so exactly one attempt sees it) and then, halfway
# through its tensors, ends its worker process with os._exit (Ray retries the task) or sleeps (a driver can be
# killed while tasks write). Unset in normal runs: one getenv per task.
FAULT_ENV = "PYSOUP_DISTRIBUTED_FAULT"


@dataclass
class MergeSpec:
    """What every task of one merge shares: how to plan it again, and where the driver's temporaries are."""

    inputs: list  # absolute paths
    base: str | None
    out: str  # absolute
    strategy: str
    weights: object
    params: object
    model_params: object
    out_dtype: str | None
    shard_size: int | None
    backend: str
    threads: int
    durable: bool
    files: list  # per input (base last): [(real path, inode, size, mtime_ns)] as the driver saw them
    shard_sizes: list  # bytes of each output file
    temporaries: list  # each shard's temporary, named by OutputTarget.share()


@dataclass
class TaskResult:
    start: int
    stop: int
    seconds: float  # the whole task, in the worker
    open_seconds: float  # opening headers, planning, laying out
    bytes_read: int
    bytes_written: int
    warnings: list = field(default_factory=list)  # the NonFiniteWarning messages, for the driver to repeat
    nonfinite: list = field(default_factory=list)
    summaries: dict = field(default_factory=dict)
    host: str = ""
    node: str = ""  # the Ray node's id (several simulated nodes share a host)
    pid: int = 0
    peak_rss_bytes: int = 0


def file_identities(checkpoint) -> list:
    """(real path, inode, size, mtime) of a checkpoint's files: what must not change between the driver's plan
    and the tasks' (st_dev is left out: one NFS export has another device number on each node)."""
    out = []
    for path in checkpoint.files:
        st = os.stat(path)
        out.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return out


def run_task(spec: MergeSpec, start: int, stop: int, shard: int, bytes_read: int) -> TaskResult:
    """Computes output tensors [start, stop) of shard `shard` into the driver's temporary."""
    from pysoup.engine.execute import OUTPUT_BUFFER_BYTES, NonFiniteWarning, execute_rows
    from pysoup.engine.plan import build_plan
    from pysoup.engine.report import peak_rss_bytes
    from pysoup.io.checkpoint import open_inputs
    from pysoup.io.writer import FileSink, OutputTarget
    from pysoup.ops import get_backend
    from pysoup.strategies import get_strategy

    t0 = time.perf_counter()
    opened = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the driver planned first and showed the planning warnings
            base = open_inputs(spec.inputs, spec.base, opened)
            for c, seen in zip(opened, spec.files):
                if [tuple(x) for x in file_identities(c)] != [tuple(x) for x in seen]:
                    raise FormatError(f"{c.name}: changed since the merge was planned (replaced or written to)")
            plan = build_plan(
                get_strategy(spec.strategy),
                opened[: len(spec.inputs)],
                base,
                weights=spec.weights,
                params=spec.params,
                model_params=spec.model_params,
                out_dtype=spec.out_dtype,
            )
        target = OutputTarget(spec.out, plan.entries, shard_size=spec.shard_size, metadata={"format": "pt"})
        if [s.size for s in target.shards] != list(spec.shard_sizes):
            raise FormatError(f"{spec.out}: this task laid the output out unlike the driver (different pysoup?)")
        target.attach({shard: spec.temporaries[shard]})
        opened_at = time.perf_counter()
        be = get_backend(spec.backend, None, spec.threads)
        fault = _take_fault(start)
        # The test hook's fault comes halfway, between two runs of the engine (each with its sink, flushed).
        mid = start + max(1, (stop - start) // 2) if fault is not None else stop
        nonfinite, summaries = [], {}
        try:
            with be.activate(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NonFiniteWarning)
                for lo, hi in ((start, mid), (mid, stop)):
                    if lo == hi:
                        continue
                    if lo != start:
                        _fire(fault)
                    sink = FileSink(target, OUTPUT_BUFFER_BYTES)
                    try:
                        more, more_summaries = execute_rows(plan, sink, be, lo, hi)
                    finally:
                        sink.close()
                    nonfinite += more
                    for op, items in more_summaries.items():
                        summaries.setdefault(op, []).extend(items)
        finally:
            target.detach(spec.durable)
        messages = [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]
        written = target.layout.end(stop - 1) - target.layout.begin(start)
        return TaskResult(
            start,
            stop,
            time.perf_counter() - t0,
            opened_at - t0,
            bytes_read,
            written,
            messages,
            nonfinite,
            summaries,
            socket.gethostname(),
            _node_id(),
            os.getpid(),
            peak_rss_bytes(),
        )
    finally:
        for c in opened:
            c.close()


def _node_id() -> str:
    ray = sys.modules.get("ray")  # loaded when this runs in a Ray worker; never imported here
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def _take_fault(start: int):
    path = os.environ.get(FAULT_ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            fault = json.load(f)
    except OSError:
        return None
    if fault.get("start") != start:
        return None
    try:
        os.rename(path, path + ".taken")  # one attempt takes it; the retry runs clean
    except OSError:
        return None
    with open(path + ".taken", "w") as f:  # which process took it (a test checks the retry ran elsewhere)
        json.dump({**fault, "pid": os.getpid()}, f)
    return fault


def _fire(fault: dict) -> None:
    if fault.get("action") == "sleep":
        time.sleep(float(fault.get("seconds", 30)))
    else:
        os._exit(17)

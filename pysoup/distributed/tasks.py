"""How a planned merge splits into tasks: one per output shard, and a shard larger than the task size (a single-file
output above all) cut into runs of whole tensors, each a byte range of the one pre-sized file.

A tensor never spans two tasks: its statistics (TIES thresholds, SLERP angles, variances) and selection stay inside
one task, so every method gives the bytes of a local merge. Pure arithmetic on the layout: no file is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from pysoup.dtypes import SAFETENSORS_SIZES


@dataclass(frozen=True)
class TaskRange:
    """Output tensors [start, stop) (rows of the layout), all in shard `shard`."""

    shard: int
    start: int
    stop: int
    bytes_written: int  # tensor bytes of [start, stop)
    bytes_read: int  # what computing them reads from the inputs


def read_bytes_per_row(plan) -> list:
    """What output tensor k reads from the inputs, for every k (numel x the sources' item sizes)."""
    per_kind = [sum(SAFETENSORS_SIZES[d] for d in kind.dtypes) for kind in plan.kinds]
    numels = memoryview(plan.layout.numels()).cast("q")
    return [n * per_kind[kid] for n, kid in zip(numels, plan.kind_of)]


def task_ranges(plan, target, task_bytes: int | None = None) -> list:
    """The tasks of a merge into `target` (an OutputTarget laid out from `plan`): each shard's tensors cut, in
    layout order, into runs of at most `task_bytes` of output (a larger tensor is a task of its own); None: one
    task per shard.

    Returns:
        [TaskRange], in layout order.
    """
    layout = target.layout
    reads = read_bytes_per_row(plan)
    out = []
    for i, s in enumerate(target.shards):
        start = s.start
        written = read = 0
        for k in range(s.start, s.stop):
            nbytes = layout.nbytes(k)
            if task_bytes is not None and k > start and written + nbytes > task_bytes:
                out.append(TaskRange(i, start, k, written, read))
                start, written, read = k, 0, 0
            written += nbytes
            read += reads[k]
        if s.stop > start:
            out.append(TaskRange(i, start, s.stop, written, read))
    return out

"""Executes a MergePlan: output tensors in layout order, each cut into chunks; one fused kernel call per
chunk reads the inputs' mapped windows and writes straight into the output buffer.

Memory stays bounded: one sliding window per input file (unmapped as it moves on) and two output buffers.
"""

from __future__ import annotations

import ctypes
import sys
import warnings

from pysoup.dtypes import SAFETENSORS_SIZES
from pysoup.plan import Copy, MergePlan, NonFiniteWarning, WeightedSum

# Elements per kernel call: 4 Mi elements = 8 MiB of bf16 per input, which fits the inputs' 16 MiB windows
# at every dtype. Smaller chunks lose throughput to per-call overhead.
CHUNK_ELEMENTS = 4 << 20
# The output is written in 16 MiB pieces, double-buffered.
OUTPUT_BUFFER_BYTES = 16 << 20


def execute(plan: MergePlan, sink, backend, threads: int, progress=None) -> list:
    """Runs every task of the plan into `sink`. Returns the names of tensors that came out non-finite."""
    bar = _progress_bar(plan, progress)
    nonfinite = []
    try:
        for k, task in enumerate(plan.tasks):
            sink.begin_tensor(task.name)
            count = _run_task(plan, task, sink, backend, threads, bar)
            if count:
                nonfinite.append(task.name)
                warnings.warn(f"tensor {task.name!r}: {count} non-finite values in the merged result (NaN or inf in "
                              "the inputs, or overflow in the output dtype)", NonFiniteWarning, stacklevel=2)
            if bar is not None:
                bar.set_postfix_str(f"tensors {k + 1}/{len(plan.tasks)}", refresh=False)
        sink.finish()
    finally:
        for c in plan.inputs:
            c.release()
        if bar is not None:
            bar.close()
    return nonfinite


def _run_task(plan, task, sink, backend, threads, bar) -> int:
    sources = [plan.inputs[i] for i in task.sources]
    infos = [c.infos[task.name] for c in sources]
    dtypes = [i.dtype for i in infos]
    in_sizes = [i.itemsize for i in infos]
    osize = SAFETENSORS_SIZES[task.out_dtype]
    total = infos[0].numel
    chunk = max(1, min(CHUNK_ELEMENTS, sink.capacity // osize))
    nonfinite = 0
    e = 0
    while e < total:
        n = min(total - e, chunk)
        room = sink.available() // osize
        if room < n and room >= chunk // 4:
            n = room  # top up the current buffer rather than flushing it part-empty
        addrs = [c.address(task.name, i.begin + e * s, i.begin + (e + n) * s) for c, i, s in zip(sources, infos, in_sizes)]
        out = sink.reserve(n * osize)
        if isinstance(task.op, WeightedSum):
            nonfinite += backend.weighted_sum_raw(addrs, dtypes, task.op.weights, n, out, task.out_dtype,
                                                  task.op.normalize, threads)
        elif isinstance(task.op, Copy):
            ctypes.memmove(out, addrs[0], n * osize)
        else:  # pragma: no cover - a strategy returned an op this engine does not know
            raise TypeError(f"tensor {task.name!r}: unknown op {task.op!r}")
        sink.advance(n * osize)
        sink.flush_if_full()
        e += n
        if bar is not None:
            bar.update(n * sum(in_sizes))
    return nonfinite


def _progress_bar(plan, progress):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=plan.bytes_to_read, unit="B", unit_scale=True, unit_divisor=1000, desc="merging read",
                dynamic_ncols=True, mininterval=0.2)



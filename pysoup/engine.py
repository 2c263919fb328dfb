"""Executes a MergePlan: output tensors in layout order, each cut into chunks; one fused kernel call per
chunk reads the inputs' mapped windows and writes straight into the output buffer.

Memory stays bounded: one sliding window per input file (unmapped as it moves on) and two output buffers.
"""

from __future__ import annotations

import warnings

from pysoup.dtypes import SAFETENSORS_SIZES
from pysoup.plan import Chunk, MergePlan, NonFiniteWarning
from pysoup.progress import progress_bar

# Elements per kernel call: 4 Mi elements = 8 MiB of bf16 per input, which fits the inputs' 16 MiB windows
# at every dtype. Smaller chunks lose throughput to per-call overhead.
CHUNK_ELEMENTS = 4 << 20
# The output is written in 16 MiB pieces, double-buffered.
OUTPUT_BUFFER_BYTES = 16 << 20


def execute(plan: MergePlan, sink, backend, threads: int, progress=None) -> tuple:
    """Runs every task of the plan into `sink`.

    Returns:
        (names of tensors that came out non-finite, {tensor name: op summary} for the ops that report one)
    """
    bar = progress_bar(plan.bytes_to_read, progress, unit="B", unit_scale=True, unit_divisor=1000, desc="merging read")
    nonfinite = []
    states = {}
    try:
        # Checks that must pass for every tensor before anything is computed (e.g. sparse masks).
        for task in plan.tasks:
            if task.op.verify_first:
                states[task.name] = _reduce(plan, task, backend, threads)
        for k, task in enumerate(plan.tasks):
            sink.begin_tensor(task.name)
            if task.name not in states:
                states[task.name] = _reduce(plan, task, backend, threads)
            count = _combine(plan, task, sink, backend, threads, bar, states[task.name])
            states[task.name] = task.op.summary(states[task.name])  # free histograms and the like
            if count:
                nonfinite.append(task.name)
                warnings.warn(
                    f"tensor {task.name!r}: {count} non-finite values in the merged result (NaN or inf in "
                    "the inputs, or overflow in the output dtype)",
                    NonFiniteWarning,
                    stacklevel=2,
                )
            if bar is not None:
                bar.set_postfix_str(f"tensors {k + 1}/{len(plan.tasks)}", refresh=False)
        sink.finish()
        # An input written or truncated by another process while we read it: its bytes are not one file's.
        for c in plan.inputs:
            c.check_unchanged()
    finally:
        for c in plan.inputs:
            c.release()
        if bar is not None:
            bar.close()
    return nonfinite, {name: s for name, s in states.items() if s is not None}


class _TaskView:
    """Where one task's sources live, and how to cut them into chunks."""

    def __init__(self, plan, task, threads, chunk_elems):
        self.task = task
        self.sources = [plan.inputs[i] for i in task.sources]
        self.infos = [c.infos[task.name] for c in self.sources]
        self.dtypes = [i.dtype for i in self.infos]
        self.sizes = [i.itemsize for i in self.infos]
        self.total = self.infos[0].numel
        self.threads = threads
        self.chunk_elems = chunk_elems

    def chunk(self, e: int, n: int, out: int = 0) -> Chunk:
        addrs = [
            c.address(self.task.name, i.begin + e * s, i.begin + (e + n) * s)
            for c, i, s in zip(self.sources, self.infos, self.sizes)
        ]
        return Chunk(self.task.name, addrs, self.dtypes, e, n, out, self.task.out_dtype, self.threads)


def _reduce(plan, task, backend, threads):
    """The op's reduction passes over the task's chunks; returns its state (None for one-pass ops)."""
    op = task.op
    view = _TaskView(plan, task, threads, CHUNK_ELEMENTS)
    state = op.begin(backend, task.name, view.total)
    for pass_ in range(op.reduce_passes(backend)):
        for e in range(0, view.total, view.chunk_elems):
            op.reduce(backend, view.chunk(e, min(view.chunk_elems, view.total - e)), state, pass_)
        op.end_pass(state, pass_)
    return state


def _combine(plan, task, sink, backend, threads, bar, state) -> int:
    osize = SAFETENSORS_SIZES[task.out_dtype]
    view = _TaskView(plan, task, threads, max(1, min(CHUNK_ELEMENTS, sink.capacity // osize)))
    nonfinite = 0
    e = 0
    while e < view.total:
        n = min(view.total - e, view.chunk_elems)
        room = sink.available() // osize
        if room < n and room >= view.chunk_elems // 4:
            n = room  # top up the current buffer rather than flushing it part-empty
        chunk = view.chunk(e, n)
        chunk.out = sink.reserve(n * osize)
        nonfinite += task.op.combine(backend, chunk, state)
        sink.advance(n * osize)
        sink.flush_if_full()
        e += n
        if bar is not None:
            bar.update(n * sum(view.sizes))
    return nonfinite

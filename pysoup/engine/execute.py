"""Executes a MergePlan: output tensors in layout order, each cut into chunks; one fused kernel call per
chunk reads the inputs' mapped windows and writes straight into the output buffer. Runs of small tensors of one
kind go to the kernel together, as one batch.

Memory stays bounded: one sliding window per input file (unmapped as it moves on) and two output buffers.
"""

from __future__ import annotations

import warnings

from pysoup.dtypes import SAFETENSORS_SIZES
from pysoup.engine.plan import MergePlan
from pysoup.engine.progress import progress_bar
from pysoup.io.table import batch_end
from pysoup.ops.table import Batch, Chunk

# Elements per kernel call: 4 Mi elements = 8 MiB of bf16 per input, which fits the inputs' 16 MiB windows
# at every dtype. Smaller chunks lose throughput to per-call overhead.
CHUNK_ELEMENTS = 4 << 20
# The output is written in 16 MiB pieces, double-buffered.
OUTPUT_BUFFER_BYTES = 16 << 20
# Tensors of at most this many elements go to the kernel in batches: one tensor at a time cost ~50 us of Python
# (10^5 tensors of 4 elements: 4.9 s, now 0.03 s), as much as the arithmetic of the largest of them (64 Ki elements
# of 2 bf16 inputs: ~70 us on one thread); and the kernel runs a tensor of fewer than 2 x 64 Ki elements on one
# thread, a batch of them on all.
BATCH_MAX_ELEMENTS = 1 << 16
# A batch reads at most this span of each input: one mapped window.
BATCH_SPAN_BYTES = 16 << 20


class NonFiniteWarning(UserWarning):
    """A merged tensor holds NaN or inf (from its inputs, or from overflow in the output dtype)."""


def execute(plan: MergePlan, sink, backend, progress=None) -> tuple:
    """Runs every task of the plan into `sink`.

    Returns:
        (names of tensors that came out non-finite, the ops' report: (stats, notes), see TensorOp.report)
    """
    nonfinite, summaries = execute_rows(plan, sink, backend, 0, len(plan), progress)
    return nonfinite, report_of(summaries)


def execute_rows(plan: MergePlan, sink, backend, start: int, stop: int, progress=None) -> tuple:
    """Runs output tensors [start, stop) of the plan (rows of its layout) into `sink`: the whole merge, or one
    task's share of it (pysoup.distributed: one range per output shard or byte range of a file).

    Returns:
        (names of tensors that came out non-finite, {op type: its tensors' summaries}; report_of() reads them)
    """
    total = plan.bytes_to_read if (start, stop) == (0, len(plan)) else 0
    bar = progress_bar(total, progress, unit="B", unit_scale=True, unit_divisor=1000, desc="merging read")
    nonfinite = []
    states, summaries = {}, {}  # summaries: op type -> its tensors' summaries
    n = stop
    try:
        # Checks that must pass for every tensor before anything is computed (e.g. sparse masks).
        if any(kind.op.verify_first for kind in plan.kinds):
            for k in range(start, n):
                if plan.kind(k).op.verify_first:
                    states[k] = _reduce(plan, k, backend)
        k = start
        while k < n:
            kind = plan.kind(k)
            end = k
            if kind.op.batchable and getattr(sink, "runs", False):
                end = _combine_batch(plan, k, sink, backend, bar, nonfinite, stop)
            if end == k:  # a large tensor, or an op that takes one tensor at a time
                name = plan.layout.name(k)
                sink.begin_tensor(k)
                state = states.pop(k) if k in states else _reduce(plan, k, backend)
                count = _combine(plan, k, sink, backend, bar, state)
                summary = kind.op.summary(state, plan.layout.numel(k))  # free histograms and the like
                if summary is not None:
                    summaries.setdefault(type(kind.op), []).append(summary)
                if count:
                    _warn_nonfinite(nonfinite, name, count)
                end = k + 1
            k = end
            if bar is not None:
                bar.set_postfix_str(f"tensors {k}/{n}", refresh=False)
        sink.finish()
        # An input written or truncated by another process while we read it: its bytes are not one file's.
        for c in plan.inputs:
            c.check_unchanged()
    finally:
        for c in plan.inputs:
            c.release()
        if bar is not None:
            bar.close()
    return nonfinite, summaries


def report_of(summaries: dict) -> tuple:
    """The merge report's (stats, notes) from {op type: summaries} (of one run, or every task's joined)."""
    stats, notes = {}, []
    for op_type, items in summaries.items():
        more_stats, more_notes = op_type.report(items)
        stats.update(more_stats)
        notes.extend(more_notes)
    return stats, notes


def _warn_nonfinite(nonfinite: list, name: str, count: int, stacklevel: int = 3) -> None:
    nonfinite.append(name)
    warnings.warn(
        f"tensor {name!r}: {count} non-finite values in the merged result (NaN or inf in "
        "the inputs, or overflow in the output dtype)",
        NonFiniteWarning,
        stacklevel=stacklevel,
    )


class _TaskView:
    """Where one output tensor's sources live, and how to cut them into chunks."""

    def __init__(self, plan, k):
        kind = plan.kind(k)
        self.name = plan.layout.name(k)
        self.out_dtype = plan.layout.dtype(k)
        self.sources = [(plan.inputs[i], plan.row(i, k)) for i in kind.sources]
        self.begins = [c.table.begin(r) for c, r in self.sources]
        self.dtypes = list(kind.dtypes)
        self.sizes = [SAFETENSORS_SIZES[d] for d in self.dtypes]
        self.total = plan.layout.numel(k)

    def chunk(self, e: int, n: int, out: int = 0) -> Chunk:
        addrs = [
            c.address_at(r, b + e * s, b + (e + n) * s) for (c, r), b, s in zip(self.sources, self.begins, self.sizes)
        ]
        return Chunk(self.name, addrs, self.dtypes, e, n, out, self.out_dtype)


def _reduce(plan, k, backend):
    """The op's reduction passes over tensor k's chunks; returns its state (None for one-pass ops)."""
    op = plan.kind(k).op
    view = _TaskView(plan, k)
    state = op.begin(backend, view.name, view.total)
    step = CHUNK_ELEMENTS - CHUNK_ELEMENTS % op.chunk_align
    passes, pass_ = op.reduce_passes(backend), 0
    while pass_ < passes:
        for e in range(0, view.total, step):
            op.reduce(backend, view.chunk(e, min(step, view.total - e)), state, pass_)
        op.end_pass(state, pass_)
        pass_ = op.next_pass(backend, state, pass_)
    return state


def _combine(plan, k, sink, backend, bar, state) -> int:
    op = plan.kind(k).op
    view = _TaskView(plan, k)
    osize = SAFETENSORS_SIZES[view.out_dtype]
    chunk_elems = max(1, min(CHUNK_ELEMENTS, sink.capacity // osize))
    nonfinite = 0
    e = 0
    while e < view.total:
        n = min(view.total - e, chunk_elems)
        room = sink.available() // osize
        if room < n and room >= chunk_elems // 4:
            n = room  # top up the current buffer rather than flushing it part-empty
        if n < view.total - e and op.chunk_align > 1:  # whole rows per chunk (fewer than a row: no top-up)
            n = n - n % op.chunk_align or min(view.total - e, chunk_elems - chunk_elems % op.chunk_align)
        chunk = view.chunk(e, n)
        chunk.out = sink.reserve(n * osize)
        nonfinite += op.combine(backend, chunk, state)
        sink.advance(n * osize)
        sink.flush_if_full()
        e += n
        if bar is not None:
            bar.update(n * sum(view.sizes))
    return nonfinite


def _combine_batch(plan, k0, sink, backend, bar, nonfinite, stop) -> int:
    """Output tensors k0, k0 + 1, ... (before `stop`) of one kind, as many as fit one batch (in the inputs' windows,
    the output buffer, the current output file); returns the first tensor left (k0 when tensor k0 is too large for a
    batch)."""
    kind, layout = plan.kind(k0), plan.layout
    sources = [(plan.inputs[i].table, plan.rows[i]) for i in kind.sources]
    room = sink.available()
    if layout.nbytes(k0) > room:
        room = sink.capacity  # reserve() flushes first
    k1, spans = batch_end(
        sources, layout, plan.kind_of, k0, min(stop, sink.run_end(k0)), BATCH_SPAN_BYTES, room, BATCH_MAX_ELEMENTS
    )
    if k1 == k0:
        return k0
    # One window per input covers the batch: bases are the addresses of file offset 0 as seen through it.
    bases = [plan.inputs[i].address_at(plan.row(i, k0), lo, hi) - lo for i, (lo, hi) in zip(kind.sources, spans)]
    sink.begin_tensor(k0)
    nbytes = layout.end(k1 - 1) - layout.begin(k0)
    out = sink.reserve(nbytes)
    batch = Batch(
        [(t, r, base) for (t, r), base in zip(sources, bases)],
        list(kind.dtypes),
        layout,
        out - layout.begin(k0),
        layout.dtype(k0),
        k0,
        k1,
    )
    bad = kind.op.combine_batch(backend, batch)
    sink.advance(nbytes)
    sink.flush_if_full()
    for k, count in bad:
        _warn_nonfinite(nonfinite, layout.name(k), count, stacklevel=4)
    if bar is not None:
        bar.update(nbytes // SAFETENSORS_SIZES[batch.out_dtype] * sum(SAFETENSORS_SIZES[d] for d in kind.dtypes))
    return k1

"""The dry run: what a merge will read, write, hold in memory and take, from the headers alone.

`pysoup.plan(...)` / `pysoup merge ... --plan` open the inputs' headers, build the MergePlan and lay out the output
exactly as the merge would (so every error a merge would give before writing, the dry run gives too), then count:
bytes per input and per output shard, the tasks a distributed merge would run, the peak memory of each process, and
a time estimate. No tensor data is read and no file is written.

The time model: a process that reads R bytes with T kernel threads takes R / io_rate + R / (compute_rate * T),
where io_rate is the I/O floor (reading the inputs and writing the output, no arithmetic) and compute_rate the
strategy's arithmetic per thread, both measured on this repository's benchmark host with inputs in the page
cache (`MEASURED` says where each number comes from). Tasks are spread over the worker slots longest first, and
each pays the per-task overhead measured by benchmarks/scale_out.py.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import asdict, dataclass, field

from pysoup.distributed.tasks import read_bytes_per_row, task_ranges
from pysoup.dtypes import SAFETENSORS_SIZES
from pysoup.io.reader import DEFAULT_WINDOW_BYTES
from pysoup.io.table import sum_by_group
from pysoup.io.units import format_bytes

# Measured with `python benchmarks/run.py --suite methods` and `--suite linear` (benchmarks/results/methods.json,
# linear.json: AMD EPYC, 2 cores, avx512, 2 threads, bf16, base + 3 x 512 MiB, inputs in the page cache,
# 2026-11-27): strategy -> (bytes read, pysoup seconds, I/O floor seconds), medians of 3 runs.
MEASURED_ON = "AMD EPYC, 2 cores, avx512, 2 threads, page cache, 2026-11-27"
MEASURED_SOURCE = "benchmarks/results/methods.json and linear.json"
MEASURED = {
    "linear": (2143454400, 0.3653, 0.3260),  # linear.json, 4 x 512MiB
    "uniform": (2143454400, 0.3653, 0.3260),  # the linear kernel
    "task_arithmetic": (2143454400, 0.5381, 0.3945),
    "ties": (2143454400, 1.4709, 0.4053),
    "dare_linear": (2143454400, 0.7849, 0.4036),
    "dare_ties": (2143454400, 0.8763, 0.4027),
    "slerp": (1071727200, 0.5629, 0.3923),
    "model_stock": (2143454400, 0.8166, 0.4191),
    "sparse": (1607590800, 0.8185, 0.4050),
    "variance_corrected": (1607590800, 0.7755, 0.4142),
    "interpolate": (1071727200, 0.3958, 0.3433),
}
MEASURED_THREADS = 2
# Peak RSS of a merge process (methods.json, linear.json: 2 inputs 90.5 MB, 4 inputs 124.2 MB, 8 inputs 191.3 MB)
# is this base plus the two output buffers plus one mapped window per input: 22 MiB is `import pysoup` with _C
# loaded (ru_maxrss, Python 3.9 here); the rest is execute.py's OUTPUT_BUFFER_BYTES and reader.py's window (16 MiB
# when those were measured; 8 MiB since: 94.3 MB for 4 inputs, task_arithmetic on base + 3 x 512 MiB).
PROCESS_BASE_BYTES = 22 << 20
OUTPUT_BUFFERS_BYTES = 2 * (16 << 20)
WINDOW_BYTES = DEFAULT_WINDOW_BYTES
# What a Ray worker process holds beyond a plain merging process (Ray's core worker, its imports): a merge task's
# measured peak RSS, 240.6 MB (TIES, base + 3 x 512 MiB, benchmarks/results/scale_out.json), less this model's
# 123.7 MB for the same merge.
RAY_WORKER_BYTES = 240_594_944 - 123_747_373
# Header tables: ~75 bytes a tensor per input (README, "Checkpoints with very many tensors") and the plan's rows.
TABLE_BYTES_PER_TENSOR = 75 + 4
# A Ray task's fixed cost: a task's round trip, 3.6 ms (median of 50 no-op tasks), plus opening the inputs, planning
# and laying out in the task, 0.9-1.3 ms for 4 inputs of 12-300 tensors (benchmarks/results/scale_out.json, 2 cores
# under load 8); a task opening many tensors pays per tensor and input what pysoup.open and the planner do for
# 10^6 tensors (README: 0.76 s to open, 2.66 s for a 2-input merge, ~1.5 us a tensor per input).
RAY_TASK_SECONDS = 0.0036 + 0.0013
OPEN_SECONDS_PER_TENSOR_INPUT = 1.5e-6
PROCESS_START_SECONDS = 0.08  # README: a merge process starts in ~80 ms


@dataclass
class InputBytes:
    name: str
    files: int
    tensor_bytes: int  # bytes the merge reads from this input
    tensors: int


@dataclass
class OutputShard:
    path: str
    tensors: int
    bytes: int  # file size, header included
    tasks: int


@dataclass
class MergeEstimate:
    """What `pysoup.plan` found: the merge's bytes, tasks, memory and time, without reading tensor data.

    Attributes:
        inputs: bytes each input gives the merge.
        outputs: every output file (the index, when there is one, is written last and is small).
        tasks: the tasks of the merge (1 for a local merge; per output shard or byte range on Ray).
        task_bytes_read, task_bytes_written: per task, in layout order.
        peak_memory_bytes: expected peak resident memory of one merging process (a task).
        seconds: expected wall time; `model` says how it was computed and from which measurements.
    """

    strategy: str
    executor: str
    tensors: int
    inputs: list
    outputs: list
    bytes_read: int
    bytes_written: int
    tasks: int
    task_bytes_read: list
    task_bytes_written: list
    threads_per_task: int
    workers: int
    peak_memory_bytes: int
    memory_parts: dict
    seconds: float
    model: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """The dry run as the command line prints it."""
        width = max([len(i.name) for i in self.inputs] + [len(o.path) for o in self.outputs] + [10])
        lines = [
            f"plan: {self.strategy}, {len(self.inputs)} inputs, {self.tensors} tensors, {self.tasks} task(s) "
            f"({self.executor}); nothing read but headers, nothing written",
            f"{'input':<{width}}  files  tensors  {'to read':>10}",
        ]
        for i in self.inputs:
            lines.append(f"{i.name:<{width}}  {i.files:>5}  {i.tensors:>7}  {format_bytes(i.tensor_bytes):>10}")
        lines.append(f"{'output':<{width}}  tasks  tensors  {'to write':>10}")
        for o in self.outputs:
            lines.append(f"{o.path:<{width}}  {o.tasks:>5}  {o.tensors:>7}  {format_bytes(o.bytes):>10}")
        if self.tasks > 1:
            r, w = self.task_bytes_read, self.task_bytes_written
            lines.append(
                f"per task: reads {format_bytes(min(r))} to {format_bytes(max(r))}, writes {format_bytes(min(w))} "
                f"to {format_bytes(max(w))}"
            )
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.memory_parts.items())
        lines.append(
            f"total: read {format_bytes(self.bytes_read)}, write {format_bytes(self.bytes_written)}; peak memory "
            f"per process ~{format_bytes(self.peak_memory_bytes)} ({parts})"
        )
        lines.append(
            f"time: ~{self.seconds:.2f} s on {self.workers} worker slot(s) of {self.threads_per_task} thread(s)"
        )
        lines.extend(f"  {m}" for m in self.model)
        return "\n".join(lines)


def estimate(
    plan,
    target,
    *,
    executor: str = "local",
    task_bytes: int | None = None,
    threads: int = 1,
    workers: int = 1,
    read_gbps: float | None = None,
    calibration: tuple | None = None,
) -> MergeEstimate:
    """Counts a planned merge into `target` (an OutputTarget laid out, not created).

    Args:
        plan: the MergePlan.
        target: the OutputTarget the merge would write.
        executor: "local" (one process, one task) or "ray" (tasks per shard / byte range, see tasks.py).
        task_bytes: the Ray task size (output bytes per task; None: one task per shard).
        threads: kernel threads per process (per task on Ray).
        workers: tasks that run at once (Ray: the cluster's task slots; local: 1).
        read_gbps: the storage's read bandwidth, when it is slower than the page cache the rates were measured on.
        calibration: (bytes read per second, how it was measured) from calibrate(), instead of MEASURED.
    """
    reads = read_bytes_per_row(plan)
    if executor == "local":
        ranges = [(0, len(plan), sum(reads), target.total_bytes)]
        per_shard = [1] * len(target.shards)
    else:
        tr = task_ranges(plan, target, task_bytes)
        ranges = [(t.start, t.stop, t.bytes_read, t.bytes_written) for t in tr]
        per_shard = [0] * len(target.shards)
        for t in tr:
            per_shard[t.shard] += 1
    numel_of_kind = sum_by_group(memoryview(plan.layout.numels()).cast("q"), plan.kind_of, len(plan.kinds))
    inputs = []
    for i, c in enumerate(plan.inputs):
        # Input i's share of every output tensor that reads it.
        total = sum(
            n * SAFETENSORS_SIZES[kind.dtypes[kind.sources.index(i)]]
            for kind, n in zip(plan.kinds, numel_of_kind)
            if i in kind.sources
        )
        inputs.append(InputBytes(c.name, max(1, len(c.files)), total, len(c.table)))
    outputs = [OutputShard(s.path, s.stop - s.start, s.size, n) for s, n in zip(target.shards, per_shard)]

    n_inputs = len(plan.inputs)
    tensors = max(len(c.table) for c in plan.inputs)
    parts = memory_parts(plan, max(w for _, _, _, w in ranges), ray=executor != "local")
    model = []
    open_seconds = OPEN_SECONDS_PER_TENSOR_INPUT * tensors * n_inputs
    if calibration is not None:  # this machine, now: one rate for I/O and arithmetic together
        rate, how = calibration
        if read_gbps is not None:
            rate = min(rate, read_gbps * 1e9)
        task_seconds = [r / rate for _, _, r, _ in ranges]
        model.append(
            f"{plan.strategy}: {rate / 1e9:.2f} GB/s read per process of {threads} thread(s)"
            + (f" (capped at --read-gbps {read_gbps:g})" if read_gbps is not None else "")
            + f"; {how}"
        )
    else:
        rates = MEASURED.get(plan.strategy)
        if rates is None:  # a strategy registered after the measurements: the slowest measured one
            rates = max(MEASURED.values(), key=lambda m: m[1] / m[0])
            model.append(f"{plan.strategy!r} was not measured; assumed as slow as the slowest measured method")
        measured_bytes, seconds, floor = rates
        io_rate = measured_bytes / floor
        if read_gbps is not None:
            io_rate = min(io_rate, read_gbps * 1e9)
        compute_rate = measured_bytes / max(seconds - floor, 1e-9) / MEASURED_THREADS  # bytes read / s / thread
        task_seconds = [r / io_rate + r / (compute_rate * threads) for _, _, r, _ in ranges]
        model.append(
            f"{plan.strategy}: I/O {io_rate / 1e9:.2f} GB/s per process"
            + (f" (capped at --read-gbps {read_gbps:g})" if read_gbps is not None else "")
            + f", arithmetic {compute_rate / 1e9:.2f} GB/s read per thread; measured {MEASURED_ON} ({MEASURED_SOURCE});"
            " --calibrate measures this machine instead"
        )
    if executor == "local":
        total = PROCESS_START_SECONDS + open_seconds + task_seconds[0]
    else:
        fixed = RAY_TASK_SECONDS + open_seconds
        total = PROCESS_START_SECONDS + open_seconds + _makespan([t + fixed for t in task_seconds], workers)
    model.append(
        f"fixed: {PROCESS_START_SECONDS * 1e3:.0f} ms start, {open_seconds * 1e3:.1f} ms opening headers"
        + (
            f"; per task {RAY_TASK_SECONDS * 1e3:.0f} ms scheduling + its own header opening "
            "(benchmarks/results/scale_out.md); tasks placed longest first on the worker slots"
            if executor != "local"
            else ""
        )
    )
    return MergeEstimate(
        strategy=plan.strategy,
        executor=executor,
        tensors=len(plan),
        inputs=inputs,
        outputs=outputs,
        bytes_read=sum(reads),
        bytes_written=target.total_bytes,
        tasks=len(ranges),
        task_bytes_read=[r for _, _, r, _ in ranges],
        task_bytes_written=[w for _, _, _, w in ranges],
        threads_per_task=threads,
        workers=workers,
        peak_memory_bytes=sum(parts.values()),
        memory_parts=parts,
        seconds=total,
        model=model,
    )


# The calibration merge: base + the plan's models of this size each, synthetic bf16 Llama-shaped tensors (16 MiB:
# the kernels' 4 Mi-element chunks, and writing the inputs takes a few seconds even on a loaded machine).
CALIBRATION_BYTES = 16 << 20


def calibrate(strategy: str, models: int, base: bool, threads: int, merge_kwargs: dict) -> tuple:
    """Measures the strategy on this machine now: a merge of synthetic inputs (as many models, a base if the plan
    has one, CALIBRATION_BYTES each, in /dev/shm when it has room) with the plan's parameters and `threads`
    threads, timed after one warm-up run. Reads none of the plan's inputs.

    Returns:
        (bytes read per second, a line saying how it was measured)
    """
    import time

    from pysoup.api import merge
    from pysoup.bench.harness import work_dir
    from pysoup.testing import make_family

    with work_dir((models + 3) * CALIBRATION_BYTES) as d:
        fts = make_family(d, models, CALIBRATION_BYTES, dtype="BF16", seed=0)
        kw = dict(merge_kwargs, strategy=strategy, threads=threads, progress=False)
        kw["base"] = os.path.join(d, "base.safetensors") if base else None
        out = os.path.join(d, "out.safetensors")
        merge(fts, out, **kw)  # warm-up: kernels loaded, inputs in the page cache
        t = time.perf_counter()
        report = merge(fts, out, **kw)
        seconds = time.perf_counter() - t
    how = (
        f"calibrated now: {report.bytes_read / 1e6:.0f} MB merged in {seconds:.3f} s "
        f"({models} x {CALIBRATION_BYTES >> 20} MiB synthetic bf16{' + base' if base else ''}, page cache, load "
        f"{os.getloadavg()[0]:.1f})"
    )
    return report.bytes_read / seconds, how


def memory_parts(plan, out_bytes: int | None = None, ray: bool = False) -> dict:
    """A merging process's peak resident memory by the model above, part by part: a window maps at most its file,
    and the output buffers are touched only as far as the output (of `out_bytes`, when given) fills them; a Ray
    task's process (`ray`) holds the Ray worker besides."""
    n_inputs = len(plan.inputs)
    tensors = max(len(c.table) for c in plan.inputs)
    windows = sum(min(WINDOW_BYTES, max((os.path.getsize(f) for f in c.files), default=0)) for c in plan.inputs)
    buffers = OUTPUT_BUFFERS_BYTES if out_bytes is None else min(OUTPUT_BUFFERS_BYTES, out_bytes)
    return {
        **({"ray worker": RAY_WORKER_BYTES} if ray else {}),
        "process": PROCESS_BASE_BYTES,
        "output buffers": buffers,
        f"{n_inputs} input windows": windows,
        "headers": TABLE_BYTES_PER_TENSOR * tensors * (n_inputs + 1),
    }


def task_memory_bytes(plan, out_bytes: int | None = None) -> int:
    """The memory a merge task declares to Ray: a Ray worker merging, by the model above."""
    return sum(memory_parts(plan, out_bytes, ray=True).values())


def _makespan(seconds: list, workers: int) -> float:
    """Longest-first list scheduling of task times on `workers` slots: the time the last one ends."""
    slots = [0.0] * max(1, workers)
    for t in sorted(seconds, reverse=True):
        heapq.heapreplace(slots, slots[0] + t)
    return max(slots)

"""Folding LoRA adapters into a base model, out of core: W' = W + Σ wᵢsᵢBᵢAᵢ for every adapted weight, every other
tensor copied, streamed from the base checkpoint into the output files.

Each adapted weight is computed in blocks of rows that fill the output buffer, each one call of the op table's
fused fold (lora_fold_raw; csrc/cpu/lora_fold*): out = round(W + L·R) with L = [w₁s₁B₁ | ...], R = [A₁; ...], the
products of each element accumulated in registers over k = Σrᵢ (fma in order from +0), W read in place from the
block's mapping of the base and added once in fp32, the result rounded once to the base's dtype straight into the
output buffer. No fp32 ΔW buffer and no second pass: the block's W is read once and its output written once. The
adapters' factors are read per tensor with pread; tensors copied unchanged go file to file on the writer thread
(large) or are read into the output buffer (small). Memory is the output buffers, one block of the base and one
tensor's factors: it does not grow with the model. Torch is never imported (its import alone is ~220 MiB
resident); numpy's is ~25 MiB.

Why a kernel of our own rather than numpy's BLAS: the GEMM's output, [rows, cols] fp32, is twice the bf16 weight
it is added to, and writing and reading it back was half the fold's time (a 1 GiB rank-64 fold: 0.78 s in sgemm,
0.75 s in the add pass). The fused kernel adds W in the GEMM's epilogue instead (docs/lora.md has the numbers).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pysoup.dtypes import SAFETENSORS_SIZES
from pysoup.engine.report import peak_rss_bytes
from pysoup.errors import PlanError
from pysoup.io.reader import changed_while_read
from pysoup.lora.adapter import LoraAdapter, np_dtype, open_adapter, to_f32

# Bytes of each of the output's two buffers (FileSink): the engine's size (pysoup.engine.execute's
# OUTPUT_BUFFER_BYTES), not imported from there, since that module imports every strategy (~0.1 s, more where Python
# cannot cache bytecode) and a fold needs none.
BUFFER_BYTES = 16 << 20
# Bytes per copy step for tensors that are copied unchanged (within one mapped window of the base).
COPY_BYTES = 8 << 20
# The copy step's pieces, handed out one at a time to the fold's threads (none smaller than this).
_COPY_PIECE = 1 << 20
# Tensors copied unchanged from this size on go file to file on the writer thread (FileSink.write_from); smaller
# ones (norms, biases) through the output buffer, beside their neighbours, instead of a system call each.
_DIRECT_COPY_BYTES = 1 << 20
_FLOAT = ("F32", "F16", "BF16")


@dataclass
class FoldReport:
    """What a fold did.

    Attributes:
        seconds: wall time (open, check, stream, commit).
        bytes_read: tensor bytes read from the base and the adapters.
        bytes_written: bytes of every output file.
        peak_rss_bytes: the process's peak resident memory.
        outputs: paths written, the index last.
        tensors: tensors in the output.
        folded: {weight name: number of adapters folded into it}.
        replaced: weight names replaced by adapter copies (modules_to_save, saved base layers).
        nonfinite_tensors: folded weights holding NaN or inf.
    """

    seconds: float
    bytes_read: int
    bytes_written: int
    peak_rss_bytes: int
    outputs: list
    tensors: int
    folded: dict = field(default_factory=dict)
    replaced: list = field(default_factory=list)
    nonfinite_tensors: list = field(default_factory=list)


def fold(
    base, adapters, out, *, weights=None, shard_size=None, durable=False, threads=None, backend="auto"
) -> FoldReport:
    """Folds LoRA adapters into a base checkpoint: the output is the base with W + Σ wᵢsᵢBᵢAᵢ for every adapted
    weight (computed in fp32, rounded once to the base's dtype), modules_to_save copies in place of the base's
    (their weighted average, weights normalized, when several adapters hold one), every other tensor copied byte
    for byte, and the base's config and tokenizer files beside a directory output. What PEFT's
    `merge_and_unload()` gives, without loading the model.

    Args:
        base: the base model: a safetensors file or a Hugging Face directory.
        adapters: PEFT LoRA adapter directories (or open LoraAdapters).
        out: a .safetensors path or a directory (sharded like save_pretrained).
        weights: one number per adapter (default 1 each: the adapters' updates add up, as in PEFT).
        shard_size: max tensor bytes per shard of a directory output.
        durable: fsync the output before renaming it into place.
        threads: threads running the fold kernel (default: every core).
        backend: the backend adding W and ΔW ("auto", "cpu" or "reference").

    Returns:
        A FoldReport.

    Example:
        >>> fold("llama/", ["adapter/"], "merged/")  # doctest: +SKIP
        >>> fold("llama/", ["math/", "code/"], "merged/", weights=[0.5, 0.5])  # doctest: +SKIP
    """
    from pysoup.io.checkpoint import open_checkpoint
    from pysoup.io.signals import cleanup_on_termination
    from pysoup.io.units import parse_size
    from pysoup.io.writer import OutputTarget
    from pysoup.ops import get_backend
    from pysoup.ops.cpu import default_threads

    start = time.perf_counter()
    if isinstance(adapters, (str, os.PathLike, LoraAdapter)):
        adapters = [adapters]
    adapters = list(adapters)
    if not adapters:
        raise PlanError("fold needs at least one adapter")
    weights = _weights(weights, len(adapters))
    backend_name = backend
    # Every core by default: the kernel's own threads (not OpenMP's, whose idle thread spun between the fold's many
    # short kernel calls, 1.4 CPU s of a 1 GiB fold on 2 cores, on the core the writer thread's pwrite needs), and
    # as many Python threads for the copies.
    threads = int(threads) if threads is not None else default_threads()
    if threads < 1:
        raise PlanError(f"fold needs at least 1 thread, got {threads}")
    if shard_size is not None:
        shard_size = parse_size(shard_size)
    if out is None or os.fspath(out) == "":
        raise PlanError("fold needs an output path")
    opened, base_ckpt = [], None
    with cleanup_on_termination():
        try:
            for a in adapters:
                opened.append(a if isinstance(a, LoraAdapter) else open_adapter(a))
            base_ckpt = open_checkpoint(base)
            plan = _plan(base_ckpt, opened, weights)
            table = base_ckpt.table
            entries = [(table.name(i), table.dtype(i), table.shape(i)) for i in range(len(table))]
            target = OutputTarget(
                out,
                entries,
                shard_size=shard_size,
                metadata={"format": "pt"},
                input_files=list(base_ckpt.files) + [f for ad in opened for f in ad.files],
                aux_files=base_ckpt.aux_files(),
                durable=durable,
            )
            # The fold kernel runs on `threads` threads of its own (strips handed out one at a time, csrc/cpu/
            # lora_fold.cpp); the copies-only weighted sums (modules_to_save) on this one.
            backend = get_backend(backend_name, None, threads)
            nonfinite = []
            pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="pysoup-fold") if threads > 1 else None
            with contextlib.ExitStack() as stack:
                if pool is not None:
                    stack.enter_context(pool)
                factors = stack.enter_context(_FactorsAhead(plan, target.layout))
                sink = stack.enter_context(target.streaming(BUFFER_BYTES))
                stack.enter_context(backend.activate())
                for k in range(len(target.layout)):
                    name = target.layout.name(k)
                    sink.begin_tensor(k)
                    if _write_tensor(
                        base_ckpt, table.find(name), plan.get(name), sink, backend, pool, threads, factors
                    ):
                        nonfinite.append(name)
                sink.finish()
                base_ckpt.check_unchanged()  # a base rewritten while we read it: nothing is committed
            adapter_bytes = sum(ad.reader.file_size for ad in opened)
            return FoldReport(
                seconds=time.perf_counter() - start,
                bytes_read=sum(table.nbytes(i) for i in range(len(table))) + adapter_bytes,
                bytes_written=target.total_bytes,
                peak_rss_bytes=peak_rss_bytes(),
                outputs=target.paths,
                tensors=len(table),
                folded={n: len(p.terms) for n, p in plan.items() if p.terms},
                replaced=sorted(n for n, p in plan.items() if p.sources),
                nonfinite_tensors=nonfinite,
            )
        finally:
            if base_ckpt is not None:
                base_ckpt.close()
            for ad, given in zip(opened, adapters):
                if ad is not given:
                    ad.close()


def split_model_lora(reference: str) -> tuple:
    """mergekit's `MODEL+LORA` model reference as (model, adapter or None), split as mergekit 0.1.5's
    ModelReference does (on "+": one part is a model, two are a model and an adapter, more are an error).

    Example:
        >>> split_model_lora("llama/+adapter/")
        ('llama/', 'adapter/')
    """
    parts = os.fspath(reference).split("+")
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise PlanError(f"{reference!r}: a model reference is MODEL or MODEL+LORA")


@contextlib.contextmanager
def folded(reference, adapters=(), *, weights=None, dir=None):  # noqa: A002 - tempfile's name for it
    """A model with adapters folded in, as a temporary Hugging Face directory removed on exit: what a mergekit
    config's `MODEL+LORA` means (mergekit loads it with PEFT and runs merge_and_unload; this streams it).

    Args:
        reference: a model path, or "MODEL+LORA".
        adapters: more adapter directories to fold (after the reference's own).
        weights: one number per adapter (default 1 each).
        dir: where the temporary directory goes (default: beside the model, so that it is on the same disk).

    Yields:
        The temporary directory's path (or the model's own path when there is no adapter to fold).

    Example:
        >>> with folded("llama/+adapter/") as path:  # doctest: +SKIP
        ...     pysoup.merge([path, "other/"], "soup/")
    """
    model, lora = split_model_lora(reference)
    adapters = ([lora] if lora else []) + list(adapters)
    if not adapters:
        yield model
        return
    parent = dir if dir is not None else os.path.dirname(os.path.abspath(model))
    tmp = tempfile.mkdtemp(prefix=".pysoup-folded-", dir=parent)
    try:
        out = os.path.join(tmp, "model")
        fold(model, adapters, out, weights=weights)
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class _TensorFold:
    """What one output tensor becomes: its rows taken from `sources` (adapter copies, (weight, adapter, key)) or
    from the base when there are none, plus the terms (wᵢ, adapter, module) of ΔW."""

    sources: list = field(default_factory=list)
    terms: list = field(default_factory=list)


def _weights(weights, n: int) -> list:
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise PlanError(f"{len(weights)} adapter weights for {n} adapters")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise PlanError(f"adapter weights must be finite numbers, got {w!r}")
    return [float(w) for w in weights]


def _plan(base, adapters: list, weights: list) -> dict:
    """{tensor name: _TensorFold}, every adapter module and copy checked against the base (one-line errors naming
    the adapter and the module)."""
    plan = {}
    for w, ad in zip(weights, adapters):
        for m in ad.modules.values():
            info = _base_info(base, ad, m.weight_name, f"module {m.name!r}")
            if tuple(info.shape) != tuple(m.weight_shape):
                raise PlanError(
                    f"{ad.path}: module {m.name!r} adapts a {list(m.weight_shape)} weight but the base's "
                    f"{m.weight_name!r} is {list(info.shape)} (another base model, or fan_in_fan_out set wrongly?)"
                )
            plan.setdefault(m.weight_name, _TensorFold()).terms.append((w, ad, m))
        for copies, what in ((ad.whole, "modules_to_save"), (ad.base_copies, "saved base layer")):
            for name, key in copies.items():
                info = _base_info(base, ad, name, f"{what} {name!r}")
                mine = ad.reader.infos[key].shape
                if tuple(mine) != tuple(info.shape):
                    raise PlanError(f"{ad.path}: {what} {name!r} is {list(mine)} but the base's is {list(info.shape)}")
                plan.setdefault(name, _TensorFold()).sources.append((w, ad, key))
    for name, p in plan.items():
        row = base.table.find(name)
        shape = tuple(base.table.shape(row))
        row_bytes = (base.table.numel(row) // shape[0] if shape and shape[0] else 0) * SAFETENSORS_SIZES[
            base.table.dtype(row)
        ]
        if row_bytes > BUFFER_BYTES:  # the kernel writes whole rows into the output buffer
            raise PlanError(
                f"{name!r}: a row of {row_bytes} bytes is larger than the {BUFFER_BYTES}-byte output buffer; "
                "cannot fold it"
            )
        if len(p.sources) > 1:
            total = sum(w for w, _, _ in p.sources)
            if total == 0:
                raise PlanError(f"{name!r}: the adapters' weights sum to 0, so their copies cannot be averaged")
            p.sources = [(w / total, ad, key) for w, ad, key in p.sources]
        elif p.sources:
            p.sources = [(1.0, p.sources[0][1], p.sources[0][2])]
    return plan


def _base_info(base, ad, name: str, what: str):
    row = base.table.find(name)
    if row < 0:
        raise PlanError(f"{ad.path}: {what}: the base {base.name} has no tensor {name!r} (another base model?)")
    info = base.infos[name]
    if base.table.dtype(row) not in _FLOAT:
        raise PlanError(f"{ad.path}: {what}: the base's {name!r} is {base.table.dtype(row)}, not a float weight")
    return info


def _write_tensor(base, row: int, fold_plan, sink, backend, pool, threads: int, factors) -> int:
    """Writes one output tensor: copied, or W + ΔW in blocks of rows that fill the output buffer, one call of the
    op table's fused fold each (on the backend's threads, which take the block's row strips one at a time): W read
    in place from the base's mapped window, the result rounded straight into the output buffer. Every element is
    computed alone, so neither the blocks nor the threads change a bit. Returns how many results are not finite.

    A block of W in a file is mapped for its call only, without populating it (MAP_POPULATE here, on this thread
    alone, was 0.2 s of a 1 GiB fold between the kernel calls): the kernel's threads fault its pages in as they read
    them, side by side. The mapping is guarded as the reader's windows are (a page gone under a read reads as zeros
    and marks it), and a marked block fails the fold."""
    table = base.table
    nbytes = table.nbytes(row)
    if fold_plan is None:
        _copy(base, row, sink, nbytes, pool, threads)
        return 0
    from pysoup._native import native
    from pysoup.ops import get_backend
    from pysoup.ops.table import Chunk

    name, dtype = table.name(row), table.dtype(row)
    shape = tuple(table.shape(row))
    rows_n = shape[0] if shape else 1
    cols = table.numel(row) // rows_n if rows_n else 0
    left, right = factors.take(name)
    size = SAFETENSORS_SIZES[dtype]
    row_bytes = max(1, cols * size)
    begin = table.begin(row)
    source = None if fold_plan.sources else base.source_file(row)
    # Copies only (modules_to_save): their average rounded to the base's dtype, on one thread.
    averaging = get_backend(backend.name, None, 1) if left is None else None
    nonfinite, r0 = 0, 0
    while r0 < rows_n:
        # As many rows as the output buffer has room for (a fresh buffer when not one fits): the fold packs R once
        # per call, so fewer, larger calls.
        fit = sink.available() // row_bytes or max(1, sink.capacity // row_bytes)
        r1 = min(rows_n, r0 + fit)
        n = (r1 - r0) * cols
        region, w_dtype = None, dtype
        if fold_plan.sources:
            w = _source_rows(fold_plan.sources, r0, r1, cols)
            w_addr, w_dtype = w.ctypes.data, "F32"
        elif source is not None:
            region = native.MappedRegion(source[0], begin + r0 * cols * size, n * size, False)
            w_addr = region.address
        else:
            w_addr = base.address_at(row, begin + r0 * cols * size, begin + r1 * cols * size)
        out = sink.reserve(n * size)
        chunk = Chunk(name, [w_addr], [w_dtype], r0 * cols, n, out, dtype)
        try:
            if averaging is not None:
                nonfinite += averaging.weighted_sum_raw(chunk, [1.0], False)
            else:
                nonfinite += backend.lora_fold_raw(chunk, left[r0:r1], right)
        finally:
            if region is not None:
                region.close()
        if region is not None and region.faulted():
            raise changed_while_read(source[1])
        sink.advance(n * size)
        sink.flush_if_full()
        r0 = r1
    return nonfinite


class _FactorsAhead:
    """The (L, R) of each folded weight in output order, the next one read (pread, widened, scaled, concatenated:
    0.15 s for the 56 weights of a 1 GiB rank-64 fold on an idle machine, 0.44 s under load) on a thread of its own
    while this one is folded."""

    def __init__(self, plan: dict, layout):
        names = (layout.name(k) for k in range(len(layout)))
        self._order = iter([n for n in names if plan.get(n) is not None and plan[n].terms])
        self._plan = plan
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pysoup-factors")
        self._pending = {}
        self._submit_next()

    def _submit_next(self) -> None:
        name = next(self._order, None)
        if name is not None:
            self._pending[name] = self._pool.submit(_gemm_factors, self._plan[name].terms)

    def take(self, name: str) -> tuple:
        """The factors of `name` (None, None without adapter terms); starts reading the next weight's."""
        future = self._pending.pop(name, None)
        if future is None:
            return None, None
        self._submit_next()
        return future.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)


def _on_threads(pool, threads: int, calls) -> None:
    """Runs calls [(fn, *args), ...] (each releasing the GIL) on this thread and `pool`'s, each thread taking the
    next call when it is done with one: a thread the OS deschedules (2 cores shared with the writer) holds back
    one call, not a static share."""
    lock = threading.Lock()
    todo = iter(calls)

    def drain():
        while True:
            with lock:
                call = next(todo, None)
            if call is None:
                return
            call[0](*call[1:])

    futures = [pool.submit(drain) for _ in range(min(threads, len(calls)) - 1)] if pool else []
    try:
        drain()
    finally:
        for f in futures:
            f.result()


def _cut(r0: int, r1: int, parts: int) -> list:
    """[r0, r1) as up to `parts` runs of rows, the same size within one row (none empty)."""
    parts = max(1, min(parts, r1 - r0))
    bounds = [r0 + (r1 - r0) * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _gemm_factors(terms) -> tuple:
    """(L, R) with ΔW (in the base weight's layout) = L @ R, over every adapter's module: L = [w₁s₁B₁ | ...],
    R = [A₁; ...] for a linear weight; for a transposed one (embeddings, fan_in_fan_out) L = [A₁ᵀ | ...],
    R = [w₁s₁B₁ᵀ; ...]."""
    import numpy as np

    if not terms:
        return None, None
    lefts, rights = [], []
    for w, ad, m in terms:
        a, b = ad.factors(m.name)
        b *= np.float32(w * m.scaling)
        if m.transposed:
            lefts.append(a.T)
            rights.append(b.T)
        else:
            lefts.append(b)
            rights.append(a)
    if len(terms) == 1:  # nothing to concatenate (read_f32's arrays are fresh): no copy of either
        return np.ascontiguousarray(lefts[0]), np.ascontiguousarray(rights[0])
    return np.ascontiguousarray(np.concatenate(lefts, axis=1)), np.ascontiguousarray(np.concatenate(rights, axis=0))


def _source_rows(sources, r0: int, r1: int, cols: int):
    """Rows [r0, r1) of the weighted average of adapter copies, in fp32, read with pread."""
    import numpy as np

    acc = None
    for w, ad, key in sources:
        info = ad.reader.infos[key]
        size = SAFETENSORS_SIZES[info.dtype]
        lo = info.begin + r0 * cols * size
        data = os.pread(ad.reader._fd, (r1 - r0) * cols * size, lo)
        vals = to_f32(np.frombuffer(data, np_dtype(info.dtype)), info.dtype).reshape(r1 - r0, cols)
        if w != 1.0:
            vals = vals * np.float32(w)
        acc = vals if acc is None else acc + vals
    return acc


def _copy(base, row: int, sink, nbytes: int, pool, threads: int) -> None:
    """Copies one tensor's bytes into the output. From a file, a large one goes file to file on the writer thread
    (FileSink.write_from: copy_file_range; the embeddings and the head are a quarter of a Llama's bytes) while this
    thread goes on folding, and a small one (norms, biases) is read into the output buffer beside its neighbours:
    neither is mapped (the reader's window is 16 MiB, for a 4 KiB norm). From memory, through the
    output buffer, each piece cut among the fold's threads (ctypes releases the GIL)."""
    begin = base.table.begin(row)
    source = base.source_file(row)
    if source is not None and nbytes >= _DIRECT_COPY_BYTES:
        sink.write_from(source[0], begin, nbytes, source[1])
        return
    pos = 0
    while pos < nbytes:
        n = min(COPY_BYTES, sink.capacity, nbytes - pos)
        dst = sink.reserve(n)
        if source is not None:
            _pread_into(source, begin + pos, dst, n)
        else:
            src = base.address_at(row, begin + pos, begin + pos + n)
            runs = _cut(0, n, max(1, min(n // _COPY_PIECE, 4 * threads)))
            _on_threads(pool, threads, [(ctypes.memmove, dst + a, src + a, b - a) for a, b in runs])
        sink.advance(n)
        sink.flush_if_full()
        pos += n


def _pread_into(source, offset: int, address: int, nbytes: int) -> None:
    """Reads nbytes of the file source = (fd, path) from offset into memory at address."""
    done = 0
    while done < nbytes:
        got = os.preadv(source[0], [(ctypes.c_char * (nbytes - done)).from_address(address + done)], offset + done)
        if got == 0:
            raise changed_while_read(source[1], "it ended early")
        done += got

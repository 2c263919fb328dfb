"""OffloadedEMA: EMA's schedule with the average in host memory, updated by a worker thread while training goes on.

The pipeline of one update (K chunks: the parameters packed into pieces of at most chunk_bytes, a tensor larger
than a chunk split across several):

    update()  (training thread)          side CUDA stream             worker thread (host)
    ---------------------------          ----------------             --------------------
    event after the optimizer step  ->   waits for it
    buffers -> host, and the current     copy buffers
      stream waits for that copy         copy chunk 0 -> staging[0]
    returns                              copy chunk 1 -> staging[1]   buffers' lerp
                                                                      chunk 0 copied? lerp it; then issue
                                         copy chunk 2 -> staging[0] <-  chunk 2 into the slot it freed
                                                                      chunk 1 copied? lerp it; issue chunk 3 ...

The host lerp of chunk k runs while chunk k+1 is in flight; both run while the GPU does the next forward and
backward. Each lerp is one fused multi-tensor call (pysoup.ops.MultiTensorLerp; the C++ kernels release the GIL),
the numerical contract's a <- weighted_sum([a, x], [1 - t, t]) applied per element, so the average is the same
bytes as pysoup.training.EMA's in-place update, whatever the chunking.

Without a GPU the same pipeline runs on CPU tensors (a "copy" is a memcpy into the staging slot), which is how the
tests hold it to EMA bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import sys
import threading
import weakref

from pysoup.errors import PlanError
from pysoup.training.average import EMA, _Average, averaged_tensors

NAME = "OffloadedEMA"
MIN_CHUNK_BYTES = 1 << 20
# Staging is two slots of this size. 64 MiB moves in ~1.3 ms at PCIe 5's ~50 GB/s, long enough that the per-copy
# and per-call costs (a few microseconds each) vanish, short enough that the two slots stay small.
DEFAULT_CHUNK_BYTES = 64 << 20
ALIGN = 64  # every tensor piece in a host buffer starts on a cache line (and is aligned for any dtype view)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack_chunks(numels: list, itemsizes: list, chunk_bytes: int) -> list:
    """Packs tensors, in order, into chunks of at most `chunk_bytes`; a tensor that does not fit in what is left
    of a chunk continues in the next one, so only the last chunk is less than full (up to alignment).

    Args:
        numels: element counts of the tensors.
        itemsizes: their element sizes in bytes.
        chunk_bytes: a chunk's capacity (at least 64 bytes more than the largest element size).

    Returns:
        One list per chunk of (tensor index, first element, end element, byte offset in the chunk); each piece
        starts on a 64-byte boundary. Empty tensors have no piece.

    Example:
        >>> pack_chunks([300, 10], [4, 4], 1024)
        [[(0, 0, 256, 0)], [(0, 256, 300, 0), (1, 0, 10, 192)]]
    """
    chunks, pieces, used = [], [], 0
    for i, (numel, size) in enumerate(zip(numels, itemsizes)):
        start = 0
        while start < numel:
            offset = _aligned(used)
            room = (chunk_bytes - offset) // size if offset < chunk_bytes else 0
            if room <= 0:
                chunks.append(pieces)
                pieces, used = [], 0
                continue
            end = min(numel, start + room)
            pieces.append((i, start, end, offset))
            used = offset + (end - start) * size
            start = end
    if pieces:
        chunks.append(pieces)
    return chunks


class _HostMemory:
    """Host buffers for the average and the staging area: page-locked when the model is on a GPU (so that the
    device-to-host copies are asynchronous), plain memory otherwise.

    Page-locking registers the exact bytes with CUDA (as torch.distributed.checkpoint's stager does) instead of
    allocating with torch.empty(pin_memory=True): torch's caching host allocator rounds every pinned allocation
    up to a power of two (ATen/core/CachingHostAllocator.h, PowerOf2Ceil), so a 100M-parameter fp32 average
    (381 MiB) would lock 512 MiB, and a 2.1 GiB one 4 GiB, and keep it cached after the average is gone."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._registered = []

    def empty(self, nbytes: int):
        import torch

        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        if self.pinned:
            err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 1))  # 1: portable
            if err:
                raise PlanError(f"{NAME}: could not page-lock {nbytes} bytes of host memory (cudaError {err})")
            self._registered.append(buf)
        return buf

    def carve(self, specs: list) -> list:
        """Tensors of the given (shape, dtype) in one new buffer, each piece 64-byte aligned."""
        import torch

        offsets, end = [], 0
        for shape, dtype in specs:
            offsets.append(_aligned(end))
            end = offsets[-1] + torch.Size(shape).numel() * dtype.itemsize
        buf = self.empty(end)
        return [
            buf[off : off + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
            for off, (shape, dtype) in zip(offsets, specs)
        ]

    def release(self) -> None:
        """Unregisters the page-locked buffers (they stay valid, pageable, for any view still held)."""
        import torch

        while self._registered:
            buf = self._registered.pop()
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


class _HostAverage(_Average):
    """_Average's binding to the model, with the averaged and copied tensors in host memory (page-locked when the
    model is on a GPU) and no device-side lerp plan. EMA.__init__'s `super().__init__` lands here for an
    OffloadedEMA (its method resolution order: OffloadedEMA, EMA, _HostAverage, _Average), so the schedule's
    arguments are checked by EMA itself."""

    def __init__(self, model, *, buffers: str = "average", dtype=None):
        import torch

        named, self._copied, self._param_count = averaged_tensors(model, buffers, dtype, NAME)
        self.buffers = buffers
        self._model = model
        devices = {t.device for _, t in named + self._copied}
        if len(devices) > 1 or next(iter(devices)).type not in ("cpu", "cuda"):
            raise PlanError(
                f"{NAME}: the model must be on one CPU or CUDA device, it is on {sorted(map(str, devices))}"
            )
        self.device = next(iter(devices))
        # DTensor, when torch.distributed.tensor was ever imported (else no DTensor can exist)
        dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())
        for name, t in named:
            if isinstance(t, dtensor):
                raise PlanError(
                    f"{NAME}: {name!r} is a DTensor; only unsharded models are offloaded (EMA averages shards)"
                )
            if not t.is_contiguous():
                raise PlanError(f"{NAME}: {name!r} is not contiguous; its memory is copied as it lies")
        self.names = [n for n, _ in named]  # names[:_param_count] are parameters, the rest float buffers
        self._sharding = None  # _Average's DTensor support: not offloaded
        self._current = [t for _, t in named]
        self._shapes = [(t.shape, t.dtype, t.device) for t in self._current]
        self._addresses = [t.data_ptr() for t in self._current]
        self._memory = _HostMemory(pinned=self.device.type == "cuda")
        averaged = self._memory.carve([(t.shape, dtype or t.dtype) for t in self._current])
        copied = self._memory.carve([(b.shape, b.dtype) for _, b in self._copied])
        with torch.no_grad():
            for a, t in zip(averaged, self._current):
                a.copy_(t)
            for c, (_, b) in zip(copied, self._copied):
                c.copy_(b)
        self.averaged = dict(zip(self.names, averaged))
        self.copied = {n: c for (n, _), c in zip(self._copied, copied)}
        self.step = 0


class _Chunk:
    """One chunk: pieces of the model's tensors (sources), where their copies land (staged), the average's pieces
    the first len(averaged) copies are lerped into, the fused lerp, and the event marking the copy done (CUDA)."""

    def __init__(self, sources, staged, averaged, threads, cuda):
        import torch

        from pysoup.ops import MultiTensorLerp

        self.sources, self.staged, self.averaged = sources, staged, averaged
        self.lerped = staged[: len(averaged)]
        self.lerp = MultiTensorLerp(averaged, self.lerped, threads=threads) if averaged else None
        # blocking: a worker waiting for its copy sleeps instead of spinning on a core the host lerp needs
        self.event = torch.cuda.Event(blocking=True) if cuda else None


class _Pipeline:
    """The copies, the worker thread and their synchronisation; it holds no reference to the OffloadedEMA, so the
    worker never keeps one alive."""

    def __init__(self, ema: _HostAverage, chunk_bytes: int, threads):
        import torch

        self.cuda = ema.device.type == "cuda"
        self.device = ema.device
        memory, current, averaged, n = ema._memory, ema._current, list(ema.averaged.values()), ema._param_count
        flat = [t.detach().view(-1) for t in current]
        # Buffers are copied first, into a staging area of their own: the next forward writes some (BatchNorm's
        # statistics), so update() cannot return before they are copied. Copied (non-averaged) buffers go
        # straight into ema.copied.
        buffer_stage = memory.carve([((t.numel(),), t.dtype) for t in current[n:]])
        self.buffers = _Chunk(
            [*flat[n:], *(b.detach() for _, b in ema._copied)],
            [*buffer_stage, *ema.copied.values()],
            [a.view(-1) for a in averaged[n:]],
            threads,
            self.cuda,
        )
        # The parameters, chunk by chunk, through two staging slots: chunk k lands in slot k % 2.
        sizes = [t.element_size() for t in current]
        pieces = pack_chunks([t.numel() for t in current[:n]], sizes, chunk_bytes)
        slot_bytes = max(
            (off + (end - start) * sizes[i] for chunk in pieces for i, start, end, off in chunk), default=0
        )
        slots = [memory.empty(slot_bytes) for _ in range(min(2, len(pieces)))]
        self.chunks = [
            _Chunk(
                [flat[i][start:end] for i, start, end, _ in chunk],
                [
                    slots[k % 2][off : off + (end - start) * sizes[i]].view(current[i].dtype)
                    for i, start, end, off in chunk
                ],
                [averaged[i].view(-1)[start:end] for i, start, end, _ in chunk],
                threads,
                self.cuda,
            )
            for k, chunk in enumerate(pieces)
        ]
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready = torch.cuda.Event() if self.cuda else None
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pysoup-offloaded-ema")
        self.all_copied = threading.Event()  # set once the last chunk's copy is issued
        self.all_copied.set()
        self.future = None
        self.fenced = True
        self.worker = None  # the worker thread's ident, once it ran

    # -- the training thread -------------------------------------------------------------------------------------
    def start(self, t: float) -> None:
        """Issues the copies of this step's weights (buffers, chunks 0 and 1) and hands the rest to the worker."""
        import torch

        self.all_copied.clear()
        self.fenced = False
        try:
            if self.cuda:
                current = torch.cuda.current_stream(self.device)
                self.ready.record(current)  # after everything the caller enqueued: the optimizer step
                self.side.wait_event(self.ready)
                self._copy(self.buffers)
                if self.buffers.sources:
                    current.wait_event(self.buffers.event)  # the next forward may write the buffers
            else:
                self._copy(self.buffers)
            for k in range(min(2, len(self.chunks))):
                self._issue(k)
            if not self.chunks:
                self.all_copied.set()
            self.future = self.executor.submit(self._run, t)
        except BaseException:
            self.all_copied.set()  # nothing more will be issued: a fence must not wait for it
            raise

    def fence(self) -> None:
        """Blocks until the last copy of the update in flight is issued and makes the current stream wait for it:
        from here on the weights may be written."""
        import torch

        if self.fenced:
            return
        self.all_copied.wait()
        if self.cuda and self.chunks:
            torch.cuda.current_stream(self.device).wait_event(self.chunks[-1].event)
        self.fenced = True

    def wait(self) -> None:
        """Waits for the update in flight to be in the average; re-raises what the worker raised."""
        if self.future is None:
            return
        self.fence()
        future, self.future = self.future, None
        future.result()

    # -- both threads --------------------------------------------------------------------------------------------
    def _copy(self, chunk: _Chunk) -> None:
        import torch

        if not chunk.sources:
            return
        if self.cuda:
            with torch.cuda.stream(self.side):
                torch._foreach_copy_(chunk.staged, chunk.sources, non_blocking=True)
                chunk.event.record(self.side)
        else:
            torch._foreach_copy_(chunk.staged, chunk.sources)

    def _issue(self, k: int) -> None:
        self._copy(self.chunks[k])
        if k == len(self.chunks) - 1:
            self.all_copied.set()

    # -- the worker thread ---------------------------------------------------------------------------------------
    def _run(self, t: float) -> None:
        import torch

        self.worker = threading.get_ident()
        try:
            with torch.no_grad(), torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext():
                self._apply(self.buffers, t)
                for k, chunk in enumerate(self.chunks):
                    self._apply(chunk, t)
                    if k + 2 < len(self.chunks):
                        self._issue(k + 2)  # into the slot chunk k just freed
        finally:
            self.all_copied.set()  # a fence must not wait forever for copies a failure left unissued

    def _apply(self, chunk: _Chunk, t: float) -> None:
        import torch

        if chunk.event is not None and chunk.sources:
            chunk.event.synchronize()
        if not chunk.averaged:
            return
        if t == 1.0:  # a copy: exact even where the average holds inf or NaN (0 * inf is NaN), as EMA
            torch._foreach_copy_(chunk.averaged, chunk.lerped)
        else:
            chunk.lerp(t)


class OffloadedEMA(EMA, _HostAverage):
    """pysoup.training.EMA with the average in host memory: each update() copies the weights to the host in
    chunks and a worker thread lerps them into the average while the training step goes on.

    The schedule (decay, warm-up, update_every, start_step) is EMA's own (decay_at), and the average is the same
    bytes as EMA's after every update; state_dict() and load_state_dict() are interchangeable with EMA's.

    Memory: the average (and the copied buffers) in host memory, page-locked when the model is on a GPU; a staging
    area of two chunks (2 x chunk_bytes at most) plus the size of the float buffers, on the host. Extra GPU memory:
    none (the copies go from the parameters straight into the host staging). For contrast, torchtitan's offload
    (as issue 11 describes it) keeps a full-size GPU scratch copy of the weights, and NeMo's EMAOptimizer with a
    CPU device allocates a new host copy of every parameter every step (`param.data.to(device, non_blocking=True)`).

    Synchronisation: update() must be called after optimizer.step(). It records an event on the current stream
    and the copies (on a side stream) wait for it, so they read this step's weights. With only two staging slots,
    the copy of chunk k + 2 can be issued only once the host has lerped chunk k, so the weights must not change
    until the host lerp has reached the last two chunks:
      - buffers (BatchNorm statistics, written by the next forward) are copied first, into staging of their own,
        and update() makes the current stream wait for that copy before returning (cost: the buffers' transfer);
      - parameters are written by the next optimizer step. With `optimizer=`, a step pre-hook (fence()) blocks the
        training thread at the next optimizer.step() until the last copy is issued, and makes the current stream
        wait for it: the host lerp overlaps the next forward and backward, and the GPU idles only for the part of
        the host work (lerp of all but the last two chunks, then the last copy) that outlasts them. Without
        `optimizer=`, update() fences itself before returning: then only the lerp of the last two chunks (at most
        2 x chunk_bytes of weights) overlaps training, and the rest is paid inside update().
    Anything else that writes the weights between two updates must call fence() first (swapped(), state_dict(),
    save() and load_state_dict() wait for the update in flight themselves). Read `averaged` after wait().

    Args:
        model: the training model, on one CPU or CUDA device (its parameters, and floating-point buffers under
            buffers="average").
        decay, warmup, warmup_gamma, warmup_power, min_decay, update_every, start_step, buffers, dtype: as EMA.
        chunk_bytes: the staging chunk size, at least 1 MiB (default 64 MiB).
        optimizer: the optimizer (or a list of them) whose step writes the weights: its step pre-hook is where
            the training thread waits for the copies (see above). Default none: update() waits itself.
        threads: CPU threads of the host lerp (default: every core this process may use).

    Example:
        >>> ema = pysoup.training.OffloadedEMA(model, decay=0.999, optimizer=opt)  # doctest: +SKIP
        >>> for batch in loader:                                                    # doctest: +SKIP
        ...     loss(model, batch).backward(); opt.step(); ema.update()
        >>> ema.save("ema.safetensors")                                             # doctest: +SKIP
    """

    kind = "EMA"  # the state: an EMA's, loadable either way

    def __init__(
        self,
        model,
        decay: float = 0.9999,
        *,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        update_every: int = 1,
        start_step: int = 0,
        buffers: str = "average",
        dtype=None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        optimizer=None,
        threads: int | None = None,
    ):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < MIN_CHUNK_BYTES:
            raise PlanError(f"{NAME}: chunk_bytes must be an integer of at least 1 MiB (1048576), got {chunk_bytes!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise PlanError(f"{NAME}: threads must be a positive integer or None, got {threads!r}")
        optimizers = (
            [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        )
        for opt in optimizers:
            if not callable(getattr(opt, "register_step_pre_hook", None)):
                raise PlanError(
                    f"{NAME}: optimizer must be a torch.optim.Optimizer (or a list), got {type(opt).__name__}"
                )
        try:
            super().__init__(
                model,
                decay,
                warmup=warmup,
                warmup_gamma=warmup_gamma,
                warmup_power=warmup_power,
                min_decay=min_decay,
                update_every=update_every,
                start_step=start_step,
                buffers=buffers,
                dtype=dtype,
            )
            self._pipeline = _Pipeline(self, chunk_bytes, threads)
        except BaseException:
            if "_memory" in self.__dict__:
                self._memory.release()
            raise
        self.chunk_bytes = chunk_bytes
        me = weakref.ref(self)
        self._hooks = [opt.register_step_pre_hook(lambda *_: _fence(me)) for opt in optimizers]
        self._finalizer = weakref.finalize(self, _close, self._pipeline, self._hooks, self._memory)

    @property
    def chunks(self) -> int:
        """How many chunks the parameters are copied in."""
        return len(self._pipeline.chunks)

    def update(self, step: int | None = None) -> None:
        """Call after each optimizer step: waits for the previous update, then issues this one's copies and returns
        (after fencing, when no optimizer was given). `step`: the step number, when the loop counts."""
        if not self._finalizer.alive:
            raise PlanError(f"{NAME}: update() after close()")
        self._pipeline.wait()
        previous = self.step
        self.step = self.step + 1 if step is None else int(step)
        t = self._weight()
        if t is None:
            return
        moved = self._moved()
        if moved:
            self.step = previous
            raise self._changed(f"{moved!r} no longer holds the memory it had (was its .data replaced?)")
        try:
            self._pipeline.start(t)
        except BaseException:
            self.step = previous
            raise
        self._averaged()
        if not self._hooks:
            self._pipeline.fence()

    def fence(self) -> None:
        """Returns once the weights may be written: the copies of the update in flight are issued and the current
        stream waits for them (the optimizer's step pre-hook calls this)."""
        self._pipeline.fence()

    def wait(self) -> None:
        """Waits until the update in flight is in the average."""
        self._pipeline.wait()

    def close(self) -> None:
        """Waits for the update in flight, removes the optimizer hooks, stops the worker thread and unregisters the
        page-locked memory (the average stays readable). Also done when the OffloadedEMA is garbage-collected."""
        self._pipeline.wait()
        self._finalizer()

    # -- reading and resuming: after the update in flight ----------------------------------------------------------
    def state_dict_of_average(self) -> dict:
        self.wait()
        return super().state_dict_of_average()

    def state_dict(self) -> dict:
        self.wait()
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.wait()
        super().load_state_dict(state)

    def save_sharded(self, directory) -> list:
        self.wait()
        return super().save_sharded(directory)

    def load_sharded(self, directory) -> None:
        self.wait()
        super().load_sharded(directory)

    @contextlib.contextmanager
    def swapped(self):
        """The training model holds the averaged weights inside the block (for evaluation), its own after; its own
        are kept in host memory meanwhile (no GPU memory)."""
        import torch

        self.wait()
        live = [*self._current, *(b for _, b in self._copied)]
        with torch.no_grad():
            kept = [x.detach().to("cpu", copy=True) for x in live]
            for x, avg in zip(live, [*self.averaged.values(), *self.copied.values()]):
                x.copy_(avg)
        try:
            yield self._model
        finally:
            with torch.no_grad():
                for x, old in zip(live, kept):
                    x.copy_(old)


def _fence(ref) -> None:
    ema = ref()
    if ema is not None:
        ema.fence()


def _close(pipeline: _Pipeline, hooks: list, memory: _HostMemory) -> None:
    """Removes the hooks, lets the update in flight finish, stops the worker, unregisters the host memory."""
    if threading.get_ident() == pipeline.worker:  # a garbage collection in the worker: it cannot wait for itself
        threading.Thread(target=_close, args=(pipeline, hooks, memory), daemon=True).start()
        return
    for handle in hooks:
        handle.remove()
    hooks.clear()
    with contextlib.suppress(Exception):  # a failed update was reported, or is of no interest any more
        pipeline.wait()
    if pipeline.side is not None:
        pipeline.side.synchronize()
    pipeline.executor.shutdown(wait=True)
    memory.release()

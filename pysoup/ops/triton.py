"""The triton backend: pysoup.kernels, on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1, which is
how CI tests it).

Tensor ops (weighted_sum, the multi-tensor lerp) run the kernels on the tensors where they are. Range ops, the
merge engine's (`pysoup.merge(..., device="cuda")`), stream host ranges to the backend's device: the engine
hands every op slices of the inputs' memory-mapped windows and of the output buffer; each range goes through
page-locked (pinned) staging buffers to the device, the kernels run there (the TIES histograms in pysoup._cuda
when it was built), and the result comes back into the output buffer. Input i of a range is staged into its own
pinned buffer while input i - 1 is still in flight over PCIe, so the CPU's copies overlap the DMA and the kernel
waits only for the last input.

Every range op computes the CPU backend's result bit for bit: the kernels follow the numerical contract, TIES
picks its threshold from exact histograms with the same radix select, and the statistics passes (SLERP, model
stock, the variance correction) form their fp64 sums in the CPU kernels' fixed order (pysoup.kernels.statistics).
Under TRITON_INTERPRET=1 the device may be the CPU: the same staging code runs, with plain buffers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

from pysoup.dtypes import KERNEL_CODE, SAFETENSORS_SIZES, to_torch
from pysoup.errors import BackendError
from pysoup.ops import reference, register_backend
from pysoup.ops.table import Backend


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def cuda_module():
    """pysoup._cuda when it was built (PYSOUP_CUDA=ON) and a CUDA device is present, else None."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from pysoup import _cuda
    except ImportError:
        return None
    return _cuda


@register_backend
class TritonBackend(Backend):
    """The Triton kernels; range ops run on `device` (default: the current CUDA device, or the CPU under the
    interpreter)."""

    name = "triton"

    def __init__(self, threads: int | None = None, device=None):
        super().__init__(threads)
        ok, reason = self.availability()
        if not ok:
            raise BackendError(f"the triton backend cannot run here: {reason}")
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise BackendError(f"unknown device {device!r}: {exc}") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendError(f"device {device!r}: torch sees no CUDA device")
            if self.device.index is not None and self.device.index >= torch.cuda.device_count():
                raise BackendError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        elif not (self.device.type == "cpu" and interpreting()):
            raise BackendError(f"device {device!r}: merges run on 'cuda' devices (or 'cpu' under TRITON_INTERPRET=1)")
        self.cuda = self.device.type == "cuda"
        self._slots = []  # per input position: [pinned host bytes, device bytes, event of the last upload]
        self._out = None  # pinned host bytes the results come back through

    @classmethod
    def availability(cls):
        if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
            return False, "triton is not installed: pip install 'pysoup[gpu]'"
        if interpreting():
            return True, ""
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
        return True, ""

    def activate(self):
        import torch

        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

    # -- tensor ops ------------------------------------------------------------------------------------------
    def weighted_sum(self, tensors, weights, out_dtype, normalize):
        from pysoup.kernels.weighted_sum import weighted_sum as launch

        _check_device(tensors[0])
        return launch(tensors, weights, out_dtype, normalize)

    def lerp_plan(self, averaged, current):
        _check_device(averaged[0])
        return _LerpPlan(averaged, current)

    def lerp_(self, averaged, current, t):
        # Plans of recent calls, so a training loop's one-shot calls do not copy new tables to the device each step.
        # A plan is a function of the pointers, sizes and dtypes in its key: a hit is valid even when the tensors it
        # was made for are gone.
        key = (
            averaged[0].device,
            *(x for a, b in zip(averaged, current) for x in (a.data_ptr(), b.data_ptr(), a.numel(), a.dtype, b.dtype)),
        )
        plan = _PLANS.pop(key, None) or self.lerp_plan(averaged, current)
        _PLANS[key] = plan  # most recent last
        while len(_PLANS) > _PLANS_KEPT:
            del _PLANS[next(iter(_PLANS))]
        plan(t)

    # -- staging ---------------------------------------------------------------------------------------------
    def _buffer(self, nbytes: int, pinned: bool):
        import torch

        size = max(nbytes, 1 << 20)
        if pinned and self.cuda:
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return torch.empty(size, dtype=torch.uint8, device=self.device if not pinned else "cpu")

    def upload(self, slot: int, addr: int, n: int, dtype: str):
        """The host range [addr, addr + n elements) as a tensor on the device (valid until this slot's next
        upload). Returns without waiting for the copy; kernels on the current stream run after it."""
        nbytes = n * SAFETENSORS_SIZES[dtype]
        while len(self._slots) <= slot:
            self._slots.append([None, None, None])
        entry = self._slots[slot]
        if entry[0] is None or entry[0].numel() < nbytes:
            if entry[2] is not None:
                entry[2].synchronize()
            entry[0], entry[1] = self._buffer(nbytes, pinned=True), self._buffer(nbytes, pinned=False)
        host, dev, done = entry
        if done is not None:
            done.synchronize()  # the previous upload from this pinned buffer has left it
        if nbytes:
            host[:nbytes].copy_(reference._view(addr, nbytes, "U8"))
            dev[:nbytes].copy_(host[:nbytes], non_blocking=True)
        if self.cuda:
            import torch

            entry[2] = torch.cuda.Event()
            entry[2].record()
        return dev[:nbytes].view(to_torch(dtype))

    def uploads(self, chunk):
        """Every source of a chunk on the device."""
        return [self.upload(i, a, chunk.n, d) for i, (a, d) in enumerate(zip(chunk.addrs, chunk.dtypes))]

    def download(self, result, chunk) -> int:
        """Copies a device result into the chunk's output range; returns how many values are not finite."""
        import torch

        nbytes = chunk.n * SAFETENSORS_SIZES[chunk.out_dtype]
        if nbytes == 0:
            return 0
        if self._out is None or self._out.numel() < nbytes:
            self._out = self._buffer(nbytes, pinned=True)
        flat = result.reshape(-1)
        nonfinite = (~torch.isfinite(flat)).sum()
        self._out[:nbytes].copy_(flat.view(torch.uint8), non_blocking=True)
        count = int(nonfinite)  # waits for the stream, so the copy above has landed too
        reference._view(chunk.out, nbytes, "U8").copy_(self._out[:nbytes])
        return count

    # -- range ops -------------------------------------------------------------------------------------------
    def fusion_kl_raw(self, chunk, row, kl, carry, hist=None):
        """Arcee Fusion's row KL on the host ranges: pysoup._C's kernel where it loaded (the same bits, ~20x faster
        than the reference's ~40 fp64 torch ops an element), else the reference's."""
        from pysoup import _native

        if not _native.available:
            return super().fusion_kl_raw(chunk, row, kl, carry, hist)
        from pysoup.ops.cpu import active_isa, default_threads, fusion_kl_native

        isa = _native.native.isa_code(active_isa())
        return fusion_kl_native(chunk, row, kl, carry, self.threads or default_threads(), isa, hist)

    def weighted_sum_raw(self, chunk, weights, normalize):
        from pysoup.kernels.weighted_sum import weighted_sum

        result = weighted_sum(self.uploads(chunk), weights, to_torch(chunk.out_dtype), normalize)
        return self.download(result, chunk)

    def task_vector_raw(self, chunk, p, quota):
        from pysoup.kernels.task_vector import task_vector_combine

        xs = self.uploads(chunk)
        result, quota = task_vector_combine(xs[:-1], xs[-1], p, chunk.start, quota, to_torch(chunk.out_dtype))
        return self.download(result, chunk), quota

    def top_k_selector(self, keep):
        return _DeviceRadixTopK(keep, self)

    def masked_sum_raw(self, chunk, weights, mode, center=0.0, scale=1.0):
        from pysoup.kernels.masked_sum import masked_sum

        result = masked_sum(self.uploads(chunk), weights, int(mode), to_torch(chunk.out_dtype), center, scale)
        return self.download(result, chunk)

    def sparse_scan_raw(self, chunk):
        return reference.sparse_scan(self.uploads(chunk))

    def moments_raw(self, chunk, acc):
        from pysoup.kernels.statistics import block_sums

        xs = self.uploads(chunk)
        base = xs.pop() if acc.spec.base else None
        return reference.moments(xs, base, chunk.start, acc, block_sums)


_PLANS: dict = {}
_PLANS_KEPT = 8


def _check_device(t) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise BackendError(f"the triton backend takes CUDA tensors (got {t.device}; TRITON_INTERPRET=1 allows CPU)")


class _LerpPlan:
    """pysoup.ops.lerp_ on a GPU: one launch per dtype pair (pysoup.kernels.multi_tensor), driven by a table of
    pointers and sizes made once per plan. The tables hold numbers, not tensors: whoever keeps a plan keeps the
    tensors alive and unmoved (MultiTensorLerp checks)."""

    def __init__(self, avg, cur):
        from pysoup.kernels.multi_tensor import TensorTable
        from pysoup.ops.checks import lerp_groups

        self.tables = []
        for As, Bs in lerp_groups(avg, cur).values():
            table = TensorTable(As, Bs)
            table.keep = None
            self.tables.append(table)

    def __call__(self, t: float) -> None:
        from pysoup.kernels.multi_tensor import lerp_ as launch

        for table in self.tables:
            launch(table, t)


class _DeviceRadixTopK(reference.TorchRadixTopK):
    """RadixTopK with the histograms counted on the device: by pysoup._cuda's fused kernel when it was built, else
    by torch.bincount (exact too, but it materialises the bits and bins of every element first)."""

    def __init__(self, keep, backend: TritonBackend):
        import torch

        super().__init__(keep)
        self._backend = backend
        self._counts = torch.zeros(self.k * self.BINS, dtype=torch.int64, device=backend.device)

    def _count(self, chunk, pass_):
        import torch

        xs = self._backend.uploads(chunk)
        module = cuda_module() if self._backend.cuda else None
        if module is None:
            self._bincount(xs, pass_, self._counts)
            return
        module.magnitude_histogram(
            [x.data_ptr() for x in xs[:-1]],
            [KERNEL_CODE[d] for d in chunk.dtypes[:-1]],
            xs[-1].data_ptr(),
            KERNEL_CODE[chunk.dtypes[-1]],
            chunk.n,
            pass_,
            [int(p) for p in self._prefix] if pass_ else [],
            self._counts.data_ptr(),
            torch.cuda.current_stream().cuda_stream,
        )

    def _select(self, want):
        self._hist.copy_(self._counts.cpu())
        self._counts.zero_()
        return super()._select(want)

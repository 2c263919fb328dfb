"""Merges on a GPU: `pysoup.merge(..., device="cuda")`.

The engine hands every op host ranges: slices of the inputs' memory-mapped windows and of the output buffer.
This backend streams each range through page-locked (pinned) staging buffers to the device, runs the Triton
kernels there (pysoup.kernels; the TIES histograms in pysoup._cuda when it was built), and copies the result
back into the output buffer. Input i of a range is staged into its own pinned buffer while input i - 1 is
still in flight over PCIe, so the CPU's copies overlap the DMA and the kernel waits only for the last input.

Every op computes the CPU backend's result bit for bit: the kernels follow the numerical contract, TIES picks
its threshold from exact histograms with the CPU's radix select, and the statistics passes (SLERP, model stock,
the variance correction) form their fp64 sums in the CPU kernels' fixed order (pysoup.kernels.statistics).

Under TRITON_INTERPRET=1 the "device" may be the CPU: the same staging code runs, with plain buffers, which is
how CI tests this module.
"""

from __future__ import annotations

import contextlib
import functools

from pysoup.dtypes import KERNEL_CODE, SAFETENSORS_SIZES, to_torch
from pysoup.errors import BackendError
from pysoup.ops import cpu as cpu_backend
from pysoup.ops import reference
from pysoup.ops import triton as triton_backend


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


class DeviceBackend:
    """The engine's backend interface (weighted_sum_raw, task_vector_raw, ..., TopKSelector) for one device."""

    __name__ = "pysoup.ops.device"  # reports name backends by module

    def __init__(self, device):
        ok, reason = triton_backend.availability()
        if not ok:
            raise BackendError(f"device merges need the triton backend: {reason}")
        import torch

        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise BackendError(f"unknown device {device!r}: {exc}") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendError(f"device {device!r}: torch sees no CUDA device")
            if self.device.index is not None and self.device.index >= torch.cuda.device_count():
                raise BackendError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        elif not (self.device.type == "cpu" and triton_backend.interpreting()):
            raise BackendError(f"device {device!r}: merges run on 'cuda' devices (or 'cpu' under TRITON_INTERPRET=1)")
        self.cuda = self.device.type == "cuda"
        self._slots = []  # per input position: [pinned host bytes, device bytes, event of the last upload]
        self._out = None  # pinned host bytes the results come back through
        self.TopKSelector = type("TopKSelector", (_DeviceTopK,), {"backend": self})

    def activate(self):
        """A context in which kernels launch on this backend's device."""
        import torch

        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

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

    def upload_all(self, addrs, dtypes, n: int):
        return [self.upload(i, a, n, d) for i, (a, d) in enumerate(zip(addrs, dtypes))]

    def download(self, result, out_addr: int, n: int, out_dtype: str) -> int:
        """Copies a device result into the host output range; returns how many values are not finite."""
        import torch

        nbytes = n * SAFETENSORS_SIZES[out_dtype]
        if nbytes == 0:
            return 0
        if self._out is None or self._out.numel() < nbytes:
            self._out = self._buffer(nbytes, pinned=True)
        flat = result.reshape(-1)
        nonfinite = (~torch.isfinite(flat)).sum()
        self._out[:nbytes].copy_(flat.view(torch.uint8), non_blocking=True)
        count = int(nonfinite)  # waits for the stream, so the copy above has landed too
        reference._view(out_addr, nbytes, "U8").copy_(self._out[:nbytes])
        return count

    # -- the engine's ops --------------------------------------------------------------------------------------
    def weighted_sum_raw(self, addrs, dtypes, weights, n, out_addr, out_dtype, normalize, threads=None) -> int:
        from pysoup.kernels.weighted_sum import weighted_sum

        xs = self.upload_all(addrs, dtypes, n)
        return self.download(weighted_sum(xs, weights, to_torch(out_dtype), normalize), out_addr, n, out_dtype)

    def task_vector_raw(self, addrs, dtypes, base, base_dtype, n, out, out_dtype, p, start, quota, threads=None):
        from pysoup.kernels.task_vector import task_vector_combine

        views = self.upload_all([*addrs, base], [*dtypes, base_dtype], n)
        result, quota = task_vector_combine(views[:-1], views[-1], p, start, quota, to_torch(out_dtype))
        return self.download(result, out, n, out_dtype), quota

    def masked_sum_raw(self, addrs, dtypes, weights, mode, n, out, out_dtype, threads=None, center=0.0, scale=1.0):
        from pysoup.kernels.masked_sum import masked_sum

        xs = self.upload_all(addrs, dtypes, n)
        result = masked_sum(xs, weights, mode, to_torch(out_dtype), center=center, scale=scale)
        return self.download(result, out, n, out_dtype)

    def sparse_scan_raw(self, addrs, dtypes, n, threads=None):
        return reference.sparse_scan(self.upload_all(addrs, dtypes, n))

    def moments_raw(
        self,
        addrs,
        dtypes,
        base,
        base_dtype,
        n,
        start,
        totals,
        mean_weights=(),
        dare_keys=(),
        keep_below=(),
        gram=True,
        threads=None,
    ):
        from pysoup.kernels.statistics import block_sums

        xs = self.upload_all([*addrs, base] if base else addrs, [*dtypes, base_dtype] if base else dtypes, n)
        b = xs.pop() if base else None
        return reference.moments(xs, b, start, totals, mean_weights, dare_keys, keep_below, gram, block_sums)


class _DeviceTopK(cpu_backend.TopKSelector):
    """The CPU's radix select (two histogram passes, then the same search over the counts), with the
    histograms counted on the device: by pysoup._cuda's fused kernel when it was built, else by torch.bincount
    (exact too, but it materialises the bits and bins of every element first)."""

    backend: DeviceBackend  # set per backend by DeviceBackend.__init__

    def __init__(self, keep, threads=None):
        import torch

        super().__init__(keep)
        self._counts = torch.zeros(self.k * 65536, dtype=torch.int64, device=self.backend.device)

    def add(self, addrs, dtypes, base, base_dtype, n, start, pass_):
        import torch

        views = self.backend.upload_all([*addrs, base], [*dtypes, base_dtype], n)
        b = views.pop()
        module = cuda_module() if self.backend.cuda else None
        if module is not None:
            module.magnitude_histogram(
                [x.data_ptr() for x in views],
                [KERNEL_CODE[d] for d in dtypes],
                b.data_ptr(),
                KERNEL_CODE[base_dtype],
                n,
                pass_,
                [int(p) for p in self._prefix] if pass_ else [],
                self._counts.data_ptr(),
                torch.cuda.current_stream().cuda_stream,
            )
            return
        bf = b.float()
        for i, x in enumerate(views):
            bits = (x.float() - bf).view(torch.int32) & 0x7FFFFFFF
            if pass_ == 0:
                binned = bits >> 16
            else:
                binned = bits[(bits >> 16) == int(self._prefix[i])] & 0xFFFF
            self._counts[i * 65536 : (i + 1) * 65536] += torch.bincount(binned, minlength=65536)

    def finish(self, pass_):
        import torch

        torch.frombuffer(self._hist, dtype=torch.int64).copy_(self._counts.cpu())
        self._counts.zero_()
        super().finish(pass_)

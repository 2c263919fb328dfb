"""The cpu backend: pysoup._C's fused kernels (scalar, AVX2, AVX-512; OpenMP threads; the GIL released)."""

from __future__ import annotations

import os

from pysoup import _native
from pysoup.dtypes import KERNEL_CODE, from_torch
from pysoup.errors import BackendError


def availability():
    if not _native.available:
        return False, f"the C++ module did not load: {_native.load_error}"
    return True, ""


def default_threads() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def usable_isas() -> list:
    return list(_native.native.cpu_isas()) if _native.available else []


def active_isa() -> str:
    """The best ISA this CPU runs, unless PYSOUP_CPU_ISA forces one."""
    isas = usable_isas()
    forced = os.environ.get("PYSOUP_CPU_ISA")
    if forced:
        if forced not in isas:
            raise BackendError(f"PYSOUP_CPU_ISA={forced!r} cannot run here (usable: {', '.join(isas)})")
        return forced
    return isas[-1]


def weighted_sum_raw(addrs, dtypes, weights, n, out_addr, out_dtype, normalize, threads=None, isa=None) -> int:
    """The engine's entry: raw buffers in and out. Returns the count of non-finite outputs."""
    return _native.native.weighted_sum(
        list(addrs), [KERNEL_CODE[d] for d in dtypes], list(weights), n, out_addr, KERNEL_CODE[out_dtype],
        normalize, threads or default_threads(), isa or active_isa(),
    )


def weighted_sum(tensors, weights, out_dtype, normalize, threads=None, isa=None):
    import torch

    if tensors[0].device.type != "cpu":
        raise BackendError(f"the cpu backend takes CPU tensors, got {tensors[0].device}")
    xs = [t.contiguous() for t in tensors]
    out = torch.empty(xs[0].shape, dtype=out_dtype)
    weighted_sum_raw([x.data_ptr() for x in xs], [from_torch(x.dtype) for x in xs], weights, out.numel(),
                     out.data_ptr(), from_torch(out_dtype), normalize, threads, isa)
    return out

"""The triton backend: pysoup.kernels on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1, which is
how CI tests them).

Kernels: weighted_sum, the task-vector combine (task arithmetic, TIES, DARE), the masked sum (sparse soup,
variance correction) and the multi-tensor lerp. On host buffers (the engine's entry points below, interpreter
only) the selection and statistics passes use the reference's torch code: TIES' threshold is a stable sort of
|tau|'s bits. File merges on a GPU go through pysoup.ops.device, which streams the ranges to the device and
counts the TIES histograms and the fixed-order statistics there.
"""

from __future__ import annotations

import importlib.util
import os

from pysoup.errors import BackendError


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def availability():
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
        return False, "triton is not installed: pip install 'pysoup[gpu]'"
    if interpreting():
        return True, ""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return True, ""


def _check_device(t) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise BackendError(f"the triton backend takes CUDA tensors (got {t.device}; TRITON_INTERPRET=1 allows CPU)")


def weighted_sum(tensors, weights, out_dtype, normalize, threads=None):
    from pysoup.kernels.weighted_sum import weighted_sum as launch

    _check_device(tensors[0])
    return launch(tensors, weights, out_dtype, normalize)


class LerpPlan:
    """pysoup.ops.lerp_ on a GPU: one launch per dtype pair (pysoup.kernels.multi_tensor), driven by a table of
    pointers and sizes made once per plan. The tables hold numbers, not tensors: whoever keeps a plan keeps the
    tensors alive and unmoved (MultiTensorLerp checks)."""

    def __init__(self, avg, cur, threads=None):
        from pysoup.kernels.multi_tensor import TensorTable
        from pysoup.ops._checks import lerp_groups

        _check_device(avg[0])
        self.tables = []
        for As, Bs in lerp_groups(avg, cur).values():
            table = TensorTable(As, Bs)
            table.keep = None
            self.tables.append(table)

    def __call__(self, t: float) -> None:
        from pysoup.kernels.multi_tensor import lerp_ as launch

        for table in self.tables:
            launch(table, t)


# Plans of recent lerp_ calls, so a training loop's one-shot calls do not copy new tables to the device each
# step. A plan is a function of the pointers, sizes and dtypes in its key: a hit is valid even when the tensors
# it was made for are gone.
_PLANS = {}
_PLANS_KEPT = 8


def lerp_(avg, cur, t: float, threads=None) -> None:
    key = (
        avg[0].device,
        *(x for a, b in zip(avg, cur) for x in (a.data_ptr(), b.data_ptr(), a.numel(), a.dtype, b.dtype)),
    )
    plan = _PLANS.pop(key, None) or LerpPlan(avg, cur)
    _PLANS[key] = plan  # most recent last
    while len(_PLANS) > _PLANS_KEPT:
        del _PLANS[next(iter(_PLANS))]
    plan(t)


def _host_views(addrs, dtypes, n):
    """The engine's host buffers as CPU tensors: only the interpreter can run kernels on them."""
    from pysoup.ops.reference import _view

    if not interpreting():
        raise BackendError("the triton backend takes host buffers only under TRITON_INTERPRET=1 (GPU: device='cuda')")
    return [_view(a, n, d) for a, d in zip(addrs, dtypes)]


def weighted_sum_raw(addrs, dtypes, weights, n, out_addr, out_dtype, normalize, threads=None) -> int:
    """The engine's entry on host buffers (interpreter only)."""
    from pysoup.dtypes import to_torch
    from pysoup.ops.reference import store

    result = weighted_sum(_host_views(addrs, dtypes, n), weights, to_torch(out_dtype), normalize)
    return store(out_addr, n, out_dtype, result)


def task_vector_raw(addrs, dtypes, base, base_dtype, n, out, out_dtype, p, start, quota, threads=None):
    """The engine's entry on host buffers (interpreter only)."""
    from pysoup.dtypes import to_torch
    from pysoup.kernels.task_vector import task_vector_combine
    from pysoup.ops.reference import store

    views = _host_views([*addrs, base], [*dtypes, base_dtype], n)
    result, quota = task_vector_combine(views[:-1], views[-1], p, start, quota, to_torch(out_dtype))
    return store(out, n, out_dtype, result), quota


def masked_sum_raw(addrs, dtypes, weights, mode, n, out, out_dtype, threads=None, center=0.0, scale=1.0) -> int:
    """The engine's entry on host buffers (interpreter only)."""
    from pysoup.dtypes import to_torch
    from pysoup.kernels.masked_sum import masked_sum
    from pysoup.ops.reference import store

    result = masked_sum(_host_views(addrs, dtypes, n), weights, mode, to_torch(out_dtype), center=center, scale=scale)
    return store(out, n, out_dtype, result)


# Selection and statistics: the reference's torch code (see the module docstring).
_FROM_REFERENCE = ("TopKSelector", "sparse_scan_raw", "moments_raw")


def __getattr__(name):
    if name in _FROM_REFERENCE:
        from pysoup.ops import reference

        return getattr(reference, name)
    if name.endswith("_raw"):
        raise BackendError(
            f"the triton backend has no {name} yet (the merge methods run on backend='cpu' or 'reference')"
        )
    raise AttributeError(name)

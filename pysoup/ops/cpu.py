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
        list(addrs),
        [KERNEL_CODE[d] for d in dtypes],
        list(weights),
        n,
        out_addr,
        KERNEL_CODE[out_dtype],
        normalize,
        threads or default_threads(),
        isa or active_isa(),
    )


def weighted_sum_rows(sources, out, out_base, k0, k1, dtypes, weights, out_dtype, normalize, threads=None, isa=None):
    """The engine's batches (pysoup.plan.Batch): output tensors [k0, k1) in one C++ call. Returns [(k, non-finite
    count)] for the tensors that have any."""
    return _native.native.weighted_sum_rows(
        list(sources),
        out,
        out_base,
        k0,
        k1,
        [KERNEL_CODE[d] for d in dtypes],
        list(weights),
        KERNEL_CODE[out_dtype],
        normalize,
        threads or default_threads(),
        isa or active_isa(),
    )


def weighted_sum(tensors, weights, out_dtype, normalize, threads=None, isa=None):
    import torch

    if tensors[0].device.type != "cpu":
        raise BackendError(f"the cpu backend takes CPU tensors, got {tensors[0].device}")
    xs = [t.contiguous() for t in tensors]
    out = torch.empty(xs[0].shape, dtype=out_dtype)
    weighted_sum_raw(
        [x.data_ptr() for x in xs],
        [from_torch(x.dtype) for x in xs],
        weights,
        out.numel(),
        out.data_ptr(),
        from_torch(out_dtype),
        normalize,
        threads,
        isa,
    )
    return out


class LerpPlan:
    """pysoup.ops.lerp_ on the CPU: one C++ call per dtype pair, whose threads split the elements of all its
    tensors evenly; the pointer lists are made once per plan."""

    def __init__(self, avg, cur, threads=None, isa=None):
        from pysoup.ops._checks import lerp_groups

        if avg[0].device.type != "cpu":
            raise BackendError(f"the cpu backend takes CPU tensors, got {avg[0].device}")
        self.threads, self.isa = threads or default_threads(), isa or active_isa()
        self.calls = []
        for (a_dtype, b_dtype), (As, Bs) in lerp_groups(avg, cur).items():
            outs = [a.data_ptr() for a in As]
            inputs = [p for pair in zip(outs, [b.data_ptr() for b in Bs]) for p in pair]
            codes = [KERNEL_CODE[from_torch(a_dtype)], KERNEL_CODE[from_torch(b_dtype)]]
            self.calls.append((inputs, codes, [a.numel() for a in As], outs))

    def __call__(self, t: float) -> None:
        from pysoup.dtypes import to_f32

        weights = [to_f32(1.0 - t), to_f32(t)]
        for inputs, codes, sizes, outs in self.calls:
            _native.native.weighted_sum_many(
                inputs, codes, weights, sizes, outs, codes[0], False, self.threads, self.isa
            )


def lerp_(avg, cur, t: float, threads=None, isa=None) -> None:
    LerpPlan(avg, cur, threads, isa)(t)


# -- task-vector merges, sparse soups, statistics (issue: merge methods) ----------------------------------
def task_vector_raw(addrs, dtypes, base, base_dtype, n, out, out_dtype, p, start, quota, threads=None, isa=None):
    """TIES / DARE / task arithmetic over one range. `p` is a TaskVectorParams; returns (nonfinite, quota)."""
    return _native.native.task_vector(
        list(addrs),
        [KERNEL_CODE[d] for d in dtypes],
        base,
        KERNEL_CODE[base_dtype],
        n,
        out,
        KERNEL_CODE[out_dtype],
        list(p.weights),
        p.lam,
        p.normalize,
        p.consensus,
        list(p.dare_keys),
        list(p.keep_below),
        list(p.dare_scale),
        list(p.trim_bits),
        list(quota),
        start,
        threads or default_threads(),
        isa or active_isa(),
    )


class TopKSelector:
    """The exact keep[i]-th largest |x_i - base| per model, by radix select over the fp32 bits in two histogram
    passes (high 16 bits, then low 16 bits inside the chosen bin): no copy of any tensor, two streaming reads."""

    passes = 2

    _buffers: dict = {}  # one histogram per model count, reused by every tensor (cleared between passes)

    def __init__(self, keep, threads=None, isa=None):
        import ctypes

        self.keep = list(keep)
        self.k = len(self.keep)
        if self.k not in self._buffers:
            self._buffers[self.k] = (ctypes.c_uint64 * (self.k * 65536))()
        self._hist = self._buffers[self.k]
        ctypes.memset(self._hist, 0, ctypes.sizeof(self._hist))
        self._addr = ctypes.addressof(self._hist)
        self._prefix = [0] * self.k
        self._threads, self._isa = threads, isa
        self.thresholds = None
        self.quotas = None

    def add(self, addrs, dtypes, base, base_dtype, n, start, pass_):
        _native.native.magnitude_histogram(
            list(addrs),
            [KERNEL_CODE[d] for d in dtypes],
            base,
            KERNEL_CODE[base_dtype],
            n,
            pass_,
            self._prefix,
            self._addr,
            self._threads or default_threads(),
            self._isa or active_isa(),
        )

    def finish(self, pass_):
        import ctypes

        # Models keeping nothing or everything need no search: threshold above / at the bottom of every value.
        want = [max(1, k) for k in self.keep]
        if pass_ == 0:
            bins, above, _ = _native.native.radix_select(self._addr, want)
            self._prefix, self._above = list(bins), list(above)
            ctypes.memset(self._addr, 0, ctypes.sizeof(self._hist))
            return
        need = [w - a for w, a in zip(want, self._above)]
        bins, above, in_bin = _native.native.radix_select(self._addr, need)
        self.thresholds, self.quotas = [], []
        for i, keep in enumerate(self.keep):
            if keep == 0:
                self.thresholds.append(0xFFFFFFFF)
                self.quotas.append(0)
                continue
            self.thresholds.append((self._prefix[i] << 16) | bins[i])
            quota = need[i] - above[i]
            self.quotas.append(-1 if quota == in_bin[i] else quota)


def masked_sum_raw(addrs, dtypes, weights, mode, n, out, out_dtype, threads=None, isa=None, center=0.0, scale=1.0):
    """Sparse soup (mode 0 shared, 1 intersection, 2 union) or the variance-corrected mean (mode 3)."""
    return _native.native.masked_sum(
        list(addrs),
        [KERNEL_CODE[d] for d in dtypes],
        list(weights),
        mode,
        n,
        out,
        KERNEL_CODE[out_dtype],
        threads or default_threads(),
        isa or active_isa(),
        center,
        scale,
    )


def sparse_scan_raw(addrs, dtypes, n, threads=None, isa=None):
    """(first index where the zero patterns differ, or -1; zeros in the first input)."""
    return _native.native.sparse_scan(
        list(addrs), [KERNEL_CODE[d] for d in dtypes], n, threads or default_threads(), isa or active_isa()
    )


def moments_raw(
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
    isa=None,
):
    """fp64 statistics of one range added to `totals` (layout: see csrc/cpu/task_vector.h, MomentsArgs)."""
    return _native.native.moments(
        list(addrs),
        [KERNEL_CODE[d] for d in dtypes],
        base or 0,
        KERNEL_CODE[base_dtype or "F32"],
        n,
        list(mean_weights),
        list(dare_keys),
        list(keep_below),
        start,
        list(totals),
        threads or default_threads(),
        isa or active_isa(),
        gram,
    )

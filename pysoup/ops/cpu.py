"""The cpu backend: pysoup._C's fused kernels (scalar, AVX2, AVX-512; OpenMP threads; the GIL released)."""

from __future__ import annotations

import ctypes
import os

from pysoup import _native
from pysoup.dtypes import KERNEL_CODE, from_torch
from pysoup.errors import BackendError
from pysoup.ops import register_backend
from pysoup.ops.table import Backend, Batch, Chunk, RadixTopK

# SCE's variance selection keeps every entry's fp32 variance bits in memory during its first pass where they take at
# most this much (32 Mi entries: every matrix of a 1B Llama, its [16384, 2048] embeddings too), and then ends the
# selection there: the low-half histogram and the keep bits come from memory, so the variances are computed once
# instead of three times and the inputs read three times instead of four. Larger tensors take both passes. At 64 MiB
# the embeddings took both (SCE, base + 3 x 512 MiB: 3.90-4.14 s in-process against 3.76-3.81 s); 128 MiB fits the
# 256 MiB peak-RSS target since the input windows shrank to 8 MiB (227.7 MiB peak; with 16 MiB windows 259.9 MiB).
VARIANCE_STORE_BYTES = 128 << 20


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


def _codes(dtypes) -> list:
    return [KERNEL_CODE[d] for d in dtypes]


def fusion_kl_native(chunk, row, kl, carry, threads: int, isa: int, hist=None) -> None:
    """Arcee Fusion's row KL with the C++ kernel over a chunk of host memory (the cpu and triton backends'
    fusion_kl_raw, the latter where pysoup._C loaded: the same bits as the torch reference, tested): whole rows in
    one call, a row split between chunks copied and carried until it is whole; with `hist`, the completed rows'
    importance keys counted there (Backend.fusion_kl_raw)."""
    import numpy as np

    from pysoup.dtypes import SAFETENSORS_SIZES

    sizes = [SAFETENSORS_SIZES[d] for d in chunk.dtypes]
    codes = _codes(chunk.dtypes)
    pos, end = chunk.start, chunk.start + chunk.n

    def copy(dst, at, e0, e1):  # the sources' elements [e0, e1) of this chunk into dst (bytes), from element `at`
        for i, s in enumerate(sizes):
            ctypes.memmove(dst[i].ctypes.data + at * s, chunk.addrs[i] + (e0 - chunk.start) * s, (e1 - e0) * s)

    h = 0 if hist is None else hist.ctypes.data
    lead = carry.pop("row", None)
    # A row an earlier chunk began: completed here (one kernel call on the copy), or carried on.
    if lead is not None:
        r, bufs = lead
        row_end = (r + 1) * row
        stop = min(row_end, end)
        copy(bufs, pos - r * row, pos, stop)
        if stop < row_end:
            carry["row"] = lead
            return
        _native.native.fusion_kl([b.ctypes.data for b in bufs], codes, row, 1, kl.ctypes.data + 4 * r, threads, isa, h)
        pos = stop
    first = -(-pos // row)  # the chunks come in order, so pos is a row start here (or the end)
    rows = max(0, end // row - first)
    if rows:
        addrs = [a + (first * row - chunk.start) * s for a, s in zip(chunk.addrs, sizes)]
        _native.native.fusion_kl(addrs, codes, row, rows, kl.ctypes.data + 4 * first, threads, isa, h)
    tail = max(pos, (first + rows) * row)
    if tail < end:  # the start of a row that ends in a later chunk: kept (a copy) until it is whole
        bufs = [np.empty(row * s, dtype=np.uint8) for s in sizes]
        copy(bufs, 0, tail, end)
        carry["row"] = (tail // row, bufs)


@register_backend
class CpuBackend(Backend):
    """The C++ kernels. The ISA and the thread count are resolved once, when the backend is made."""

    name = "cpu"

    def __init__(self, threads: int | None = None, isa: str | None = None):
        super().__init__(threads or default_threads())
        self.isa = isa or active_isa()
        if self.isa not in usable_isas():
            raise BackendError(f"CPU ISA {self.isa!r} cannot run here (usable: {', '.join(usable_isas())})")
        self._isa = _native.native.isa_code(self.isa)  # what the kernels take: the ISA's code, resolved once
        self._variances = None  # SCE's stored variance bits (_VarianceTopK), reused by every tensor

    @classmethod
    def availability(cls):
        if not _native.available:
            return False, f"the C++ module did not load: {_native.load_error}"
        return True, ""

    def describe(self):
        return {"backend": self.name, "device": "cpu", "cpu_isa": self.isa}

    # -- tensor ops ------------------------------------------------------------------------------------------
    def weighted_sum(self, tensors, weights, out_dtype, normalize):
        import torch

        if tensors[0].device.type != "cpu":
            raise BackendError(f"the cpu backend takes CPU tensors, got {tensors[0].device}")
        xs = [t.contiguous() for t in tensors]
        out = torch.empty(xs[0].shape, dtype=out_dtype)
        chunk = Chunk("", [x.data_ptr() for x in xs], [from_torch(x.dtype) for x in xs], 0, out.numel())
        chunk.out, chunk.out_dtype = out.data_ptr(), from_torch(out_dtype)
        self.weighted_sum_raw(chunk, weights, normalize)
        return out

    def lerp_plan(self, averaged, current):
        if averaged[0].device.type != "cpu":
            raise BackendError(f"the cpu backend takes CPU tensors, got {averaged[0].device}")
        return _LerpPlan(averaged, current, self.threads, self._isa)

    # -- range ops -------------------------------------------------------------------------------------------
    def weighted_sum_raw(self, chunk, weights, normalize):
        return _native.native.weighted_sum(
            list(chunk.addrs),
            _codes(chunk.dtypes),
            list(weights),
            chunk.n,
            chunk.out,
            KERNEL_CODE[chunk.out_dtype],
            normalize,
            self.threads,
            self._isa,
        )

    def weighted_sum_batch(self, batch: Batch, weights, normalize):
        return _native.native.weighted_sum_rows(
            list(batch.sources),
            batch.out,
            batch.out_base,
            batch.k0,
            batch.k1,
            _codes(batch.dtypes),
            list(weights),
            KERNEL_CODE[batch.out_dtype],
            normalize,
            self.threads,
            self._isa,
        )

    def task_vector_raw(self, chunk, p, quota):
        return _native.native.task_vector(
            list(chunk.addrs[:-1]),
            _codes(chunk.dtypes[:-1]),
            chunk.addrs[-1],
            KERNEL_CODE[chunk.dtypes[-1]],
            chunk.n,
            chunk.out,
            KERNEL_CODE[chunk.out_dtype],
            list(p.weights),
            p.lam,
            p.normalize,
            p.consensus,
            list(p.dare_keys),
            list(p.keep_below),
            list(p.dare_scale),
            list(p.trim_bits),
            list(quota),
            chunk.start,
            self.threads,
            self._isa,
        )

    def top_k_selector(self, keep):
        return _RadixTopK(keep, self)

    def masked_sum_raw(self, chunk, weights, mode, center=0.0, scale=1.0):
        return _native.native.masked_sum(
            list(chunk.addrs),
            _codes(chunk.dtypes),
            list(weights),
            int(mode),
            chunk.n,
            chunk.out,
            KERNEL_CODE[chunk.out_dtype],
            self.threads,
            self._isa,
            center,
            scale,
        )

    def sparse_scan_raw(self, chunk):
        return _native.native.sparse_scan(list(chunk.addrs), _codes(chunk.dtypes), chunk.n, self.threads, self._isa)

    def segment_moments_raw(self, chunk, seg, base, acc):
        _native.native.segment_moments(
            list(chunk.addrs),
            _codes(chunk.dtypes),
            base,
            chunk.n,
            seg.length,
            seg.columns,
            chunk.start,
            acc.ctypes.data,
            acc.shape[0],
            self.threads,
            self._isa,
        )
        return acc

    def segment_weighted_sum_raw(self, chunk, seg, coefficients, around_base):
        import numpy as np

        # The kernel reads each source's coefficients contiguously: [sources, vectors].
        by_source = np.ascontiguousarray(coefficients.T, dtype=np.float32)
        return _native.native.segment_weighted_sum(
            list(chunk.addrs),
            _codes(chunk.dtypes),
            around_base,
            chunk.n,
            seg.length,
            seg.columns,
            chunk.start,
            by_source.ctypes.data,
            seg.count,
            chunk.out,
            KERNEL_CODE[chunk.out_dtype],
            self.threads,
            self._isa,
        )

    def fusion_kl_raw(self, chunk, row, kl, carry, hist=None):
        fusion_kl_native(chunk, row, kl, carry, self.threads, self._isa, hist)

    def fusion_histogram_raw(self, chunk, row, kl, pass_, prefix, hist):
        _native.native.fusion_histogram(
            list(chunk.addrs),
            _codes(chunk.dtypes),
            kl.ctypes.data,
            kl.shape[0],
            row,
            chunk.start,
            chunk.n,
            pass_,
            [int(p) for p in prefix],
            hist.ctypes.data,
            self.threads,
            self._isa,
        )

    def fusion_combine_raw(self, chunk, row, kl, threshold):
        return _native.native.fusion_combine(
            list(chunk.addrs),
            _codes(chunk.dtypes),
            kl.ctypes.data,
            kl.shape[0],
            row,
            chunk.start,
            chunk.n,
            threshold,
            chunk.out,
            KERNEL_CODE[chunk.out_dtype],
            self.threads,
            self._isa,
        )

    def nearswap_raw(self, chunk, t):
        return _native.native.nearswap(
            list(chunk.addrs),
            _codes(chunk.dtypes),
            t,
            chunk.n,
            chunk.out,
            KERNEL_CODE[chunk.out_dtype],
            self.threads,
            self._isa,
        )

    def lora_fold_raw(self, chunk, left, right):
        rows, cols = left.shape[0], right.shape[1]
        if chunk.n != rows * cols or left.shape[1] != right.shape[0]:
            raise BackendError(f"lora_fold_raw: {chunk.n} elements, L {left.shape}, R {right.shape}")
        for m in (left, right):  # the kernel reads raw row-major fp32
            if m.dtype != "float32" or not m.flags.c_contiguous:
                raise BackendError(f"lora_fold_raw: L and R must be C-contiguous fp32, got {m.dtype} {m.strides}")
        return _native.native.lora_fold(
            chunk.addrs[0],
            KERNEL_CODE[chunk.dtypes[0]],
            left.ctypes.data,
            right.ctypes.data,
            rows,
            cols,
            left.shape[1],
            chunk.out,
            KERNEL_CODE[chunk.out_dtype],
            self.threads,
            self._isa,
        )

    def sparse_task_vector_raw(self, chunk, p, quota):
        return _native.native.sparse_task_vector(
            list(chunk.addrs[:-1]),
            _codes(chunk.dtypes[:-1]),
            chunk.addrs[-1],
            KERNEL_CODE[chunk.dtypes[-1]],
            chunk.n,
            chunk.out,
            KERNEL_CODE[chunk.out_dtype],
            _sparse_params(p),
            list(quota),
            chunk.start,
            self.threads,
            self._isa,
        )

    def sparse_stats_raw(self, chunk, p, quota, acc):
        return _native.native.sparse_stats(
            list(chunk.addrs[:-1]),
            _codes(chunk.dtypes[:-1]),
            chunk.addrs[-1],
            KERNEL_CODE[chunk.dtypes[-1]],
            chunk.n,
            _sparse_params(p),
            list(quota),
            list(acc),
            chunk.start,
            self.threads,
            self._isa,
        )

    def variance_selector(self, density, numel=0, keep_mask=None):
        return _VarianceTopK(density, self, numel, keep_mask)

    def _variance_bits(self, numel: int):
        """Memory for numel uint32 variance bits (numel * 4 <= VARIANCE_STORE_BYTES): one buffer per backend, grown
        to the largest tensor, which one tensor's selection at a time fills in pass 0 and reads at its end (the
        engine reduces one tensor at a time; like _RadixTopK's histograms, it is not for concurrent merges). It stays
        while the backend does (pysoup.ops caches backends): at most VARIANCE_STORE_BYTES after an SCE merge. Made
        per tensor, 64 MiB took ~55 ms to allocate (ctypes zeroes it, faulting every page in) and ~16 ms to free, in
        the main thread: the 512 MiB benchmark's SCE took 5.2-5.4 s against 4.6-4.7 s reused (2 cores)."""
        if self._variances is None or len(self._variances) < numel:
            self._variances = None  # the old buffer freed before the new one is made
            self._variances = (ctypes.c_uint32 * numel)()
        return self._variances

    def keep_mask_buffer(self, nbytes: int):
        """Zeroed memory for DELLA's or SCE's keep bits (SparseParams.keep_mask): the statistics pass stores the
        selection, the combine reads it instead of ranking every row or computing every variance again."""
        return (ctypes.c_uint8 * nbytes)()

    def moments_raw(self, chunk, acc):
        spec = acc.spec
        addrs, dtypes = (chunk.addrs[:-1], chunk.dtypes[:-1]) if spec.base else (chunk.addrs, chunk.dtypes)
        totals = _native.native.moments(
            list(addrs),
            _codes(dtypes),
            chunk.addrs[-1] if spec.base else 0,
            KERNEL_CODE[chunk.dtypes[-1] if spec.base else "F32"],
            chunk.n,
            list(spec.mean_weights),
            list(spec.dare_keys),
            list(spec.keep_below),
            chunk.start,
            list(acc.totals),
            self.threads,
            self._isa,
            spec.gram,
        )
        return type(acc)(spec, list(totals))


class _LerpPlan:
    """pysoup.ops.lerp_ on the CPU: one C++ call per dtype pair, whose threads split the elements of all its
    tensors evenly; the pointer lists are made once per plan."""

    def __init__(self, avg, cur, threads, isa):
        from pysoup.ops.checks import lerp_groups

        self.threads, self.isa = threads, isa
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


class _RadixTopK(RadixTopK):
    """RadixTopK with the counting and the search in C++."""

    _buffers: dict = {}  # one histogram per model count, reused by every tensor (cleared between passes)

    def __init__(self, keep, backend: CpuBackend):
        super().__init__(keep)
        if self.k not in self._buffers:
            self._buffers[self.k] = (ctypes.c_uint64 * (self.k * self.BINS))()
        self._hist = self._buffers[self.k]
        self._addr = ctypes.addressof(self._hist)
        self._clear()
        self._backend = backend

    def _count(self, chunk, pass_):
        be = self._backend
        _native.native.magnitude_histogram(
            list(chunk.addrs[:-1]),
            _codes(chunk.dtypes[:-1]),
            chunk.addrs[-1],
            KERNEL_CODE[chunk.dtypes[-1]],
            chunk.n,
            pass_,
            self._prefix,
            self._addr,
            be.threads,
            be._isa,
        )

    def _select(self, want):
        bins, above, in_bin, self._mixed_in_bin = _native.native.radix_select(self._addr, want)
        return bins, above, in_bin

    def _mixed(self):
        # Pass 0's counters also count the values with a nonzero low half (csrc/cpu/radix_select.h: kMixedShift).
        return self._mixed_in_bin

    def _clear(self):
        ctypes.memset(self._addr, 0, ctypes.sizeof(self._hist))


def _sparse_params(p) -> tuple:
    """SparseParams as the sparse kernels take them (one tuple, in csrc/bindings.cpp's order)."""
    return (
        int(p.select),
        int(p.mix),
        list(p.weights),
        p.lam,
        p.normalize,
        list(p.scale),
        list(p.keep_bits),
        list(p.skip_bits),
        list(p.keys),
        list(p.lo),
        list(p.eps),
        [1 if d else 0 for d in p.drops],
        p.row,
        p.stride,
        p.epsilon,
        p.keep_mask,
        p.keep_mask_stride,
        p.keep_mask_mode,
    )


class _VarianceTopK(_RadixTopK):
    """SCE's selection (pysoup.ops.reference.TorchVarianceTopK) with the counting in C++. Given the tensor's keep
    bits and at most VARIANCE_STORE_BYTES of variances, pass 0 also stores each entry's variance bits, and finish(0)
    ends the selection from them: one pass over the stored bits counts pass 1's histogram and writes the keep bits
    outside the chosen high bin, then the bin's entries are kept against the same threshold and quota as pass 1 would
    give (keep_mask_written): the bits the statistics pass would have stored."""

    def __init__(self, density, backend, numel=0, keep_mask=None):
        super().__init__([0], backend)
        self.density = density
        self._zeros = self._numel = 0
        self._variances = None
        if keep_mask is not None and 0 < numel * 4 <= VARIANCE_STORE_BYTES:
            self._variances = backend._variance_bits(numel)  # entry e at e; dropped here when the selection ends
            self._keep_mask = keep_mask

    def _mixed(self):
        return None  # variances have low halves of every kind: two passes, or pass 1 counted from memory

    def _count(self, chunk, pass_):
        be = self._backend
        store = ctypes.addressof(self._variances) if self._variances is not None and pass_ == 0 else 0
        self._zeros += _native.native.variance_histogram(
            list(chunk.addrs[:-1]),
            _codes(chunk.dtypes[:-1]),
            chunk.addrs[-1],
            KERNEL_CODE[chunk.dtypes[-1]],
            chunk.n,
            pass_,
            self._prefix[0] if pass_ else 0,
            self._addr,
            be.threads,
            be._isa,
            store,
            chunk.start,
        )
        if pass_ == 0:
            self._numel += chunk.n

    def finish(self, pass_):
        if pass_ == 0:
            from pysoup.ops.reference import variance_keep

            self.keep = [variance_keep(self._numel - self._zeros, self.density)]
        super().finish(pass_)
        if pass_ == 0 and self._variances is not None:
            self._finish_from_memory()

    def _finish_from_memory(self):
        """Pass 1 over the stored variance bits, writing the keep bits of the entries outside the chosen bin as it
        goes, then the bin's entries' bits once the threshold and the quota are known (the stored bits are spent)."""
        be, n, addr = self._backend, self._numel, ctypes.addressof(self._variances)
        mask, prefix = ctypes.addressof(self._keep_mask), self._prefix[0]
        in_bin = _native.native.stored_variance_select(addr, n, prefix, self._addr, mask, be.threads, be._isa)
        super().finish(1)
        threshold, quota = self.thresholds[0], self.quotas[0]
        _native.native.stored_variance_keep_ties(addr, n, in_bin, prefix, threshold, quota, mask, be.threads)
        self._variances = self._keep_mask = None
        self.keep_mask_written = True

"""The op table: every op a backend implements, declared once, with its argument and result types.

Two families of ops:

- **Tensor ops** take torch tensors and return torch tensors: `weighted_sum` and the multi-tensor lerp that
  averaging during training runs every step (`lerp_plan`).
- **Range ops** are what the merge engine calls. Each takes a `Chunk` (one piece of one output tensor: raw input
  addresses, elements [start, start + n), the output address) or a `Batch` (many small output tensors at once),
  reads the inputs in place and writes the output in place. Ops that use a base model find it as the chunk's
  last source.

A backend is a registered subclass of `Backend` with a `name`; `pysoup.ops.get_backend` picks one. The reference
backend (plain torch) defines every result; the others match it bit for bit where the numerical contract says
so (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field
from typing import Protocol


# -- argument types -----------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """Elements [start, start + n) of output tensor `name`: one raw address per source (models, then the base
    when the op uses one), and the output address (0 during a reduction pass, which writes nothing)."""

    name: str
    addrs: list
    dtypes: list
    start: int
    n: int
    out: int = 0
    out_dtype: str = "F32"

    def without_base(self) -> Chunk:
        """The same range over the models only (the last source, the base, left out)."""
        return Chunk(self.name, self.addrs[:-1], self.dtypes[:-1], self.start, self.n, self.out, self.out_dtype)


@dataclass
class Batch:
    """Output tensors [k0, k1) of a plan in one op call (runs of small tensors of one kind). Tensor k's input i
    is at sources[i].base + the begin of row rows[k] of sources[i].table (rows None: row k); its output at
    out_base + out.begin(k), out.numel(k) elements."""

    sources: list  # (table, rows as int32 bytes or None, base address) per source
    dtypes: list
    out: object  # the plan's layout table
    out_base: int
    out_dtype: str
    k0: int
    k1: int

    def chunks(self):
        """(k, Chunk) for every tensor of the batch: for backends without a batched kernel."""
        from pysoup.io.table import rows

        for k in range(self.k0, self.k1):
            addrs = [base + t.begin(k if r is None else rows(r)[k]) for t, r, base in self.sources]
            out = self.out_base + self.out.begin(k)
            yield k, Chunk(self.out.name(k), addrs, self.dtypes, 0, self.out.numel(k), out, self.out_dtype)


@dataclass(frozen=True)
class TaskVectorParams:
    """The task-vector combine (task arithmetic, TIES, DARE) besides the data: per model its weight, DARE's
    Philox key, keep threshold and survivor scale, and TIES' magnitude threshold (fp32 bits of |tau|)."""

    weights: tuple
    lam: float
    normalize: bool
    consensus: bool  # TIES' sign election and disjoint mean
    dare_keys: tuple = ()
    keep_below: tuple = ()
    dare_scale: tuple = ()
    trim_bits: tuple = ()


class SparseSelect(enum.IntEnum):
    """Which entries of each task vector tau_i = x_i - base the sparsified task-vector op keeps (kernel codes)."""

    ALL = 0  # every entry
    BAND = 1  # per model, the entries ranked [skip, keep) by |tau_i| (descending, ties in index order): Breadcrumbs
    RANK = 2  # per model, a Bernoulli draw whose probability grows with |tau_i|'s rank in its row: DELLA's MagPrune
    SHARED = 3  # one mask for every model: the entries whose variance across the models ranks < keep: SCE


class SparseMix(enum.IntEnum):
    """How the sparsified task-vector op mixes the kept entries (kernel codes)."""

    SUM = 0  # base + lambda * sum_i w_i tau_i (divided by sum_i w_i under normalize)
    TIES = 1  # TIES: sign of sum_i w_i tau_i elected, agreeing entries mixed, divided by their weights (0 -> 1)
    SCE = 2  # SCE: sign of sum_i tau_i elected, base + sum_agree w_i tau_i / max(sum_agree w_i, 1e-6)
    RAM = 3  # RAM: c = #{i : |tau_i| > epsilon}; base + sum over those of (c == 1 ? w_i tau_i : tau_i / c)


@dataclass(frozen=True)
class SparseParams:
    """The sparsified task-vector op (Breadcrumbs, DELLA, SCE, RAM) besides the data. Selections whose ties are
    kept in index order take their quotas separately (they change from chunk to chunk)."""

    select: SparseSelect
    mix: SparseMix
    weights: tuple  # fp32 per model: the mixing weights (RAM: each model's factor for the entries only it changes)
    lam: float = 1.0
    normalize: bool = False
    scale: tuple = ()  # fp32 per model: l1 rescale of the kept entries; () for none
    keep_bits: tuple = ()  # BAND: per model, fp32 bits of the keep-th largest |tau_i|; SHARED: (bits of the variance,)
    skip_bits: tuple = ()  # BAND: per model, fp32 bits of the skip-th largest |tau_i| (0xFFFFFFFF: skip none)
    keys: tuple = ()  # RANK: per model, the Philox key of its draws
    lo: tuple = ()  # RANK: per model, fp32 density - epsilon (the probability of the smallest entry of a row)
    eps: tuple = ()  # RANK: per model, fp32 epsilon (the probabilities span lo .. lo + 2 epsilon)
    drops: tuple = ()  # RANK: per model, whether it is sparsified at all (density < 1)
    row: int = 1  # RANK: entries per row (the tensor's dimension 1; a 1-D tensor is one row)
    stride: int = 1  # RANK: distance between a row's entries (the product of the dimensions after 1)
    epsilon: float = 0.0  # RAM: fp32 threshold on |tau_i|
    # RANK, SHARED on the CPU: the address of the tensor's keep bits (keep_mask_stride bytes per model for RANK, one
    # mask for SHARED; bit e % 8 of byte e // 8), which the statistics pass writes (mode 1) and the combine reads
    # (mode 2) instead of selecting again.
    keep_mask: int = 0
    keep_mask_stride: int = 0
    keep_mask_mode: int = 0

    @property
    def quotas(self) -> int:
        """How many tie quotas the selection takes (BAND: keep then skip per model; SHARED: one)."""
        k = len(self.weights)
        return 2 * k if self.select == SparseSelect.BAND else 1 if self.select == SparseSelect.SHARED else 0


SPARSE_STATS = 5  # per model: sum |tau_i|, sum |kept tau_i|, sum kept tau_i^2, #shared, #unique (RAM)


@dataclass(frozen=True)
class Segments:
    """How a tensor of `numel` elements splits into the vectors the row- and column-wise methods work on: rows
    (element e in vector e // length, `length` contiguous elements each) or columns (element e in vector e % length,
    one element every `length`). `count` vectors in all."""

    length: int
    count: int
    columns: bool = False

    def ids(self, start: int, n: int):
        """The vector of each element in [start, start + n), as an int64 torch tensor."""
        import torch

        e = torch.arange(start, start + n, dtype=torch.int64)
        return e % self.length if self.columns else e // self.length


class MaskedSumMode(enum.IntEnum):
    """What `masked_sum` computes (the values are the kernels' codes)."""

    SHARED = 0  # the weighted mean where the first input is non-zero (the sparse soup's shared mask)
    INTERSECTION = 1  # the weighted mean where every input is non-zero, else 0
    UNION = 2  # the mean over the inputs that are non-zero there, weighted
    VARIANCE = 3  # center + scale * (weighted mean - center): the variance-corrected average


@dataclass(frozen=True)
class MomentsSpec:
    """Which fp64 statistics `moments` gathers over the vectors v_i: the k inputs (minus the base when there is
    one), then their weighted mean when `mean_weights` is given. Per vector: its sum, sum of squares and sum of
    absolute values; then the Gram entries <v_i, v_j>, i < j (zeros unless `gram`); then per input, with DARE
    keys, the sum of |tau| over the entries DARE keeps."""

    inputs: int
    base: bool = False
    mean_weights: tuple = ()
    gram: bool = True
    dare_keys: tuple = ()
    keep_below: tuple = ()

    @property
    def vectors(self) -> int:
        return self.inputs + (1 if self.mean_weights else 0)

    def __len__(self) -> int:
        v = self.vectors
        return 3 * v + v * (v - 1) // 2 + len(self.dare_keys)

    def zeros(self) -> Moments:
        return Moments(self, [0.0] * len(self))


@dataclass
class Moments:
    """The running totals of a MomentsSpec (a flat list in the kernels' layout), read by name."""

    spec: MomentsSpec
    totals: list = field(default_factory=list)

    def sum(self, i: int) -> float:
        return self.totals[3 * i]

    def squares(self, i: int) -> float:
        return self.totals[3 * i + 1]

    def abs_sum(self, i: int) -> float:
        return self.totals[3 * i + 2]

    def dot(self, i: int, j: int) -> float:
        """<v_i, v_j> for i < j."""
        v = self.spec.vectors
        return self.totals[3 * v + i * (2 * v - i - 1) // 2 + (j - i - 1)]

    def kept_abs_sum(self, i: int) -> float:
        """Sum of |tau_i| over the entries DARE keeps."""
        v = self.spec.vectors
        return self.totals[3 * v + v * (v - 1) // 2 + i]

    @property
    def mean(self) -> int:
        """The index of the weighted mean among the vectors."""
        return self.spec.inputs


class TopKSelector(Protocol):
    """Finds, per model, the keep[i]-th largest |x_i - base| of one tensor, exactly, over at most `passes` streaming
    passes of `add` (each chunk's sources: the models, then the base), each ended by `finish`; once `thresholds` is
    set the selection is done, and no later pass is run (the CPU's may end after pass 0). Then
    `thresholds[i]` holds the fp32 bits of that magnitude (0xFFFFFFFF when keep[i] is 0) and `quotas[i]` how many
    entries equal to it are kept, first in index order (-1: all of them). A selector given the tensor's keep-bit
    memory (Backend.variance_selector) may also write the selection there itself: then `keep_mask_written`."""

    passes: int
    thresholds: list | None
    quotas: list | None
    keep_mask_written: bool

    def add(self, chunk: Chunk, pass_: int) -> None: ...

    def finish(self, pass_: int) -> None: ...


class RadixTopK:
    """A TopKSelector by radix select over the fp32 bits of |x_i - base| in two histogram passes: the high 16 bits,
    then the low 16 bits inside the chosen bin; 65536 counts per model whatever the tensor's size, no copy of any
    tensor. Backends implement the counting (`_count`), the search over the counts (`_select`) and `_clear`.

    A backend whose pass 0 also counts, per bin, the values with a nonzero low half (`_mixed`) finishes after pass 0
    wherever every model's threshold is a value whose low half is 0 (then `thresholds` is set after pass 0, and the
    caller skips pass 1). That is the common case for bf16 fine-tunes: x_i - base of two bf16 values has a zero low
    half unless their exponents differ (99.6% of entries in the benchmark's models), and the zero low half is the
    bin's smallest value, so it is the threshold whenever the mixed values do not fill the count wanted."""

    passes = 2
    BINS = 1 << 16
    keep_mask_written = False
    # The mixed counts are exact in bins of fewer values (they share a 64-bit counter with the count).
    MIXED_EXACT_BELOW = 1 << 24

    def __init__(self, keep):
        self.keep = list(keep)
        self.k = len(self.keep)
        self._prefix = [0] * self.k  # pass 1 counts only the values whose high bits are the chosen bin
        self._above = [0] * self.k
        self.thresholds = self.quotas = None

    def add(self, chunk: Chunk, pass_: int) -> None:
        self._count(chunk, pass_)

    def _count(self, chunk: Chunk, pass_: int) -> None:
        """Adds the pass's histogram of chunk's |x_i - base| (model i's in row i)."""
        raise NotImplementedError

    def _select(self, want: list) -> tuple:
        """Per model i: the bin holding the want[i]-th largest value counting from the top, how many values lie
        in the bins above it and how many in it: (bins, above, in_bin)."""
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def _mixed(self):
        """After the last _select of pass 0: per model, how many values in its chosen bin have a nonzero low half;
        None where the backend does not count them."""
        return None

    def finish(self, pass_: int) -> None:
        # Models keeping nothing need no search: their threshold lies above every value.
        want = [max(1, k) for k in self.keep]
        if pass_ == 0:
            bins, above, in_bin = self._select(want)
            self._prefix, self._above = list(bins), list(above)
            mixed = self._mixed()
            if mixed is None or not self._finish_on_zero_low(want, in_bin, mixed):
                self._clear()  # for pass 1's counts
            return
        need = [w - a for w, a in zip(want, self._above)]
        bins, above, in_bin = self._select(need)
        self._set([(self._prefix[i] << 16) | bins[i] for i in range(self.k)], need, above, in_bin)

    def _finish_on_zero_low(self, want, in_bin, mixed) -> bool:
        """Ends the selection after pass 0 if every model's want-th largest has a zero low half: in its bin, the
        values with a nonzero low half (all larger) number fewer than it needs there. Pass 1 would count them above
        the low half 0, and the others in it: the same thresholds and quotas. Returns whether it ended."""
        need = [w - a for w, a in zip(want, self._above)]
        for i, keep in enumerate(self.keep):
            if keep and not (in_bin[i] < self.MIXED_EXACT_BELOW and mixed[i] < need[i] <= in_bin[i]):
                return False
        self._set([p << 16 for p in self._prefix], need, mixed, [n - m for n, m in zip(in_bin, mixed)])
        return True

    def _set(self, thresholds, need, above, ties) -> None:
        """thresholds and quotas from, per model, its threshold's bits, how many values it needs from the last bin
        searched, how many of that bin's values lie above the threshold and how many equal it."""
        self.thresholds, self.quotas = [], []
        for i, keep in enumerate(self.keep):
            if keep == 0:
                self.thresholds.append(0xFFFFFFFF)
                self.quotas.append(0)
                continue
            self.thresholds.append(thresholds[i])
            quota = need[i] - above[i]
            self.quotas.append(-1 if quota == ties[i] else quota)


# -- the backends --------------------------------------------------------------------------------------------
class Backend:
    """One implementation of the op table. Subclasses set `name`, implement `availability` and the ops, and are
    registered with `pysoup.ops.register_backend`. An instance is bound to a thread count (and, on the CPU, an
    ISA) resolved once, when it is made: a merge makes one and hands it every chunk."""

    name = ""
    device = "cpu"  # where the arithmetic runs
    top_k_passes = RadixTopK.passes  # streaming passes of this backend's TopKSelector

    def __init__(self, threads: int | None = None):
        self.threads = threads

    @classmethod
    def availability(cls) -> tuple:
        """(True, "") when this backend can run here, else (False, why not)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What a merge report says of this backend."""
        return {"backend": self.name, "device": str(self.device), "cpu_isa": None}

    def activate(self):
        """A context in which this backend's kernels run (e.g. its CUDA device current)."""
        return contextlib.nullcontext()

    # -- tensor ops ------------------------------------------------------------------------------------------
    def weighted_sum(self, tensors, weights, out_dtype, normalize: bool):
        """sum_i w_i x_i (divided by the fp32 sum of the weights under `normalize`), rounded to `out_dtype`."""
        raise NotImplementedError(f"the {self.name} backend has no weighted_sum")

    def lerp_plan(self, averaged, current):
        """A callable t -> None doing a <- weighted_sum([a, b], [1 - t, t]) rounded into a's dtype, in place, for
        every pair (tensors checked by pysoup.ops.checks.check_lerp_tensors)."""
        raise NotImplementedError(f"the {self.name} backend has no lerp")

    def lerp_(self, averaged, current, t: float) -> None:
        """One lerp over checked tensors (backends that launch from device tables keep plans of recent calls)."""
        self.lerp_plan(averaged, current)(t)

    # -- range ops: the merge engine's ---------------------------------------------------------------------
    def weighted_sum_raw(self, chunk: Chunk, weights, normalize: bool) -> int:
        """weighted_sum over one chunk into chunk.out. Returns how many results are not finite."""
        raise NotImplementedError(f"the {self.name} backend has no weighted_sum_raw")

    def weighted_sum_batch(self, batch: Batch, weights, normalize: bool) -> list:
        """weighted_sum_raw for every tensor of a batch; returns [(k, non-finite count)] where it is not 0.
        Backends with a batched kernel override this; here, one call per tensor."""
        bad = []
        for k, chunk in batch.chunks():
            count = self.weighted_sum_raw(chunk, weights, normalize)
            if count:
                bad.append((k, count))
        return bad

    def task_vector_raw(self, chunk: Chunk, p: TaskVectorParams, quota: list) -> tuple:
        """base + lam * mix(tau) over one chunk, tau_i = x_i - base after DARE's drop or TIES' trim (ties kept in
        index order while quota[i] lasts). Returns (non-finite count, the quotas left)."""
        raise NotImplementedError(f"the {self.name} backend has no task_vector_raw")

    def top_k_selector(self, keep: list) -> TopKSelector:
        """A TopKSelector for one tensor."""
        raise NotImplementedError(f"the {self.name} backend has no top_k_selector")

    def masked_sum_raw(self, chunk: Chunk, weights, mode: MaskedSumMode, center=0.0, scale=1.0) -> int:
        """The sparse soup's masked means, or the variance-corrected mean (see MaskedSumMode)."""
        raise NotImplementedError(f"the {self.name} backend has no masked_sum_raw")

    def sparse_scan_raw(self, chunk: Chunk) -> tuple:
        """(first index where the inputs' zero patterns differ, or -1; zeros in the first input)."""
        raise NotImplementedError(f"the {self.name} backend has no sparse_scan_raw")

    def sparse_task_vector_raw(self, chunk: Chunk, p: SparseParams, quota: list) -> tuple:
        """base + the mix of the sparsified task vectors over one chunk (see SparseParams; a RANK chunk holds whole
        rows). Returns (non-finite count, the quotas left). Backends without a kernel run the reference's, on the
        CPU through torch."""
        from pysoup.ops import reference

        return reference.sparse_task_vector_raw(chunk, p, quota)

    def keep_mask_buffer(self, nbytes: int):
        """Zeroed ctypes memory of nbytes for DELLA's or SCE's keep bits (SparseParams.keep_mask), or None where the
        backend selects again in the combine (this one: the reference's kernels take no bits)."""
        return None

    def sparse_stats_raw(self, chunk: Chunk, p: SparseParams, quota: list, acc: list) -> tuple:
        """acc (SPARSE_STATS fp64 totals per model) plus this chunk's, summed as moments_raw sums; returns
        (totals, the quotas left). Backends without a kernel run the reference's."""
        from pysoup.ops import reference

        return reference.sparse_stats_raw(chunk, p, quota, acc)

    def variance_selector(self, density: float, numel: int = 0, keep_mask=None) -> TopKSelector:
        """A TopKSelector over the fp32 variance across the models of each entry (sources: the models, then the
        base), keeping trunc(fp32(#nonzero variances * density)) entries, as SCE does. `keep_mask`: the tensor's
        (numel entries) zeroed keep bits from keep_mask_buffer, or None; a backend that can keep the tensor's
        variances in memory may end the selection with pass 0 and write the bits there (`keep_mask_written`).
        Backends without a kernel run the reference's (which always takes both passes and writes no bits)."""
        from pysoup.ops import reference

        return reference.TorchVarianceTopK(density)

    def segment_moments_raw(self, chunk: Chunk, seg: Segments, base: bool, acc):
        """acc (fp64 [seg.count, k + k(k-1)/2] tensor) plus this chunk's per-vector statistics of v_i = x_i (minus
        the base, the last source, when `base`): per vector |v_i|^2, then <v_i, v_j> for i < j. Each vector's sums
        run in element order, one fp64 addition at a time from acc: no chunking, thread or ISA changes them.
        Backends without a kernel run the reference's."""
        from pysoup.ops import reference

        return reference.segment_moments_raw(chunk, seg, base, acc)

    def segment_weighted_sum_raw(self, chunk: Chunk, seg: Segments, coefficients, around_base: bool) -> int:
        """out = sum_i c[v, i] x_i for element e of vector v (fma in input order from -0.0, fp32 coefficients
        [seg.count, sources]); with `around_base`, base + sum_i c[v, i] (x_i - base), the base the last source and
        c[v] one per model. Returns the non-finite count. Backends without a kernel run the reference's."""
        from pysoup.ops import reference

        return reference.segment_weighted_sum_raw(chunk, seg, coefficients, around_base)

    def fusion_kl_raw(self, chunk: Chunk, row: int, kl, carry: dict, hist=None) -> None:
        """Arcee Fusion's per-row statistic (sources: the model p, then the base b; rows of `row` elements):
        kl[r] = sum_j P_j log(P_j / Q_j), P = softmax(p_r) + 1e-8, Q = softmax(b_r) + 1e-8, in fp64 rounded to
        fp32 once (reference.fusion_kl defines every operation); `carry` keeps a row split between chunks until it
        is whole. With `hist` (int64 numpy [65536]), every row completed here also has its importances counted there
        as fusion_histogram_raw's pass 0 counts them (one reading of the rows fewer). The chunk is host memory on
        every backend. Backends without a kernel run the reference's."""
        from pysoup.ops import reference

        reference.fusion_kl_raw(chunk, row, kl, carry, hist)

    def fusion_histogram_raw(self, chunk: Chunk, row: int, kl, pass_: int, prefix: list, hist) -> None:
        """Adds the chunk's importance |p - b| * kl[row] (fp32) to the radix-select histograms of the quantiles:
        pass 0 the high 16 bits of each value's order key into hist[0], pass 1 the low 16 bits of those whose high
        bits are prefix[q] into hist[q] (hist: int64 numpy [quantiles, 65536]; order keys as
        reference.order_keys). Backends without a kernel run the reference's."""
        from pysoup.ops import reference

        reference.fusion_histogram_raw(chunk, row, kl, pass_, prefix, hist)

    def fusion_combine_raw(self, chunk: Chunk, row: int, kl, threshold: float) -> int:
        """out = b + (p - b) * (|p - b| * kl[row] >= threshold), in fp32. Returns the non-finite count. Backends
        without a kernel run the reference's."""
        from pysoup.ops import reference

        return reference.fusion_combine_raw(chunk, row, kl, threshold)

    def nearswap_raw(self, chunk: Chunk, t: float) -> int:
        """mergekit's NearSwap (sources: the model, then the base a), in its fp32 operation order:
        w = min(max(fp32(1 / max(|a - x|, 1e-6)) * t, 0), 1), out = w x + (1 - w) a, a NaN result as 0x7FC00000.
        Returns the non-finite count.
        Backends without a kernel run the reference's."""
        from pysoup.ops import reference

        return reference.nearswap_raw(chunk, t)

    def lora_fold_raw(self, chunk: Chunk, left, right) -> int:
        """A LoRA fold over rows of a weight (pysoup.lora.fold): out = round(W + L R), W the chunk's one source
        (rows x cols, row-major; rows = left.shape[0], cols = right.shape[1], chunk.n = rows * cols), L and R fp32
        C-contiguous numpy arrays [rows, K] and [K, cols]. Each element: acc = +0, acc = fma(L[r, k], R[k, c], acc)
        for k in order, s = fp32(W) + acc (one fp32 addition), a NaN s as 0x7FC00000, rounded once to the output
        dtype. Returns the non-finite count. Backends without a kernel run the reference's."""
        from pysoup.ops import reference

        return reference.lora_fold_raw(chunk, left, right)

    def moments_raw(self, chunk: Chunk, acc: Moments) -> Moments:
        """acc plus the statistics of one chunk (fp64, summed block by block in index order: the result does not
        depend on the backend, the chunking or the threads)."""
        raise NotImplementedError(f"the {self.name} backend has no moments_raw")

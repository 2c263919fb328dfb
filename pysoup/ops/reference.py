"""The reference backend: plain torch, fp32. It defines every op's result; the other backends must match it
bit for bit where the numerical contract says so.

torch has no fp32 fused multiply-add, so `fma_f32` computes one exactly: the product of two fp32 numbers is
exact in fp64; the fp64 sum is made round-to-odd (TwoSum gives the exact error, and an inexact even result
steps one ulp toward it), and rounding a round-to-odd fp64 value to fp32 is correctly rounded because fp64
has more than 24 + 2 bits. That is exactly fma's single rounding.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math

from pysoup.dtypes import SAFETENSORS_SIZES, f32_sum, to_f32, to_torch
from pysoup.ops import register_backend
from pysoup.ops.table import (
    SPARSE_STATS,
    Backend,
    Chunk,
    MaskedSumMode,
    Moments,
    RadixTopK,
    SparseMix,
    SparseSelect,
)


def exact_f32(x):
    """An input tensor converted to fp32 exactly, NaN payloads included: torch (2.13) turns every fp16 NaN into
    0x7FFFFFFF when converting, where the hardware conversion (vcvtph2ps) and the C++ kernels keep its sign and
    payload."""
    import torch

    f = x.float()
    if x.dtype != torch.float16:
        return f
    h = x.view(torch.int16).to(torch.int32)
    bits = ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x3FF) << 13)
    return torch.where(torch.isnan(x), bits.view(torch.float32), f)


def fma_f32(w: float, x, acc):
    """round_fp32(w * x + acc), exactly, for an fp32 scalar w and fp32 tensors x and acc."""
    import torch

    a = acc.double()
    p = x.double() * to_f32(w)  # exact: 24 + 24 bits fit in 53
    s = a + p
    bb = s - a
    err = (a - (s - bb)) + (p - bb)  # TwoSum: a + p == s + err exactly
    inexact = (err != 0) & torch.isfinite(s)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where(inexact & even, torch.nextafter(s, toward), s)
    return s.float()  # fp64 -> fp32: a rounding, not an input conversion


def round_to(acc, out_dtype):
    """fp32 -> out_dtype, round to nearest even; NaN keeps its sign and top payload bits, quiet bit set."""
    import torch

    if out_dtype == torch.float32:
        return acc
    if out_dtype == torch.float16:
        return acc.to(torch.float16)  # hardware-exact RNE (vcvtps2ph / the c10 equivalent)
    u = acc.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = torch.where(nan, (u >> 16) | 0x40, rounded) & 0xFFFF
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    return bits.view(torch.bfloat16)


def weighted_sum(tensors, weights, out_dtype, normalize):
    import torch

    acc = torch.full(tensors[0].shape, -0.0, dtype=torch.float32, device=tensors[0].device)
    for x, w in zip(tensors, weights):
        acc = fma_f32(w, exact_f32(x), acc)
    if normalize:
        total = f32_sum(weights)
        # A tensor divisor: torch may turn division by a scalar into multiplication by its reciprocal.
        acc = acc / torch.full_like(acc, float(total))
    return round_to(acc, out_dtype)


def store(out_addr: int, n: int, out_dtype: str, result) -> int:
    """Copies a result tensor into the engine's output buffer; returns how many values are not finite."""
    import torch

    _view(out_addr, n, out_dtype).copy_(result)
    return int((~torch.isfinite(result)).sum())


def _view(addr: int, n: int, dtype: str):
    import torch

    nbytes = n * SAFETENSORS_SIZES[dtype]
    if nbytes == 0:
        return torch.empty(0, dtype=to_torch(dtype))
    buf = (ctypes.c_char * nbytes).from_address(addr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(to_torch(dtype))


# -- task-vector merges, sparse soups, statistics (the definitions the C++ kernels reproduce) ------------
def philox_words(key: int, e):
    """Philox4x32-10 as Triton's tl.randint4x(key, e // 4): word e % 4, for an int64 tensor of indices e."""
    import torch

    M32 = 0xFFFFFFFF

    def mulhilo(a: int, b):  # a constant, b a tensor of uint32 values held in int64
        lo16, hi16 = b & 0xFFFF, b >> 16
        p_lo = a * lo16
        p_hi = a * hi16
        hi = (p_hi + (p_lo >> 16)) >> 16
        lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & M32
        return hi, lo

    g = e >> 2
    c0, c1 = g & M32, (g >> 32) & M32
    c2 = torch.zeros_like(e)
    c3 = torch.zeros_like(e)
    k0, k1 = key & M32, (key >> 32) & M32
    for _ in range(10):
        hi_b, lo_b = mulhilo(0xCD9E8D57, c2)
        hi_a, lo_a = mulhilo(0xD2511F53, c0)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    words = torch.stack([c0, c1, c2, c3])
    return words.gather(0, (e & 3).unsqueeze(0)).squeeze(0)


def _f32_bits(x):
    import torch

    return x.view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def task_vectors(xs, base, p, start, quota):
    """tau_i = x_i - base (fp32), then the DARE drop or the TIES trim (ties kept in index order)."""
    import torch

    b = exact_f32(base)
    taus, quota = [], list(quota)
    idx = torch.arange(start, start + b.numel(), dtype=torch.int64)
    for i, x in enumerate(xs):
        t = exact_f32(x) - b
        if p.dare_keys:
            keep = philox_words(p.dare_keys[i], idx) < p.keep_below[i]
            t = torch.where(keep, t * to_f32(p.dare_scale[i]), torch.zeros_like(t))
        if p.trim_bits:
            bits = _f32_bits(t)
            thr = p.trim_bits[i]
            keep = bits > thr
            tie = bits == thr
            if quota[i] < 0:
                keep |= tie
            else:
                rank = torch.cumsum(tie.to(torch.int64), 0)  # 1 for the first tie in this range, ...
                keep |= tie & (rank <= quota[i])
                quota[i] = max(0, quota[i] - int(tie.sum()))
            t = torch.where(keep, t, torch.zeros_like(t))
        taus.append(t)
    return b, taus, quota


def sparse_scan(xs):
    """(first index where the zero patterns differ, or -1; zeros in the first input), on any device."""
    xs = [exact_f32(x.reshape(-1)) for x in xs]
    zero0 = xs[0] == 0
    diff = zero0 != zero0
    for x in xs[1:]:
        diff |= (x == 0) != zero0
    where = diff.nonzero()
    return (int(where[0]) if where.numel() else -1), int(zero0.sum())


STAT_BLOCK, STAT_LANES = 4096, 8


def lane_block_sums(q):
    """Per-block sums of a 1-D fp64 tensor in the kernels' order: lanes of 8 within blocks of 4096 (the last
    padded with zeros), each lane sequential, lanes combined ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))."""
    import torch

    n = q.numel()
    pad = -n % STAT_BLOCK
    blocks = (n + pad) // STAT_BLOCK
    q = torch.nn.functional.pad(q, (0, pad)).view(blocks, STAT_BLOCK // STAT_LANES, STAT_LANES)
    q = torch.cumsum(q, dim=1)[:, -1, :]  # sequential within each lane (on the CPU)
    return ((q[:, 0] + q[:, 1]) + (q[:, 2] + q[:, 3])) + ((q[:, 4] + q[:, 5]) + (q[:, 6] + q[:, 7]))


def moments(xs, base, start, acc: Moments, block_sums=None) -> Moments:
    """acc plus the statistics of its MomentsSpec over tensors on any device (the models, and the base or None).
    `block_sums` maps a [stats, n] fp64 tensor to its [stats, blocks] per-block sums (default: lane_block_sums row
    by row, sequential only on the CPU; pysoup.kernels.statistics.block_sums on a GPU)."""
    import torch

    spec = acc.spec
    mean_weights, dare_keys, keep_below, gram = spec.mean_weights, spec.dare_keys, spec.keep_below, spec.gram
    xs = [exact_f32(x.reshape(-1)) for x in xs]
    n = xs[0].numel()
    if base is not None:
        b = exact_f32(base.reshape(-1))
        xs = [x - b for x in xs]
    vecs = list(xs)
    if mean_weights:
        m = torch.full_like(xs[0], -0.0)
        for w, x in zip(mean_weights, xs):
            m = fma_f32(w, x, m)
        vecs.append(m / torch.full_like(m, f32_sum(mean_weights)))

    # Every quantity is written straight into its row of one zero-padded [rows, whole blocks] fp64 tensor: on a
    # GPU this is the pass's peak memory, once, not a list, a stacked copy and a padded copy of it.
    stacked = torch.zeros((len(spec), n + -n % STAT_BLOCK), dtype=torch.float64, device=xs[0].device)
    q = stacked[:, :n]
    ds = [v.double() for v in vecs]  # fp64, exact: products of two fp32 values fit in fp64
    for r, d in enumerate(ds):
        q[3 * r].copy_(d)
        torch.mul(d, d, out=q[3 * r + 1])
        torch.abs(d, out=q[3 * r + 2])
    r = 3 * len(vecs)
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            if gram:
                torch.mul(ds[i], ds[j], out=q[r])
            r += 1
    if dare_keys:
        idx = torch.arange(start, start + n, dtype=torch.int64, device=xs[0].device)
        for key, kb, x in zip(dare_keys, keep_below, xs):
            q[r].copy_(torch.where(philox_words(key, idx) < kb, x, torch.zeros_like(x)).abs())
            r += 1
    per_block = block_sums(stacked) if block_sums else torch.stack([lane_block_sums(row) for row in stacked])
    per_block = per_block.cpu()
    out = []
    for total, row in zip(acc.totals, per_block):
        seq = torch.cat([torch.tensor([total], dtype=torch.float64), row])
        out.append(float(torch.cumsum(seq, 0)[-1]))  # sequential (on the CPU), as the kernels add blocks
    return Moments(spec, out)


def task_vector_combine(xs, base, p, start, quota):
    """The task-vector combine over tensors (the definition the kernels reproduce): (fp32 result, quotas left)."""
    import torch

    b, taus, quota = task_vectors(xs, base, p, start, quota)
    mix = torch.full_like(b, -0.0)
    if p.consensus:
        s = torch.full_like(b, -0.0)
        for w, t in zip(p.weights, taus):
            s = fma_f32(w, t, s)
        positive = s >= 0
        div = torch.zeros_like(b)
        for w, t in zip(p.weights, taus):
            agree = torch.where(positive, t > 0, t < 0)
            mix = torch.where(agree, fma_f32(w, t, mix), mix)
            div = torch.where(agree, div + to_f32(w), div)
        if p.normalize:
            mix = mix / torch.where(div == 0, torch.ones_like(div), div)
    else:
        for w, t in zip(p.weights, taus):
            mix = fma_f32(w, t, mix)
        if p.normalize:
            mix = mix / torch.full_like(mix, f32_sum(p.weights))
    return fma_f32(p.lam, mix, b), quota


def masked_sum(xs, weights, mode: MaskedSumMode, center=0.0, scale=1.0):
    """The masked means over tensors (the definition the kernels reproduce), fp32."""
    import torch

    xs = [exact_f32(x) for x in xs]
    acc = torch.full_like(xs[0], -0.0)
    div = torch.zeros_like(xs[0])
    nz = torch.ones_like(xs[0], dtype=torch.bool)
    for w, x in zip(weights, xs):
        acc = fma_f32(w, x, acc)
        div = torch.where(x != 0, div + to_f32(w), div)
        nz &= x != 0
    total = torch.full_like(acc, f32_sum(weights))
    zero = torch.zeros_like(acc)
    if mode == MaskedSumMode.SHARED:
        return torch.where(xs[0] == 0, xs[0], acc / total)
    if mode == MaskedSumMode.INTERSECTION:
        return torch.where(nz, acc / total, zero)
    if mode == MaskedSumMode.UNION:
        return torch.where(div != 0, acc / torch.where(div != 0, div, torch.ones_like(div)), zero)
    return fma_f32(scale, acc / total - to_f32(center), torch.full_like(acc, to_f32(center)))


# -- sparsified task vectors: Breadcrumbs, DELLA, SCE, RAM (pysoup.strategies.sparsify) -------------------------
def _in_top(bits, thr: int, quota: int) -> tuple:
    """(mask of the entries among the top: bits > thr, and ties (bits == thr) first in index order while `quota`
    lasts (< 0: every tie), the quota left)."""
    import torch

    keep = bits > thr
    tie = bits == thr
    if quota < 0:
        return keep | tie, quota
    rank = torch.cumsum(tie.to(torch.int64), 0)
    return keep | (tie & (rank <= quota)), max(0, quota - int(tie.sum()))


def variance(taus):
    """The population variance across the models of each entry, as torch.var(dim=0, unbiased=False) computes it on
    the CPU: Welford's update in fp64 over the fp32 task vectors in input order, then rounded to fp32."""
    import torch

    mean = torch.zeros(taus[0].shape, dtype=torch.float64, device=taus[0].device)
    m2 = torch.zeros_like(mean)
    for j, t in enumerate(taus):
        d = t.double()
        delta = d - mean
        mean = mean + delta / float(j + 1)
        m2 = m2 + delta * (d - mean)
    return (m2 / float(len(taus))).float()


def row_ranks(bits):
    """DELLA's normalized ranks: each entry's 0-based position in its row by |tau| ascending, ties in index order,
    over (row - 1) in fp32 (rows of one entry: 0). bits: [slabs, row, stride] fp32 bits of |tau|."""
    import torch

    order = torch.sort(bits, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(bits.shape[1], dtype=order.dtype).view(1, -1, 1).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks.float() / torch.full(ranks.shape, float(max(bits.shape[1] - 1, 1)), dtype=torch.float32)


def _rank_masks(t, p, i: int, start: int):
    """DELLA's draws for model i: kept where the Philox word is below round(prob * 2^32) (at most 2^32 - 1), prob =
    fp32(density - epsilon) + fp32(fp32(2 rank) * fp32(epsilon)), two fp32 roundings as mergekit computes it."""
    import torch

    rn = row_ranks(_f32_bits(t).view(-1, p.row, p.stride)).reshape(-1)
    prob = (rn * 2.0) * torch.full_like(rn, p.eps[i]) + torch.full_like(rn, p.lo[i])
    below = torch.floor(prob.double() * 2.0**32 + 0.5).clamp(max=2.0**32 - 1).to(torch.int64)
    idx = torch.arange(start, start + t.numel(), dtype=torch.int64)
    return philox_words(p.keys[i], idx) < below


def sparse_masks(xs, base, p, start: int, quota):
    """(base in fp32, the task vectors tau_i = x_i - base, per model the mask of kept entries or None for all, the
    quotas left) of SparseParams p over tensors."""
    b = exact_f32(base)
    taus = [exact_f32(x) - b for x in xs]
    k = len(taus)
    quota = list(quota)
    masks = [None] * k
    if p.select == SparseSelect.BAND:
        for i, t in enumerate(taus):
            bits = _f32_bits(t)
            top, quota[i] = _in_top(bits, p.keep_bits[i], quota[i])
            skipped, quota[k + i] = _in_top(bits, p.skip_bits[i], quota[k + i])
            masks[i] = top & ~skipped
    elif p.select == SparseSelect.RANK:
        for i, t in enumerate(taus):
            if p.drops[i]:
                masks[i] = _rank_masks(t, p, i, start)
    elif p.select == SparseSelect.SHARED:
        shared, quota[0] = _in_top(_f32_bits(variance(taus)), p.keep_bits[0], quota[0])
        masks = [shared] * k
    return b, taus, masks, quota


def _kept(t, mask, scale=None):
    import torch

    if mask is not None:
        t = torch.where(mask, t, torch.zeros_like(t))
    if scale is not None and scale != 1.0:
        t = t * torch.full_like(t, scale)
    return t


def sparse_task_vector_combine(xs, base, p, start: int, quota) -> tuple:
    """The sparsified task-vector op over tensors (the definition the kernels reproduce): (fp32 result, quotas
    left)."""
    import torch

    b, taus, masks, quota = sparse_masks(xs, base, p, start, quota)
    scales = p.scale or (1.0,) * len(taus)
    taus = [_kept(t, m, s) for t, m, s in zip(taus, masks, scales)]
    mix = torch.full_like(b, -0.0)
    if p.mix == SparseMix.RAM:
        eps = torch.full_like(b, p.epsilon)
        nz = [t.abs() > eps for t in taus]
        count = sum(m.to(torch.int32) for m in nz).float()
        for w, t, m in zip(p.weights, taus, nz):
            term = torch.where(count == 1, t * torch.full_like(t, w), t / torch.where(count > 0, count, 1.0))
            mix = torch.where(m, mix + term, mix)
        return b + mix, quota
    if p.mix in (SparseMix.TIES, SparseMix.SCE):
        s = torch.full_like(b, -0.0)
        for w, t in zip(p.weights, taus):
            s = fma_f32(w, t, s) if p.mix == SparseMix.TIES else s + t
        positive = s >= 0
        div = torch.zeros_like(b)
        for w, t in zip(p.weights, taus):
            agree = torch.where(positive, t > 0, t < 0)
            mix = torch.where(agree, fma_f32(w, t, mix), mix)
            div = torch.where(agree, div + to_f32(w), div)
        if p.mix == SparseMix.SCE:
            return b + mix / torch.clamp(div, min=to_f32(1e-6)), quota
        if p.normalize:
            mix = mix / torch.where(div == 0, torch.ones_like(div), div)
    else:
        for w, t in zip(p.weights, taus):
            mix = fma_f32(w, t, mix)
        if p.normalize:
            mix = mix / torch.full_like(mix, f32_sum(p.weights))
    return fma_f32(p.lam, mix, b), quota


def sparse_stats(xs, base, p, start: int, quota, acc: list) -> tuple:
    """acc plus SPARSE_STATS fp64 totals per model over tensors (sums as `moments` adds them): sum |tau_i|, sum
    |kept tau_i|, sum kept tau_i^2 (before any rescale), and RAM's counts of the entries that model i changes by more
    than epsilon together with another model (#shared) and alone (#unique). Only those the mix reads (the others 0):
    the sums of squares under SCE (its weights), the counts under RAM (its factors), both sums of magnitudes under the
    other mixes (the L1 rescale). Returns (totals, quotas left)."""
    import torch

    b, taus, masks, quota = sparse_masks(xs, base, p, start, quota)
    n = b.numel()
    rows = torch.zeros((SPARSE_STATS * len(taus), n + -n % STAT_BLOCK), dtype=torch.float64)
    eps = torch.full_like(b, p.epsilon)
    nz = [t.abs() > eps for t in taus]
    count = sum(m.to(torch.int32) for m in nz)
    for i, (t, m) in enumerate(zip(taus, masks)):
        kept = _kept(t, m).double()
        r = SPARSE_STATS * i
        if p.mix not in (SparseMix.SCE, SparseMix.RAM):
            rows[r, :n] = t.double().abs()
            rows[r + 1, :n] = kept.abs()
        if p.mix == SparseMix.SCE:
            rows[r + 2, :n] = kept * kept
        if p.mix == SparseMix.RAM:
            rows[r + 3, :n] = (nz[i] & (count > 1)).double()
            rows[r + 4, :n] = (nz[i] & (count == 1)).double()
    out = []
    for total, row in zip(acc, rows):
        seq = torch.cat([torch.tensor([total], dtype=torch.float64), lane_block_sums(row)])
        out.append(float(torch.cumsum(seq, 0)[-1]))
    return out, quota


def sparse_task_vector_raw(chunk: Chunk, p, quota) -> tuple:
    xs = views(chunk)
    result, quota = sparse_task_vector_combine(xs[:-1], xs[-1], p, chunk.start, quota)
    return store(chunk.out, chunk.n, chunk.out_dtype, round_to(result, to_torch(chunk.out_dtype))), quota


def sparse_stats_raw(chunk: Chunk, p, quota, acc) -> tuple:
    xs = views(chunk)
    return sparse_stats(xs[:-1], xs[-1], p, chunk.start, quota, acc)


class TorchRadixTopK(RadixTopK):
    """RadixTopK counted with torch.bincount and searched with torch (the device backend counts on its device)."""

    def __init__(self, keep):
        import torch

        super().__init__(keep)
        self._hist = torch.zeros(self.k * self.BINS, dtype=torch.int64)

    def _count(self, chunk, pass_):
        self._bincount(views(chunk), pass_, self._hist)

    def _bincount(self, xs, pass_: int, hist) -> None:
        """Adds the pass's histogram of |x_i - base| (xs: the models, then the base) into hist, on xs' device."""
        import torch

        b = exact_f32(xs[-1])
        for i, x in enumerate(xs[:-1]):
            bits = _f32_bits(exact_f32(x) - b)
            binned = bits >> 16 if pass_ == 0 else bits[(bits >> 16) == self._prefix[i]] & 0xFFFF
            hist[i * self.BINS : (i + 1) * self.BINS] += torch.bincount(binned, minlength=self.BINS)

    def _select(self, want):
        import torch

        bins, above, in_bin = [], [], []
        for row, w in zip(self._hist.view(-1, self.BINS), want):
            from_top = torch.flip(row, [0]).cumsum(0)
            i = int(torch.searchsorted(from_top, torch.tensor([w], dtype=from_top.dtype)))
            bins.append(self.BINS - 1 - i)
            in_bin.append(int(row[bins[-1]]))
            above.append(int(from_top[i]) - in_bin[-1])
        return bins, above, in_bin

    def _clear(self):
        self._hist.zero_()


class TorchVarianceTopK(TorchRadixTopK):
    """SCE's selection: RadixTopK over the fp32 bits of each entry's variance across the models (`variance`), keeping
    trunc(fp32(fp32(#nonzero variances) * fp32(density))) entries: mergekit multiplies the count tensor by the density
    in fp32."""

    def __init__(self, density: float):
        super().__init__([0])
        self.density = density
        self._zeros = self._numel = 0

    def _bincount(self, xs, pass_, hist):
        import torch

        b = exact_f32(xs[-1])
        bits = _f32_bits(variance([exact_f32(x) - b for x in xs[:-1]]))
        if pass_ == 0:
            self._zeros += int((bits == 0).sum())
            self._numel += bits.numel()
            binned = bits >> 16
        else:
            binned = bits[(bits >> 16) == self._prefix[0]] & 0xFFFF
        hist[: self.BINS] += torch.bincount(binned, minlength=self.BINS)

    def finish(self, pass_):
        if pass_ == 0:
            self.keep = [variance_keep(self._numel - self._zeros, self.density)]
        super().finish(pass_)


def variance_keep(nonzero: int, density: float) -> int:
    """int(nonzero * density) with mergekit's fp32 arithmetic (a count tensor times a Python float)."""
    return int(to_f32(to_f32(nonzero) * to_f32(density)))


@register_backend
class ReferenceBackend(Backend):
    """Plain torch, fp32: the definition of every result, slow and simple."""

    name = "reference"

    @classmethod
    def availability(cls):
        # find_spec, not import: asking must not cost torch's 1.5 s import on the file-merge path.
        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed: pip install 'pysoup[torch]'"
        return True, ""

    def weighted_sum(self, tensors, weights, out_dtype, normalize):
        return weighted_sum(tensors, weights, out_dtype, normalize)

    def lerp_plan(self, averaged, current):
        pairs = list(zip(averaged, current))

        def lerp(t: float) -> None:  # a <- weighted_sum([a, b], [1 - t, t]) rounded into a's dtype
            for a, b in pairs:
                a.copy_(weighted_sum([a, b], [1.0 - t, t], a.dtype, False))

        return lerp

    def weighted_sum_raw(self, chunk, weights, normalize):
        out = weighted_sum(views(chunk), weights, to_torch(chunk.out_dtype), normalize)
        return store(chunk.out, chunk.n, chunk.out_dtype, out)

    def task_vector_raw(self, chunk, p, quota):
        xs = views(chunk)
        result, quota = task_vector_combine(xs[:-1], xs[-1], p, chunk.start, quota)
        return store(chunk.out, chunk.n, chunk.out_dtype, round_to(result, to_torch(chunk.out_dtype))), quota

    def top_k_selector(self, keep):
        return TorchRadixTopK(keep)

    def masked_sum_raw(self, chunk, weights, mode, center=0.0, scale=1.0):
        result = masked_sum(views(chunk), weights, mode, center, scale)
        return store(chunk.out, chunk.n, chunk.out_dtype, round_to(result, to_torch(chunk.out_dtype)))

    def sparse_scan_raw(self, chunk):
        return sparse_scan(views(chunk))

    def moments_raw(self, chunk, acc):
        xs = views(chunk)
        base = xs.pop() if acc.spec.base else None
        return moments(xs, base, chunk.start, acc)


def views(chunk: Chunk) -> list:
    """A chunk's sources as CPU tensors over the engine's buffers (no copy)."""
    return [_view(a, chunk.n, d) for a, d in zip(chunk.addrs, chunk.dtypes)]


# -- the row- and column-wise methods' ops, NearSwap (pysoup.strategies.geometric, rowwise) -----------------------
def _fma_f32_per_element(w, x, acc):
    """fma_f32 with a per-element fp32 weight tensor w."""
    import torch

    a = acc.double()
    p = x.double() * w.double()  # exact: 24 + 24 bits fit in 53
    s = a + p
    bb = s - a
    err = (a - (s - bb)) + (p - bb)
    inexact = (err != 0) & torch.isfinite(s)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where(inexact & even, torch.nextafter(s, toward), s)
    return s.float()


def _by_vector(q, seg, start: int):
    """q ([stats, n] fp64, elements [start, start + n)) laid out as [stats, vectors, positions] with zeros padding
    the partial vectors at both ends, and the index of its first vector: for rows [stats, rows, length] (vector =
    row), for columns [stats, rows, length] too (vector = column, summed along dim 1)."""
    import torch

    n = q.shape[1]
    L = seg.length
    lead = start % L
    r0 = start // L
    rows = (lead + n + L - 1) // L
    padded = torch.zeros((q.shape[0], rows * L), dtype=q.dtype)
    padded[:, lead : lead + n] = q
    return padded.view(q.shape[0], rows, L), r0


def segment_moments(xs, base, seg, start: int, acc):
    """acc ([seg.count, stats] fp64, updated in place and returned) plus the per-vector statistics of the chunk's
    v_i = x_i (- base): |v_i|^2, then <v_i, v_j> (i < j); each vector's sum sequential in element order from acc."""
    import torch

    b = exact_f32(base) if base is not None else None
    vs = [(exact_f32(x) - b if b is not None else exact_f32(x)).double() for x in xs]
    k = len(vs)
    q = torch.empty((k + k * (k - 1) // 2, vs[0].numel()), dtype=torch.float64)
    for i, v in enumerate(vs):
        torch.mul(v, v, out=q[i])
    r = k
    for i in range(k):
        for j in range(i + 1, k):
            torch.mul(vs[i], vs[j], out=q[r])
            r += 1
    blocks, r0 = _by_vector(q, seg, start)
    if seg.columns:
        # Every column is one vector: its sum runs down the rows, from acc (prepended as row -1).
        seq = torch.cat([acc.t().unsqueeze(1), blocks], dim=1)
        acc.copy_(torch.cumsum(seq, dim=1)[:, -1, :].t())
    else:
        rows = blocks.shape[1]
        seq = torch.cat([acc[r0 : r0 + rows].t().unsqueeze(2), blocks], dim=2)
        acc[r0 : r0 + rows] = torch.cumsum(seq, dim=2)[:, :, -1].t()
    return acc


def segment_weighted_sum(xs, seg, coefficients, around_base: bool, start: int):
    """The fp32 result of segment_weighted_sum_raw over tensors (xs: the sources; the base last when around_base)."""
    import torch

    ids = seg.ids(start, xs[0].numel())
    c = coefficients[ids]  # [n, sources]
    if around_base:
        b = exact_f32(xs[-1])
        terms = [exact_f32(x) - b for x in xs[:-1]]
    else:
        terms = [exact_f32(x) for x in xs]
    acc = torch.full(terms[0].shape, -0.0, dtype=torch.float32)
    for i, t in enumerate(terms):
        acc = _fma_f32_per_element(c[:, i].contiguous(), t, acc)
    return fma_f32(1.0, acc, b) if around_base else acc


def nearswap(x, base, t: float):
    """mergekit's NearSwap in its fp32 operation order (t / d is torch's reciprocal(d) * t)."""
    import torch

    x, a = exact_f32(x), exact_f32(base)
    d = torch.clamp((a - x).abs(), min=to_f32(1e-6))
    w = torch.clamp(torch.reciprocal(d) * torch.full_like(d, to_f32(t)), 0.0, 1.0)
    out = w * x + (1 - w) * a
    # NaN results are the one quiet NaN 0x7FC00000: which NaN torch propagates (its sign) differs between its
    # vectorized and scalar code paths, so no other choice is reproducible.
    return torch.where(torch.isnan(out), torch.full_like(out, float("nan")), out)


def segment_moments_raw(chunk: Chunk, seg, base: bool, acc):
    """acc: a C-contiguous fp64 numpy array, updated in place (through a torch view of it) and returned."""
    import torch

    xs = views(chunk)
    b = xs.pop() if base else None
    segment_moments(xs, b, seg, chunk.start, torch.from_numpy(acc))
    return acc


def segment_weighted_sum_raw(chunk: Chunk, seg, coefficients, around_base: bool) -> int:
    """coefficients: an fp32 numpy array [seg.count, sources or models]."""
    import torch

    result = segment_weighted_sum(views(chunk), seg, torch.from_numpy(coefficients), around_base, chunk.start)
    return store(chunk.out, chunk.n, chunk.out_dtype, round_to(result, to_torch(chunk.out_dtype)))


def nearswap_raw(chunk: Chunk, t: float) -> int:
    x, base = views(chunk)
    return store(chunk.out, chunk.n, chunk.out_dtype, round_to(nearswap(x, base, t), to_torch(chunk.out_dtype)))


# -- the LoRA fold (pysoup.lora.fold) ---------------------------------------------------------------------------
def lora_fold(w, left, right):
    """The fp32 result of lora_fold_raw before rounding: fp32(W) + (L R with each element's products fma'd in k
    order from +0), a NaN result as 0x7FC00000 (w: [rows, cols] tensor; left, right: fp32 tensors)."""
    import torch

    rows, cols = w.shape
    acc = torch.zeros((rows, cols), dtype=torch.float32)
    for q in range(left.shape[1]):
        lq = left[:, q : q + 1].expand(rows, cols)
        rq = right[q : q + 1, :].expand(rows, cols)
        acc = _fma_f32_per_element(lq, rq, acc)
    s = exact_f32(w) + acc
    return torch.where(torch.isnan(s), torch.full_like(s, float("nan")), s)


def lora_fold_raw(chunk: Chunk, left, right) -> int:
    """left, right: fp32 C-contiguous numpy arrays [rows, K] and [K, cols]. Computed in slices of rows of ~256 K
    elements: the fma emulation's fp64 temporaries of a whole 16 MiB block took ~0.5 GiB."""
    import torch

    rows, cols = left.shape[0], right.shape[1]
    if chunk.n != rows * cols:
        raise ValueError(f"lora_fold_raw: {chunk.n} elements for {rows} x {cols}")
    w_size, out_size = SAFETENSORS_SIZES[chunk.dtypes[0]], SAFETENSORS_SIZES[chunk.out_dtype]
    step = max(1, (1 << 18) // max(cols, 1))
    nonfinite = 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = (r1 - r0) * cols
        w = _view(chunk.addrs[0] + r0 * cols * w_size, n, chunk.dtypes[0]).view(r1 - r0, cols)
        result = lora_fold(w, torch.from_numpy(left[r0:r1]), torch.from_numpy(right))
        out = round_to(result.reshape(-1), to_torch(chunk.out_dtype))
        nonfinite += store(chunk.out + r0 * cols * out_size, n, chunk.out_dtype, out)
    return nonfinite


# -- Arcee Fusion (pysoup.strategies.geometric.ArceeFusion) -----------------------------------------------------
# The row KL's fp64 exp and log: the kernel's (csrc/cpu/geometric_impl.h, kl_exp / kl_log_ratio), operation for
# operation (the kernel's shortcuts for rows of small spread give the same bits; the reference has none).
# torch's fp64 add, multiply, divide, floor and bit views round as the C++ does, while its exp and log (SLEEF) and
# libm's differ in the last bit: hence polynomials of those operations only.
_KL_INV_LN2 = 1.4426950408889634
_KL_LN2_HI = 0.6931471803691238  # 0x3FE62E42FEE00000: k * hi is exact for |k| < 2^11
_KL_LN2_LO = 1.9082149292705877e-10
_KL_SQRT2 = 1.4142135623730951
_KL_EPS = 9.99999993922529e-09  # fp32(1e-8), what mergekit adds to its fp32 softmax
_KL_EXP_FLOOR = -600.0  # exp(r) below it counts as 0 (it vanishes next to _KL_EPS)
_KL_EXP = tuple(1.0 / math.factorial(i) for i in range(14))  # exp(f)'s Taylor series, 1/i! (the kernel's literals)
_KL_LOG = tuple(1.0 / (2 * i + 1) for i in range(12))  # atanh(s)/s's series in z = s^2, 1/(2i + 1)
_KL_LOG_SHORT = 0.01  # rows whose |s| are all below it take the series to z^3 (kKlLogShort)


def _estrin(c, x):
    """sum_i c[i] x^i by Estrin's scheme in the kernel's order: c[i] + c[i + 1] x for pairs, then pairs of those
    with x^2, x^4, ... (an odd one out carried up a level)."""
    terms, power = list(c), x
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] * power if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
        power = power * power
    return terms[0]


def _kl_exp(r):
    """exp(r), r <= 0 fp64 (kl_exp): Cody-Waite reduction, Taylor series to f^13, 2^k from its bits; 0 below -600."""
    import torch

    rc = r.clamp(min=_KL_EXP_FLOOR)
    k = torch.floor(rc * _KL_INV_LN2 + 0.5)
    f = (rc - k * _KL_LN2_HI) - k * _KL_LN2_LO
    s = _estrin(_KL_EXP, f)
    scale = ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    return torch.where(r < _KL_EXP_FLOOR, torch.zeros_like(s), s * scale)


def _kl_log_ratio(P, Q, short):
    """log(P / Q), P and Q > 0 normal fp64 (kl_log_ratio): P = 2^eP mP, Q = 2^eQ mQ, one mantissa doubled so that
    mP / mQ lies in [sqrt(1/2), sqrt(2)], then e ln2 + 2 atanh((mP - mQ) / (mP + mQ)): one division; atanh's series
    to z^3 where `short` (a row's choice, broadcast), else to z^11."""
    import torch

    def split(y):
        u = y.view(torch.int64)
        e = (u >> 52).to(torch.float64)  # the biased exponent (the biases cancel in eP - eQ)
        return e, ((u & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).view(torch.float64)

    (ep, mp), (eq, mq) = split(P), split(Q)
    up = mp > mq * _KL_SQRT2
    down = mq > mp * _KL_SQRT2
    mq = torch.where(up, mq * 2.0, mq)
    mp = torch.where(down, mp * 2.0, mp)
    e = (ep - eq) + torch.where(up, 1.0, torch.where(down, -1.0, 0.0)).to(torch.float64)
    s = (mp - mq) / (mp + mq)
    z = s * s
    q = torch.where(short, _estrin(_KL_LOG[:4], z), _estrin(_KL_LOG, z))
    return e * _KL_LN2_HI + (e * _KL_LN2_LO + (2.0 * s) * q)


def _kl_sum(x):
    """Row sums of [rows, n] fp64 as the kernel's kl_sum: 8 lane sums (element j into lane j % 8), each in element
    order from +0.0 (cumsum: a sequential loop; padding adds +0.0, which changes no sum), then the lanes pairwise."""
    import torch

    rows, n = x.shape
    pad = -n % 8
    if pad:
        x = torch.cat([x, x.new_zeros(rows, pad)], dim=1)
    s = torch.cumsum(x.reshape(rows, -1, 8), dim=1)[:, -1, :]
    return ((s[:, 0] + s[:, 1]) + (s[:, 2] + s[:, 3])) + ((s[:, 4] + s[:, 5]) + (s[:, 6] + s[:, 7]))


def fusion_kl(p, b):
    """Arcee Fusion's per-row KL over [rows, row] tensors, fp64 rounded to fp32 once (the kernel's definition,
    csrc/cpu/geometric.h fusion_kl): P = softmax(p) + eps, Q = softmax(b) + eps, sum_j P_j log(P_j / Q_j), with
    softmax(x)_j = e_j * (1 / sum e), e_j = exp(x_j - max x), every sum _kl_sum's fixed order and exp / log(P / Q)
    the polynomials above. A row with a non-finite value: NaN. mergekit computes the same in
    fp32 with torch's softmax and log: within fp32 rounding of the KL (docs/methods.md)."""
    import torch

    x = [exact_f32(t).double() for t in (p, b)]
    finite = torch.isfinite(x[0]).all(dim=-1) & torch.isfinite(x[1]).all(dim=-1)
    probs = []
    for t in x:
        t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # NaN rows are set below; keep the rest finite
        e = _kl_exp(t - t.amax(dim=-1, keepdim=True))
        inv = (1.0 / _kl_sum(e))[:, None]
        probs.append(e * inv + _KL_EPS)
    P, Q = probs
    # The short atanh series in rows where every |(P - Q) / (P + Q)| <= 0.01 (kKlLogShort): there e = 0 and s is
    # that quotient.
    short = ((P - Q) / (P + Q)).abs().amax(dim=-1, keepdim=True) <= _KL_LOG_SHORT
    kl = _kl_sum(P * _kl_log_ratio(P, Q, short)).float()
    return torch.where(finite, kl, torch.full_like(kl, float("nan")))


def _whole_rows(chunk: Chunk, row: int, carry: dict):
    """(first row, p rows, b rows) of the rows that end in this chunk, as [rows, row] tensors of the stored dtype,
    joining the part of a row an earlier chunk left in `carry`; keeps this chunk's unfinished row there."""
    import torch

    p, b = views(chunk)
    start, end = chunk.start, chunk.start + chunk.n
    lead = carry.pop("rows", None)
    if lead is not None:
        p, b = torch.cat([lead[0], p]), torch.cat([lead[1], b])
        start -= lead[0].numel()
    first = -(-start // row)  # rows that start in this range (the carry starts a row)
    whole_end = end // row * row
    if whole_end < end:
        tail = whole_end - start if whole_end > start else 0
        carry["rows"] = (p[tail:].clone(), b[tail:].clone())
    n = max(0, whole_end - first * row)
    off = first * row - start
    return first, p[off : off + n].view(-1, row), b[off : off + n].view(-1, row)


def fusion_kl_raw(chunk: Chunk, row: int, kl, carry: dict, hist=None) -> None:
    import torch

    first, p, b = _whole_rows(chunk, row, carry)
    out = torch.from_numpy(kl)
    # ~16 Ki elements (at least one row) per call: the ~40 fp64 temporaries stay in the allocator's reused memory
    # (fresh pages for each cost ~10x the arithmetic on a 2-core VM), and one torch thread (two contended with the
    # engine's and ran ~10x slower). Each row's KL depends on that row alone (the chunking test compares).
    step = max(1, (1 << 14) // row)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r0 in range(0, p.shape[0], step):
            r1 = min(p.shape[0], r0 + step)
            out[first + r0 : first + r1] = fusion_kl(p[r0:r1], b[r0:r1])
            if hist is not None:  # fusion_histogram_raw's pass 0 over these rows, their KL now known
                pr, br = exact_f32(p[r0:r1]), exact_f32(b[r0:r1])
                keys = order_keys((pr - br).abs() * out[first + r0 : first + r1, None])
                torch.from_numpy(hist)[:] += torch.bincount((keys >> 16).flatten(), minlength=hist.shape[0])
    finally:
        torch.set_num_threads(threads)


def fusion_importance(chunk: Chunk, row: int, kl):
    """(p, b, importance) over the chunk, fp32."""
    import torch

    p, b = (exact_f32(x) for x in views(chunk))
    rows = torch.arange(chunk.start, chunk.start + chunk.n, dtype=torch.int64) // row
    return p, b, (p - b).abs() * torch.from_numpy(kl)[rows]


def order_keys(x):
    """fp32 values -> int64 keys in [0, 2^32) ordered as the values (NaNs last, as torch.sort puts them)."""
    import torch

    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    keys = torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits | 0x80000000)
    return torch.where(torch.isnan(x), torch.full_like(keys, 0xFFFFFFFF), keys)


def from_order_key(key: int) -> float:
    """The fp32 value of an order key (order_keys' inverse)."""
    import struct

    bits = key & 0x7FFFFFFF if key >= 0x80000000 else 0xFFFFFFFF - key
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def fusion_histogram_raw(chunk: Chunk, row: int, kl, pass_: int, prefix: list, hist) -> None:
    import torch

    keys = order_keys(fusion_importance(chunk, row, kl)[2])
    h = torch.from_numpy(hist)
    if pass_ == 0:  # every quantile counts the same values: row 0 only
        h[0] += torch.bincount(keys >> 16, minlength=h.shape[1])
        return
    for q, high in enumerate(prefix):
        h[q] += torch.bincount(keys[(keys >> 16) == high] & 0xFFFF, minlength=h.shape[1])


def fusion_combine_raw(chunk: Chunk, row: int, kl, threshold: float) -> int:
    import torch

    p, b, importance = fusion_importance(chunk, row, kl)
    mask = (importance >= torch.tensor(threshold, dtype=torch.float32)).float()
    out = b + (p - b) * mask
    return store(chunk.out, chunk.n, chunk.out_dtype, round_to(out, to_torch(chunk.out_dtype)))


# -- end of the geometric methods' ops ----------------------------------------------------------------------------

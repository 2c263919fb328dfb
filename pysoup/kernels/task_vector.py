"""Task-vector merges on the GPU: the fused combine of task arithmetic, TIES (given each model's threshold from the
selection pass) and DARE, with the semantics of pysoup/ops/reference.py: task_vector_raw, bit for bit.

DARE's mask uses tl.philox with the key and counters the C++ kernels use (word e % 4 of philox(key, e // 4)), so
a GPU merge drops exactly the entries a CPU merge drops. TIES ties at the threshold are kept in index order: a
first kernel counts them per block, a prefix sum hands each block its quota, and tl.cumsum ranks them inside it.
Per-model values arrive as tuples; a launch is compiled per model count and dtypes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pysoup.kernels._rounding import round_to_out, to_f32
from pysoup.kernels.weighted_sum import _kind

BLOCK = 2048


@triton.jit
def _tau(
    i: tl.constexpr,
    xs,
    keys,
    keep_below,
    scales,
    thresholds,
    quotas,
    pid,
    b,
    offs,
    mask,
    e,
    N: tl.constexpr,
    DARE: tl.constexpr,
    TRIM: tl.constexpr,
):
    """Model i's task vector on this block, dropped (DARE) or trimmed (TIES) as the C++ kernels do."""
    t = to_f32(tl.load(xs[i] + offs, mask=mask, other=0.0)) - b
    if DARE:
        g = e >> 2
        zero = tl.zeros_like(g).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(keys[i], (g & 0xFFFFFFFF).to(tl.uint32), (g >> 32).to(tl.uint32), zero, zero)
        lane = e & 3
        word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        t = tl.where(word < keep_below[i], t * scales[i], 0.0)
    if TRIM:
        quota = tl.load(quotas + pid * N + i)
        bits = t.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        tie = (bits == thresholds[i]) & mask
        rank = tl.cumsum(tie.to(tl.int64), axis=0)  # 1 for the first tie of this block
        keep = (bits > thresholds[i]) | (tie & ((quota < 0) | (rank <= quota)))
        t = tl.where(keep, t, 0.0)
    return t


@triton.jit
def _tie_count_kernel(counts, base, xs, thresholds, n, N: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = to_f32(tl.load(base + offs, mask=mask, other=0.0))
    for i in tl.static_range(N):
        bits = (to_f32(tl.load(xs[i] + offs, mask=mask, other=0.0)) - b).to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        tl.store(counts + pid * N + i, tl.sum(((bits == thresholds[i]) & mask).to(tl.int64), axis=0))


@triton.jit
def _combine_kernel(
    out,
    base,
    quotas,
    xs,
    ws,
    keys,
    keep_below,
    scales,
    thresholds,
    n,
    start,
    lam,
    divisor,
    N: tl.constexpr,
    DARE: tl.constexpr,
    TRIM: tl.constexpr,
    CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = offs + start
    b = to_f32(tl.load(base + offs, mask=mask, other=0.0))
    mix = tl.full((BLOCK,), -0.0, tl.float32)
    if CONSENSUS:
        s = tl.full((BLOCK,), -0.0, tl.float32)
        for i in tl.static_range(N):  # elect the sign of sum w_i tau_i (+ where it is 0 or -0)
            t = _tau(i, xs, keys, keep_below, scales, thresholds, quotas, pid, b, offs, mask, e, N, DARE, TRIM)
            s = tl.fma(ws[i], t, s)
        positive = s >= 0.0
        div = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(N):  # then mix only the agreeing entries
            t = _tau(i, xs, keys, keep_below, scales, thresholds, quotas, pid, b, offs, mask, e, N, DARE, TRIM)
            agree = tl.where(positive, t > 0.0, t < 0.0)
            mix = tl.where(agree, tl.fma(ws[i], t, mix), mix)
            div = tl.where(agree, div + ws[i], div)
        if NORMALIZE:
            mix = tl.math.div_rn(mix, tl.where(div == 0.0, 1.0, div))
    else:
        for i in tl.static_range(N):
            t = _tau(i, xs, keys, keep_below, scales, thresholds, quotas, pid, b, offs, mask, e, N, DARE, TRIM)
            mix = tl.fma(ws[i], t, mix)
        if NORMALIZE:
            mix = tl.math.div_rn(mix, divisor)
    tl.store(out + offs, round_to_out(tl.fma(lam, mix, b), OUT_KIND), mask=mask)


def task_vector_combine(xs, base, p, start: int, quota, out_dtype, out=None):
    """base + lambda * mix(tau) over one range of tensors; returns (out, the tie quotas left).

    Args:
        xs: the model tensors; base: the base tensor (same shape); p: a TaskVectorParams.
        start: index of element 0 within the whole tensor (DARE's counter).
        quota: per model, ties at the threshold that may still be kept (-1: all).
    """
    import torch

    from pysoup.dtypes import f32_sum, to_f32

    k = len(xs)
    flat = tuple(x.contiguous().reshape(-1) for x in xs)
    b = base.contiguous().reshape(-1)
    n = b.numel()
    device = b.device
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype, device=device)
    nblocks = triton.cdiv(n, BLOCK)
    trim, dare = bool(p.trim_bits), bool(p.dare_keys)
    thresholds = tuple(p.trim_bits) if trim else (0,) * k
    quotas = torch.full((max(nblocks, 1), k), -1, dtype=torch.int64, device=device)
    quota = list(quota)
    if trim and nblocks and any(q >= 0 for q in quota):
        counts = torch.zeros((nblocks, k), dtype=torch.int64, device=device)
        _tie_count_kernel[(nblocks,)](counts, b, flat, thresholds, n, N=k, BLOCK=BLOCK)
        before = torch.cumsum(counts, 0) - counts  # ties in earlier blocks
        for i, q in enumerate(quota):
            if q >= 0:
                quotas[:, i] = torch.clamp(q - before[:, i], min=0)
                quota[i] = max(0, q - int(counts[:, i].sum()))
    if nblocks:
        _combine_kernel[(nblocks,)](
            out.view(-1),
            b,
            quotas,
            flat,
            tuple(to_f32(w) for w in p.weights),
            tuple(p.dare_keys) if dare else (0,) * k,
            tuple(p.keep_below) if dare else (0,) * k,
            tuple(to_f32(s) for s in p.dare_scale) if dare else (1.0,) * k,
            thresholds,
            n,
            start,
            to_f32(p.lam),
            f32_sum(p.weights),
            N=k,
            DARE=dare,
            TRIM=trim,
            CONSENSUS=p.consensus,
            NORMALIZE=p.normalize,
            OUT_KIND=_kind(out_dtype),
            BLOCK=BLOCK,
            enable_fp_fusion=False,  # the contract's roundings: no a*b+c fused behind our back
        )
    return out, quota

"""Task-vector merges on the GPU: the fused combine of task arithmetic, TIES (given each model's threshold from the
selection pass) and DARE, with the semantics of pysoup/ops/reference.py: task_vector_raw, bit for bit.

DARE's mask uses tl.philox with the key and counters the C++ kernels use (word e % 4 of philox(key, e // 4)), so
a GPU merge drops exactly the entries a CPU merge drops. TIES ties at the threshold are kept in index order: a
first kernel counts them per block, a prefix sum hands each block its quota, and tl.cumsum ranks them inside it.
"""

from __future__ import annotations

import triton
import triton.language as tl
from pysoup.kernels._rounding import round_to_out, to_f32
from pysoup.kernels.weighted_sum import _kind

MAX_MODELS = 8
BLOCK = 2048


@triton.jit
def _pick(i: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    if i == 0:
        return a0
    elif i == 1:
        return a1
    elif i == 2:
        return a2
    elif i == 3:
        return a3
    elif i == 4:
        return a4
    elif i == 5:
        return a5
    elif i == 6:
        return a6
    else:
        return a7


@triton.jit
def _tau(x, b, offs, mask, e, key, keep_below, scale, thr, quota, DARE: tl.constexpr, TRIM: tl.constexpr):
    """One model's task vector on this block, dropped (DARE) or trimmed (TIES) as the C++ kernels do."""
    t = to_f32(tl.load(x + offs, mask=mask, other=0.0)) - b
    if DARE:
        g = e >> 2
        w0, w1, w2, w3 = tl.philox(
            key,
            (g & 0xFFFFFFFF).to(tl.uint32),
            (g >> 32).to(tl.uint32),
            tl.zeros_like(g).to(tl.uint32),
            tl.zeros_like(g).to(tl.uint32),
        )
        lane = e & 3
        word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        t = tl.where(word < keep_below, t * scale, 0.0)
    if TRIM:
        bits = t.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        tie = (bits == thr) & mask
        rank = tl.cumsum(tie.to(tl.int64), axis=0)  # 1 for the first tie of this block
        keep = (bits > thr) | (tie & ((quota < 0) | (rank <= quota)))
        t = tl.where(keep, t, 0.0)
    return t


@triton.jit
def _tie_count_kernel(
    counts,
    base,
    x0,
    x1,
    x2,
    x3,
    x4,
    x5,
    x6,
    x7,
    t0,
    t1,
    t2,
    t3,
    t4,
    t5,
    t6,
    t7,
    n,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = to_f32(tl.load(base + offs, mask=mask, other=0.0))
    for i in tl.static_range(8):
        if i < N:
            x = _pick(i, x0, x1, x2, x3, x4, x5, x6, x7)
            thr = _pick(i, t0, t1, t2, t3, t4, t5, t6, t7)
            bits = (to_f32(tl.load(x + offs, mask=mask, other=0.0)) - b).to(tl.uint32, bitcast=True) & 0x7FFFFFFF
            tl.store(counts + pid * 8 + i, tl.sum(((bits == thr) & mask).to(tl.int64), axis=0))


@triton.jit
def _combine_kernel(
    out,
    base,
    quotas,
    x0,
    x1,
    x2,
    x3,
    x4,
    x5,
    x6,
    x7,
    w0,
    w1,
    w2,
    w3,
    w4,
    w5,
    w6,
    w7,
    k0,
    k1,
    k2,
    k3,
    k4,
    k5,
    k6,
    k7,
    kb0,
    kb1,
    kb2,
    kb3,
    kb4,
    kb5,
    kb6,
    kb7,
    s0,
    s1,
    s2,
    s3,
    s4,
    s5,
    s6,
    s7,
    t0,
    t1,
    t2,
    t3,
    t4,
    t5,
    t6,
    t7,
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
        for i in tl.static_range(8):
            if i < N:
                t = _tau(
                    _pick(i, x0, x1, x2, x3, x4, x5, x6, x7),
                    b,
                    offs,
                    mask,
                    e,
                    _pick(i, k0, k1, k2, k3, k4, k5, k6, k7),
                    _pick(i, kb0, kb1, kb2, kb3, kb4, kb5, kb6, kb7),
                    _pick(i, s0, s1, s2, s3, s4, s5, s6, s7),
                    _pick(i, t0, t1, t2, t3, t4, t5, t6, t7),
                    tl.load(quotas + pid * 8 + i),
                    DARE,
                    TRIM,
                )
                s = tl.fma(_pick(i, w0, w1, w2, w3, w4, w5, w6, w7), t, s)
        positive = s >= 0.0
        div = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(8):
            if i < N:
                w = _pick(i, w0, w1, w2, w3, w4, w5, w6, w7)
                t = _tau(
                    _pick(i, x0, x1, x2, x3, x4, x5, x6, x7),
                    b,
                    offs,
                    mask,
                    e,
                    _pick(i, k0, k1, k2, k3, k4, k5, k6, k7),
                    _pick(i, kb0, kb1, kb2, kb3, kb4, kb5, kb6, kb7),
                    _pick(i, s0, s1, s2, s3, s4, s5, s6, s7),
                    _pick(i, t0, t1, t2, t3, t4, t5, t6, t7),
                    tl.load(quotas + pid * 8 + i),
                    DARE,
                    TRIM,
                )
                agree = tl.where(positive, t > 0.0, t < 0.0)
                mix = tl.where(agree, tl.fma(w, t, mix), mix)
                div = tl.where(agree, div + w, div)
        if NORMALIZE:
            mix = mix / tl.where(div == 0.0, 1.0, div)
    else:
        for i in tl.static_range(8):
            if i < N:
                t = _tau(
                    _pick(i, x0, x1, x2, x3, x4, x5, x6, x7),
                    b,
                    offs,
                    mask,
                    e,
                    _pick(i, k0, k1, k2, k3, k4, k5, k6, k7),
                    _pick(i, kb0, kb1, kb2, kb3, kb4, kb5, kb6, kb7),
                    _pick(i, s0, s1, s2, s3, s4, s5, s6, s7),
                    _pick(i, t0, t1, t2, t3, t4, t5, t6, t7),
                    tl.load(quotas + pid * 8 + i),
                    DARE,
                    TRIM,
                )
                mix = tl.fma(_pick(i, w0, w1, w2, w3, w4, w5, w6, w7), t, mix)
        if NORMALIZE:
            mix = mix / divisor
    tl.store(out + offs, round_to_out(tl.fma(lam, mix, b), OUT_KIND), mask=mask)


def _pad(values, fill):
    values = list(values)
    return values + [fill] * (MAX_MODELS - len(values))


def task_vector_combine(xs, base, p, start: int, quota, out_dtype, out=None):
    """base + lambda * mix(tau) over one range of contiguous tensors; returns (out, the tie quotas left).

    Args:
        xs: up to 8 model tensors; base: the base tensor (same shape); p: a TaskVectorParams.
        start: index of element 0 within the whole tensor (DARE's counter).
        quota: per model, ties at the threshold that may still be kept (-1: all).
    """
    import torch

    from pysoup.dtypes import f32_sum, to_f32

    if len(xs) > MAX_MODELS:
        raise ValueError(f"the Triton task-vector kernel takes at most {MAX_MODELS} models per launch")
    k = len(xs)
    flat = [x.contiguous().reshape(-1) for x in xs]
    b = base.contiguous().reshape(-1)
    n = b.numel()
    device = b.device
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype, device=device)
    nblocks = triton.cdiv(n, BLOCK)
    ptrs = _pad(flat, flat[0])
    trim = bool(p.trim_bits)
    thresholds = _pad(p.trim_bits if trim else [0] * k, 0)
    quotas = torch.full((max(nblocks, 1), MAX_MODELS), -1, dtype=torch.int64, device=device)
    quota = list(quota)
    if trim and nblocks and any(q >= 0 for q in quota):
        counts = torch.zeros((nblocks, MAX_MODELS), dtype=torch.int64, device=device)
        _tie_count_kernel[(nblocks,)](counts, b, *ptrs, *thresholds, n, N=k, BLOCK=BLOCK)
        before = torch.cumsum(counts, 0) - counts  # ties in earlier blocks
        for i, q in enumerate(quota):
            if q >= 0:
                quotas[:, i] = torch.clamp(q - before[:, i], min=0)
                quota[i] = max(0, q - int(counts[:, i].sum()))
    dare = bool(p.dare_keys)
    if nblocks:
        _combine_kernel[(nblocks,)](
            out.view(-1),
            b,
            quotas,
            *ptrs,
            *_pad([to_f32(w) for w in p.weights], 0.0),
            *_pad(p.dare_keys if dare else [0] * k, 0),
            *_pad(p.keep_below if dare else [0] * k, 0),
            *_pad([to_f32(s) for s in p.dare_scale] if dare else [1.0] * k, 1.0),
            *thresholds,
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
        )
    return out, quota

"""The sparse soup's masked sum (shared / intersection / union) and the variance-corrected average's rescaled
mean, with the semantics of pysoup/ops/reference.py: masked_sum_raw, bit for bit."""

from __future__ import annotations

import triton
import triton.language as tl
from pysoup.kernels._rounding import round_to_out, to_f32
from pysoup.kernels.task_vector import MAX_MODELS, _pad, _pick
from pysoup.kernels.weighted_sum import _kind

BLOCK = 2048
SHARED, INTERSECTION, UNION, AFFINE_MEAN = 0, 1, 2, 3


@triton.jit
def _masked_sum_kernel(
    out,
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
    n,
    divisor,
    center,
    scale,
    N: tl.constexpr,
    MODE: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.full((BLOCK,), -0.0, tl.float32)
    div = tl.zeros((BLOCK,), tl.float32)
    all_nonzero = tl.full((BLOCK,), 1, tl.int1)
    first = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(8):
        if i < N:
            x = to_f32(tl.load(_pick(i, x0, x1, x2, x3, x4, x5, x6, x7) + offs, mask=mask, other=0.0))
            w = _pick(i, w0, w1, w2, w3, w4, w5, w6, w7)
            if i == 0:
                first = x
            acc = tl.fma(w, x, acc)
            div = tl.where(x != 0.0, div + w, div)
            all_nonzero = all_nonzero & (x != 0.0)
    if MODE == 0:
        res = tl.where(first == 0.0, first, acc / divisor)
    elif MODE == 1:
        res = tl.where(all_nonzero, acc / divisor, 0.0)
    elif MODE == 2:
        res = tl.where(div != 0.0, acc / tl.where(div != 0.0, div, 1.0), 0.0)
    else:
        res = tl.fma(scale, acc / divisor - center, tl.full((BLOCK,), 0.0, tl.float32) + center)
    tl.store(out + offs, round_to_out(res, OUT_KIND), mask=mask)


def masked_sum(xs, weights, mode: int, out_dtype, center: float = 0.0, scale: float = 1.0, out=None):
    """Up to 8 contiguous tensors of one shape; mode 0 shared, 1 intersection, 2 union, 3 affine mean."""
    import torch

    from pysoup.dtypes import f32_sum, to_f32

    if len(xs) > MAX_MODELS:
        raise ValueError(f"the Triton masked sum takes at most {MAX_MODELS} inputs per launch")
    flat = [x.contiguous().reshape(-1) for x in xs]
    n = flat[0].numel()
    if out is None:
        out = torch.empty(xs[0].shape, dtype=out_dtype, device=flat[0].device)
    ws = [to_f32(w) for w in weights]
    if n:
        _masked_sum_kernel[(triton.cdiv(n, BLOCK),)](
            out.view(-1),
            *_pad(flat, flat[0]),
            *_pad(ws, 0.0),
            n,
            f32_sum(ws),
            to_f32(center),
            to_f32(scale),
            N=len(flat),
            MODE=mode,
            OUT_KIND=_kind(out_dtype),
            BLOCK=BLOCK,
        )
    return out

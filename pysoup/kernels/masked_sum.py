"""The sparse soup's masked sum (shared / intersection / union) and the variance-corrected average's rescaled
mean, with the semantics of pysoup/ops/reference.py: masked_sum_raw, bit for bit."""

from __future__ import annotations

import triton
import triton.language as tl

from pysoup.kernels._rounding import round_to_out, to_f32
from pysoup.kernels.weighted_sum import _kind

BLOCK = 2048
SHARED, INTERSECTION, UNION, AFFINE_MEAN = 0, 1, 2, 3


@triton.jit
def _masked_sum_kernel(
    out,
    xs,
    ws,
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
    first = to_f32(tl.load(xs[0] + offs, mask=mask, other=0.0))
    acc = tl.full((BLOCK,), -0.0, tl.float32)
    div = tl.zeros((BLOCK,), tl.float32)
    all_nonzero = tl.full((BLOCK,), 1, tl.int1)
    for i in tl.static_range(N):
        x = to_f32(tl.load(xs[i] + offs, mask=mask, other=0.0))
        acc = tl.fma(ws[i], x, acc)
        div = tl.where(x != 0.0, div + ws[i], div)
        all_nonzero = all_nonzero & (x != 0.0)
    if MODE == 0:  # shared: zeros keep the first input's bits
        res = tl.where(first == 0.0, first, tl.math.div_rn(acc, divisor))
    elif MODE == 1:  # intersection
        res = tl.where(all_nonzero, tl.math.div_rn(acc, divisor), 0.0)
    elif MODE == 2:  # union
        res = tl.where(div != 0.0, tl.math.div_rn(acc, tl.where(div != 0.0, div, 1.0)), 0.0)
    else:  # the variance-corrected average
        res = tl.fma(scale, tl.math.div_rn(acc, divisor) - center, tl.full((BLOCK,), 0.0, tl.float32) + center)
    tl.store(out + offs, round_to_out(res, OUT_KIND), mask=mask)


def masked_sum(xs, weights, mode: int, out_dtype, center: float = 0.0, scale: float = 1.0, out=None):
    """Tensors of one shape; mode 0 shared, 1 intersection, 2 union, 3 affine mean."""
    import torch

    from pysoup.dtypes import f32_sum, to_f32

    flat = tuple(x.contiguous().reshape(-1) for x in xs)
    n = flat[0].numel()
    if out is None:
        out = torch.empty(xs[0].shape, dtype=out_dtype, device=flat[0].device)
    ws = tuple(to_f32(w) for w in weights)
    if n:
        _masked_sum_kernel[(triton.cdiv(n, BLOCK),)](
            out.view(-1),
            flat,
            ws,
            n,
            f32_sum(ws),
            to_f32(center),
            to_f32(scale),
            N=len(flat),
            MODE=mode,
            OUT_KIND=_kind(out_dtype),
            BLOCK=BLOCK,
            enable_fp_fusion=False,  # the contract's roundings: no a*b+c fused behind our back
        )
    return out

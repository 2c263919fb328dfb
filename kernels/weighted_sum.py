"""The fused N-ary weighted sum: out = round(sum_i fma(w_i, x_i) [/ sum w]) for up to 8 inputs per launch; more
inputs chain through an fp32 accumulator, so the fma order (and every bit) matches the C++ kernels."""

from __future__ import annotations

import triton
import triton.language as tl
from pysoup.kernels._rounding import BF16, F16, F32, round_to_out, to_f32

MAX_INPUTS = 8
# 4096 elements per program: large blocks keep the interpreter (20-50x slower than torch) fast in CI and are
# a reasonable default on H100-class GPUs for a streaming kernel.
BLOCK = 4096


@triton.jit
def _weighted_sum_kernel(
    out_ptr,
    acc_ptr,
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
    N: tl.constexpr,
    ACC_IN: tl.constexpr,
    FINAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if ACC_IN:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    else:
        acc = tl.full((BLOCK,), -0.0, tl.float32)
    # tl.static_range unrolls at compile time: input i exists only when i < N.
    for i in tl.static_range(8):
        if i < N:
            x = (
                x0
                if i == 0
                else x1
                if i == 1
                else x2
                if i == 2
                else x3
                if i == 3
                else x4
                if i == 4
                else x5
                if i == 5
                else x6
                if i == 6
                else x7
            )
            w = (
                w0
                if i == 0
                else w1
                if i == 1
                else w2
                if i == 2
                else w3
                if i == 3
                else w4
                if i == 4
                else w5
                if i == 5
                else w6
                if i == 6
                else w7
            )
            v = to_f32(tl.load(x + offs, mask=mask, other=0.0))
            acc = tl.fma(w, v, acc)
    if FINAL:
        if NORMALIZE:
            acc = acc / divisor
        tl.store(out_ptr + offs, round_to_out(acc, OUT_KIND), mask=mask)
    else:
        tl.store(acc_ptr + offs, acc, mask=mask)


def _kind(dtype) -> int:
    import torch

    return {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}[dtype]


def weighted_sum(tensors, weights, out_dtype, normalize: bool, out=None):
    """Launches the kernel over contiguous tensors of one shape (CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        tensors: float32/float16/bfloat16 tensors, mixed freely.
        weights: one number per tensor (rounded to fp32).
        out_dtype: the result's torch dtype.
        normalize: divide by the fp32 sum of the weights (input order).
        out: optional preallocated contiguous result.

    Returns:
        The result tensor, bit-identical to pysoup.ops.reference.weighted_sum.
    """
    import torch

    from pysoup.dtypes import f32_sum, to_f32

    xs = [t.contiguous().reshape(-1) for t in tensors]
    n = xs[0].numel()
    if out is None:
        out = torch.empty(tensors[0].shape, dtype=out_dtype, device=xs[0].device)
    flat_out = out.view(-1)
    ws = [to_f32(w) for w in weights]
    divisor = f32_sum(ws) if normalize else 1.0
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK),)
    acc = None
    groups = [list(range(i, min(i + MAX_INPUTS, len(xs)))) for i in range(0, len(xs), MAX_INPUTS)]
    if len(groups) > 1:
        acc = torch.empty(n, dtype=torch.float32, device=xs[0].device)
    for g, idx in enumerate(groups):
        ptrs = [xs[i] for i in idx] + [xs[idx[0]]] * (MAX_INPUTS - len(idx))
        wts = [ws[i] for i in idx] + [0.0] * (MAX_INPUTS - len(idx))
        final = g == len(groups) - 1
        _weighted_sum_kernel[grid](
            flat_out,
            acc if acc is not None else flat_out,
            *ptrs,
            *wts,
            n,
            divisor,
            N=len(idx),
            ACC_IN=g > 0,
            FINAL=final,
            NORMALIZE=normalize,
            OUT_KIND=_kind(out_dtype),
            BLOCK=BLOCK,
        )
    return out

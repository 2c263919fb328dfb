"""The fused N-ary weighted sum: out = round(sum_i fma(w_i, x_i) [/ sum w]), bit for bit the C++ kernels' result.
The inputs arrive as a tuple of tensors (any mix of dtypes); a launch is compiled per input count and dtypes."""

from __future__ import annotations

import triton
import triton.language as tl

from pysoup.kernels._rounding import BF16, F16, F32, round_to_out, to_f32

# 4096 elements per program: large blocks keep the interpreter (20-50x slower than torch) fast in CI and are
# a reasonable default on H100-class GPUs for a streaming kernel.
BLOCK = 4096


@triton.jit
def _weighted_sum_kernel(
    out_ptr, xs, ws, n, divisor, N: tl.constexpr, NORMALIZE: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.full((BLOCK,), -0.0, tl.float32)
    for i in tl.static_range(N):  # unrolled: input order is the fma order
        acc = tl.fma(ws[i], to_f32(tl.load(xs[i] + offs, mask=mask, other=0.0)), acc)
    if NORMALIZE:
        acc = tl.math.div_rn(acc, divisor)
    tl.store(out_ptr + offs, round_to_out(acc, OUT_KIND), mask=mask)


def _kind(dtype) -> int:
    import torch

    return {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}[dtype]


def weighted_sum(tensors, weights, out_dtype, normalize: bool, out=None):
    """Launches the kernel over tensors of one shape (CUDA, or CPU under TRITON_INTERPRET=1).

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

    xs = tuple(t.contiguous().reshape(-1) for t in tensors)
    n = xs[0].numel()
    if out is None:
        out = torch.empty(tensors[0].shape, dtype=out_dtype, device=xs[0].device)
    ws = tuple(to_f32(w) for w in weights)
    if n:
        _weighted_sum_kernel[(triton.cdiv(n, BLOCK),)](
            out.view(-1),
            xs,
            ws,
            n,
            f32_sum(ws) if normalize else 1.0,
            N=len(xs),
            NORMALIZE=normalize,
            OUT_KIND=_kind(out_dtype),
            BLOCK=BLOCK,
            enable_fp_fusion=False,  # the contract's roundings: no a*b+c fused behind our back
        )
    return out

"""Multi-tensor updates for averaging during training: one launch over every tensor of a model.

`lerp_` computes, for every tensor pair (a, b), a <- weighted_sum([a, b], [1 - t, t]) in place, by the numerical
contract (EMA is t = 1 - beta, SWA is t = 1 / (n + 1)). A table of
pointers and sizes drives the programs, so hundreds of small tensors cost one launch, not hundreds.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pysoup.kernels._rounding import round_to_out, to_f32
from pysoup.kernels.weighted_sum import _kind

# Elements per program. Each program first reads its tensor's row of the table (dependent loads), so small
# blocks spend their time waiting on those; see benchmarks/results/gpu-*.md for the sweep behind the default.
BLOCK = 1024
NUM_WARPS = 2


@triton.jit
def _lerp_kernel(
    a_table,
    b_table,
    sizes,
    block_start,
    tensor_of_block,
    w_a,
    w_b,
    A_DTYPE: tl.constexpr,
    B_DTYPE: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tensor_of_block + pid)
    first = tl.load(block_start + t)
    n = tl.load(sizes + t)
    a = tl.load(a_table + t).to(tl.pointer_type(A_DTYPE))
    b = tl.load(b_table + t).to(tl.pointer_type(B_DTYPE))
    if ALIGNED:  # pointers read from a table have unknown alignment: say so, or no load is a vector one
        a = tl.multiple_of(a, 16)
        b = tl.multiple_of(b, 16)
    start = (pid - first).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    # A size read from a table has unknown divisibility, so a mask `offs < n` would split every access into
    # scalar ones: whole blocks take the unmasked path and only each tensor's last block is masked.
    if ALIGNED and start + BLOCK <= n:
        acc = tl.fma(w_a, to_f32(tl.load(a + offs)), tl.full((BLOCK,), -0.0, tl.float32))
        acc = tl.fma(w_b, to_f32(tl.load(b + offs)), acc)
        tl.store(a + offs, round_to_out(acc, OUT_KIND))
    else:
        mask = offs < n
        acc = tl.fma(w_a, to_f32(tl.load(a + offs, mask=mask, other=0.0)), tl.full((BLOCK,), -0.0, tl.float32))
        acc = tl.fma(w_b, to_f32(tl.load(b + offs, mask=mask, other=0.0)), acc)
        tl.store(a + offs, round_to_out(acc, OUT_KIND), mask=mask)


class TensorTable:
    """The launch tables for one list of (a, b) tensor pairs; build once, reuse every step."""

    def __init__(self, avg, new, block: int = 0, num_warps: int = 0, aligned=None):
        import torch

        self.block = block or BLOCK
        self.num_warps = num_warps or NUM_WARPS
        if len(avg) != len(new):
            raise ValueError(f"{len(avg)} averaged tensors for {len(new)} new ones")
        dtypes = {t.dtype for t in avg}, {t.dtype for t in new}
        if len(dtypes[0]) > 1 or len(dtypes[1]) > 1:
            raise ValueError("one launch takes one dtype per side; group the tensors by dtype")
        for a, b in zip(avg, new):
            if a.shape != b.shape or not a.is_contiguous() or not b.is_contiguous():
                raise ValueError("tensor pairs must have one shape and be contiguous")
        device = avg[0].device
        sizes = [a.numel() for a in avg]
        blocks = [triton.cdiv(s, self.block) for s in sizes]
        starts, owner = [], []
        total = 0
        for i, nb in enumerate(blocks):
            starts.append(total)
            owner += [i] * nb
            total += nb
        as_i64 = dict(dtype=torch.int64, device=device)
        self.a = torch.tensor([t.data_ptr() for t in avg], **as_i64)
        self.b = torch.tensor([t.data_ptr() for t in new], **as_i64)
        self.sizes = torch.tensor(sizes, **as_i64)
        self.starts = torch.tensor(starts, **as_i64)
        self.owner = torch.tensor(owner, dtype=torch.int32, device=device)
        self.blocks = total
        self.a_dtype, self.b_dtype = avg[0].dtype, new[0].dtype
        # 16-byte aligned pointers let the kernel load vectors (torch's allocator aligns every tensor it makes).
        self.aligned = all(t.data_ptr() % 16 == 0 for t in (*avg, *new)) if aligned is None else aligned
        self.keep = (avg, new)  # the tables hold raw pointers: keep the tensors alive


_TL = {}


def _tl_dtype(dtype):
    import torch

    if not _TL:
        _TL.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return _TL[dtype]


def lerp_(table: TensorTable, t: float) -> None:
    """avg <- (1 - t) * avg + t * new for every pair in the table, in one launch."""
    from pysoup.dtypes import to_f32

    if table.blocks == 0:
        return
    _lerp_kernel[(table.blocks,)](
        table.a,
        table.b,
        table.sizes,
        table.starts,
        table.owner,
        to_f32(1.0 - t),
        to_f32(t),
        A_DTYPE=_tl_dtype(table.a_dtype),
        B_DTYPE=_tl_dtype(table.b_dtype),
        OUT_KIND=_kind(table.a_dtype),
        BLOCK=table.block,
        ALIGNED=table.aligned,
        num_warps=table.num_warps,
        enable_fp_fusion=False,  # the contract's roundings: no a*b+c fused behind our back
    )

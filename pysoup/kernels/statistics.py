"""Fixed-order fp64 block sums for the statistics passes (SLERP's angle, model stock's cosines, the variance
correction): the sum of each 4096-element block, formed exactly as the C++ kernels and the reference form it.
Within a block, lane l (l = 0..7) adds elements l, l + 8, l + 16, ... one after another; the lanes are then
combined ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)). A GPU reduction (torch.sum, torch.cumsum) adds in another
order, so its last bits would depend on the device; this kernel makes a GPU merge's coefficients the CPU's.
"""

from __future__ import annotations

import triton
import triton.language as tl

STAT_BLOCK, STAT_LANES = 4096, 8
# Statistics blocks per program: 64 x 8 lanes = 512 running sums, each a sequential walk over 512 values.
BLOCKS_PER_PROGRAM = 64


@triton.jit
def _lane(acc, lanes, L: tl.constexpr):
    # One lane's sum, taken out of the [blocks, 8] tile exactly: -0.0 is the identity of fp64 addition.
    return tl.sum(tl.where(lanes[None, :] == L, acc, -0.0), axis=1)


@triton.jit
def _block_sums_kernel(q, out, n, n_blocks, BLOCKS: tl.constexpr, STEPS: tl.constexpr, LANES: tl.constexpr):
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    lanes = tl.arange(0, LANES)
    first = blocks.to(tl.int64)[:, None] * (STEPS * LANES) + lanes[None, :]
    acc = tl.full((BLOCKS, LANES), -0.0, tl.float64)
    for j in range(STEPS):  # sequential within each lane: the order is the contract
        offs = first + j * LANES
        acc = acc + tl.load(q + offs, mask=offs < n, other=0.0)
    total = (_lane(acc, lanes, 0) + _lane(acc, lanes, 1)) + (_lane(acc, lanes, 2) + _lane(acc, lanes, 3))
    total = total + ((_lane(acc, lanes, 4) + _lane(acc, lanes, 5)) + (_lane(acc, lanes, 6) + _lane(acc, lanes, 7)))
    tl.store(out + blocks, total, mask=blocks < n_blocks)


def block_sums(q):
    """Per-block fp64 sums of each row of a [rows, n] float64 tensor (CUDA, or CPU under TRITON_INTERPRET=1),
    each row's last block padded with zeros: what pysoup.ops.reference.lane_block_sums computes row by row, bit
    for bit. Returns [rows, blocks]. One launch for every statistic of a range: under the interpreter the cost
    is per program, and on a GPU one launch fills the device where a single statistic would not."""
    import torch

    rows, n = q.shape
    pad = -n % STAT_BLOCK
    flat = (torch.nn.functional.pad(q, (0, pad)) if pad else q).reshape(-1)  # whole blocks already: a view
    n_blocks = flat.numel() // STAT_BLOCK
    out = torch.empty(n_blocks, dtype=torch.float64, device=q.device)
    if n_blocks:
        _block_sums_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
            flat,
            out,
            flat.numel(),
            n_blocks,
            BLOCKS=BLOCKS_PER_PROGRAM,
            STEPS=STAT_BLOCK // STAT_LANES,
            LANES=STAT_LANES,
            enable_fp_fusion=False,
        )
    return out.view(rows, n_blocks // max(rows, 1))

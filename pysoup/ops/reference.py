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

from pysoup.dtypes import SAFETENSORS_SIZES, f32_sum, to_f32, to_torch


def availability():
    # find_spec, not import: asking must not cost torch's 1.5 s import on the file-merge path.
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed: pip install 'pysoup[torch]'"
    return True, ""


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
    return s.float()


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


def weighted_sum(tensors, weights, out_dtype, normalize, threads=None):
    import torch

    acc = torch.full(tensors[0].shape, -0.0, dtype=torch.float32, device=tensors[0].device)
    for x, w in zip(tensors, weights):
        acc = fma_f32(w, x.float(), acc)
    if normalize:
        total = f32_sum(weights)
        # A tensor divisor: torch may turn division by a scalar into multiplication by its reciprocal.
        acc = acc / torch.full_like(acc, float(total))
    return round_to(acc, out_dtype)


def _view(addr: int, n: int, dtype: str):
    import torch

    nbytes = n * SAFETENSORS_SIZES[dtype]
    if nbytes == 0:
        return torch.empty(0, dtype=to_torch(dtype))
    buf = (ctypes.c_char * nbytes).from_address(addr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(to_torch(dtype))


def weighted_sum_raw(addrs, dtypes, weights, n, out_addr, out_dtype, normalize, threads=None) -> int:
    """The engine's entry: raw buffers in and out. Returns the count of non-finite outputs."""
    import torch

    xs = [_view(a, n, d) for a, d in zip(addrs, dtypes)]
    out = weighted_sum(xs, weights, to_torch(out_dtype), normalize)
    _view(out_addr, n, out_dtype).copy_(out)
    return int((~torch.isfinite(out)).sum())

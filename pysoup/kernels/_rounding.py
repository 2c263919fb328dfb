"""Conversions between the stored dtypes and fp32, on the bits where the interpreter would not be exact, as
csrc/cpu/dtype.h does."""

import triton
import triton.language as tl

# Output kinds, by code (the same codes as the C++ kernels).
F32, F16, BF16 = 0, 1, 2


@triton.jit
def round_to_out(acc, OUT_KIND: tl.constexpr):
    """fp32 -> the output element type. bf16: add 0x7FFF plus the lowest kept bit, shift; a NaN keeps its sign
    and top payload with the quiet bit set. fp16: the hardware/numpy conversion, which rounds to nearest even."""
    if OUT_KIND == 2:
        bits = acc.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet = (bits >> 16) | 0x40
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(is_nan, quiet, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT_KIND == 1:
        return acc.to(tl.float16)
    else:
        return acc


@triton.jit
def to_f32(v):
    """Exact widening to fp32. bf16 is shifted on the bits: the interpreter's own conversion flushes bf16
    subnormals to zero (254 of the 65536 patterns differed)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)

"""Dtype names and codes: safetensors strings, the kernels' integer codes, numpy and torch dtypes."""

from __future__ import annotations

import math
import struct

from pysoup.errors import PlanError

# Codes shared with csrc/cpu/dtype.h (enum DType).
F32, F16, BF16 = 0, 1, 2

# Element size of every safetensors dtype we accept in a header. Only the floating ones in KERNEL_CODE
# are merged; the others (position ids, masks) are copied from the first input.
SAFETENSORS_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# safetensors writes tensors sorted by dtype, largest enum value first (its Rust `Dtype` order), then name.
SAFETENSORS_ORDER = [
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
]  # fmt: skip

KERNEL_CODE = {"F32": F32, "F16": F16, "BF16": BF16}

_USER_NAMES = {
    "float32": "F32", "fp32": "F32", "float": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16", "f16": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}  # fmt: skip

_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "U16": "uint16", "U32": "uint32", "U64": "uint64",
                "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn"}  # fmt: skip


def parse_dtype(value) -> str:
    """Turns 'bfloat16', 'bf16', 'BF16' or a torch dtype into a mergeable safetensors dtype string."""
    if value is None:
        return None
    name = str(value).replace("torch.", "")
    code = _USER_NAMES.get(name.lower()) or (name.upper() if name.upper() in KERNEL_CODE else None)
    if code is None:
        raise PlanError(f"unsupported output dtype {value!r}: choose bfloat16, float16 or float32")
    return code


def to_torch(st_dtype: str):
    import torch

    return getattr(torch, _TORCH_NAMES[st_dtype])


def from_torch(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    for st, tn in _TORCH_NAMES.items():
        if tn == name:
            return st
    raise PlanError(f"unsupported tensor dtype {dtype}")


def to_f32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as a Python float; inf when it overflows.

    struct, not numpy: the file-merge path must not pay numpy's import (~60 ms of a whole-process merge).
    """
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def f32_sum(values) -> float:
    """The float32 sum in input order, as the kernels compute the normalizing divisor. (Rounding the exact
    double sum of two float32 values to float32 equals float32 addition: 53 >= 2 * 24 + 2.)"""
    total = 0.0
    for v in values:
        total = to_f32(total + to_f32(v))
    return total

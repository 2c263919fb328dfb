"""Argument checks shared by every backend's torch-facing entry points."""

from __future__ import annotations

import math

from pysoup.dtypes import f32_sum
from pysoup.errors import PlanError


def check_weighted_sum(tensors, weights, out_dtype, normalize):
    import torch

    tensors = list(tensors)
    if not tensors:
        raise PlanError("weighted_sum needs at least one tensor")
    weights = [float(w) for w in weights]
    if len(weights) != len(tensors):
        raise PlanError(f"{len(weights)} weights for {len(tensors)} tensors")
    if not all(math.isfinite(w) for w in weights):
        raise PlanError(f"weights must be finite, got {weights}")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    shape, device = tensors[0].shape, tensors[0].device
    for i, t in enumerate(tensors):
        if t.dtype not in floats:
            raise PlanError(f"tensor {i} has dtype {t.dtype}; weighted_sum takes float32, float16 or bfloat16")
        if t.shape != shape:
            raise PlanError(f"tensor {i} has shape {list(t.shape)}, tensor 0 has {list(shape)}")
        if t.device != device:
            raise PlanError(f"tensor {i} is on {t.device}, tensor 0 on {device}")
    out_dtype = tensors[0].dtype if out_dtype is None else out_dtype
    if out_dtype not in floats:
        raise PlanError(f"out_dtype {out_dtype} is not float32, float16 or bfloat16")
    if normalize:
        total = f32_sum(weights)
        if total == 0 or not math.isfinite(total):
            raise PlanError(f"weights {weights} sum to {float(total)}; cannot normalize")
    return tensors, weights, out_dtype

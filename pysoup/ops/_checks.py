"""Argument checks shared by every backend's torch-facing entry points."""

from __future__ import annotations

import math
import numbers

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


def check_lerp(averaged, current, weight):
    """The arguments of lerp_: two equally long sequences of tensors (or two tensors) and one number."""
    import torch

    from pysoup.dtypes import to_f32

    avg = [averaged] if isinstance(averaged, torch.Tensor) else list(averaged)
    cur = [current] if isinstance(current, torch.Tensor) else list(current)
    if len(avg) != len(cur):
        raise PlanError(f"{len(avg)} averaged tensors for {len(cur)} current ones")
    scalar = isinstance(weight, torch.Tensor) and weight.numel() == 1
    if isinstance(weight, bool) or not (isinstance(weight, numbers.Real) or scalar):
        raise PlanError(f"the weight must be a number, got {type(weight).__name__}")
    t = float(weight)
    if not (math.isfinite(to_f32(t)) and math.isfinite(to_f32(1.0 - t))):
        raise PlanError(f"the weight must be finite in float32, got {weight}")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    device = avg[0].device if avg else None
    if device is not None and device.type not in ("cpu", "cuda"):
        raise PlanError(f"lerp_ updates CPU or CUDA tensors, got {device}")
    for i, (a, b) in enumerate(zip(avg, cur)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise PlanError(f"pair {i}: expected tensors, got {type(a).__name__} and {type(b).__name__}")
        for side, x in (("averaged", a), ("current", b)):
            if x.dtype not in floats:
                raise PlanError(f"{side} tensor {i} has dtype {x.dtype}; lerp_ takes float32, float16 or bfloat16")
            if x.device != device:
                raise PlanError(f"{side} tensor {i} is on {x.device}, averaged tensor 0 on {device}")
        if a.shape != b.shape:
            raise PlanError(f"pair {i}: averaged shape {list(a.shape)}, current shape {list(b.shape)}")
        if not a.is_contiguous():
            raise PlanError(f"averaged tensor {i} is not contiguous; it is updated in place")
        if a.requires_grad and torch.is_grad_enabled():
            raise PlanError(f"averaged tensor {i} requires grad: update it under torch.no_grad()")
    # The kernels read raw memory: a non-contiguous current tensor goes through a contiguous copy.
    return avg, [b.contiguous() for b in cur], t


def lerp_groups(avg, cur):
    """Pairs grouped by (averaged dtype, current dtype), in order: each group is one kernel launch."""
    groups = {}
    for a, b in zip(avg, cur):
        pair = groups.setdefault((a.dtype, b.dtype), ([], []))
        pair[0].append(a)
        pair[1].append(b)
    return groups

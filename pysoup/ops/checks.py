"""Argument checks shared by every backend's torch-facing entry points."""

from __future__ import annotations

import functools
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


def check_weight(weight) -> float:
    """lerp's weight: a real number whose float32 rounding, and that of 1 - weight, are finite."""
    import torch

    from pysoup.dtypes import to_f32

    scalar = isinstance(weight, torch.Tensor) and weight.numel() == 1
    if isinstance(weight, bool) or not (isinstance(weight, numbers.Real) or scalar):
        raise PlanError(f"the weight must be a number, got {type(weight).__name__}")
    t = float(weight)
    if not (math.isfinite(to_f32(t)) and math.isfinite(to_f32(1.0 - t))):
        raise PlanError(f"the weight must be finite in float32, got {weight}")
    return t


def check_lerp_tensors(averaged, current, copy_strided: bool):
    """Two equally long sequences of tensors (or two tensors) for an in-place lerp: the averaged ones contiguous,
    every one float32, float16 or bfloat16 on one CPU or CUDA device, pairs of one shape. A strided current
    tensor is copied when `copy_strided`, else refused. Returns the two lists."""
    import torch

    avg = [averaged] if isinstance(averaged, torch.Tensor) else list(averaged)
    cur = [current] if isinstance(current, torch.Tensor) else list(current)
    if len(avg) != len(cur):
        raise PlanError(f"{len(avg)} averaged tensors for {len(cur)} current ones")
    if not avg:
        return avg, cur
    device = getattr(avg[0], "device", None)
    if device is not None and device.type not in ("cpu", "cuda"):
        raise PlanError(f"lerp_ updates CPU or CUDA tensors, got {device}")
    # The common case in one pass: a training loop calls this every step on hundreds of tensors, and each
    # attribute costs ~50 ns. Anything unusual falls through to the loop below, which names the problem.
    grad, floats = torch.is_grad_enabled(), _floats()
    try:
        if all(
            a.dtype in floats
            and b.dtype in floats
            and a.device == device
            and b.device == device
            and a.shape == b.shape
            and a.is_contiguous()
            and b.is_contiguous()
            and not (grad and a.requires_grad)
            for a, b in zip(avg, cur)
        ):
            return avg, cur
    except AttributeError:
        pass
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
        if not b.is_contiguous() and not copy_strided:
            raise PlanError(f"current tensor {i} is not contiguous; MultiTensorLerp reads it in place every call")
        if grad and a.requires_grad:
            raise PlanError(f"averaged tensor {i} requires grad: update it under torch.no_grad()")
    # The kernels read raw memory: a non-contiguous current tensor goes through a contiguous copy.
    return avg, [b.contiguous() for b in cur]


@functools.cache
def _floats():
    import torch

    return frozenset((torch.float32, torch.float16, torch.bfloat16))


def lerp_groups(avg, cur):
    """Pairs grouped by (averaged dtype, current dtype), in order: each group is one kernel launch."""
    first = (avg[0].dtype, cur[0].dtype)
    if all(a.dtype is first[0] and b.dtype is first[1] for a, b in zip(avg, cur)):
        return {first: (avg, cur)}
    groups = {}
    for a, b in zip(avg, cur):
        pair = groups.setdefault((a.dtype, b.dtype), ([], []))
        pair[0].append(a)
        pair[1].append(b)
    return groups

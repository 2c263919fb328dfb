"""Gossip learning's aggregation step with variance correction (Vanishing Variance; the authors' DFL_torch 'VC'
preset is the default): averaging uncorrelated models shrinks the weights' spread below what their initialisation
set; the step averages, then restores the spread per tensor.

One node's step, in place on its own tensors, tensor by tensor: one fp64 statistics pass (`moments`) over the
node's tensor and the received ones, then one fused pass (`masked_sum`, mode VARIANCE) that writes
center + scale * (mean - center) over the node's tensor. Both are ops of the op table, so the C++ kernels run it on
the CPU and the reference backend defines the bits. No copy of a model is made: a non-contiguous tensor of the node
is computed into one scratch tensor of its size, a non-contiguous received one is copied contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pysoup.dtypes import from_torch, to_f32
from pysoup.errors import PlanError
from pysoup.ops.table import Chunk, MaskedSumMode, MomentsSpec
from pysoup.strategies.variance import BATCHNORM_BUFFERS, variance_scale

MODES = ("vc", "plain", "mean")
_AVERAGED_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class GossipStep:
    """What one gossip_step did.

    Attributes:
        scales: per variance-corrected tensor, the factor sqrt((sigma^2* + eps) / (Var(W_bar) + eps)) applied about
            its mean (above 1 where averaging shrank the spread).
        averaged: names written: the variance-corrected tensors, then the plainly averaged ones (scalars, and
            every tensor in mode "mean").
        kept: names left as the node had them (batch-norm statistics, integer and bool tensors, empty tensors).
    """

    scales: dict = field(default_factory=dict)
    averaged: list = field(default_factory=list)
    kept: list = field(default_factory=list)


def gossip_step(own, received, mode: str = "vc", eps: float = 1e-4, backend: str = "auto", threads=None):
    """One node's gossip aggregation, in place: its tensors become the (variance-corrected) average of its own
    model and the models it received.

    Per floating-point tensor W (n = numel > 1), with r received models W_1..W_r:

    - "vc" (default; the authors' DFL_torch 'VC' preset): W_bar = 1/2 W + 1/2 mean_j W_j, target
      sigma^2* = mean_j Var(W_j) over the received models only;
    - "plain": W_bar = the uniform mean of W and the W_j, sigma^2* = the mean variance of all r + 1 (what
      pysoup.merge(strategy="variance_corrected") computes over the same models);
    - "mean": W_bar, uniform as in "plain", with no correction (plain gossip averaging, the vanishing-variance
      baseline);

    then W' = (W_bar - mean W_bar) * sqrt((sigma^2* + eps) / (Var W_bar + eps)) + mean W_bar. Variances are
    unbiased, from fp64 sums (as the variance_corrected file strategy). W_bar is the fp32 fused weighted sum with
    integer weights (r for the node and 1 per received model in "vc", all 1 otherwise) divided by their sum, so it
    is computed, and its statistics are taken, from exactly the values that are rescaled; the result is rounded
    once into the node's dtype.

    Not rescaled: scalars (numel 1) get W_bar; batch-norm statistics (names ending in running_mean, running_var,
    num_batches_tracked) and integer or bool tensors stay the node's own (the received ones are not read); empty
    tensors are left alone. Tensors of the node that share memory (tied weights) are updated once.

    Everything is checked before anything is written: the same names in every model, the same shapes, averaged
    tensors float32, float16 or bfloat16 in every model (dtypes may differ between models), all on the CPU.

    Args:
        own: the node's model (nn.Module: its state_dict's tensors, which share memory with its parameters and
            buffers) or a state dict of CPU tensors, updated in place.
        received: a non-empty list of state dicts (or modules) with the same names and shapes.
        mode: "vc", "plain" or "mean".
        eps: added to both variances (1e-4 in the paper and in DFL_torch).
        backend: "auto", "cpu" (the C++ kernels) or "reference" (torch; the same bits).
        threads: CPU threads of the cpu backend (default: every core this process may use).

    Returns:
        GossipStep: the correction factor per tensor, and which names were averaged or kept.

    Example:
        >>> step = gossip_step(node_model, [peer_a.state_dict(), peer_b.state_dict()])   # doctest: +SKIP
        >>> step.scales["fc1.weight"]   # > 1: averaging uncorrelated peers had shrunk the spread  # doctest: +SKIP
        1.38
    """
    import torch

    from pysoup.ops import get_backend

    tensors, peers, plan = _check(own, received, mode, eps)
    ops = get_backend(backend, "cpu", threads)
    r = len(peers)
    weights = (float(r),) + (1.0,) * r if mode == "vc" else (1.0,) * (r + 1)
    target = range(1, r + 1) if mode == "vc" else None
    result = GossipStep()
    with torch.no_grad():
        for name, action in plan:
            if action != "average":
                (result.kept if action == "keep" else result.averaged).append(name)
                continue
            x = tensors[name]
            # The kernels write each element after reading it, so the output may be the node's input itself: x,
            # or its contiguous copy when x is strided.
            srcs = [x.contiguous()] + [p[name].contiguous() for p in peers]
            out = srcs[0]
            chunk = Chunk(name, [s.data_ptr() for s in srcs], [from_torch(s.dtype) for s in srcs], 0, x.numel())
            chunk.out, chunk.out_dtype = out.data_ptr(), from_torch(x.dtype)
            if mode == "mean" or x.numel() == 1:
                ops.weighted_sum_raw(chunk, weights, True)
            else:
                m = ops.moments_raw(chunk, MomentsSpec(r + 1, mean_weights=weights, gram=False).zeros())
                center, scale = variance_scale(r + 1, x.numel(), m, float(eps), target)
                ops.masked_sum_raw(chunk, weights, MaskedSumMode.VARIANCE, to_f32(center), to_f32(scale))
                result.scales[name] = scale
            if out is not x:
                x.copy_(out)
            result.averaged.append(name)
    return result


def _state(model, what: str) -> dict:
    import torch

    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return dict(model)
    raise PlanError(f"gossip_step: {what} is a {type(model).__name__}, not a state dict or nn.Module")


def _check(own, received, mode, eps):
    """(the node's tensors, the peers' state dicts, [(name, "average" | "keep" | "alias")]) or a one-line
    PlanError."""
    import math

    import torch

    if mode not in MODES:
        raise PlanError(f"gossip_step: unknown mode {mode!r} (one of {', '.join(MODES)})")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise PlanError(f"gossip_step: eps must be a finite number >= 0, got {eps!r}")
    tensors = _state(own, "the node's model")
    if isinstance(received, (Mapping, torch.nn.Module)) or not isinstance(received, (list, tuple)):
        raise PlanError("gossip_step: received must be a list of state dicts")
    if not received:
        raise PlanError("gossip_step: no received models (a node with nothing received has nothing to average)")
    peers = [_state(p, f"received model {j}") for j, p in enumerate(received)]
    names = list(tensors)
    for j, peer in enumerate(peers):
        missing = [n for n in names if n not in peer]
        extra = [n for n in peer if n not in tensors]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the node has not"
            raise PlanError(f"gossip_step: received model {j} {what} ({len(missing)} missing, {len(extra)} extra)")
    plan, seen = [], set()
    for name in names:
        x = tensors[name]
        if not isinstance(x, torch.Tensor):
            raise PlanError(f"gossip_step: {name!r} of the node is a {type(x).__name__}, not a tensor")
        if x.device.type != "cpu":
            raise PlanError(f"gossip_step: {name!r} of the node is on {x.device}; gossip_step runs on CPU tensors")
        for j, peer in enumerate(peers):
            y = peer[name]
            if not isinstance(y, torch.Tensor):
                raise PlanError(f"gossip_step: {name!r} of received model {j} is a {type(y).__name__}, not a tensor")
            if y.shape != x.shape:
                raise PlanError(
                    f"gossip_step: {name!r} is {list(y.shape)} in received model {j}, {list(x.shape)} in the node"
                )
        key = (x.data_ptr(), x.dtype, tuple(x.shape), x.stride())
        if name.endswith(BATCHNORM_BUFFERS) or not x.is_floating_point() or x.numel() == 0:
            plan.append((name, "keep"))
            continue
        if key in seen:
            plan.append((name, "alias"))  # tied to a tensor met before: written once, under that name
            continue
        seen.add(key)
        for j, y in enumerate([x] + [p[name] for p in peers]):
            dtype = str(y.dtype).replace("torch.", "")
            if dtype not in _AVERAGED_DTYPES:
                who = "the node" if j == 0 else f"received model {j - 1}"
                raise PlanError(
                    f"gossip_step: {name!r} is {dtype} in {who}; averaged tensors must be float32, float16 or bfloat16"
                )
            if y.device.type != "cpu":
                raise PlanError(f"gossip_step: {name!r} of received model {j - 1} is on {y.device}, not the CPU")
        plan.append((name, "average"))
    return tensors, peers, plan

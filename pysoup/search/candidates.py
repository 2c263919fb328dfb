"""Candidates of a search: state dicts or checkpoint paths, checked against each other and packed into one flat
buffer per dtype, so that building any soup of them is one fused kernel call per dtype, not a loop over tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pysoup.errors import PlanError


class PackedModels:
    """k models of one architecture, each stored as flat buffers (one per float dtype) plus shared layout.

    Attributes:
        names: tensor names in the first candidate's order.
        layout: name -> (dtype, offset, shape) inside that dtype's flat buffer.
        flats: per model, {dtype: flat tensor}.
        extras: non-float tensors (copied from the first candidate).
    """

    def __init__(self, candidates, what: str = "candidate"):
        import torch

        from pysoup.io.checkpoint import open_checkpoint

        if not candidates:
            raise PlanError(f"no {what}s given")
        sds = []
        for i, c in enumerate(candidates):
            if isinstance(c, Mapping):
                sds.append(dict(c))
            else:
                with open_checkpoint(c, i) as ckpt:
                    sds.append({k: ckpt.torch(k).clone() for k in ckpt.keys()})
        first = sds[0]
        self.names = list(first)
        floats = (torch.float32, torch.float16, torch.bfloat16)
        self.layout = {}
        sizes = {}
        for name in self.names:
            t = first[name]
            if t.dtype in floats:
                self.layout[name] = (t.dtype, sizes.get(t.dtype, 0), tuple(t.shape))
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        self.extras = {n: first[n].detach().clone() for n in self.names if n not in self.layout}
        self.flats = []
        for i, sd in enumerate(sds):
            missing = [n for n in self.names if n not in sd]
            if missing:
                raise PlanError(f"{what} {i}: tensor {missing[0]!r} is missing (it is in {what} 0)")
            flat = {dt: torch.empty(n, dtype=dt) for dt, n in sizes.items()}
            for name, (dt, off, shape) in self.layout.items():
                t = sd[name]
                if tuple(t.shape) != shape:
                    raise PlanError(
                        f"{what} {i}: tensor {name!r} has shape {list(t.shape)}, {what} 0 has {list(shape)}"
                    )
                flat[dt][off : off + math.prod(shape)].copy_(t.detach().reshape(-1).to(device="cpu", dtype=dt))
            self.flats.append(flat)

    def __len__(self) -> int:
        return len(self.flats)

    def empty(self):
        """Fresh flat buffers shaped like one model."""
        import torch

        return {dt: torch.empty_like(f) for dt, f in self.flats[0].items()}

    def combine(self, flats: list, weights, normalize: bool, out=None):
        """sum_i w_i flats[i] (divided by sum w when normalize), one fused kernel call per dtype."""
        from pysoup.ops import weighted_sum

        out = out if out is not None else self.empty()
        for dt in out:
            out[dt] = weighted_sum([f[dt] for f in flats], list(weights), out_dtype=dt, normalize=normalize)
        return out

    def state_dict(self, flat) -> dict:
        """Views of a flat model as a state dict (the first candidate's order; non-float tensors included)."""
        sd = {}
        for name in self.names:
            if name in self.layout:
                dt, off, shape = self.layout[name]
                sd[name] = flat[dt][off : off + math.prod(shape)].view(shape)
            else:
                sd[name] = self.extras[name]
        return sd


def score_of(evaluate, state_dict, what: str) -> float:
    """evaluate(state_dict) as a finite float, or a SoupError naming what was evaluated."""
    try:
        value = float(evaluate(state_dict))
    except Exception as exc:  # the user's evaluator failed: say on what, keep the cause
        raise PlanError(f"evaluate() raised on {what}: {type(exc).__name__}: {exc}") from exc
    if not math.isfinite(value):
        raise PlanError(f"evaluate() returned {value} on {what}")
    return value

"""Sparse Model Soups (Zimmer et al.): average pruned models that share one sparsity mask; zeros stay zero."""

from __future__ import annotations

from dataclasses import dataclass

from pysoup.errors import PlanError
from pysoup.ops.table import MaskedSumMode
from pysoup.strategies import register
from pysoup.strategies.base import Strategy
from pysoup.strategies.tensor_op import TensorOp

MODES = {"shared": MaskedSumMode.SHARED, "intersection": MaskedSumMode.INTERSECTION, "union": MaskedSumMode.UNION}


@dataclass(frozen=True)
class SparseOp(TensorOp):
    weights: tuple
    mode: str

    # The shared mask is verified for every tensor before any output is written.
    verify_first = True

    def reduce_passes(self, backend) -> int:
        return 1

    def begin(self, backend, name, numel):
        return {"zeros": 0}

    def reduce(self, backend, chunk, state, pass_):
        first, zeros = backend.sparse_scan_raw(chunk)
        if first >= 0 and self.mode == "shared":
            raise PlanError(
                f"tensor {chunk.name!r}: the inputs' zero patterns differ (first at element "
                f"{chunk.start + first}); use mask=intersection or mask=union"
            )
        state["zeros"] += zeros

    def summary(self, state, numel):
        return state["zeros"], numel

    @classmethod
    def report(cls, summaries):
        zeros, total = sum(z for z, _ in summaries), sum(n for _, n in summaries)
        sparsity = zeros / total if total else 0.0
        return {"sparsity": sparsity}, [f"sparsity {sparsity:.2%} (zeros kept exactly)"]

    def combine(self, backend, chunk, state):
        return backend.masked_sum_raw(chunk, self.weights, MODES[self.mode])


@register
class Sparse(Strategy):
    """theta = sum w_i theta_i / sum w_i where the mask is non-zero. mask: shared (verify equal patterns),
    intersection (keep entries non-zero in every input), union (average over the inputs where non-zero)."""

    name = "sparse"
    plans_by_name = False
    params = {"mask": "shared"}
    model_params = {"weight": 1.0}

    def plan_tensor(self, ctx):
        mode = ctx.param("mask", "shared")
        if mode not in MODES:
            raise PlanError(f"parameter 'mask' must be one of {', '.join(MODES)}, got {mode!r}")
        return SparseOp(ctx.weights(normalize=True), mode)

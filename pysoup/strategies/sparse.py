"""Sparse Model Soups (Zimmer et al.): average pruned models that share one sparsity mask; zeros stay zero."""

from __future__ import annotations

from dataclasses import dataclass

from pysoup.errors import PlanError
from pysoup.plan import TensorOp
from pysoup.strategies import register
from pysoup.strategies.base import Strategy

MODES = {"shared": 0, "intersection": 1, "union": 2}


@dataclass(frozen=True)
class SparseOp(TensorOp):
    weights: tuple
    mode: str

    # The shared mask is verified for every tensor before any output is written.
    verify_first = True

    def reduce_passes(self, backend) -> int:
        return 1

    def begin(self, backend, name, numel):
        return {"name": name, "zeros": 0}

    def reduce(self, backend, chunk, state, pass_):
        first, zeros = backend.sparse_scan_raw(chunk.addrs, chunk.dtypes, chunk.n, threads=chunk.threads)
        if first >= 0 and self.mode == "shared":
            raise PlanError(
                f"tensor {chunk.name!r}: the inputs' zero patterns differ (first at element "
                f"{chunk.start + first}); use mask=intersection or mask=union"
            )
        state["zeros"] += zeros

    def summary(self, state):
        return {"zeros": state["zeros"]}

    def combine(self, backend, chunk, state):
        return backend.masked_sum_raw(
            chunk.addrs,
            chunk.dtypes,
            self.weights,
            MODES[self.mode],
            chunk.n,
            chunk.out,
            chunk.out_dtype,
            threads=chunk.threads,
        )


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

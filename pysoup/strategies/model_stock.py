"""Model Stock (Jang et al.): average the fine-tunes, then move toward the base by how aligned they are."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pysoup.dtypes import to_f32
from pysoup.errors import PlanError
from pysoup.ops.table import Moments, MomentsSpec
from pysoup.strategies import register
from pysoup.strategies.base import Strategy
from pysoup.strategies.tensor_op import MomentsOp


def model_stock_ratio(k: int, m: Moments) -> float:
    """t = k c / (1 + (k - 1) c), c the mean pairwise cosine of the task vectors (0 where a norm is 0)."""
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            denom = math.sqrt(m.squares(i) * m.squares(j))
            cosines.append(max(-1.0, min(1.0, m.dot(i, j) / denom)) if denom > 0 else 0.0)
    c = sum(cosines) / len(cosines)
    denom = 1 + (k - 1) * c
    return k * c / denom if denom != 0 else 0.0


@dataclass(frozen=True)
class ModelStockOp(MomentsOp):
    k: int

    def moments_spec(self):
        return MomentsSpec(self.k, base=True)

    def end_pass(self, state, pass_):
        t = model_stock_ratio(self.k, state["moments"])
        state["t"] = t
        state["weights"] = tuple(to_f32(t / self.k) for _ in range(self.k)) + (to_f32(1 - t),)

    def combine(self, backend, chunk, state):
        return backend.weighted_sum_raw(chunk, state["weights"], False)


@register
class ModelStock(Strategy):
    """theta = t mean(theta_i) + (1 - t) theta_0, computed as the fused sum (t/k) sum_i theta_i + (1 - t) theta_0."""

    name = "model_stock"
    plans_by_name = False
    base = "required"
    min_models = 2
    params = {"filter_wise": False}

    def plan_tensor(self, ctx):
        if ctx.param("filter_wise", False):
            raise PlanError("model_stock: filter_wise=true (per-row ratios) is not supported")
        return ModelStockOp(ctx.num_models)

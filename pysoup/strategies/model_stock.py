"""Model Stock (Jang et al.): average the fine-tunes, then move toward the base by how aligned they are."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pysoup.dtypes import to_f32
from pysoup.ops.table import Moments, MomentsSpec
from pysoup.strategies import register
from pysoup.strategies.base import Strategy
from pysoup.strategies.tensor_op import MomentsOp


def model_stock_ratio(k: int, m: Moments) -> float:
    """t = k c / (1 + (k - 1) c), c the mean pairwise cosine of the task vectors, each <a, b> / max(|a| |b|, 1e-6)
    clamped to [-1, 1]; t = 0 (the base) where |1 + (k - 1) c| < 1e-6 (mergekit 0.1.5's rules)."""
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            denom = max(math.sqrt(m.squares(i)) * math.sqrt(m.squares(j)), 1e-6)
            cosines.append(max(-1.0, min(1.0, m.dot(i, j) / denom)))
    c = sum(cosines) / len(cosines)
    denom = 1 + (k - 1) * c
    return k * c / denom if abs(denom) >= 1e-6 else 0.0


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

    def check_params(self, settings, weights_given):
        super().check_params(settings, weights_given)
        # filter_wise ops depend on the tensor's shape, not only its element count: plan every tensor on its own.
        self.plans_by_name = "filter_wise" in settings

    def plan_tensor(self, ctx):
        if ctx.flag("filter_wise", False):
            from pysoup.strategies.rowwise import RowModelStockOp, segments

            return RowModelStockOp(models=ctx.num_models, seg=segments(ctx, columns=False))
        return ModelStockOp(ctx.num_models)

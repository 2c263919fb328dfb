"""The variance-corrected average (Vanishing Variance): averaging shrinks the weights' spread; restore it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pysoup.dtypes import to_f32
from pysoup.ops.table import MaskedSumMode, Moments, MomentsSpec
from pysoup.strategies import register
from pysoup.strategies.base import Strategy
from pysoup.strategies.tensor_op import MomentsOp, WeightedSum

# Buffers of BatchNorm are statistics, not weights: they are averaged but never rescaled.
BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def variance_scale(k: int, n: int, m: Moments, eps: float, target=None) -> tuple:
    """(center, scale): the mean of the average and sqrt((mean_i Var(theta_i) + eps) / (Var(mean) + eps)),
    unbiased variances from the fp64 sums; i over `target` (indices of the k inputs; default: all of them; gossip's
    VC preset takes the received models only)."""

    def var(s, q):
        return max(0.0, (q - s * s / n) / (n - 1))

    indices = range(k) if target is None else target
    sigma2 = sum(var(m.sum(i), m.squares(i)) for i in indices) / len(indices)
    s_m, q_m = m.sum(m.mean), m.squares(m.mean)
    return s_m / n, math.sqrt((sigma2 + eps) / (var(s_m, q_m) + eps))


@dataclass(frozen=True)
class VarianceCorrectedOp(MomentsOp):
    k: int
    numel: int
    eps: float

    def moments_spec(self):
        return MomentsSpec(self.k, mean_weights=(1.0,) * self.k, gram=False)

    def end_pass(self, state, pass_):
        center, scale = variance_scale(self.k, self.numel, state["moments"], self.eps)
        state["center"], state["scale"] = to_f32(center), to_f32(scale)

    def combine(self, backend, chunk, state):
        weights = (1.0,) * self.k
        return backend.masked_sum_raw(chunk, weights, MaskedSumMode.VARIANCE, state["center"], state["scale"])


@register
class VarianceCorrected(Strategy):
    """w' = (w_bar - mean(w_bar)) * sqrt((sigma^2 + eps) / (Var(w_bar) + eps)) + mean(w_bar), sigma^2 the mean of the
    inputs' variances; scalars and BatchNorm buffers are plainly averaged."""

    name = "variance_corrected"
    params = {"eps": 1e-4}

    def plan_tensor(self, ctx):
        if ctx.numel <= 1 or ctx.name.endswith(BATCHNORM_BUFFERS):
            return WeightedSum((1.0,) * ctx.num_models, True)
        return VarianceCorrectedOp(ctx.num_models, ctx.numel, float(ctx.param("eps", 1e-4)))

"""Model soups (Wortsman et al.): the weighted average of fine-tuned models, and its uniform special case."""

from __future__ import annotations

from pysoup.dtypes import to_f32
from pysoup.errors import PlanError
from pysoup.strategies import register
from pysoup.strategies.base import Strategy, TensorContext
from pysoup.strategies.tensor_op import WeightedSum


@register
class Linear(Strategy):
    """theta = sum_i w_i theta_i, divided by sum_i w_i when `normalize` (default true).

    Weights are per model and may vary per tensor (gradients, filters). Under normalize, weights that sum
    to zero (in fp32, input order) for some tensor are an error naming the tensor.
    """

    name = "linear"
    plans_by_name = False
    params = {"normalize": True}
    model_params = {"weight": 1.0}

    def plan_tensor(self, ctx: TensorContext):
        normalize = ctx.flag("normalize", True)
        return WeightedSum(ctx.weights(normalize), normalize)


@register
class Uniform(Linear):
    """The uniform soup: every model weighs the same (linear with w_i = 1, normalized)."""

    name = "uniform"
    params = {}
    model_params = {}

    def plan_tensor(self, ctx: TensorContext):
        return WeightedSum((1.0,) * ctx.num_models, True)


@register
class Interpolate(Strategy):
    """theta = (1 - alpha) a + alpha b (WiSE-FT; the alignment-tax paper's model averaging). Per-layer-group ratios
    are per-tensor values of alpha: a gradient over the layers, or {filter, value} entries."""

    name = "interpolate"
    plans_by_name = False
    params = {"alpha": 0.5}
    min_models = max_models = 2

    def plan_tensor(self, ctx: TensorContext):
        alpha = ctx.param("alpha", 0.5)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
            raise PlanError(f"tensor {ctx.name!r}: alpha = {alpha!r} is outside [0, 1]")
        return WeightedSum((to_f32(1 - alpha), to_f32(alpha)), False)

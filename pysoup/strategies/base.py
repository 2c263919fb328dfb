"""What a merge method declares, and the context it gets for each tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pysoup.dtypes import f32_sum, to_f32
from pysoup.errors import PlanError
from pysoup.strategies.params import finite_number, resolve


@dataclass
class TensorContext:
    """Everything a strategy may look at to plan one output tensor."""

    name: str
    t: float  # layer position in [0, 1], for gradients
    numel: int
    model_settings: list  # per non-base model: {param: setting}
    settings: dict  # global {param: setting}
    num_models: int
    # The tensor's shape, for the row- and column-wise methods (model_stock filter_wise, nuslerp unflattened, Arcee
    # Fusion). Such strategies plan every tensor on its own (plans_by_name), so the op cache never mixes shapes.
    shape: tuple = ()

    def param(self, key: str, default=None):
        value = resolve(self.settings.get(key, default), self.name, self.t)
        return default if value is None else value

    def model_param(self, i: int, key: str, default=None):
        setting = self.model_settings[i].get(key, self.settings.get(key, default))
        value = resolve(setting, self.name, self.t)
        return default if value is None else value

    def flag(self, key: str, default: bool) -> bool:
        value = self.param(key, default)
        if not isinstance(value, bool):
            raise PlanError(f"tensor {self.name!r}: parameter {key!r} must be true or false, got {value!r}")
        return value

    def weights(self, normalize: bool) -> tuple:
        """The per-model weights rounded to fp32, as the kernels use them. Under `normalize` their fp32 sum in
        input order (the kernels' divisor) must be finite and non-zero."""
        raw = [self.model_number(i, "weight", 1.0) for i in range(self.num_models)]
        w32 = tuple(to_f32(w) for w in raw)
        if not all(math.isfinite(w) for w in w32):
            raise PlanError(f"tensor {self.name!r}: weights {raw} overflow float32")
        if normalize:
            total = f32_sum(w32)
            if total == 0 or not math.isfinite(total):
                raise PlanError(
                    f"tensor {self.name!r}: weights {raw} sum to {float(total)}; cannot normalize "
                    "(pass normalize=false or other weights)"
                )
        return w32

    def model_number(self, i: int, key: str, default=None) -> float:
        return finite_number(key, self.model_param(i, key, default), f"tensor {self.name!r}, model {i}")


class Strategy:
    """A merge method: its parameters, its input contract, and the op it plans for each tensor.

    Subclasses set `name`, `params` (global parameters with their defaults), `model_params` (per-model
    parameters with defaults) and `base` ("required", "optional" or "forbidden"), and implement
    `plan_tensor`.
    """

    name = ""
    params: dict = {}
    model_params: dict = {}
    base = "forbidden"
    min_models = 1
    max_models = None
    # False when plan_tensor's op depends on the tensor only through ctx.numel and ctx.param / ctx.model_param (the
    # name and layer position reach it through the settings' filters and gradients, and in error messages): then the
    # planner asks once per distinct (element count, layer position where a gradient needs it, matching filters) and
    # reuses the op. True (the default) plans every tensor on its own: 10 us a tensor, 10 s for 10^6 expert tensors.
    plans_by_name = True

    def check_inputs(self, num_models: int, has_base: bool) -> None:
        if self.base == "required" and not has_base:
            raise PlanError(f"strategy {self.name!r} needs a base model (--base / base=)")
        if self.base == "forbidden" and has_base:
            raise PlanError(f"strategy {self.name!r} takes no base model")
        if num_models < self.min_models or (self.max_models is not None and num_models > self.max_models):
            want = (
                str(self.min_models)
                if self.max_models == self.min_models
                else (
                    f"at least {self.min_models}"
                    if self.max_models is None
                    else f"{self.min_models}..{self.max_models}"
                )
            )
            raise PlanError(f"strategy {self.name!r} takes {want} models, got {num_models}")

    def check_params(self, settings: dict, weights_given: bool) -> None:
        valid = set(self.params) | set(self.model_params)
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise PlanError(
                f"strategy {self.name!r} has no parameter {unknown[0]!r} (valid: {', '.join(sorted(valid)) or 'none'})"
            )
        if weights_given and "weight" not in self.model_params:
            raise PlanError(f"strategy {self.name!r} takes no weights")

    def plan_tensor(self, ctx: TensorContext):
        raise NotImplementedError

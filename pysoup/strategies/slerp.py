"""Spherical linear interpolation between two models, per tensor (as mergekit's slerp)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pysoup.dtypes import to_f32
from pysoup.errors import PlanError
from pysoup.ops.table import MomentsSpec
from pysoup.strategies import register
from pysoup.strategies.base import Strategy
from pysoup.strategies.tensor_op import MomentsOp

# Above this |cos| the two tensors are nearly parallel and slerp's sin(Omega) ~ 0: interpolate linearly.
COLINEAR = 0.9995


def slerp_coefficients(t: float, dot: float, norm_a2: float, norm_b2: float) -> tuple:
    """(c_a, c_b) with theta = c_a * a + c_b * b, from <a, b>, |a|^2 and |b|^2 (all fp64)."""
    if norm_a2 == 0 or norm_b2 == 0:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, dot / math.sqrt(norm_a2 * norm_b2)))
    if abs(cos) > COLINEAR:
        return 1.0 - t, t
    omega = math.acos(cos)
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s


@dataclass(frozen=True)
class SlerpOp(MomentsOp):
    t: float

    def moments_spec(self):
        return MomentsSpec(2)

    def end_pass(self, state, pass_):
        m = state["moments"]
        coefficients = slerp_coefficients(self.t, m.dot(0, 1), m.squares(0), m.squares(1))
        state["coefficients"] = tuple(to_f32(c) for c in coefficients)

    def combine(self, backend, chunk, state):
        return backend.weighted_sum_raw(chunk, state["coefficients"], False)


@register
class Slerp(Strategy):
    """theta = sin((1-t) Omega)/sin Omega * a + sin(t Omega)/sin Omega * b, cos Omega = <a,b>/(|a||b|) in fp64;
    linear when |cos Omega| > 0.9995. t = 0 gives the first model."""

    name = "slerp"
    plans_by_name = False
    params = {"t": None}
    min_models = max_models = 2

    def plan_tensor(self, ctx):
        t = ctx.param("t")
        if t is None:
            raise PlanError("strategy 'slerp' needs the parameter t (0 gives the first model, 1 the second)")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 1:
            raise PlanError(f"tensor {ctx.name!r}: t = {t!r} is outside [0, 1]")
        return SlerpOp(float(t))

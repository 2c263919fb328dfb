"""mergekit's geometric merges and the ones that keep one model: NuSLERP, Multi-SLERP, the Karcher mean, NearSwap,
Arcee Fusion and passthrough (with `scale`), read from mergekit 0.1.5's code (mergekit/merge_methods/*.py).

The spherical methods reduce to "one statistics pass, then a weighted sum": every vector they build (unit vectors,
their mean, tangents, the Karcher iterates) lies in the span of the inputs, so pysoup carries it as coefficients
over the inputs and computes every norm and dot product from the inputs' Gram matrix (fp64, one streaming pass,
MomentsSpec with `gram`). The output is then one fused weighted sum (or task-vector sum around a base) with fp32
coefficients: no pass holds a whole tensor, and the result is within fp32 rounding of mergekit's (which builds
each intermediate vector in fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pysoup.dtypes import to_f32
from pysoup.errors import PlanError, SoupError
from pysoup.ops.table import Moments, MomentsSpec, TaskVectorParams
from pysoup.strategies import register
from pysoup.strategies.base import Strategy, TensorContext
from pysoup.strategies.tensor_op import MomentsOp, TensorOp


def _number(ctx: TensorContext, key: str, default=None) -> float:
    value = ctx.param(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise PlanError(f"tensor {ctx.name!r}: parameter {key!r} must be a finite number, got {value!r}")
    return float(value)


def _required_weights(ctx: TensorContext, method: str) -> list:
    """Per-model `weight`, which mergekit's nuslerp and multislerp require (no default)."""
    out = []
    for i in range(ctx.num_models):
        w = ctx.model_param(i, "weight")
        if w is None:
            raise PlanError(f"strategy {method!r} needs a weight for every model (model {i} has none)")
        out.append(ctx.model_number(i, "weight"))
    return out


class _Gram:
    """Norms and dot products of the vectors a MomentsSpec gathered, fp64."""

    def __init__(self, m: Moments, k: int):
        self.k = k
        self.g = [[0.0] * k for _ in range(k)]
        for i in range(k):
            self.g[i][i] = m.squares(i)
            for j in range(i + 1, k):
                self.g[i][j] = self.g[j][i] = m.dot(i, j)

    def dot(self, c, d) -> float:
        """<sum_i c_i v_i, sum_j d_j v_j>."""
        return sum(c[i] * sum(self.g[i][j] * d[j] for j in range(self.k)) for i in range(self.k))

    def norm(self, c) -> float:
        return math.sqrt(max(0.0, self.dot(c, c)))

    def row(self, c, i) -> float:
        """<v_i, sum_j c_j v_j>."""
        return sum(self.g[i][j] * c[j] for j in range(self.k))


def _combine(backend, chunk, coefficients, has_base: bool) -> int:
    """sum_i c_i x_i, or base + sum_i c_i (x_i - base) when there is a base (mergekit's order: task vectors in
    fp32, then their combination added to the base)."""
    if has_base:
        p = TaskVectorParams(tuple(coefficients), 1.0, False, False)
        nonfinite, _ = backend.task_vector_raw(chunk, p, [-1] * len(coefficients))
        return nonfinite
    return backend.weighted_sum_raw(chunk, tuple(coefficients), False)


# -- NuSLERP ---------------------------------------------------------------------------------------------------
def nuslerp_coefficients(t: float, dot: float, sq0: float, sq1: float) -> tuple:
    """(c0, c1) with nuslerp(t, v0, v1) = c0 v0 + c1 v1 over whole tensors (mergekit's nuslerp, flatten=True):
    units by norms clamped at 1e-7, cos clamped to [-1, 1], linear where 1 - cos^2 <= eps^2 (eps = 1e-8)."""
    n0, n1 = max(math.sqrt(sq0), 1e-7), max(math.sqrt(sq1), 1e-7)
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if 1 - cos * cos <= 1e-16:
        return 1.0 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


@dataclass(frozen=True)
class NuSlerpOp(MomentsOp):
    t: float
    has_base: bool

    def moments_spec(self):
        return MomentsSpec(2, base=self.has_base)

    def end_pass(self, state, pass_):
        m = state["moments"]
        c = nuslerp_coefficients(self.t, m.dot(0, 1), m.squares(0), m.squares(1))
        state["coefficients"] = tuple(to_f32(x) for x in c)

    def combine(self, backend, chunk, state):
        return _combine(backend, chunk, state["coefficients"], self.has_base)


def nuslerp_t(weights) -> float:
    """mergekit: t = w1 / (w0 + w1), 0.5 when |w0 + w1| < 1e-6."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


@register
class NuSlerp(Strategy):
    """NuSLERP: slerp between two models (or their task vectors around a base) at t = w1 / (w0 + w1)."""

    name = "nuslerp"
    base = "optional"
    min_models = max_models = 2
    params = {"nuslerp_flatten": True, "nuslerp_row_wise": False}
    model_params = {"weight": None}

    def __init__(self):
        self.has_base = False

    def check_inputs(self, num_models, has_base):
        super().check_inputs(num_models, has_base)
        self.has_base = has_base

    def plan_tensor(self, ctx):
        t = nuslerp_t(_required_weights(ctx, self.name))
        flatten = ctx.flag("nuslerp_flatten", True)
        row_wise = ctx.flag("nuslerp_row_wise", False)
        if not flatten:
            from pysoup.strategies.rowwise import RowNuSlerpOp, segments

            return RowNuSlerpOp(t=t, has_base=self.has_base, seg=segments(ctx, columns=row_wise))
        return NuSlerpOp(t, self.has_base)


# -- Multi-SLERP -----------------------------------------------------------------------------------------------
def multislerp_coefficients(weights, normalize: bool, eps: float, gram: _Gram):
    """Coefficients c with multislerp(v) = sum_i c_i v_i (mergekit's multislerp over flattened tensors), or None
    for mergekit's two-vector linear fallback (then the normalized weights are the coefficients)."""
    k = gram.k
    w = list(weights)
    if normalize:
        total = sum(w)
        w = [x / total for x in w]
    norms = [math.sqrt(max(0.0, gram.g[i][i])) for i in range(k)]
    unit = [1.0 / (n + eps) for n in norms]  # u_i = unit[i] * v_i
    mean = [w[i] * unit[i] for i in range(k)]
    mean_norm = gram.norm(mean)
    if mean_norm < eps:
        if k == 2:
            return list(w)
        raise SoupError(
            "multislerp: the weighted sum of the input tensors is zero (antipodal inputs with balancing weights); "
            "use other weights"
        )
    mean = [c / mean_norm for c in mean]
    dots = [gram.row(mean, i) * unit[i] for i in range(k)]  # <u_i, mean>
    s = sum(w[i] * dots[i] for i in range(k))
    tangent = [w[i] * unit[i] - s * mean[i] for i in range(k)]
    tn = gram.norm(tangent) + eps
    avg_norm = sum(n * wi for n, wi in zip(norms, w))
    return [avg_norm * (math.cos(tn) * mean[i] + math.sin(tn) / tn * tangent[i]) for i in range(k)]


@dataclass(frozen=True)
class MultiSlerpOp(MomentsOp):
    weights: tuple
    normalize: bool
    eps: float
    has_base: bool

    def moments_spec(self):
        return MomentsSpec(len(self.weights), base=self.has_base)

    def end_pass(self, state, pass_):
        k = len(self.weights)
        c = multislerp_coefficients(self.weights, self.normalize, self.eps, _Gram(state["moments"], k))
        state["coefficients"] = tuple(to_f32(x) for x in c)

    def combine(self, backend, chunk, state):
        return _combine(backend, chunk, state["coefficients"], self.has_base)


@dataclass(frozen=True)
class FirstModel(TensorOp):
    """out = the first model, converted to the output dtype exactly (multislerp of one model ignores the base)."""

    sources: int

    def combine(self, backend, chunk, state):
        return backend.weighted_sum_raw(chunk if self.sources == 1 else chunk.without_base(), (1.0,), False)


@register
class MultiSlerp(Strategy):
    """Barycentric interpolation on the hypersphere: the inputs (or task vectors) projected onto the tangent space at
    their weighted mean direction, averaged there, mapped back and scaled by the weighted mean norm."""

    name = "multislerp"
    base = "optional"
    plans_by_name = False
    min_models = 1
    params = {"normalize_weights": True, "eps": 1e-8}
    model_params = {"weight": None}

    def __init__(self):
        self.has_base = False

    def check_inputs(self, num_models, has_base):
        super().check_inputs(num_models, has_base)
        self.has_base = has_base

    def plan_tensor(self, ctx):
        weights = _required_weights(ctx, self.name)
        normalize = ctx.flag("normalize_weights", True)
        eps = _number(ctx, "eps", 1e-8)
        if ctx.num_models == 1:
            return FirstModel(1 + self.has_base)
        if normalize and sum(weights) == 0:
            raise PlanError(f"tensor {ctx.name!r}: multislerp weights {weights} sum to 0; cannot normalize")
        return MultiSlerpOp(tuple(weights), normalize, eps, self.has_base)


# -- Karcher mean ----------------------------------------------------------------------------------------------
def karcher_coefficients(gram: _Gram, max_iter: int, tol: float) -> list:
    """Coefficients c with karcher(v) = sum_i c_i v_i: mergekit's weighted Karcher mean on the unit sphere (equal
    weights 1/k, Riemannian gradient steps, at most max_iter, stopping when the tangent's norm is below tol;
    inputs with norm <= tol left out of the mean but not of the scale), times the mean of the norms."""
    k = gram.k
    alphas = [1.0 / k] * k
    norms = [math.sqrt(max(0.0, gram.g[i][i])) for i in range(k)]
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return [0.0] * k
    total = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / total for i in valid}
    mean = [0.0] * k
    for i in valid:
        mean[i] = a[i] / norms[i]
    mean_norm = gram.norm(mean)
    if mean_norm < tol:
        mean = [0.0] * k
        mean[valid[0]] = 1.0 / norms[valid[0]]
    else:
        mean = [c / mean_norm for c in mean]
    for _ in range(max_iter):
        tangent = [0.0] * k
        for i in valid:
            dot = max(-1.0, min(1.0, gram.row(mean, i) / norms[i]))
            theta = math.acos(dot)
            if theta < tol:
                continue
            f = a[i] * theta / math.sin(theta)
            tangent[i] += f / norms[i]
            for j in range(k):
                tangent[j] -= f * dot * mean[j]
        tn = gram.norm(tangent)
        if tn < tol:
            break
        mean = [math.cos(tn) * m + math.sin(tn) * t / tn for m, t in zip(mean, tangent)]
        un = gram.norm(mean)
        if un > tol:
            mean = [m / un for m in mean]
    scale = sum(al * n for al, n in zip(alphas, norms))
    return [scale * m for m in mean]


@dataclass(frozen=True)
class KarcherOp(MomentsOp):
    sources: int
    max_iter: int
    tol: float

    def moments_spec(self):
        return MomentsSpec(self.sources)

    def end_pass(self, state, pass_):
        c = karcher_coefficients(_Gram(state["moments"], self.sources), self.max_iter, self.tol)
        state["coefficients"] = tuple(to_f32(x) for x in c)

    def combine(self, backend, chunk, state):
        return backend.weighted_sum_raw(chunk, state["coefficients"], False)


@register
class Karcher(Strategy):
    """The Karcher (Riemannian) mean of the inputs' directions, scaled by their mean norm. A base model is one more
    input (mergekit 0.1.5 ignores the base role for karcher and averages it with the others)."""

    name = "karcher"
    base = "optional"
    plans_by_name = False
    params = {"max_iter": 10, "tol": 1e-5}

    def __init__(self):
        self.has_base = False

    def check_inputs(self, num_models, has_base):
        super().check_inputs(num_models, has_base)
        self.has_base = has_base

    def plan_tensor(self, ctx):
        max_iter = ctx.param("max_iter", 10)
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 0:
            raise PlanError(f"tensor {ctx.name!r}: max_iter = {max_iter!r} must be a whole number >= 0")
        tol = _number(ctx, "tol", 1e-5)
        sources = ctx.num_models + self.has_base
        if sources == 1:
            return FirstModel(1)
        return KarcherOp(sources, max_iter, tol)


# -- NearSwap --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NearSwapOp(TensorOp):
    t: float

    def combine(self, backend, chunk, state):
        return backend.nearswap_raw(chunk, self.t)


@register
class NearSwap(Strategy):
    """Take the model's value where it is within t of the base's, interpolate toward the base beyond:
    w = clamp(t / max(|base - x|, 1e-6), 0, 1), out = w x + (1 - w) base, in mergekit's fp32 operation order."""

    name = "nearswap"
    base = "required"
    plans_by_name = False
    min_models = max_models = 1
    params = {"t": None}

    def plan_tensor(self, ctx):
        t = ctx.param("t")
        if t is None:
            raise PlanError(
                "strategy 'nearswap' needs the parameter t (the distance up to which the model's value is taken)"
            )
        return NearSwapOp(to_f32(_number(ctx, "t")))


# -- Arcee Fusion -----------------------------------------------------------------------------------------------
QUANTILES = (0.25, 0.5, 0.75)


def quantile_ranks(numel: int) -> list:
    """mergekit's quantile positions in the ascending sort: (fp32(q) * fp32(numel - 1)) truncated, in fp32 as torch
    multiplies its fp32 q tensor by the count."""
    import numpy as np

    return [int(np.float32(q) * np.float32(numel - 1)) for q in QUANTILES]


@dataclass(frozen=True)
class ArceeFusionOp(TensorOp):
    """Two reduction passes and the combine: (0) each row's KL (fp64, rounded to fp32 once: the C++ kernel, no
    torch) and, with the row still at hand, the high 16 bits of its importances' order keys counted; (1) the low 16
    bits of the keys in each quartile's bin (the radix select finished); then
    out = b + (p - b) * (importance >= median + 1.5 IQR)."""

    row: int
    rows: int

    def reduce_passes(self, backend):
        return 2

    def begin(self, backend, name, numel):
        import numpy as np

        return {
            "kl": np.zeros(self.rows, dtype=np.float32),
            "carry": {},
            "hist": np.zeros((len(QUANTILES), 1 << 16), dtype=np.int64),
            "ranks": quantile_ranks(numel),
            "prefix": [0] * len(QUANTILES),
        }

    def reduce(self, backend, chunk, state, pass_):
        if pass_ == 0:
            backend.fusion_kl_raw(chunk, self.row, state["kl"], state["carry"], state["hist"][0])
        else:
            backend.fusion_histogram_raw(chunk, self.row, state["kl"], 1, state["prefix"], state["hist"])

    def end_pass(self, state, pass_):
        import numpy as np

        from pysoup.ops.reference import from_order_key

        hist = state["hist"]
        if pass_ == 0:  # the high 16 bits of each quartile's key, and how many values lie below its bin
            cum = np.cumsum(hist[0])
            state["prefix"] = [int(np.searchsorted(cum, r, side="right")) for r in state["ranks"]]
            state["below"] = [int(cum[b - 1]) if b else 0 for b in state["prefix"]]
        else:
            values = []
            for q, (r, high, below) in enumerate(zip(state["ranks"], state["prefix"], state["below"])):
                low = int(np.searchsorted(np.cumsum(hist[q]), r - below, side="right"))
                values.append(np.float32(from_order_key((high << 16) | low)))
            q1, median, q3 = values
            state["threshold"] = float(median + np.float32(1.5) * (q3 - q1))  # fp32 throughout, as mergekit
            state["quartiles"] = (float(q1), float(median), float(q3))
        hist[:] = 0

    def combine(self, backend, chunk, state):
        return backend.fusion_combine_raw(chunk, self.row, state["kl"], state["threshold"])


@register
class ArceeFusion(Strategy):
    """Arcee Fusion: keep the model's change to the base only where its importance |p - b| * KL(softmax rows) is at
    least median + 1.5 IQR of the tensor's importances (exact quartiles; mergekit samples 10^6 values with
    replacement on tensors larger than that). The row KL is computed in fp64 and rounded once, mergekit's in fp32:
    a mask entry can decide otherwise only where the importance is within mergekit's fp32 rounding of the
    threshold (docs/methods.md)."""

    name = "arcee_fusion"
    base = "required"
    min_models = max_models = 1

    def plan_tensor(self, ctx):
        shape = tuple(ctx.shape) or (ctx.numel,)
        row = shape[-1] if ctx.numel else 1
        return ArceeFusionOp(row, ctx.numel // row if row else 0)


# -- passthrough -----------------------------------------------------------------------------------------------
@register
class Passthrough(Strategy):
    """One model's tensors, multiplied by its `scale` where one is given (mergekit: tensor * scale in fp32)."""

    name = "passthrough"
    plans_by_name = False
    min_models = max_models = 1
    model_params = {"scale": None}

    def plan_tensor(self, ctx):
        from pysoup.strategies.tensor_op import WeightedSum

        scale = ctx.model_param(0, "scale")
        if scale is None:
            return WeightedSum((1.0,), False)
        s = ctx.model_number(0, "scale")
        if not math.isfinite(to_f32(s)):
            raise PlanError(f"tensor {ctx.name!r}: scale {s!r} overflows float32")
        return WeightedSum((to_f32(s),), False)

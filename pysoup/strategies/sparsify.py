"""Sparsified task-vector merges, as mergekit 0.1.5 runs them: Model Breadcrumbs (Davari & Belilovsky), DELLA's
MagPrune (Deep et al.), SCE (Wan et al.) and RAM / RAM+ (Reinforced Agent Merging).

All are tau_i = theta_i - theta_0 in fp32, a selection of entries per model, then a mix:

- `breadcrumbs`, `breadcrumbs_ties`: per model, drop the top `gamma` magnitudes and everything below the next
  `density` of them (a band of ranks, found by two exact radix selections: no sort, no copy), then task arithmetic or
  TIES' sign election and disjoint mean.
- `della`, `della_linear`: per model, keep each entry with probability density - epsilon .. density + epsilon by its
  magnitude's rank in its row (the rows are sorted one at a time; the tensor is never copied), rescale to the L1 norm
  of tau_i, then TIES or task arithmetic. The statistics pass keeps its draws as bits for the combine, so each row
  is ranked once.
- `sce`: keep the entries whose variance across the models is in the top `select_topk` (radix selection on the
  variance), weight each model by its mean squared kept tau, elect signs by sum_i tau_i, mix the agreeing entries.
- `ram`, `ramplus_tl`: an entry that only one model changes (|tau_i| > epsilon) takes that model's tau (RAM+: times
  1 + r * clamp(#shared_i / #unique_i, 0, alpha)); one that several change takes their mean.

The statistics the mixes need (L1 norms, SCE's weights, RAM+'s counts) come from one streaming pass; the combine is one
fused kernel per chunk (pysoup.ops.table: sparse_task_vector_raw). docs/methods.md gives the formulas and the choices
where mergekit leaves the result open (ties, the random draws).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, replace

from pysoup.dtypes import f32_sum, to_f32
from pysoup.errors import PlanError
from pysoup.ops.table import SPARSE_STATS, Chunk, SparseMix, SparseParams, SparseSelect
from pysoup.strategies import register
from pysoup.strategies.base import Strategy, TensorContext
from pysoup.strategies.params import finite_number
from pysoup.strategies.task_vector import dare_key
from pysoup.strategies.tensor_op import TensorOp

# DELLA ranks whole rows in the combine: a chunk holds whole rows, at most this many elements (the engine's chunk).
MAX_ROW_ELEMENTS = 4 << 20
# DELLA's and SCE's statistics pass keeps its selection (one bit per entry, per model for DELLA) for the combine,
# which then ranks no row and computes no variance, where the bits take at most this much memory; larger tensors
# select again in the combine.
KEEP_MASK_BYTES = 32 << 20
# mergekit's guards: norms below this are not rescaled; SCE's weights below this sum are uniform.
RESCALE_EPS = 1e-7
SCE_UNIFORM_BELOW = 1e-6


def band(density: float, gamma: float, numel: int) -> tuple:
    """Breadcrumbs' kept ranks (descending magnitude) [skip, keep) of a tensor of numel entries, as mergekit's
    magnitude_outliers: target = int(density * numel), top = int(gamma * numel), bottom = max(0, numel - target -
    top) dropped from below; density >= 1 keeps everything (no outlier is dropped either)."""
    if density >= 1:
        return 0, numel
    target = int(density * numel)
    bottom = max(0, numel - target - int(gamma * numel))
    return numel - bottom - target, numel - bottom


def l1_scale(before: float, after: float) -> float:
    """mergekit's rescale to the L1 norm: before / after, or 1 where either is below 1e-7."""
    return before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0


def sce_weights(squares: list, numel: int) -> tuple:
    """SCE's per-model weights: mean squared kept tau_i over their sum (uniform when the sum is below 1e-6)."""
    means = [s / numel for s in squares] if numel else [0.0] * len(squares)
    total = sum(means)
    if abs(total) < SCE_UNIFORM_BELOW:
        return tuple(to_f32(1.0 / len(means)) for _ in means)
    return tuple(to_f32(m / total) for m in means)


def ramplus_factors(shared: list, unique: list, r: float, alpha: float, epsilon: float) -> tuple:
    """RAM+'s per-model factors 1 + r * clamp(#shared / max(#unique, epsilon), 0, alpha), in fp32 as mergekit
    (a count tensor clamped by a Python float is fp32; every step below is one fp32 rounding)."""
    out = []
    for s, u in zip(shared, unique):
        den = to_f32(u) if u >= epsilon else to_f32(epsilon)
        rho = to_f32(to_f32(s) / den)
        rho = min(max(rho, 0.0), to_f32(alpha))
        out.append(to_f32(1.0 + to_f32(to_f32(r) * rho)))
    return tuple(out)


@dataclass(frozen=True)
class SparseTaskVectorOp(TensorOp):
    """base + mix(selected tau); the sources are the k models, then the base. `params` holds what is known when
    planning; the selection passes fill in the thresholds, the statistics pass the scales or weights."""

    params: SparseParams
    densities: tuple = ()  # BAND: per model
    gammas: tuple = ()  # BAND: per model
    rescale: bool = False  # BAND, RANK: rescale each model's kept entries to its L1 norm
    select_topk: float = 1.0  # SHARED
    ram_plus: tuple = ()  # RAM+: (r, alpha, epsilon)
    seed: int = 0  # RANK

    @property
    def chunk_align(self) -> int:
        """DELLA ranks within rows: every chunk holds whole groups of `row * stride` elements."""
        p = self.params
        return p.row * p.stride if p.select == SparseSelect.RANK else 1

    def _selects(self) -> bool:
        return self.params.select == SparseSelect.BAND or (
            self.params.select == SparseSelect.SHARED and 0 < self.select_topk < 1
        )

    def _stats(self) -> bool:
        p = self.params
        return (
            (self.rescale and p.select in (SparseSelect.BAND, SparseSelect.RANK))
            or p.mix == SparseMix.SCE
            or bool(self.ram_plus)
        )

    def reduce_passes(self, backend) -> int:
        return (backend.top_k_passes if self._selects() else 0) + (1 if self._stats() else 0)

    def begin(self, backend, name, numel):
        p = self.params
        k = len(p.weights)
        state = {"numel": numel, "params": p, "quota": [-1] * p.quotas}
        if p.select == SparseSelect.RANK:
            keys = tuple(dare_key(self.seed, name, i) for i in range(k))
            state["params"] = replace(p, keys=keys)
        if p.select == SparseSelect.BAND:
            bands = [band(d, g, numel) for d, g in zip(self.densities, self.gammas)]
            # Each model's keep and skip selections side by side: the histogram kernels load (and in their first
            # pass count) a model listed twice in a row once.
            state["selector"] = backend.top_k_selector([e for b in bands for e in (b[1], b[0])])
        elif p.select == SparseSelect.SHARED:
            if self.select_topk <= 0:  # mergekit: an all-zero mask
                state["params"] = replace(p, keep_bits=(0xFFFFFFFF,))
                state["quota"] = [0]
            elif self.select_topk >= 1:  # mergekit: no selection
                state["params"] = replace(p, select=SparseSelect.ALL)
                state["quota"] = []
        if self._stats():
            state["stats"] = [0.0] * (SPARSE_STATS * k)
            nbytes = (numel + 7) // 8
            masks = k if p.select == SparseSelect.RANK and any(p.drops) else 1 if self._selects() else 0
            if p.select in (SparseSelect.RANK, SparseSelect.SHARED) and masks and masks * nbytes <= KEEP_MASK_BYTES:
                bits = backend.keep_mask_buffer(masks * nbytes)
                if bits is not None:
                    state["keep_mask"] = bits  # alive until the combine is done
                    mask = {"keep_mask": ctypes.addressof(bits), "keep_mask_stride": nbytes, "keep_mask_mode": 1}
                    state["params"] = replace(state["params"], **mask)
        if p.select == SparseSelect.SHARED and self._selects():
            # Made once its keep bits have memory: a backend that can hold the tensor's variances ends the selection
            # with pass 0 and writes the bits itself.
            state["selector"] = backend.variance_selector(self.select_topk, numel, state.get("keep_mask"))
        state["stats_quota"] = list(state["quota"])  # the selection passes replace both
        return state

    def reduce(self, backend, chunk, state, pass_):
        if "selector" in state and pass_ < backend.top_k_passes:
            if self.params.select == SparseSelect.BAND:  # the keep and the skip selections, each model twice
                k = len(self.params.weights)
                addrs = [a for a in chunk.addrs[:k] for _ in (0, 1)] + list(chunk.addrs[k:])
                dtypes = [d for d in chunk.dtypes[:k] for _ in (0, 1)] + list(chunk.dtypes[k:])
                chunk = Chunk(chunk.name, addrs, dtypes, chunk.start, chunk.n)
            state["selector"].add(chunk, pass_)
            return
        state["stats"], state["stats_quota"] = backend.sparse_stats_raw(
            chunk, state["params"], state["stats_quota"], state["stats"]
        )

    def end_pass(self, state, pass_):
        selector = state.get("selector")
        if selector is not None and selector.thresholds is None:
            selector.finish(pass_)
            if selector.thresholds is not None:
                bits, quotas = list(selector.thresholds), list(selector.quotas)
                if self.params.select == SparseSelect.BAND:  # the kernels take every keep, then every skip
                    state["params"] = replace(state["params"], keep_bits=tuple(bits[0::2]), skip_bits=tuple(bits[1::2]))
                    quotas = quotas[0::2] + quotas[1::2]
                else:
                    state["params"] = replace(state["params"], keep_bits=tuple(bits))
                if selector.keep_mask_written:  # the statistics pass and the combine read the bits (mode 2)
                    state["params"] = replace(state["params"], keep_mask_mode=2)
                state["quota"] = quotas
                state["stats_quota"] = list(quotas)
                del state["selector"]
            return
        if "stats" in state:
            self._finish_stats(state)

    def next_pass(self, backend, state, pass_):
        if self._selects() and "selector" not in state and pass_ < backend.top_k_passes:  # the selection ended early
            return backend.top_k_passes
        return pass_ + 1

    def _finish_stats(self, state):
        p, totals, numel = state["params"], state.pop("stats"), state["numel"]
        k = len(p.weights)
        per = [totals[SPARSE_STATS * i : SPARSE_STATS * (i + 1)] for i in range(k)]
        # The combine reads the selection this pass stored (mode 1 -> 2), if it stored it.
        mode = 2 if p.keep_mask_mode else 0
        if p.mix == SparseMix.SCE:
            state["params"] = replace(p, weights=sce_weights([s[2] for s in per], numel), keep_mask_mode=mode)
        elif self.ram_plus:
            r, alpha, epsilon = self.ram_plus
            shared, unique = [int(s[3]) for s in per], [int(s[4]) for s in per]
            state["params"] = replace(p, weights=ramplus_factors(shared, unique, r, alpha, epsilon))
        else:
            sparsified = self.densities if p.select == SparseSelect.BAND else p.drops
            scale = []
            for i, s in enumerate(per):
                on = sparsified[i] < 1 if p.select == SparseSelect.BAND else sparsified[i]
                scale.append(to_f32(l1_scale(s[0], s[1])) if on else 1.0)
            state["params"] = replace(p, scale=tuple(scale), keep_mask_mode=mode)

    def combine(self, backend, chunk, state):
        nonfinite, state["quota"] = backend.sparse_task_vector_raw(chunk, state["params"], state["quota"])
        return nonfinite


def _global(ctx: TensorContext, key: str, default) -> float:
    return finite_number(key, ctx.param(key, default), f"tensor {ctx.name!r}")


def _flag(ctx: TensorContext, key: str, default: bool) -> bool:
    return ctx.flag(key, default)


class _GeneralizedTaskArithmetic(Strategy):
    """mergekit's GeneralizedTaskArithmeticMerge with a sparsification of its own (parameters as mergekit names
    them; int8_mask only changes mergekit's mask dtype, never the result, and is accepted for that)."""

    base = "required"
    consensus = False
    default_normalize = False

    def _mix(self, ctx: TensorContext) -> tuple:
        k = ctx.num_models
        _flag(ctx, "int8_mask", False)
        normalize = _flag(ctx, "normalize", self.default_normalize)
        weights = tuple(to_f32(ctx.model_number(i, "weight", 1.0)) for i in range(k))
        if not all(math.isfinite(w) for w in weights):
            raise PlanError(f"tensor {ctx.name!r}: weights overflow float32")
        lam = to_f32(_global(ctx, "lambda", 1.0))
        if not math.isfinite(lam):
            raise PlanError(f"tensor {ctx.name!r}: lambda must be a finite float32 number")
        # mergekit divides by the weights' sum only where it is not ~0 (|sum| < 1e-8: by 1).
        if normalize and not self.consensus and abs(f32_sum(weights)) < 1e-8:
            normalize = False
        mix = SparseMix.TIES if self.consensus else SparseMix.SUM
        return mix, weights, lam, normalize

    def _densities(self, ctx: TensorContext) -> tuple:
        out = []
        for i in range(ctx.num_models):
            d = ctx.model_number(i, "density", 1.0)
            if d < 0:
                raise PlanError(f"tensor {ctx.name!r}, model {i}: density {d} is negative")
            out.append(d)
        return tuple(out)


class _Breadcrumbs(_GeneralizedTaskArithmetic):
    plans_by_name = False
    params = {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}
    model_params = {"weight": 1.0, "density": 1.0, "gamma": 0.01}

    def plan_tensor(self, ctx):
        mix, weights, lam, normalize = self._mix(ctx)
        densities = self._densities(ctx)
        gammas = []
        for i in range(ctx.num_models):
            g = ctx.model_number(i, "gamma", 0.01)
            if not 0 <= g <= 1:
                raise PlanError(f"tensor {ctx.name!r}, model {i}: gamma {g} is outside [0, 1]")
            gammas.append(g)
        p = SparseParams(SparseSelect.BAND, mix, weights, lam, normalize)
        rescale = _flag(ctx, "rescale", False)
        return SparseTaskVectorOp(p, densities=densities, gammas=tuple(gammas), rescale=rescale)


@register
class Breadcrumbs(_Breadcrumbs):
    """Model Breadcrumbs: per model, drop the largest `gamma` and the smallest magnitudes of tau_i so that `density`
    of them is kept, then task arithmetic."""

    name = "breadcrumbs"


@register
class BreadcrumbsTies(_Breadcrumbs):
    """Breadcrumbs' band of magnitudes, then TIES' sign election and disjoint mean (mergekit: normalize default
    false)."""

    name = "breadcrumbs_ties"
    consensus = True


def rows_of(shape: tuple, name: str) -> tuple:
    """(row, stride) of DELLA's ranking: mergekit ranks along dimension 1 (a 1-D tensor is made one row)."""
    if len(shape) == 0:
        raise PlanError(f"tensor {name!r}: della ranks along dimension 1; a 0-d tensor has none (mergekit fails too)")
    if len(shape) == 1:
        return shape[0], 1
    stride = 1
    for s in shape[2:]:
        stride *= s
    return shape[1], stride


class _Della(_GeneralizedTaskArithmetic):
    params = {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0, "seed": 0}
    model_params = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    # plans_by_name stays true: the rows depend on the tensor's shape, not only its element count.

    def plan_tensor(self, ctx):
        mix, weights, lam, normalize = self._mix(ctx)
        densities = self._densities(ctx)
        lo, eps, drops = [], [], []
        for i, d in enumerate(densities):
            e = ctx.model_number(i, "epsilon", 0.15)
            if d >= 1:
                lo.append(1.0), eps.append(0.0), drops.append(False)
                continue
            if d <= 0:  # mergekit: zeros
                lo.append(0.0), eps.append(0.0), drops.append(True)
                continue
            if d + e >= 1 or d - e <= 0:
                raise PlanError(
                    f"tensor {ctx.name!r}, model {i}: epsilon {e} with density {d}: density +/- epsilon must lie in "
                    "(0, 1)"
                )
            lo.append(to_f32(d - e)), eps.append(to_f32(e)), drops.append(True)
        row, stride = 1, 1
        if any(drops):
            row, stride = rows_of(ctx.shape, ctx.name)
            if row == 1 and any(e > 0 for e in eps):
                raise PlanError(
                    f"tensor {ctx.name!r}: della ranks along dimension 1, which has one element here (mergekit fails "
                    "on it too: its probabilities are 0/0)"
                )
            if row * stride > MAX_ROW_ELEMENTS:
                raise PlanError(
                    f"tensor {ctx.name!r}: della's rows of {row * stride} elements exceed {MAX_ROW_ELEMENTS} (pysoup "
                    "ranks a row inside one chunk)"
                )
        seed = ctx.param("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise PlanError(f"parameter 'seed' must be a non-negative integer, got {seed!r}")
        p = SparseParams(
            SparseSelect.RANK,
            mix,
            weights,
            lam,
            normalize,
            lo=tuple(lo),
            eps=tuple(eps),
            drops=tuple(drops),
            row=row,
            stride=stride,
        )
        return SparseTaskVectorOp(p, rescale=_flag(ctx, "rescale", True), seed=seed)


@register
class Della(_Della):
    """DELLA: MagPrune (keep probabilities by magnitude rank per row, L1 rescale), then TIES' election and disjoint
    mean (mergekit: normalize default true)."""

    name = "della"
    params = {"int8_mask": False, "normalize": True, "rescale": True, "lambda": 1.0, "seed": 0}
    consensus = True
    default_normalize = True


@register
class DellaLinear(_Della):
    """DELLA's MagPrune, then task arithmetic (normalize default false)."""

    name = "della_linear"


@register
class Sce(Strategy):
    """SCE: select the entries of top variance across the models, weight each model by its mean squared kept tau,
    elect the sign of sum_i tau_i, mix the agreeing entries."""

    name = "sce"
    base = "required"
    plans_by_name = False
    params = {"int8_mask": False, "select_topk": 1.0}

    def plan_tensor(self, ctx):
        _flag(ctx, "int8_mask", False)
        topk = _global(ctx, "select_topk", 1.0)
        k = ctx.num_models
        p = SparseParams(SparseSelect.SHARED, SparseMix.SCE, (1.0,) * k)
        return SparseTaskVectorOp(p, select_topk=topk)


@register
class Ram(Strategy):
    """RAM: entries changed (|tau_i| > epsilon) by one model take its tau_i, by several their mean."""

    name = "ram"
    base = "required"
    plans_by_name = False
    params = {"epsilon": 1e-5}

    def _epsilon(self, ctx) -> float:
        e = _global(ctx, "epsilon", 1e-5)
        if e < 0:
            raise PlanError(f"tensor {ctx.name!r}: epsilon {e} is negative")
        return e

    def plan_tensor(self, ctx):
        e = self._epsilon(ctx)
        p = SparseParams(SparseSelect.ALL, SparseMix.RAM, (1.0,) * ctx.num_models, epsilon=to_f32(e))
        return SparseTaskVectorOp(p)


@register
class RamPlusTl(Ram):
    """RAM+ (tensor-local): RAM with each model's unique entries scaled by 1 + r * clamp(#shared / #unique, 0,
    alpha), the counts taken over the tensor."""

    name = "ramplus_tl"
    params = {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}

    def plan_tensor(self, ctx):
        e = self._epsilon(ctx)
        r, alpha = _global(ctx, "r", 0.1), _global(ctx, "alpha", 0.2)
        p = SparseParams(SparseSelect.ALL, SparseMix.RAM, (1.0,) * ctx.num_models, epsilon=to_f32(e))
        return SparseTaskVectorOp(p, ram_plus=(r, alpha, e))

"""Task-vector merges: task arithmetic (Ilharco et al.), TIES-merging (Yadav et al.) and DARE (Yu et al.).

tau_i = theta_i - theta_0 in fp32 and theta = theta_0 + lambda * mix(tau_1..tau_k). One fused kernel per chunk
does the subtraction, the DARE drop or TIES trim, the sign election and the weighted mix. TIES first finds each
model's exact magnitude threshold with a radix select over the same mapped windows (two histogram passes, no
copy of any tensor); DARE with rescale="l1" first sums |tau| and |dropped tau| in one statistics pass.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from pysoup.dtypes import to_f32
from pysoup.errors import PlanError
from pysoup.ops.table import MomentsSpec, TaskVectorParams
from pysoup.strategies import register
from pysoup.strategies.base import Strategy, TensorContext
from pysoup.strategies.tensor_op import TensorOp


def dare_key(seed: int, tensor: str, model: int) -> int:
    """The 64-bit Philox key of one model's drop mask on one tensor, from (seed, tensor name, model index):
    masks do not depend on backend, chunking or thread count."""
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def keep_below(density: float) -> int:
    """Philox words below this are kept: round(density * 2^32); 2^32 - 1 keeps all but 1 in 4 billion, so
    density 1 keeps everything by not dropping at all (see TaskVectorOp.drops)."""
    return min(2**32 - 1, int(math.floor(density * 2**32 + 0.5)))


def top_k(density: float, numel: int) -> int:
    """How many entries TIES keeps: floor(density * numel) (the fp64 product), at least one of a non-empty tensor, as
    mergekit 0.1.5 (`max(1, int(density * numel))`) and PEFT's magnitude prune."""
    return 0 if numel == 0 else max(1, min(numel, int(math.floor(density * numel))))


@dataclass(frozen=True)
class TaskVectorOp(TensorOp):
    """base + lambda * mix(tau); the sources are the k models, then the base."""

    weights: tuple
    lam: float
    normalize: bool
    consensus: bool
    densities: tuple = ()  # TIES trim, per model
    dare_densities: tuple = ()  # DARE drop, per model
    seed: int = 0
    rescale: str = "density"  # DARE survivors times 1/density, or "l1": scaled back to the L1 norm of tau

    @property
    def trims(self) -> bool:
        return any(d < 1 for d in self.densities)

    @property
    def drops(self) -> bool:
        return any(d < 1 for d in self.dare_densities)

    def reduce_passes(self, backend) -> int:
        if self.trims:
            return backend.top_k_passes
        return 1 if self.drops and self.rescale == "l1" else 0

    def begin(self, backend, name, numel):
        k = len(self.weights)
        state = {"quota": [-1] * k}
        if self.trims:
            state["selector"] = backend.top_k_selector([top_k(d, numel) for d in self.densities])
        if self.drops:
            state["keys"] = [dare_key(self.seed, name, i) for i in range(k)]
            state["keep"] = [keep_below(d) if d < 1 else 2**32 - 1 for d in self.dare_densities]
            keys, keep = tuple(state["keys"]), tuple(state["keep"])
            state["moments"] = MomentsSpec(k, base=True, gram=False, dare_keys=keys, keep_below=keep).zeros()
        return state

    def reduce(self, backend, chunk, state, pass_):
        if "selector" in state:
            state["selector"].add(chunk, pass_)
        else:
            state["moments"] = backend.moments_raw(chunk, state["moments"])

    def end_pass(self, state, pass_):
        if "selector" in state:
            state["selector"].finish(pass_)

    def next_pass(self, backend, state, pass_):
        if "selector" in state and state["selector"].thresholds is not None:  # the selection ended early
            return backend.top_k_passes
        return pass_ + 1

    def _params(self, state) -> TaskVectorParams:
        k = len(self.weights)
        trim_bits = ()
        if "selector" in state:
            trim_bits = tuple(state["selector"].thresholds)
            state["quota"] = list(state["selector"].quotas)
        keys, keep, scale = (), (), ()
        if self.drops:
            keys, keep = tuple(state["keys"]), tuple(state["keep"])
            if self.rescale == "l1":
                m = state["moments"]
                scale = []
                for i in range(k):
                    before, after = m.abs_sum(i), m.kept_abs_sum(i)
                    scale.append(before / after if before >= 1e-7 and after >= 1e-7 else 1.0)  # as mergekit
            else:
                scale = [1.0 / d if d < 1 else 1.0 for d in self.dare_densities]
            scale = tuple(to_f32(s) for s in scale)
        return TaskVectorParams(
            tuple(self.weights), self.lam, self.normalize, self.consensus, keys, keep, scale, trim_bits
        )

    def combine(self, backend, chunk, state):
        if "params" not in state:
            state["params"] = self._params(state)
        nonfinite, state["quota"] = backend.task_vector_raw(chunk, state["params"], state["quota"])
        return nonfinite


def _density(ctx: TensorContext, i: int) -> float:
    d = ctx.model_number(i, "density", 1.0)
    if not 0 < d <= 1:
        raise PlanError(f"tensor {ctx.name!r}, model {i}: density {d} is outside (0, 1]")
    return d


class _TaskVectorStrategy(Strategy):
    base = "required"
    plans_by_name = False
    params = {"lambda": 1.0, "normalize": False}
    model_params = {"weight": 1.0}
    consensus = False
    sparsify = None  # None, "ties" or "dare"

    def plan_tensor(self, ctx: TensorContext):
        k = ctx.num_models
        normalize = ctx.flag("normalize", self.params["normalize"])
        # TIES' disjoint mean divides by the agreeing weights, which may be zero: that case divides by 1.
        weights = ctx.weights(normalize and not self.consensus)
        lam = to_f32(ctx.param("lambda", 1.0))
        if not math.isfinite(lam):
            raise PlanError(f"tensor {ctx.name!r}: lambda must be a finite float32 number")
        op = TaskVectorOp(weights, lam, normalize, self.consensus)
        if self.sparsify == "ties":
            return TaskVectorOp(weights, lam, normalize, True, densities=tuple(_density(ctx, i) for i in range(k)))
        if self.sparsify == "dare":
            seed = ctx.param("seed", 0)
            rescale = ctx.param("rescale", "density")
            if rescale is True:
                rescale = "density"
            if rescale not in ("density", "l1", False):
                raise PlanError(f"parameter 'rescale' must be 'density', 'l1' or false, got {rescale!r}")
            densities = tuple(_density(ctx, i) for i in range(k))
            if rescale is False:  # survivors unscaled
                return _Unscaled(weights, lam, normalize, self.consensus, dare_densities=densities, seed=int(seed))
            return TaskVectorOp(
                weights, lam, normalize, self.consensus, dare_densities=densities, seed=int(seed), rescale=rescale
            )
        return op


@dataclass(frozen=True)
class _Unscaled(TaskVectorOp):
    """DARE with rescale=false: dropped entries vanish, survivors keep their value."""

    def _params(self, state):
        p = TaskVectorOp._params(self, state)
        return TaskVectorParams(
            p.weights, p.lam, p.normalize, p.consensus, p.dare_keys, p.keep_below, (1.0,) * len(p.weights), p.trim_bits
        )


@register
class TaskArithmetic(_TaskVectorStrategy):
    """theta = theta_0 + lambda * sum_i w_i (theta_i - theta_0) (`normalize` divides by sum w_i)."""

    name = "task_arithmetic"


@register
class Ties(_TaskVectorStrategy):
    """TIES: trim each task vector to its top `density` magnitudes, elect a sign per entry, average the agreeing
    entries (the disjoint mean: `normalize`, default true)."""

    name = "ties"
    params = {"lambda": 1.0, "normalize": True}
    model_params = {"weight": 1.0, "density": 1.0}
    consensus = True
    sparsify = "ties"


@register
class DareLinear(_TaskVectorStrategy):
    """DARE then task arithmetic: drop each tau entry with probability 1 - density, rescale the survivors."""

    name = "dare_linear"
    params = {"lambda": 1.0, "normalize": False, "seed": 0, "rescale": "density"}
    model_params = {"weight": 1.0, "density": 1.0}
    sparsify = "dare"


@register
class DareTies(DareLinear):
    """DARE then TIES' sign election and disjoint mean (`normalize` default true, as TIES)."""

    name = "dare_ties"
    params = {"lambda": 1.0, "normalize": True, "seed": 0, "rescale": "density"}
    consensus = True

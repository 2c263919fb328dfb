"""MergePlan: for every output tensor, its sources, op and output dtype, with every check done up front.

Nothing is computed or written while planning; a plan that builds is a merge that can run. Errors name the
file and the tensor.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from pysoup.dtypes import KERNEL_CODE, SAFETENSORS_SIZES
from pysoup.errors import PlanError
from pysoup.io.format import canonical_order
from pysoup.params import LayerPositions, validate_setting


# -- what each output tensor is computed as ---------------------------------------------------------------
@dataclass
class Chunk:
    """One piece of one tensor, as the engine hands it to an op: raw input addresses (one per source),
    elements [start, start + n) of tensor `name`, and the output address (0 during a reduction pass)."""

    name: str
    addrs: list
    dtypes: list
    start: int
    n: int
    out: int
    out_dtype: str
    threads: int


class TensorOp:
    """What one output tensor is. One-pass ops implement `combine`. Ops that need whole-tensor statistics (TIES
    thresholds, SLERP angles, variances) return a pass count from `reduce_passes`: the engine streams every chunk
    through `reduce` that many times (calling `end_pass` after each), then runs the combine pass with the state
    `begin` made. No pass ever holds a whole input tensor. Ops with `verify_first` (the sparse soup's mask check)
    have their reduction run for every tensor before any output is computed."""

    verify_first = False

    def reduce_passes(self, backend) -> int:
        return 0

    def begin(self, backend, name: str, numel: int):
        return None

    def reduce(self, backend, chunk: Chunk, state, pass_: int) -> None:
        raise NotImplementedError

    def end_pass(self, state, pass_: int) -> None:
        pass

    def combine(self, backend, chunk: Chunk, state) -> int:
        """Writes chunk.n results at chunk.out; returns how many are not finite."""
        raise NotImplementedError

    def summary(self, state):
        """What to keep of a finished tensor's state for the report (None: nothing); the rest is freed."""
        return None


@dataclass(frozen=True)
class WeightedSum(TensorOp):
    """out = sum_i w_i x_i, divided by sum_i w_i (fp32, input order) when `normalize`."""

    weights: tuple
    normalize: bool

    def combine(self, backend, chunk, state):
        return backend.weighted_sum_raw(
            chunk.addrs, chunk.dtypes, self.weights, chunk.n, chunk.out, chunk.out_dtype, self.normalize, chunk.threads
        )


@dataclass(frozen=True)
class Copy(TensorOp):
    """out = the first source, byte for byte (integer buffers such as position ids)."""

    def combine(self, backend, chunk, state):
        ctypes.memmove(chunk.out, chunk.addrs[0], chunk.n * SAFETENSORS_SIZES[chunk.out_dtype])
        return 0


@dataclass
class TensorTask:
    name: str
    shape: tuple
    out_dtype: str
    sources: list  # indices into MergePlan.inputs
    op: object


@dataclass
class MergePlan:
    inputs: list  # Checkpoint objects: the models, then the base if any
    tasks: list  # in output layout order
    strategy: str
    base_index: int | None = None

    @property
    def entries(self) -> list:
        return [(t.name, t.out_dtype, t.shape) for t in self.tasks]

    @property
    def bytes_to_read(self) -> int:
        total = 0
        for t in self.tasks:
            total += sum(self.inputs[i].infos[t.name].nbytes for i in t.sources)
        return total


class NonFiniteWarning(UserWarning):
    """A merged tensor holds NaN or inf (from its inputs, or from overflow in the output dtype)."""


def _normalize_settings(strategy, weights, params, model_params, num_models):
    settings = dict(params or {})
    for key, value in settings.items():
        validate_setting(key, value)
    model_settings = [{} for _ in range(num_models)]
    if model_params is not None:
        if len(model_params) != num_models:
            raise PlanError(f"{len(model_params)} per-model parameter sets for {num_models} models")
        for i, mp in enumerate(model_params):
            for key, value in (mp or {}).items():
                if key not in strategy.model_params:
                    raise PlanError(
                        f"strategy {strategy.name!r} has no per-model parameter {key!r} "
                        f"(valid: {', '.join(sorted(strategy.model_params)) or 'none'})"
                    )
                validate_setting(key, value)
                model_settings[i][key] = value
    if weights is not None:
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise PlanError(f"weights must be a list with one entry per model, got {weights!r}")
        if len(weights) != num_models:
            raise PlanError(f"{len(weights)} weights for {num_models} models: give one weight per model")
        for i, w in enumerate(weights):
            validate_setting("weight", w)
            model_settings[i]["weight"] = w
    strategy.check_params(settings, weights is not None)
    return settings, model_settings


def build_plan(
    strategy, models: list, base=None, *, weights=None, params=None, model_params=None, out_dtype=None
) -> MergePlan:
    """Checks the inputs against each other and the strategy, and plans every output tensor.

    Args:
        strategy: a Strategy instance.
        models: opened Checkpoints, in input order.
        base: an opened Checkpoint or None.
        weights: one setting per model (scalar, gradient or filter list), or None.
        params: {parameter: setting} for the strategy (per-model parameters given here apply to every model).
        model_params: one {parameter: setting} per model, for per-model parameters (density, weight).
        out_dtype: safetensors dtype of the merged float tensors, or None for each tensor's first input's.
    """
    if not models:
        raise PlanError("no input models given")
    strategy.check_inputs(len(models), base is not None)
    settings, model_settings = _normalize_settings(strategy, weights, params, model_params, len(models))
    inputs = list(models) + ([base] if base is not None else [])
    base_index = len(models) if base is not None else None
    reference = inputs[0]
    for c in inputs:
        if not c.infos:
            raise PlanError(f"{c.name}: checkpoint has no tensors (nothing to merge)")
    _check_keys(inputs)

    positions = LayerPositions(reference.infos)
    # Imported here: pysoup.strategies imports this module for its ops.
    from pysoup.strategies.base import TensorContext

    tasks = []
    for name, info in reference.infos.items():
        infos = [c.infos[name] for c in inputs]
        for c, other in zip(inputs[1:], infos[1:]):
            if other.shape != info.shape:
                raise PlanError(
                    f"tensor {name!r}: shape {list(other.shape)} in {c.name} differs from "
                    f"{list(info.shape)} in {reference.name}"
                )
        if all(i.dtype in KERNEL_CODE for i in infos):
            ctx = TensorContext(name, positions.t(name), info.numel, model_settings, settings, len(models))
            op = strategy.plan_tensor(ctx)
            sources = list(range(len(inputs)))
            tasks.append(TensorTask(name, info.shape, out_dtype or info.dtype, sources, op))
        elif all(i.dtype == info.dtype and not i.dtype.startswith(("F", "BF")) for i in infos):
            # Integer and bool buffers (position ids, masks) are not weights: copied from the first input.
            tasks.append(TensorTask(name, info.shape, info.dtype, [0], Copy()))
        else:
            kinds = sorted({f"{i.dtype} in {c.name}" for c, i in zip(inputs, infos)})
            raise PlanError(f"tensor {name!r}: cannot merge dtypes {', '.join(kinds)} (mergeable: F32, F16, BF16)")

    _warn_unused_filters(settings, model_settings, reference.infos)
    order = {e[0]: k for k, e in enumerate(canonical_order([(t.name, t.out_dtype, t.shape) for t in tasks]))}
    tasks.sort(key=lambda t: order[t.name])
    return MergePlan(inputs, tasks, strategy.name, base_index)


def _check_keys(inputs) -> None:
    reference = inputs[0]
    ref_keys = set(reference.infos)
    for c in inputs[1:]:
        missing = [k for k in reference.infos if k not in c.infos]
        if missing:
            raise PlanError(
                f"tensor {missing[0]!r} is missing from {c.name} (it is in {reference.name}; "
                f"{len(missing)} missing in all)"
            )
        extra = [k for k in c.infos if k not in ref_keys]
        if extra:
            warnings.warn(
                f"{c.name}: {len(extra)} tensors not in {reference.name} are ignored (first: {extra[0]!r})",
                stacklevel=3,
            )


def _collect_filters(setting, out: set) -> None:
    if isinstance(setting, (list, tuple)):
        for entry in setting:
            if isinstance(entry, Mapping):
                if entry.get("filter") not in (None, "*"):
                    out.add(entry["filter"])
                _collect_filters(entry.get("value"), out)


def _warn_unused_filters(settings, model_settings, names) -> None:
    declared: set = set()
    for s in [settings, *model_settings]:
        for v in s.values():
            _collect_filters(v, declared)
    for f in sorted(declared):
        if not any(f in name for name in names):
            warnings.warn(f"parameter filter {f!r} matches no tensor", stacklevel=3)

"""MergePlan: for every output tensor, its sources, op and output dtype, with every check done up front.

Nothing is computed or written while planning; a plan that builds is a merge that can run. Errors name the
file and the tensor.

The plan is columns, not an object per tensor (checkpoints of 10^6 expert tensors): the output layout as a
TensorTable, each input's row of every output tensor, and a "kind" per tensor, an index into the few distinct
(op, source dtypes) pairs. `MergePlan.tasks` shows one TensorTask per tensor on demand.
"""

from __future__ import annotations

import warnings
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pysoup.dtypes import KERNEL_CODE, SAFETENSORS_SIZES
from pysoup.errors import PlanError
from pysoup.io.table import DTYPE_CODE, DTYPES, rows, sum_by_group, take
from pysoup.strategies.base import TensorContext
from pysoup.strategies.params import LayerPositions, validate_setting
from pysoup.strategies.tensor_op import Copy


@dataclass
class TensorTask:
    name: str
    shape: tuple
    out_dtype: str
    sources: list  # indices into MergePlan.inputs
    op: object


@dataclass(frozen=True)
class Kind:
    """What a run of output tensors shares: the op, the inputs it reads and their dtypes."""

    op: object
    sources: tuple  # indices into MergePlan.inputs
    dtypes: tuple  # safetensors dtype of each source


@dataclass
class MergePlan:
    inputs: list  # Checkpoint objects: the models, then the base if any
    layout: object  # TensorTable of the output tensors in layout order: name, output dtype, shape
    rows: list  # per input: int32 bytes, output tensor k -> its row in that input's table
    kinds: list  # the distinct Kinds
    kind_of: array  # output tensor k -> index into kinds
    strategy: str
    base_index: int | None = None
    bytes_to_read: int = 0  # what the merge reads from its inputs

    def __len__(self) -> int:
        return len(self.layout)

    def kind(self, k: int) -> Kind:
        return self.kinds[self.kind_of[k]]

    def row(self, i: int, k: int) -> int:
        """Input i's row of output tensor k."""
        return rows(self.rows[i])[k]

    def task(self, k: int) -> TensorTask:
        kind = self.kind(k)
        table = self.layout
        return TensorTask(table.name(k), table.shape(k), table.dtype(k), list(kind.sources), kind.op)

    @property
    def tasks(self) -> Sequence:
        """One TensorTask per output tensor, in layout order, made when read."""
        return _Tasks(self)

    def state_dict_order(self) -> list:
        """Output tensor names in the first input's order: a merge into memory returns its dict in this order.
        (Files take the layout's order, `layout`: by dtype, then name, as the safetensors package writes.)"""
        layout = set(self.layout.names())
        return [name for name in self.inputs[0].infos if name in layout]

    @property
    def entries(self) -> Sequence:
        """(name, dtype, shape) of every output tensor in layout order; `.table` is the layout itself."""
        return LayoutEntries(self.layout)


class _Rows(Sequence):
    """A read-only sequence whose k-th item is made when read: no object per row is kept (10^6 rows)."""

    def _item(self, k: int):
        raise NotImplementedError

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self._item(i) for i in range(*k.indices(len(self)))]
        return self._item(k + len(self) if k < 0 else k)


class _Tasks(_Rows):
    def __init__(self, plan):
        self._plan = plan

    def __len__(self):
        return len(self._plan)

    def _item(self, k):
        return self._plan.task(k)


class LayoutEntries(_Rows):
    """(name, dtype, shape) rows of a layout TensorTable: what OutputTarget and MemorySink take, without a tuple
    per tensor for the writer (it reads `.table`)."""

    def __init__(self, table):
        self.table = table

    def __len__(self):
        return len(self.table)

    def _item(self, k):
        t = self.table
        return t.name(k), t.dtype(k), t.shape(k)


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
    strategy,
    models: list,
    base=None,
    *,
    weights=None,
    params=None,
    model_params=None,
    out_dtype=None,
    layer_positions=None,
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
        layer_positions: an object whose t(name) is each tensor's position in [0, 1] for gradients (a mergekit
            slice's own numbering), or None for LayerPositions over the reference's names.
    """
    if not models:
        raise PlanError("no input models given")
    strategy.check_inputs(len(models), base is not None)
    settings, model_settings = _normalize_settings(strategy, weights, params, model_params, len(models))
    inputs = list(models) + ([base] if base is not None else [])
    base_index = len(models) if base is not None else None
    reference = inputs[0]
    for c in inputs:
        if not len(c.table):
            raise PlanError(f"{c.name}: checkpoint has no tensors (nothing to merge)")
    ref_rows = _check_keys(inputs)  # input i's row of each reference tensor (None: the reference itself)
    table = reference.table
    n = len(table)
    planner = _TensorPlanner(strategy, settings, model_settings, len(models), table, layer_positions)

    # The first tensor (in the reference's order) whose shape differs in some input: raised when the loop gets there,
    # so that errors come in the same order as when every tensor was checked in turn.
    mismatch = min(
        (k for k in (c.table.first_shape_mismatch(table, r) for c, r in zip(inputs[1:], ref_rows[1:])) if k >= 0),
        default=-1,
    )
    codes = [memoryview(c.table.dtype_codes(r, n)) for c, r in zip(inputs, ref_rows)]
    numels = memoryview(table.numels()).cast("q")
    kinds: list = []
    kind_ids: dict = {}  # Kind -> its index in kinds
    known: dict = {}  # (input dtype codes, planning context) -> kind index
    categories: dict = {}  # input dtype codes -> (merged?, output dtype code, dtypes), or an error
    kind_of = array("I", bytes(4 * n))
    out_code_of: list = []  # per kind
    plain = planner.plain
    for k, key in enumerate(zip(zip(*codes), numels)):  # key: (dtype codes of every input, element count)
        if k == mismatch:
            _raise_shape_mismatch(inputs, ref_rows, k)
        if not plain:
            key = (key[0], planner.context(k, key[1]))
        kid = known.get(key)
        if kid is None:
            sig, context, numel = key[0], key[1], numels[k]
            category = categories.get(sig)
            if category is None:
                category = categories[sig] = _category(sig, inputs, out_dtype)
            if isinstance(category, str):
                raise PlanError(f"tensor {table.name(k)!r}: {category}")
            merge, out_code, dtypes = category
            if merge:
                kind = Kind(planner.op(k, numel, context), tuple(range(len(inputs))), dtypes)
            else:
                kind = Kind(Copy(), (0,), dtypes[:1])
            kid = _kind_index(kind, kind_ids, kinds)
            if kid == len(out_code_of):
                out_code_of.append(out_code)
            if context is not None:
                known[key] = kid
        kind_of[k] = kid

    _warn_unused_filters(settings, model_settings, planner.names)
    numel_of_kind = sum_by_group(numels, kind_of, len(kinds))
    read = sum(total * sum(SAFETENSORS_SIZES[d] for d in kind.dtypes) for kind, total in zip(kinds, numel_of_kind))
    # Layout order: the safetensors package's (dtype, then name) over the output dtypes.
    out_codes = take(bytes(out_code_of), 1, kind_of)
    order = table.canonical_order(out_codes)
    layout = table.permuted(order, out_codes)
    plan_rows = [order] + [take(r, 4, order) for r in ref_rows[1:]]
    kind_of = array("I", take(kind_of, 4, order))
    return MergePlan(inputs, layout, plan_rows, kinds, kind_of, strategy.name, base_index, read)


def _kind_index(kind: Kind, ids: dict, kinds: list) -> int:
    try:
        kid = ids.get(kind)
    except TypeError:  # an op that cannot be hashed: a kind of its own
        kinds.append(kind)
        return len(kinds) - 1
    if kid is None:
        kid = ids[kind] = len(kinds)
        kinds.append(kind)
    return kid


def _category(sig: tuple, inputs, out_dtype):
    """For one combination of input dtypes: (True, output dtype code, dtypes) when merged, (False, ...) for integer
    and bool buffers (copied from the first input), or the error."""
    dtypes = tuple(DTYPES[c] for c in sig)
    first = dtypes[0]
    if all(d in KERNEL_CODE for d in dtypes):
        return True, DTYPE_CODE[out_dtype or first], dtypes
    if all(d == first and not d.startswith(("F", "BF")) for d in dtypes):
        # Integer and bool buffers (position ids, masks) are not weights: copied from the first input.
        return False, sig[0], dtypes
    kinds = sorted({f"{d} in {c.name}" for c, d in zip(inputs, dtypes)})
    return f"cannot merge dtypes {', '.join(kinds)} (mergeable: F32, F16, BF16)"


def _raise_shape_mismatch(inputs, ref_rows, k):
    reference = inputs[0]
    name, shape = reference.table.name(k), reference.table.shape(k)
    for c, r in zip(inputs[1:], ref_rows[1:]):
        other = c.table.shape(k if r is None else rows(r)[k])
        if other != shape:
            raise PlanError(
                f"tensor {name!r}: shape {list(other)} in {c.name} differs from {list(shape)} in {reference.name}"
            )


class _TensorPlanner:
    """strategy.plan_tensor for each tensor, asked once per distinct context: a strategy that reads the name only
    through its parameters' filters (Strategy.plans_by_name false) gets one call per (element count, layer position
    where a gradient needs it, filters that match), so 10^6 expert tensors cost a few calls, not 10^6 at ~10 us."""

    def __init__(self, strategy, settings, model_settings, num_models, table, positions=None):
        self.strategy, self.settings, self.model_settings = strategy, settings, model_settings
        self.num_models, self.table = num_models, table
        declared: set = set()
        for s in [settings, *model_settings]:
            for v in s.values():
                _collect_filters(v, declared)
        self.filters = sorted(declared)
        self.per_tensor = getattr(strategy, "plans_by_name", True)
        self.gradients = any(_has_gradient(v) for s in [settings, *model_settings] for v in s.values())
        self.names = table.names() if self.filters or self.gradients or self.per_tensor else ()
        self.positions = None
        if self.gradients or self.per_tensor:
            self.positions = positions if positions is not None else LayerPositions(self.names)
        # The context is the element count alone: the planner's loop asks nothing per tensor.
        self.plain = not (self.per_tensor or self.filters or self.gradients)
        self._ops: dict = {}

    def context(self, k: int, numel: int):
        """What the op of tensor k depends on: its element count, and where a gradient or a filter needs them, its
        layer position and the filters its name matches; None when the strategy plans every tensor on its own."""
        if self.per_tensor:
            return None
        if not (self.filters or self.gradients):
            return numel
        name = self.names[k]
        t = self.positions.t(name) if self.gradients else 0.0
        return numel, t, tuple(f in name for f in self.filters)

    def op(self, k: int, numel: int, context):
        """strategy.plan_tensor for tensor k, or the op of an earlier tensor of the same context."""
        op = self._ops.get(context) if context is not None else None
        if op is None:
            name = self.names[k] if self.names else self.table.name(k)
            t = self.positions.t(name) if self.positions is not None else 0.0
            shape = tuple(self.table.shape(k))
            ctx = TensorContext(name, t, numel, self.model_settings, self.settings, self.num_models, shape)
            op = self.strategy.plan_tensor(ctx)
            if context is not None:
                self._ops[context] = op
        return op


def _has_gradient(setting) -> bool:
    if isinstance(setting, (list, tuple)):
        return any(_has_gradient(e.get("value")) if isinstance(e, Mapping) else True for e in setting)
    return False


def _check_keys(inputs) -> list:
    """Input i's row of each of the reference's tensors (as int32 bytes; None for the reference itself). A tensor
    the reference has and another input lacks is an error; one only another input has is ignored with a warning."""
    reference = inputs[0]
    out = [None]
    for c in inputs[1:]:
        found, missing, first = c.table.rows_of(reference.table)
        if missing:
            raise PlanError(
                f"tensor {reference.table.name(first)!r} is missing from {c.name} (it is in {reference.name}; "
                f"{missing} missing in all)"
            )
        if len(c.table) != len(reference.table):
            _, extra, first = reference.table.rows_of(c.table)
            warnings.warn(
                f"{c.name}: {extra} tensors not in {reference.name} are ignored (first: {c.table.name(first)!r})",
                stacklevel=3,
            )
        out.append(found)
    return out


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

"""mergekit 0.1.5's YAML merge configs, read the way mergekit reads them, so a mergekit user's config runs unchanged.

    models:
      - model: ./ft1
        parameters: {weight: 0.6, density: 0.5}
      - model: ./ft2
        parameters: {weight: 0.4, density: [{filter: mlp, value: 0.3}]}
    merge_method: ties
    base_model: ./base
    parameters: {normalize: true, density: 0.7}
    dtype: float32
    out_dtype: bfloat16

What follows mergekit 0.1.5 (mergekit/config.py, parameter_resolver.py, plan.py):
  - Precedence: a parameter is looked up in the slice source's (the model entry's) parameters, then the slice's,
    the module's, the top-level `parameters:`, and last the method's default. A level that does not set it, or whose
    filter list has no entry for the tensor (no entry without a filter), falls through to the next. Parameters of
    "shared" scope (lambda, normalize, t...) are read from the slice / module / top level only; set on a model they
    are ignored (with a warning, as every input mergekit ignores).
  - Values are validated with the parameter's type as pydantic does: YAML 1.1 reads `2e-1` as a string, mergekit
    (and pysoup) read it as 0.2; `lambda: x` is a one-line error naming the key and the model. A filter entry may be
    given alone, not in a list (`density: {filter: mlp, value: 0.5}`).
  - A parameter the method does not take is ignored by mergekit: a warning here (per-model `weight` on slerp and
    model_stock). `base_model` on a method that has no base (linear, passthrough, karcher) is what mergekit 0.1.5
    does with it: merged as one more ordinary input (added to `models:` when it is not listed), with the weight the
    slice / module / top-level parameters give it (mergekit requires one) - a warning says so.
  - `weight` has no default in mergekit: a model without one (at any level) is an error, as in mergekit.
  - `dtype` is mergekit's compute dtype; pysoup always computes in fp32 and uses it as the output dtype when
    `out_dtype` is absent, as mergekit's output then has that dtype.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from pysoup.errors import PlanError
from pysoup.mergekit.methods import METHODS, NO_EFFECT, REQUIRED, STRATEGY_NAMES, VALUE_NAMES

KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}
_BOOL_STRINGS = {
    **dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
    **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False),
}
_DTYPES = {"float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "float", "half"}


class ConfigWarning(UserWarning):
    """A config input mergekit 0.1.5 ignores (pysoup ignores it too, and says so)."""


@dataclass
class Source:
    """One input of a merge group: a model directory or file, and for `slices:` the layers [start, stop) it gives."""

    model: str
    layer_range: tuple | None = None


@dataclass
class Group:
    """Output tensors merged by one pysoup strategy call: the whole model (`models:`), or one output slice.

    `models` are the strategy's inputs in order and `base` its base (None when the strategy takes none);
    `model_params[i]` holds every per-model parameter of models[i] and `params` the shared ones, each a setting with
    mergekit's precedence already folded in (see `fold`)."""

    models: list
    base: Source | None
    params: dict
    model_params: list
    module: str | None = None
    # (model path, parameter, filters): a parameter mergekit requires that this model gets only from filter entries;
    # a tensor none of them matches is an error, as in mergekit (checked when the tensor names are known).
    required: list = field(default_factory=list)


@dataclass
class MergeSpec:
    """A config, read: the groups to merge and what the output states. `inputs`, `base`, `params`, `model_params`
    are the single group of a `models:` config as pysoup.merge's arguments (None for slice configs)."""

    strategy: str
    groups: list
    dtype: str | None = None
    compute_dtype: str | None = None
    path: str = ""
    layered: bool = False  # slices / modules: output layers are renumbered
    tokenizer_source: object = None
    tokenizer: dict | None = None
    chat_template: str | None = None
    base_model: str | None = None
    inputs: list | None = None
    base: str | None = None
    weights: list | None = None
    params: dict = field(default_factory=dict)
    model_params: list = field(default_factory=list)


def load_config(path: str) -> MergeSpec:
    """Reads a mergekit YAML config.

    Args:
        path: the YAML file.

    Returns:
        A MergeSpec. Errors are one-line PlanErrors naming the file and the key; inputs mergekit ignores are
        ConfigWarnings.

    Example:
        >>> spec = load_config("soup.yaml")  # doctest: +SKIP
        >>> pysoup.merge(spec.inputs, "out/", strategy=spec.strategy, base=spec.base, params=spec.params,
        ...              model_params=spec.model_params, dtype=spec.dtype)  # doctest: +SKIP
    """
    cfg = _read_yaml(path)
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise PlanError(f"{path}: unknown key {unknown[0]!r} (a mergekit config has {', '.join(sorted(KEYS))})")
    method = cfg.get("merge_method")
    if not isinstance(method, str):
        raise PlanError(f"{path}: 'merge_method' must name a merge method, got {method!r}")
    strategy = _strategy_for(method, path)
    layouts = [k for k in ("models", "slices", "modules") if cfg.get(k)]
    if len(layouts) != 1:
        raise PlanError(f"{path}: a config needs exactly one of 'models', 'slices' or 'modules' (non-empty)")
    if cfg.get("tokenizer_source") is not None and cfg.get("tokenizer") is not None:
        raise PlanError(f"{path}: give 'tokenizer_source' or 'tokenizer', not both")
    top = _params(cfg.get("parameters"), f"{path}: top-level parameters")
    base = _model_ref(cfg["base_model"], f"{path}: base_model") if cfg.get("base_model") is not None else None
    reader = _Reader(path, method, strategy, top)
    layout = layouts[0]
    if layout == "models":
        entries = _list(cfg["models"], f"{path}: 'models'")
        sources = [(Source(_entry_model(e, f"{path}: models[{i}]")), _entry_params(e, path, i)) for i, e in
                   enumerate(entries)]  # fmt: skip
        groups = [reader.group(sources, {}, {}, base, f"{path}: models", add_base=True)]
    elif layout == "slices":
        groups = reader.slices(_list(cfg["slices"], f"{path}: 'slices'"), {}, base, None)
    else:
        modules = cfg["modules"]
        if not isinstance(modules, Mapping):
            raise PlanError(f"{path}: 'modules' must map module names to {{slices or models, parameters}}")
        groups = []
        for name, mod in modules.items():
            where = f"{path}: modules.{name}"
            if not isinstance(mod, Mapping) or set(mod) - {"slices", "models", "parameters"}:
                raise PlanError(f"{where}: a module has 'slices' or 'models', and 'parameters'")
            if bool(mod.get("slices")) == bool(mod.get("models")):
                raise PlanError(f"{where}: give exactly one of 'slices' or 'models'")
            mparams = _params(mod.get("parameters"), f"{where}.parameters")
            if mod.get("models"):
                entries = _list(mod["models"], f"{where}.models")
                sources = [(Source(_entry_model(e, f"{where}.models[{i}]")), _entry_params(e, where, i)) for i, e in
                           enumerate(entries)]  # fmt: skip
                g = reader.group(sources, {}, mparams, base, where, add_base=True)
                g.module = str(name)
                groups.append(g)
            else:
                groups += reader.slices(_list(mod["slices"], f"{where}.slices"), mparams, base, str(name))
    dtype, compute = _dtype(cfg.get("out_dtype"), path, "out_dtype"), _dtype(cfg.get("dtype"), path, "dtype")
    spec = MergeSpec(
        strategy,
        groups,
        dtype or compute,
        compute,
        path,
        layered=layout != "models",
        tokenizer_source=cfg.get("tokenizer_source"),
        tokenizer=cfg.get("tokenizer"),
        chat_template=cfg.get("chat_template"),
        base_model=base,
    )
    if not spec.layered and len(groups) == 1:
        g = groups[0]
        spec.inputs = [s.model for s in g.models]
        spec.base = g.base.model if g.base is not None else None
        spec.params, spec.model_params = g.params, g.model_params
    return spec


def _read_yaml(path: str) -> dict:
    try:
        import yaml
    except ImportError:
        raise PlanError("reading YAML configs needs PyYAML: pip install 'pysoup[yaml]'") from None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise PlanError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"{path}: a config is a mapping with merge_method and models")
    return cfg


def _strategy_for(method: str, path: str) -> str:
    from pysoup.strategies import strategy_names

    name = STRATEGY_NAMES.get(method, method)
    if method not in METHODS:
        raise PlanError(f"{path}: merge_method {method!r} is not a mergekit 0.1.5 method (valid: {_valid()})")
    if name not in strategy_names():
        raise PlanError(f"{path}: merge_method {method!r} is not implemented by pysoup (it runs: {_valid()})")
    return name


def _valid() -> str:
    from pysoup.strategies import strategy_names

    have = set(strategy_names())
    return ", ".join(m for m in sorted(METHODS) if STRATEGY_NAMES.get(m, m) in have)


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise PlanError(f"{where} must be a list")
    return value


def _model_ref(model, where: str) -> str:
    if isinstance(model, Mapping):  # mergekit's {model: {path: ...}} / {path: ...} forms
        lora = model.get("lora")
        model = model.get("model", model)
        if isinstance(model, Mapping):
            model = model.get("path")
        if isinstance(lora, Mapping):
            lora = lora.get("path")
        if lora:
            model = f"{model}+{lora}"
    if not isinstance(model, str) or not model:
        raise PlanError(f"{where}: a model is a path, got {model!r}")
    parts = model.split("+")
    if len(parts) > 2 or not all(parts):
        raise PlanError(f"{where}: a model reference is MODEL or MODEL+LORA, got {model!r}")
    return model


def _entry_model(entry, where: str) -> str:
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise PlanError(f"{where}: every entry of 'models' needs a 'model' path")
    extra = sorted(set(entry) - {"model", "parameters"})
    if extra:
        raise PlanError(f"{where}: unknown key {extra[0]!r} (an entry has model and parameters)")
    return _model_ref(entry["model"], where)


def _entry_params(entry, where: str, i) -> dict:
    return _params(entry.get("parameters"), f"{where}: model {entry.get('model')!r}")


def _params(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise PlanError(f"{where}: 'parameters' must map parameter names to values")
    return dict(value)


def _dtype(value, path: str, key: str):
    if value is None:
        return None
    if value not in _DTYPES:
        raise PlanError(f"{path}: {key} {value!r} is not a float dtype (float32, float16, bfloat16)")
    return {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(
        value, value
    )


# -- parameter values -------------------------------------------------------------------------------------------


def coerce(value, typ: str, key: str, where: str):
    """One scalar validated as pydantic (mergekit's validator) does in lax mode: numbers written as strings are
    numbers, 'yes' / 'on' / 1 are true..."""
    bad = f"{where}: parameter {key!r} must be "
    if typ == "optfloat" and value is None:
        return None
    if typ in ("float", "optfloat"):
        if isinstance(value, (bool, int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise PlanError(bad + f"a number, got {value!r}")
    if typ == "int":
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise PlanError(bad + f"an integer, got {value!r}") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise PlanError(bad + f"an integer, got {value!r}")
        return int(value)
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
            return _BOOL_STRINGS[value.strip().lower()]
        raise PlanError(bad + f"true or false, got {value!r}")
    return value


def _is_entry(v) -> bool:
    return isinstance(v, Mapping)


def _setting(value, typ, key: str, where: str):
    """A setting as written (scalar, gradient, {filter, value} or a list of them), its scalars coerced to the
    parameter's type; a lone {filter, value} becomes a list of one."""
    if typ is None:  # a pysoup parameter mergekit does not have: as given
        return [dict(e) for e in value] if isinstance(value, list) and all(map(_is_entry, value)) else value
    if _is_entry(value):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise PlanError(f"{where}: parameter {key!r} is an empty list")
        if all(_is_entry(e) for e in value):
            out = []
            for e in value:
                extra = sorted(set(e) - {"filter", "value"})
                if "value" not in e or extra:
                    raise PlanError(f"{where}: parameter {key!r}: a filter entry has 'filter' and 'value', got {e!r}")
                if e.get("filter") is not None and not isinstance(e["filter"], str):
                    raise PlanError(f"{where}: parameter {key!r}: a filter is a substring, got {e['filter']!r}")
                if _is_entry(e["value"]):
                    raise PlanError(f"{where}: parameter {key!r}: a filter entry's value is a number or a gradient")
                out.append({"filter": e.get("filter"), "value": _setting(e["value"], typ, key, where)})
            return out
        if any(_is_entry(e) or isinstance(e, list) for e in value):
            raise PlanError(f"{where}: parameter {key!r}: a list holds numbers (a gradient) or filter entries")
        values = [coerce(e, typ, key, where) for e in value]
        if typ == "bool":
            raise PlanError(f"{where}: parameter {key!r}: a gradient of true/false values is not supported")
        return values
    return coerce(value, typ, key, where)


def _scalars(setting):
    """Every scalar a setting holds."""
    if isinstance(setting, list):
        for e in setting:
            yield from _scalars(e["value"] if _is_entry(e) else e)
    else:
        yield setting


def fold(levels: list, default=REQUIRED):
    """One setting equivalent to mergekit's lookup over `levels` (highest precedence first, None where a level does
    not set the parameter) and then `default`: the first level that gives a value for a tensor wins; a filter list
    gives none for a tensor no entry matches (no unfiltered entry), and the lookup goes on to the next level.

    Returns None when no level sets it and there is no default; else a scalar / gradient, or a filter list whose
    entries run through the levels in order (exactly what pysoup's params.resolve evaluates the same way).

    Example:
        >>> fold([[{"filter": "mlp", "value": 0.3}], 0.7])
        [{'filter': 'mlp', 'value': 0.3}, {'filter': None, 'value': 0.7}]
    """
    entries = []
    for s in list(levels) + ([] if default is REQUIRED or default is None else [default]):
        if s is None:
            continue
        if isinstance(s, list) and s and all(map(_is_entry, s)):
            entries += s
            if any(e.get("filter") in (None, "*") for e in s):
                break
        else:
            entries.append({"filter": None, "value": s})
            break
    if not entries:
        return None
    if len(entries) == 1 and entries[0]["filter"] in (None, "*"):
        return entries[0]["value"]
    return [e if e.get("filter") not in (None, "*") else {"value": e["value"]} for e in entries]


class _Reader:
    """Turns slices / model lists into Groups for one config: method, strategy and top-level parameters fixed."""

    def __init__(self, path, method, strategy_name, top):
        from pysoup.strategies import get_strategy

        self.path, self.method, self.top = path, method, top
        self.strategy = get_strategy(strategy_name)
        self.policy, self.spec = METHODS[method]
        self.warned: set = set()

    def warn(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(f"{self.path}: {message}", ConfigWarning, stacklevel=4)

    def slices(self, slices: list, module_params: dict, base, module) -> list:
        groups = []
        for j, sl in enumerate(slices):
            where = f"{self.path}: {'modules.' + module + '.' if module else ''}slices[{j}]"
            if not isinstance(sl, Mapping) or "sources" not in sl:
                raise PlanError(f"{where}: a slice has 'sources' (a list of {{model, layer_range}})")
            extra = sorted(set(sl) - {"sources", "base_model", "residual_weight", "parameters"})
            if extra:
                raise PlanError(f"{where}: unknown key {extra[0]!r}")
            if sl.get("residual_weight") is not None:
                self.warn(f"{where}: residual_weight is ignored (as mergekit 0.1.5 ignores it)")
            sources = []
            for i, src in enumerate(_list(sl["sources"], f"{where}.sources")):
                w = f"{where}.sources[{i}]"
                if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                    raise PlanError(f"{w}: a source has 'model' and 'layer_range' [start, stop)")
                extra = sorted(set(src) - {"model", "layer_range", "parameters"})
                if extra:
                    raise PlanError(f"{w}: unknown key {extra[0]!r}")
                lr = src["layer_range"]
                if (
                    not isinstance(lr, list)
                    or len(lr) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                    or not 0 <= lr[0] <= lr[1]
                ):
                    raise PlanError(f"{w}: layer_range must be [start, stop) with 0 <= start <= stop, got {lr!r}")
                model = _model_ref(src["model"], w)
                sources.append((Source(model, tuple(lr)), _params(src.get("parameters"), f"{w}: model {model!r}")))
            if not sources:
                raise PlanError(f"{where}: a slice needs at least one source")
            counts = {s.layer_range[1] - s.layer_range[0] for s, _ in sources}
            if len(counts) != 1:
                raise PlanError(f"{where}: every source of a slice must have the same number of layers")
            slice_base = base
            if sl.get("base_model") is not None:
                slice_base = _model_ref(sl["base_model"], f"{where}.base_model")
            sp = _params(sl.get("parameters"), f"{where}.parameters")
            g = self.group(sources, sp, module_params, slice_base, where, add_base=False)
            g.module = module
            groups.append(g)
        return groups

    def group(self, sources: list, slice_params: dict, module_params: dict, base, where: str, add_base: bool):
        """One Group from [(Source, its parameters)], with the parameters of the levels above it."""
        seen = set()
        for s, _ in sources:
            key = (os.path.normpath(s.model), s.layer_range)
            if key in seen:
                raise PlanError(f"{where}: model {s.model!r} is listed twice")
            seen.add(key)
        norm = os.path.normpath
        base_pos = next(
            (i for i, (s, _) in enumerate(sources) if base is not None and norm(s.model) == norm(base)), None
        )
        if base is not None and base_pos is None:
            if add_base:  # mergekit adds a base that `models:` does not list, with no parameters of its own
                lr = sources[0][0].layer_range
                sources = sources + [(Source(base, lr), {})]
                base_pos = len(sources) - 1
            elif self.policy != "ignored":
                raise PlanError(
                    f"{where}: base model {base!r} is not among the slice's sources (mergekit needs it there)"
                )
        if self.policy == "ignored":
            if base is not None and base_pos is not None:
                self.warn(
                    f"merge_method {self.method!r} has no base model: mergekit 0.1.5 merges base_model {base!r} as one "
                    "more ordinary input (added to the models when not listed), and so does pysoup"
                )
            base_pos = None
        elif self.policy in ("required",) and base_pos is None:
            raise PlanError(f"{where}: merge_method {self.method!r} needs a base_model")

        shared_levels = [slice_params, module_params, self.top]
        required = []
        params, per_model = {}, [dict() for _ in sources]
        names = set(self.top) | set(module_params) | set(slice_params)
        for _, p in sources:
            names |= set(p)
        takes = set(self.strategy.params) | set(self.strategy.model_params)
        names |= {k for k in self.spec if k in takes}  # mergekit's defaults, where pysoup's may differ
        for key in sorted(names):
            if key in NO_EFFECT:
                continue
            spec = self.spec.get(key)
            if spec is None and key not in takes:
                self.warn(f"merge_method {self.method!r} takes no parameter {key!r}; ignored (as mergekit 0.1.5 does)")
                continue
            scope, typ, default = spec if spec is not None else (None, None, REQUIRED)
            if scope is None:  # pysoup's own parameter (e.g. seed)
                scope = "non_base" if key in self.strategy.model_params else "shared"

            def read(level, w, key=key, typ=typ):
                return _setting(level[key], typ, key, w) if key in level else None

            if scope == "shared":
                for s, p in sources:
                    if key in p:
                        read(p, f"{self.path}: model {s.model!r}")  # a bad value is an error even where ignored
                        self.warn(
                            f"parameter {key!r} given for model {s.model!r} is ignored: mergekit 0.1.5 reads {key!r} "
                            "from the slice, module or top-level parameters only"
                        )
                levels = [read(lv, f"{where} parameters") for lv in shared_levels]
                value = fold(levels, default)
                if value is None and default is REQUIRED:
                    raise PlanError(f"{where}: merge_method {self.method!r} needs the parameter {key!r}")
                self._place(key, value, default, params, None, where)
                continue
            for i, (s, p) in enumerate(sources):
                if scope == "non_base" and i == base_pos:
                    continue
                w = f"{self.path}: model {s.model!r}"
                levels = [read(p, w)] + [read(lv, w) for lv in shared_levels]
                value = fold(levels, default)
                if value is None:
                    if default is REQUIRED and spec is not None:
                        raise PlanError(f"{w}: parameter {key!r} is not set (merge_method {self.method!r} needs it)")
                    continue
                self._place(key, value, default, params, per_model[i], w)
                if (
                    default is REQUIRED
                    and isinstance(value, list)
                    and all(_is_entry(e) and "filter" in e for e in value)
                ):
                    required.append((s.model, key, [e["filter"] for e in value]))

        models = [s for i, (s, _) in enumerate(sources) if i != base_pos]
        mparams = [per_model[i] for i in range(len(sources)) if i != base_pos]
        base_src = sources[base_pos][0] if base_pos is not None else None
        if base_src is not None and self.strategy.base == "forbidden":
            # mergekit's two-model methods with a base (slerp, nearswap, arcee_fusion): the base is pysoup's first
            # model (t = 0 gives it), the other the second.
            models, mparams = [base_src] + models, [per_model[base_pos]] + mparams
            base_src = None
        g = Group(models, base_src, params, mparams, required=required)
        self._check_per_model_shared(g, where)
        return g

    def _place(self, key, value, default, params, per_model, where):
        """A folded setting into the strategy's arguments: per model when the strategy takes it per model."""
        takes_model, takes_shared = key in self.strategy.model_params, key in self.strategy.params
        if not (takes_model or takes_shared):
            if any(v != default for v in _scalars(value)):
                raise PlanError(
                    f"{where}: parameter {key!r} of merge_method {self.method!r} is not implemented by pysoup "
                    f"(only its default {default!r})"
                )
            return
        names = VALUE_NAMES.get((self.method, key))
        if names:
            value = _rename_values(value, names)
        if per_model is not None and takes_model:
            per_model[key] = value
        elif per_model is not None:
            params.setdefault(("per-model", key), []).append(value)
        else:
            params[key] = value

    def _check_per_model_shared(self, g: Group, where: str) -> None:
        """A mergekit per-model parameter that the pysoup strategy takes once for all models: the models must agree."""
        for key in [k for k in g.params if isinstance(k, tuple)]:
            values = g.params.pop(key)
            if any(v != values[0] for v in values):
                raise PlanError(f"{where}: pysoup's {self.method} takes one {key[1]!r} for every model, got {values}")
            g.params[key[1]] = values[0]


def _rename_values(setting, names: dict):
    if isinstance(setting, list):
        return [{**e, "value": _rename_values(e["value"], names)} if _is_entry(e) else names.get(e, e) for e in setting]
    return names.get(setting, setting)

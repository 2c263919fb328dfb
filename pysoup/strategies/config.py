"""mergekit's YAML merge configs, for the methods both tools have, so a mergekit user's config runs unchanged.

    models:
      - model: ./ft1
        parameters: {weight: 0.6, density: 0.5}
      - model: ./ft2
        parameters: {weight: 0.4, density: 0.5}
    merge_method: ties
    base_model: ./base
    parameters: {normalize: true}
    dtype: float32
    out_dtype: bfloat16

Where pysoup's defaults differ from mergekit's, a config gets mergekit's: DARE rescales survivors to the L1 norm
(`rescale: true`, mergekit's default) and dare_ties does not normalize unless asked. `dtype` is mergekit's compute
dtype; pysoup always computes in fp32 and uses it as the output dtype when `out_dtype` is absent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pysoup.errors import PlanError

SUPPORTED_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
# Keys that only steer mergekit's execution and change no merged value.
IGNORED_PARAMETERS = {"int8_mask"}
METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "model_stock"}
# mergekit's defaults where they differ from pysoup's (see the module docstring).
MERGEKIT_DEFAULTS = {
    "dare_linear": {"rescale": "l1", "normalize": False},
    "dare_ties": {"rescale": "l1", "normalize": False},
}


@dataclass
class MergeSpec:
    """The arguments of pysoup.merge that a config describes."""

    inputs: list
    strategy: str
    base: str | None = None
    weights: list | None = None
    model_params: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    dtype: str | None = None


def _model_path(entry, where: str) -> str:
    model = entry.get("model") if isinstance(entry, dict) else entry
    if isinstance(model, dict):  # mergekit also accepts {model: {path: ...}}
        model = model.get("path") or model.get("model")
    if not isinstance(model, str) or not model:
        raise PlanError(f"{where}: every entry of 'models' needs a 'model' path")
    if "+" in model:
        raise PlanError(f"{where}: LoRA references ({model!r}) are not supported; merge the adapter first")
    return model


def load_config(path: str) -> MergeSpec:
    """Reads a mergekit YAML config. Unsupported keys are errors, never silently ignored."""
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
    unknown = sorted(set(cfg) - SUPPORTED_KEYS)
    if unknown:
        raise PlanError(f"{path}: unsupported key {unknown[0]!r} (pysoup reads {', '.join(sorted(SUPPORTED_KEYS))})")
    method = cfg.get("merge_method")
    if method not in METHODS:
        raise PlanError(f"{path}: merge_method {method!r} is not supported (supported: {', '.join(sorted(METHODS))})")
    base = cfg.get("base_model")
    if base is not None:
        base = _model_path({"model": base} if isinstance(base, str) else base, path)
    entries = cfg.get("models") or []
    if not isinstance(entries, list):
        raise PlanError(f"{path}: 'models' must be a list")
    models, settings = [], []
    for entry in entries:
        model = _model_path(entry, path)
        if base is not None and os.path.normpath(model) == os.path.normpath(base):
            continue  # mergekit lists the base among the models; its parameters are unused
        params = dict((entry.get("parameters") or {}) if isinstance(entry, dict) else {})
        models.append(model)
        settings.append(params)
    params = dict(cfg.get("parameters") or {})
    for key in IGNORED_PARAMETERS:
        params.pop(key, None)
        for s in settings:
            s.pop(key, None)
    for key, value in MERGEKIT_DEFAULTS.get(method, {}).items():
        params.setdefault(key, value)
    if params.get("rescale") is True:
        params["rescale"] = "l1"  # mergekit's rescale means "match the L1 norm"
    if method == "slerp":
        if base is None or len(models) != 1:
            raise PlanError(f"{path}: slerp needs base_model and exactly one other model")
        models, settings, base = [base, models[0]], [{}, settings[0]], None
    weights = None
    if any("weight" in s for s in settings):
        weights = [s.pop("weight", 1.0) for s in settings]
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    return MergeSpec(models, method, base, weights, settings, params, dtype)

"""Per-tensor parameter values, as mergekit users write them.

A parameter (a weight, density, t, alpha) may be:
  - a scalar: the same everywhere;
  - a list of numbers: a gradient, interpolated linearly over the layer index;
  - a list of {filter: substring, value: ...} entries: the first entry whose filter occurs in the tensor name
    wins; an entry without a filter (or filter "*") matches everything. A value may itself be a gradient.

Layer position (pysoup follows mergekit 0.1.5 here): a tensor of layer i out of L has t = i / (L - 1)
(t = 1 when L = 1); tensors outside the layer stack (embeddings, final norm, lm_head) take t = 0, because
mergekit resolves its "pre" and "post" weights with t = 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from pysoup.errors import PlanError

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer|decoder_layers)\.(\d+)(?:\.|$)")


def layer_index(name: str):
    """The transformer block a tensor belongs to, or None: 'model.layers.7.mlp.up_proj.weight' -> 7."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class LayerPositions:
    """t in [0, 1] for each tensor name, from the layer count of the whole model."""

    def __init__(self, names):
        indices = [i for i in map(layer_index, names) if i is not None]
        self.num_layers = max(indices) + 1 if indices else 0

    def t(self, name: str) -> float:
        i = layer_index(name)
        if i is None:
            return 0.0
        return i / (self.num_layers - 1) if self.num_layers > 1 else 1.0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_setting(param: str, value) -> None:
    """Rejects malformed settings up front, naming the parameter."""
    if _is_number(value) or isinstance(value, (bool, str)):
        return
    if isinstance(value, (list, tuple)):
        if not value:
            raise PlanError(f"parameter {param!r}: an empty list")
        if all(_is_number(v) for v in value):
            return
        for entry in value:
            if not isinstance(entry, Mapping) or "value" not in entry or set(entry) - {"filter", "value"}:
                raise PlanError(
                    f"parameter {param!r}: a list must hold numbers (a gradient) or "
                    f"{{filter, value}} entries, got {entry!r}"
                )
            validate_setting(param, entry["value"])
        return
    raise PlanError(f"parameter {param!r}: unsupported value {value!r}")


def resolve(value, name: str, t: float):
    """The value of a setting for one tensor at layer position t.

    Example:
        >>> resolve([0.0, 1.0], "model.layers.3.mlp", t=0.5)
        0.5
        >>> resolve([{"filter": "mlp", "value": 2}, {"value": 1}], "model.layers.3.mlp", t=0)
        2
    """
    if isinstance(value, (list, tuple)):
        if all(_is_number(v) for v in value):
            scaled = t * (len(value) - 1)
            i0 = int(scaled)
            i1 = min(len(value) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * value[i0] + frac * value[i1]
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or f in name:
                return resolve(entry["value"], name, t)
        return None
    return value


def finite_number(param: str, value, where: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise PlanError(f"{where}: parameter {param!r} must be a finite number, got {value!r}")
    return float(value)

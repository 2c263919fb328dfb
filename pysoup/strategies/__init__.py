"""Merge methods. Each strategy is registered under its public name; `get_strategy` looks one up."""

from __future__ import annotations

from pysoup.errors import PlanError
from pysoup.strategies.base import Strategy

_REGISTRY: dict = {}


def register(cls):
    """Class decorator: makes a Strategy subclass available under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str) -> Strategy:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise PlanError(f"unknown strategy {name!r} (valid: {', '.join(sorted(_REGISTRY))})") from None


def strategy_names() -> list:
    return sorted(_REGISTRY)


# Importing the modules registers their strategies.
from pysoup.strategies import (  # noqa: E402,F401
    geometric,
    linear,
    model_stock,
    slerp,
    sparse,
    sparsify,
    task_vector,
    variance,
)

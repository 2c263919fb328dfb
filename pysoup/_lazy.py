"""Package attributes imported on first use (PEP 562's module __getattr__), for pysoup and pysoup.lora."""

from __future__ import annotations

import importlib


def lazy_attributes(namespace: dict, table: dict, fallback=None) -> tuple:
    """(__getattr__, __dir__) for the package whose globals are `namespace`: a name in `table` (name -> module) is
    that module's attribute, imported on first use; `fallback(name)` may find others (None: no such attribute). What
    is found is kept in `namespace`, so later lookups skip __getattr__."""

    def __getattr__(name):
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
        else:
            value = fallback(name) if fallback is not None else None
            if value is None:
                raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(namespace["__all__"]))

    return __getattr__, __dir__

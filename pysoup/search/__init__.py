"""Soups that search and what they use: greedy, learned and LCSC soups, adaptive layer-group ratios (these need
torch), diagnostics and ensembles, and coefficients from metrics (weights.py: MWA, EMA presets).

The searches load on first use: `import pysoup` imports only weights.py from here (a file merge stays light).
"""

_LAZY = {
    "GreedySoupResult": "pysoup.search.greedy",
    "greedy_soup": "pysoup.search.greedy",
    "LcscResult": "pysoup.search.lcsc",
    "lcsc_search": "pysoup.search.lcsc",
    "LayerGroupResult": "pysoup.search.learned",
    "LearnedSoupResult": "pysoup.search.learned",
    "group_ratios": "pysoup.search.learned",
    "layer_group_ratios": "pysoup.search.learned",
    "learned_soup": "pysoup.search.learned",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pysoup.search' has no attribute {name!r}")


__all__ = [
    "GreedySoupResult",
    "LayerGroupResult",
    "LcscResult",
    "LearnedSoupResult",
    "greedy_soup",
    "group_ratios",
    "layer_group_ratios",
    "lcsc_search",
    "learned_soup",
]

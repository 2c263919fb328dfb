"""pysoup: fast, bounded-memory merging of neural-network checkpoints."""

from pysoup import ops  # torch-free until an op runs
from pysoup._version import __version__
from pysoup.api import info, merge, open, plan
from pysoup.engine.execute import NonFiniteWarning
from pysoup.engine.report import MergeReport
from pysoup.errors import BackendError, FormatError, PlanError, SoupError
from pysoup.search import weights


def __getattr__(name):
    # The searches, diagnostics and ensembles need torch: imported on first use, so `import pysoup` stays light.
    lazy = {
        "greedy_soup": "pysoup.search", "learned_soup": "pysoup.search", "lcsc_search": "pysoup.search",
        "layer_group_ratios": "pysoup.search", "diagnose": "pysoup.search.diagnostics",
        "interpolation_curve": "pysoup.search.diagnostics", "ensemble": "pysoup.search.ensembling",
    }  # fmt: skip
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'pysoup' has no attribute {name!r}")


__all__ = [
    "BackendError",
    "FormatError",
    "MergeReport",
    "NonFiniteWarning",
    "PlanError",
    "SoupError",
    "__version__",
    "diagnose",
    "ensemble",
    "greedy_soup",
    "info",
    "interpolation_curve",
    "layer_group_ratios",
    "lcsc_search",
    "learned_soup",
    "merge",
    "open",
    "ops",
    "plan",
    "weights",
]

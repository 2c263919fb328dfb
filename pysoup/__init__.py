"""pysoup: fast, bounded-memory merging of neural-network checkpoints."""

from pysoup import (
    io,  # noqa: F401 - the reader, the writer and io.signals, which every merge and fold needs
    ops,  # torch-free until an op runs
)
from pysoup._lazy import lazy_attributes as _lazy_attributes
from pysoup._version import __version__
from pysoup.errors import BackendError, FormatError, PlanError, SoupError

# pysoup.io loads with the package (no torch, no numpy): the CLI's main() imports io.signals before it installs its
# termination handlers, and a SIGTERM that lands after `import pysoup.cli` must meet those handlers at once, not a
# process still importing (tests/test_robustness.py: "terminated by SIGTERM; nothing was written").

# Imported on first use: the merge API pulls in the engine and every strategy (~0.1 s, more where Python cannot
# cache bytecode), which the commands that do not merge (folding LoRA adapters, inspect, info) never need; the
# searches, diagnostics and ensembles need torch.
_LAZY = {
    "info": "pysoup.api", "merge": "pysoup.api", "open": "pysoup.api", "plan": "pysoup.api",
    "NonFiniteWarning": "pysoup.engine.execute", "MergeReport": "pysoup.engine.report",
    "greedy_soup": "pysoup.search", "learned_soup": "pysoup.search", "lcsc_search": "pysoup.search",
    "layer_group_ratios": "pysoup.search", "diagnose": "pysoup.search.diagnostics",
    "interpolation_curve": "pysoup.search.diagnostics", "ensemble": "pysoup.search.ensembling",
}  # fmt: skip


def _module(name):
    """pysoup.weights (the module pysoup.search.weights: MWA, EMA presets) and the subpackages (pysoup.io,
    pysoup.api, ...: `import pysoup` used to load most of them on the way); None for any other name."""
    import importlib
    import importlib.util

    if name == "weights":
        return importlib.import_module("pysoup.search.weights")
    if not name.startswith("__") and importlib.util.find_spec(f"pysoup.{name}") is not None:
        return importlib.import_module(f"pysoup.{name}")
    return None


__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY, _module)


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

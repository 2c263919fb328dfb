"""pysoup: fast, bounded-memory merging of neural-network checkpoints."""

from pysoup import weights
from pysoup._version import __version__
from pysoup.api import info, merge, open
from pysoup.errors import BackendError, FormatError, PlanError, SoupError
from pysoup.report import MergeReport

__all__ = [
    "BackendError",
    "FormatError",
    "MergeReport",
    "PlanError",
    "SoupError",
    "__version__",
    "info",
    "merge",
    "open",
    "weights",
]

"""mergekit 0.1.5 configs on pysoup's streaming kernels: reading (config.py, methods.py), layer slices and the output's
config.json (slices.py), and the merge a config describes (run.py)."""

from pysoup.mergekit.config import ConfigWarning, MergeSpec, load_config

__all__ = ["ConfigWarning", "MergeSpec", "load_config"]

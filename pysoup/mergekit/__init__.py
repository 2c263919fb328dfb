"""mergekit 0.1.5 configs on pysoup's streaming kernels: reading (config.py, methods.py), layer slices and the output's
config.json (slices.py), and the merge a config describes (run.py)."""

from pysoup.mergekit.config import ConfigWarning, MergeSpec, load_config

__all__ = ["ConfigWarning", "MergeSpec", "load_config", "merge_config"]


def __getattr__(name):
    if name == "merge_config":  # the engine is imported when a merge runs, not when a config is read
        from pysoup.mergekit.run import merge_config

        return merge_config
    raise AttributeError(f"module 'pysoup.mergekit' has no attribute {name!r}")

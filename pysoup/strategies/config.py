"""mergekit YAML configs: moved to pysoup.mergekit (this name stays for existing imports)."""

from pysoup.mergekit.config import ConfigWarning, MergeSpec, load_config

__all__ = ["ConfigWarning", "MergeSpec", "load_config"]

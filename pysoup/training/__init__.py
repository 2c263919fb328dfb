"""Averaging during training: the averaged copies a training loop keeps and updates after each optimizer step.

- `EMA`, `SWA`, `WeightEnsemble` (ZSCL): average.py, on the fused multi-tensor lerp (pysoup.ops.MultiTensorLerp).
"""

from pysoup.training.average import EMA, SWA, WeightEnsemble

__all__ = ["EMA", "SWA", "WeightEnsemble"]

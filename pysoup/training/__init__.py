"""Averaging during training: the averaged copies a training loop keeps and updates after each optimizer step.

- average.py: `EMA`, `SWA`, `WeightEnsemble` (ZSCL's running weight ensemble), on the fused multi-tensor lerp
  (pysoup.ops.MultiTensorLerp).
- offload.py: `OffloadedEMA`, the EMA kept in (pinned) host memory, updated by a host thread from double-buffered
  staging while training goes on.
- experts.py: Experts Weights Averaging (feed-forward blocks as random-uniform-routed experts, the fused share
  step, `collapse_experts`).
- posthoc.py: post-hoc EMA (EDM2): snapshots of power-function EMAs, synthesized for any sigma_rel by one streaming
  merge of the snapshot files.

- sharded.py: the same averages over FSDP2 (DTensor) parameters: each rank its shard; save_sharded/load_sharded.
- callbacks.py: a Hugging Face TrainerCallback and a Lightning Callback running any of the averages.

Importing this package does not import torch; experts.py (nn.Module subclasses) and the callbacks load on first
use.
"""

from pysoup.training.average import EMA, SWA, WeightEnsemble
from pysoup.training.offload import OffloadedEMA
from pysoup.training.posthoc import PostHocEMA, coefficients, fit, gamma_to_sigma_rel, sigma_rel_to_gamma, synthesize

_LAZY = {
    "ExpertsBlock": "pysoup.training.experts",
    "ExpertsWeightsAveraging": "pysoup.training.experts",
    "collapse_experts": "pysoup.training.experts",
    "convert_to_experts": "pysoup.training.experts",
    "experts_blocks": "pysoup.training.experts",
    "AveragingCallback": "pysoup.training.callbacks",
    "LightningAveragingCallback": "pysoup.training.callbacks",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pysoup.training' has no attribute {name!r}")


__all__ = [
    "AveragingCallback",
    "EMA",
    "SWA",
    "ExpertsBlock",
    "ExpertsWeightsAveraging",
    "LightningAveragingCallback",
    "OffloadedEMA",
    "PostHocEMA",
    "WeightEnsemble",
    "coefficients",
    "collapse_experts",
    "convert_to_experts",
    "experts_blocks",
    "fit",
    "gamma_to_sigma_rel",
    "sigma_rel_to_gamma",
    "synthesize",
]

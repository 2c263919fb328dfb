"""Federated and decentralized aggregation, on the engine's fused kernels.

- aggregators.py: the server's aggregators with state: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad and FedAU,
  over state dicts or safetensors files; out of core, the server's memory does not grow with the model or the
  number of clients (updates.py: client updates and their checks; fused_sum.py, optimizer_step.py: the streaming
  passes; server_reference.py: the plain-torch definitions the tests compare with).
- flower.py: `AggregatorStrategy`, a Flower strategy running any of them (FedAU included).
- gossip.py: a gossip node's step with the Vanishing Variance paper's variance correction.
- noloco.py: NoLoCo's outer step (seeded groups, point-to-point) and the DiLoCo all-reduce baseline.
- soft_labels.py: soft labels from crowd annotations (vote shares, Dawid-Skene, MACE) and their average.

Importing this package imports neither torch nor flwr; flower.py and soft_labels.py (numpy) load on first use.
"""

from pysoup.federated.aggregators import (
    Aggregator,
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAU,
    FedAvg,
    FedAvgM,
    FedOpt,
    FedYogi,
)
from pysoup.federated.gossip import GossipStep, gossip_step
from pysoup.federated.noloco import DiLoCo, NoLoCo, noloco_groups, simulate_diloco_step, simulate_outer_step

_LAZY = {
    "AggregatorStrategy": "pysoup.federated.flower",
    **{
        name: "pysoup.federated.soft_labels"
        for name in (
            "vote_counts",
            "vote_shares",
            "softmax_votes",
            "majority_vote",
            "dawid_skene",
            "mace",
            "average_soft_labels",
            "DawidSkeneResult",
            "MaceResult",
        )
    },
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pysoup.federated' has no attribute {name!r}")


__all__ = [
    "Aggregator",
    "AggregatorStrategy",
    "ClientUpdate",
    "DawidSkeneResult",
    "DiLoCo",
    "FedAU",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedYogi",
    "GossipStep",
    "MaceResult",
    "NoLoCo",
    "average_soft_labels",
    "dawid_skene",
    "gossip_step",
    "mace",
    "majority_vote",
    "noloco_groups",
    "simulate_diloco_step",
    "simulate_outer_step",
    "softmax_votes",
    "vote_counts",
    "vote_shares",
]

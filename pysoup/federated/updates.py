"""What a client sends the server, and the checks every aggregator runs on a round's updates before reading data.

A ClientUpdate carries either the client's model after local training (`weights`: what Flower's clients send) or
its change from the global model (`delta` = x_n - x: FedAU's Delta_n), as a state dict of torch tensors, a
safetensors file or a Hugging Face directory. The checks read headers only: ids, example counts, and every tensor's
name, shape and dtype against the global model's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pysoup.errors import PlanError
from pysoup.io.checkpoint import MemoryCheckpoint, open_checkpoint

FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class ClientUpdate:
    """One client's result of a round.

    Args:
        client_id: a str or int naming the client (FedAU keeps its participation history under it).
        weights: the client's model after local training: a state dict of CPU torch tensors, a safetensors file or
            a Hugging Face directory (the form Flower's clients send).
        delta: instead of `weights`, the client's update x_n - x in the same forms (float tensors of any of
            F32, F16, BF16; integer buffers are ignored).
        num_examples: the client's number of training examples, FedAvg's and FedOpt's weight (FedAU ignores it).

    Example:
        >>> ClientUpdate("hospital-3", weights="round7/hospital-3.safetensors", num_examples=1200)  # doctest: +SKIP
    """

    client_id: object
    weights: object = None
    delta: object = None
    num_examples: float = 1

    @property
    def kind(self) -> str:
        """ "weights" or "delta": what this update carries."""
        return "weights" if self.weights is not None else "delta"

    @property
    def model(self):
        return self.weights if self.weights is not None else self.delta


def check_updates(updates) -> str:
    """Checks a round's updates without reading any tensor; returns their kind ("weights" or "delta").

    Raises PlanError on: no updates, an update that is not a ClientUpdate, one with both or neither of weights and
    delta, updates of both kinds in one round, an id that is not a str or int or that comes twice, an example
    count that is negative, not finite or not a number, and counts that total zero.
    """
    if isinstance(updates, ClientUpdate):
        raise PlanError("updates must be a list of ClientUpdate, not one ClientUpdate")
    updates = list(updates)
    if not updates:
        raise PlanError("no client updates: a round needs at least one client")
    seen = set()
    for u in updates:
        if not isinstance(u, ClientUpdate):
            raise PlanError(f"an update is a {type(u).__name__}, not a ClientUpdate")
        cid = u.client_id
        if not isinstance(cid, (str, int)) or isinstance(cid, bool):
            raise PlanError(f"client id {cid!r}: must be a str or an int")
        if cid in seen:
            raise PlanError(f"client {cid!r} sent two updates in one round")
        seen.add(cid)
        if (u.weights is None) == (u.delta is None):
            raise PlanError(f"client {cid!r}: give exactly one of weights= (its model) or delta= (x_n - x)")
        check_count(u.num_examples, f"client {cid!r}: num_examples")
    kinds = {u.kind for u in updates}
    if len(kinds) > 1:
        raise PlanError("a round's updates must all be weights or all be deltas, not both")
    return kinds.pop()


def check_count(value, what: str) -> float:
    """A non-negative finite number (an example count or a given client weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise PlanError(f"{what} must be finite and non-negative, got {value!r}")
    return value


def example_weights(updates, given=None) -> list:
    """Each update's weight: its example count, or `given` (one number per update); their total must be positive."""
    if given is None:
        weights = [u.num_examples for u in updates]
    else:
        given = list(given)
        if len(given) != len(updates):
            raise PlanError(f"{len(given)} client weights for {len(updates)} updates: give one per update")
        weights = [check_count(w, f"client {u.client_id!r}: weight") for u, w in zip(updates, given)]
    if sum(weights) <= 0:
        raise PlanError(f"the client weights {weights} total zero: at least one client must weigh more than zero")
    return weights


def open_round(global_model, updates, kind: str, window_bytes: int) -> tuple:
    """Opens the global model and every update (headers only) and checks them against each other.

    Returns:
        (the global model's Checkpoint, [each update's Checkpoint]); the caller closes them.
    """
    opened = []
    try:
        g = open_checkpoint(global_model, 0, window_bytes)
        g.name = _label(global_model, "the global model")
        opened.append(g)
        if not len(g.table):
            raise PlanError(f"{g.name}: has no tensors")
        for i, u in enumerate(updates):
            c = open_checkpoint(u.model, i + 1, window_bytes)
            c.name = _label(u.model, f"client {u.client_id!r}")
            opened.append(c)
            check_compatible(g, c, kind)
    except BaseException:
        for c in opened:
            c.close()
        raise
    return opened[0], opened[1:]


def _label(source, what: str) -> str:
    if isinstance(source, Mapping):
        return f"{what} (state dict)"
    return f"{what} ({os.fspath(source)})"


def check_compatible(g, c, kind: str) -> None:
    """Every tensor of the global model `g` is in the update `c` with its shape; the update has no other tensor; a
    weights update has each tensor's dtype, a delta update any float dtype for float tensors."""
    gt, ct = g.table, c.table
    if len(ct) != len(gt) or any(ct.find(n) < 0 for n in gt.names()):
        missing = next((n for n in gt.names() if ct.find(n) < 0), None)
        if missing is not None:
            raise PlanError(f"{c.name}: tensor {missing!r} of the global model is missing")
        extra = next(n for n in ct.names() if gt.find(n) < 0)
        raise PlanError(f"{c.name}: tensor {extra!r} is not in the global model")
    for k, name in enumerate(gt.names()):
        r = ct.find(name)
        if ct.shape(r) != gt.shape(k):
            raise PlanError(
                f"{c.name}: tensor {name!r} has shape {list(ct.shape(r))}, the global model {list(gt.shape(k))}"
            )
        gd, cd = gt.dtype(k), ct.dtype(r)
        ok = cd == gd or (kind == "delta" and gd in FLOAT_DTYPES and cd in FLOAT_DTYPES)
        if not ok:
            raise PlanError(f"{c.name}: tensor {name!r} is {cd}, the global model's is {gd}")


def count_nonfinite(ckpt, name: str) -> int:
    """How many NaN or inf values tensor `name` of a checkpoint holds (0 for integer tensors); reads that tensor."""
    dtype = ckpt.infos[name].dtype
    if dtype not in FLOAT_DTYPES:
        return 0
    if isinstance(ckpt, MemoryCheckpoint):
        import torch

        return int((~torch.isfinite(ckpt.tensors[name])).sum())
    import numpy as np

    a = ckpt.numpy(name)
    if dtype == "BF16":  # raw bits: the exponent all ones
        return int(np.count_nonzero((a & 0x7F80) == 0x7F80))
    return int(np.count_nonzero(~np.isfinite(a)))


def nonfinite_error(name: str, global_ckpt, clients, what: str) -> PlanError:
    """The one-line error for a non-finite aggregate of tensor `name`: names the first input holding NaN or inf
    there, else says the aggregate overflowed `what`."""
    for c in [global_ckpt, *clients]:
        n = count_nonfinite(c, name)
        if n:
            return PlanError(f"{c.name}: tensor {name!r} holds {n} NaN or inf values; nothing was written")
    return PlanError(f"tensor {name!r}: {what} overflows to inf (inputs are finite); nothing was written")

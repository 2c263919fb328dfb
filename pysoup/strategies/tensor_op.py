"""What a strategy plans for each output tensor: a TensorOp, and the generic ones (weighted sum, copy).

An op runs on the engine's chunks through a backend's range ops (pysoup.ops.table). One-pass ops implement
`combine`. Ops that need whole-tensor statistics (TIES thresholds, SLERP angles, variances) return a pass count
from `reduce_passes`: the engine streams every chunk through `reduce` that many times (calling `end_pass` after
each; `next_pass` may skip some), then runs the combine pass with the state `begin` made. No pass ever holds a whole
input tensor.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from pysoup.dtypes import SAFETENSORS_SIZES
from pysoup.ops.table import Backend, Batch, Chunk, MomentsSpec


class TensorOp:
    """What one output tensor is computed as. Ops are frozen dataclasses: equal ops are planned once and shared by
    every tensor of the same kind."""

    # Ops whose reduction must pass for every tensor before any output is computed (the sparse soup's mask check).
    verify_first = False
    # One-pass ops that implement combine_batch: the engine hands them runs of small tensors as one Batch.
    batchable = False
    # Elements every chunk but a tensor's last holds a multiple of (ops that work on whole rows, e.g. DELLA's ranks);
    # at most the engine's chunk.
    chunk_align = 1

    def reduce_passes(self, backend: Backend) -> int:
        return 0

    def begin(self, backend: Backend, name: str, numel: int):
        return None

    def reduce(self, backend: Backend, chunk: Chunk, state, pass_: int) -> None:
        raise NotImplementedError

    def end_pass(self, state, pass_: int) -> None:
        pass

    def next_pass(self, backend: Backend, state, pass_: int) -> int:
        """The pass to run after pass_ (ops whose selection can end early skip the passes it no longer needs)."""
        return pass_ + 1

    def combine(self, backend: Backend, chunk: Chunk, state) -> int:
        """Writes chunk.n results at chunk.out; returns how many are not finite."""
        raise NotImplementedError

    def combine_batch(self, backend: Backend, batch: Batch) -> list:
        """Every tensor of a batch (batchable ops); returns [(k, count)] for the tensors with non-finite results."""
        raise NotImplementedError

    def summary(self, state, numel: int):
        """What to keep of a finished tensor's state for the report (None: nothing); the rest is freed."""
        return None

    @classmethod
    def report(cls, summaries: list) -> tuple:
        """The merge report's (stats, notes) from every tensor's summary of this op type: stats a dict of
        numbers, notes lines the command line prints."""
        return {}, []


@dataclass(frozen=True)
class WeightedSum(TensorOp):
    """out = sum_i w_i x_i, divided by sum_i w_i (fp32, input order) when `normalize`."""

    weights: tuple
    normalize: bool

    batchable = True

    def combine(self, backend, chunk, state):
        return backend.weighted_sum_raw(chunk, self.weights, self.normalize)

    def combine_batch(self, backend, batch):
        return backend.weighted_sum_batch(batch, self.weights, self.normalize)


@dataclass(frozen=True)
class Copy(TensorOp):
    """out = the first source, byte for byte (integer buffers such as position ids)."""

    def combine(self, backend, chunk, state):
        ctypes.memmove(chunk.out, chunk.addrs[0], chunk.n * SAFETENSORS_SIZES[chunk.out_dtype])
        return 0


class MomentsOp(TensorOp):
    """An op whose coefficients come from one statistics pass over the tensor (SLERP's angle, model stock's
    cosines, the variance correction): `moments_spec` says what to gather, `end_pass` reads state["moments"]."""

    def moments_spec(self) -> MomentsSpec:
        raise NotImplementedError

    def reduce_passes(self, backend):
        return 1

    def begin(self, backend, name, numel):
        return {"moments": self.moments_spec().zeros()}

    def reduce(self, backend, chunk, state, pass_):
        state["moments"] = backend.moments_raw(chunk, state["moments"])

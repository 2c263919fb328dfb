"""The row- and column-wise forms of the geometric methods: NuSLERP without flattening (mergekit's
nuslerp_flatten=false) and model stock's filter_wise. Each vector (a row, or a column with nuslerp_row_wise) gets
its own coefficients: one statistics pass gathers every vector's squared norms and dot products (fp64, per vector in
element order), numpy turns them into per-vector fp32 coefficients, and one per-vector weighted sum writes the
output. The per-vector state is a few fp64 numbers per row or column, never a copy of a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pysoup.ops.table import Segments
from pysoup.strategies.base import TensorContext
from pysoup.strategies.tensor_op import TensorOp


def segments(ctx: TensorContext, columns: bool) -> Segments:
    """The Segments of a tensor as mergekit's row-wise methods see it: vectors along the last dimension (rows; a 1-D
    tensor is one vector), or with `columns` along the first (torch's transpose(0, -1): element e belongs to vector
    e % (numel / shape[0]); a 1-D tensor is again one vector)."""
    shape = tuple(ctx.shape) or (ctx.numel,)
    if ctx.numel == 0:
        return Segments(1, 0, columns)
    if columns:
        period = ctx.numel // shape[0]
        return Segments(period, period, True)
    return Segments(shape[-1], ctx.numel // shape[-1], False)


def _stats(k: int) -> int:
    return k + k * (k - 1) // 2


def _pair(k: int, i: int, j: int) -> int:
    """The column of <v_i, v_j> (i < j) in a segment_moments row."""
    return k + i * (2 * k - i - 1) // 2 + (j - i - 1)


@dataclass(frozen=True)
class SegmentOp(TensorOp):
    """One per-vector statistics pass over the k vectors (models, minus the base when `base`), then a per-vector
    weighted sum with the coefficients `coefficients(stats)` returns ([count, sources] fp32)."""

    seg: Segments = field(default=None)

    k = 0
    base = False
    around_base = False

    def reduce_passes(self, backend):
        return 1

    def begin(self, backend, name, numel):
        return {"acc": np.zeros((self.seg.count, _stats(self.k)), dtype=np.float64)}

    def reduce(self, backend, chunk, state, pass_):
        state["acc"] = backend.segment_moments_raw(chunk, self.seg, self.base, state["acc"])

    def end_pass(self, state, pass_):
        state["coefficients"] = np.ascontiguousarray(self.coefficients(state.pop("acc")), dtype=np.float32)

    def combine(self, backend, chunk, state):
        return backend.segment_weighted_sum_raw(chunk, self.seg, state["coefficients"], self.around_base)

    def coefficients(self, stats):
        raise NotImplementedError


def nuslerp_rows(t: float, dot, sq0, sq1) -> tuple:
    """geometric.nuslerp_coefficients for every vector at once (numpy, fp64)."""
    n0 = np.maximum(np.sqrt(sq0), 1e-7)
    n1 = np.maximum(np.sqrt(sq1), 1e-7)
    cos = np.clip(dot / (n0 * n1), -1.0, 1.0)
    colinear = 1 - cos * cos <= 1e-16
    theta = np.arccos(np.where(colinear, 0.0, cos))
    s = np.where(colinear, 1.0, np.sin(theta))
    c0 = np.where(colinear, 1.0 - t, np.sin((1 - t) * theta) / s)
    c1 = np.where(colinear, t, np.sin(t * theta) / s)
    return c0, c1


@dataclass(frozen=True)
class RowNuSlerpOp(SegmentOp):
    t: float = 0.5
    has_base: bool = False
    seg: Segments = None

    k = 2

    @property
    def base(self):
        return self.has_base

    @property
    def around_base(self):
        return self.has_base

    def coefficients(self, stats):
        c0, c1 = nuslerp_rows(self.t, stats[:, _pair(2, 0, 1)], stats[:, 0], stats[:, 1])
        return np.stack([c0, c1], axis=1)


def model_stock_rows(k: int, stats):
    """mergekit's model stock ratio per vector: t = k c / (1 + (k - 1) c), c the mean over pairs of
    clamp(<a, b> / max(|a| |b|, 1e-6), -1, 1); t = 0 where |1 + (k - 1) c| < 1e-6."""
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            denom = np.maximum(np.sqrt(stats[:, i]) * np.sqrt(stats[:, j]), 1e-6)
            cos.append(np.clip(stats[:, _pair(k, i, j)] / denom, -1.0, 1.0))
    c = np.mean(np.stack(cos), axis=0)
    denominator = 1 + (k - 1) * c
    singular = np.abs(denominator) < 1e-6
    return np.where(singular, 0.0, k * c / np.where(singular, 1.0, denominator))


@dataclass(frozen=True)
class RowModelStockOp(SegmentOp):
    models: int = 2
    seg: Segments = None

    base = True

    @property
    def k(self):
        return self.models

    def coefficients(self, stats):
        t = model_stock_rows(self.models, stats)
        return np.concatenate([np.repeat((t / self.models)[:, None], self.models, axis=1), (1 - t)[:, None]], axis=1)

"""Before a merge: are the inputs in one low-error basin? Cosines of task vectors, sign agreement, norm ratios,
and the loss along the straight line between two models (the interpolation barrier)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pysoup.search.candidates import PackedModels, score_of


@dataclass
class Diagnosis:
    """per_tensor: {name: {"cosine": mean pairwise cosine of the task vectors, "sign_agreement": fraction of
    entries where every task vector has one sign, "norm_ratio": mean |tau_i| / |reference|}}; overall: the same
    over the whole model (tensors concatenated)."""

    per_tensor: dict
    overall: dict
    pairwise_cosine: list = field(default_factory=list)


def diagnose(candidates, base=None) -> Diagnosis:
    """Task vectors tau_i = theta_i - base (with base=None: theta_i - mean_j theta_j, their spread about the
    average) compared per tensor and overall.

    Example:
        >>> d = diagnose([sd_a, sd_b], base=sd_0); d.overall["cosine"]  # doctest: +SKIP
    """
    import torch

    packed = PackedModels(list(candidates) + ([base] if base is not None else []))
    sds = [packed.state_dict(f) for f in packed.flats]
    ref = sds.pop() if base is not None else None
    k = len(sds)
    names = list(packed.layout)

    def taus(name):
        xs = [sd[name].double().reshape(-1) for sd in sds]
        r = ref[name].double().reshape(-1) if ref is not None else torch.stack(xs).mean(0)
        return [x - r for x in xs], r

    def stats(ts, r):
        norms = [float(t.norm()) for t in ts]
        cos = [
            [float(torch.dot(ts[i], ts[j]) / (norms[i] * norms[j])) if norms[i] and norms[j] else 0.0 for j in range(k)]
            for i in range(k)
        ]
        pairs = [cos[i][j] for i in range(k) for j in range(i + 1, k)]
        signs = torch.stack([torch.sign(t) for t in ts])
        agree = float(((signs == signs[0]).all(0) & (signs[0] != 0)).double().mean()) if ts[0].numel() else 1.0
        rn = float(r.norm())
        return {
            "cosine": sum(pairs) / len(pairs) if pairs else 1.0,
            "sign_agreement": agree,
            "norm_ratio": (sum(norms) / k / rn) if rn else math.inf,
        }, cos

    per_tensor = {}
    all_t, all_r = [[] for _ in range(k)], []
    for n in names:
        ts, r = taus(n)
        per_tensor[n], _ = stats(ts, r)
        for i in range(k):
            all_t[i].append(ts[i])
        all_r.append(r)
    overall, cos = stats([torch.cat(t) for t in all_t], torch.cat(all_r))
    return Diagnosis(per_tensor, overall, cos)


@dataclass
class InterpolationCurve:
    """alphas and scores along theta = (1 - alpha) a + alpha b; barrier = max over alpha of the straight line
    between the end scores minus the score (0 when the path never dips: one basin)."""

    alphas: list
    scores: list
    barrier: float


def interpolation_curve(a, b, evaluate, points: int = 11) -> InterpolationCurve:
    """Scores of evaluate() along the straight line between two models (each point one fused kernel call)."""
    from pysoup.errors import PlanError

    if points < 2:
        raise PlanError(f"points must be at least 2, got {points}")
    packed = PackedModels([a, b], "model")
    out = packed.empty()
    alphas = [i / (points - 1) for i in range(points)]
    scores = []
    for al in alphas:
        packed.combine(packed.flats, [1.0 - al, al], normalize=False, out=out)
        scores.append(score_of(evaluate, packed.state_dict(out), f"alpha={al:.3f}"))
    line = [(1 - al) * scores[0] + al * scores[-1] for al in alphas]
    return InterpolationCurve(alphas, scores, max(0.0, max(on_line - s for on_line, s in zip(line, scores))))

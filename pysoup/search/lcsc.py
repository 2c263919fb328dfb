"""LCSC (Linear Combination of Saved Checkpoints): search coefficients for the checkpoints of one run."""

from __future__ import annotations

from dataclasses import dataclass, field

from pysoup.engine.progress import progress_bar
from pysoup.errors import PlanError
from pysoup.search.candidates import PackedModels, score_of
from pysoup.search.weights import ema


@dataclass
class LcscResult:
    """coefficients: one per checkpoint (may be negative); score; state_dict; history: best score per generation."""

    coefficients: list
    score: float
    state_dict: dict
    history: list = field(default_factory=list)


def lcsc_search(
    checkpoints,
    evaluate,
    *,
    population: int = 16,
    generations: int = 20,
    seed: int = 0,
    sigma: float = 0.1,
    ema_beta: float = 0.9,
    progress=None,
) -> LcscResult:
    """Evolutionary search of theta = sum_i alpha_i theta_i over saved checkpoints (coefficients may be negative).

    Generation 0 holds the uniform average, the EMA preset (`ema_beta`) and the last checkpoint alone; each next
    generation evaluates `population` Gaussian mutations (scale `sigma`, shrinking as 1/sqrt(generation)) of the
    best coefficients so far and keeps the best. Deterministic for a seed. Each candidate soup is one fused
    weighted-sum call per dtype.

    Args:
        checkpoints: state dicts or paths, oldest first.
        evaluate: evaluate(state_dict) -> float, higher is better.
        population: mutations per generation (>= 2).
        generations: number of generations after the first.
        seed: the random seed.

    Returns:
        LcscResult.
    """
    import numpy as np

    if population < 2:
        raise PlanError(f"population must be at least 2, got {population}")
    if generations < 0:
        raise PlanError(f"generations must be >= 0, got {generations}")
    models = PackedModels(checkpoints, "checkpoint")
    k = len(models)
    rng = np.random.default_rng(seed)
    out = models.empty()

    def score(alpha) -> float:
        models.combine(models.flats, [float(a) for a in alpha], normalize=False, out=out)
        return score_of(evaluate, models.state_dict(out), f"coefficients {[round(float(a), 6) for a in alpha]}")

    starts = [np.full(k, 1.0 / k), np.asarray(ema(k, ema_beta)), np.eye(k)[-1]]
    scored = [(score(a), i, a) for i, a in enumerate(starts)]
    best_score, _, best = max(scored, key=lambda t: (t[0], -t[1]))
    history = [best_score]
    bar = progress_bar(generations, progress, desc="LCSC search", unit="generation")
    for g in range(1, generations + 1):
        step = sigma / np.sqrt(g)
        for _ in range(population):
            trial = best + rng.normal(0.0, step, size=k)
            s = score(trial)
            if s > best_score:
                best_score, best = s, trial
        history.append(best_score)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(score=f"{best_score:.4g}")
    if bar is not None:
        bar.close()
    models.combine(models.flats, [float(a) for a in best], normalize=False, out=out)
    return LcscResult([float(a) for a in best], best_score, models.state_dict(out), history)

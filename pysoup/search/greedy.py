"""Greedy soup (Wortsman et al., Model soups): add candidates best-first while the held-out score improves."""

from __future__ import annotations

from dataclasses import dataclass, field

from pysoup.engine.progress import progress_bar
from pysoup.search.candidates import PackedModels, score_of


@dataclass
class GreedySoupResult:
    """state_dict: the soup; members: candidate indices in the order added (the best single model first);
    score: evaluate(state_dict); history: one row per candidate tried; individual: each candidate's own score."""

    state_dict: dict
    members: list
    score: float
    history: list = field(default_factory=list)
    individual: list = field(default_factory=list)


def greedy_soup(candidates, evaluate, *, accept_ties: bool = False, progress=None) -> GreedySoupResult:
    """Greedy soup: sort candidates by their own score, best first; starting from the best, try
    theta = (n theta_soup + theta_c) / (n + 1) for each next candidate and keep it if the score improves
    (or ties, with accept_ties). One pass; never revisited. The result's score is >= the best single model's.

    Each trial is one fused weighted-sum call per dtype over flat buffers (reusing the running soup, so trying
    candidate n costs one pass over two models, not n).

    Args:
        candidates: state dicts or checkpoint paths of one architecture.
        evaluate: evaluate(state_dict) -> float, higher is better (the user's held-out metric).
        accept_ties: keep a candidate whose soup scores exactly the best so far.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        GreedySoupResult.

    Example:
        >>> res = greedy_soup(["ft1.safetensors", "ft2.safetensors"], lambda sd: accuracy(sd))  # doctest: +SKIP
    """
    models = PackedModels(candidates)
    individual = [score_of(evaluate, models.state_dict(f), f"candidate {i}") for i, f in enumerate(models.flats)]
    order = sorted(range(len(models)), key=lambda i: -individual[i])  # stable: ties keep input order
    best = order[0]
    soup = {dt: t.clone() for dt, t in models.flats[best].items()}
    members, score, n = [best], individual[best], 1
    history = [{"index": best, "score": score, "accepted": True}]
    bar = progress_bar(len(order) - 1, progress, desc="greedy soup", unit="candidate")
    trial = models.empty()
    for i in order[1:]:
        trial = models.combine([soup, models.flats[i]], [float(n), 1.0], normalize=True, out=trial)
        s = score_of(evaluate, models.state_dict(trial), f"the soup with candidate {i}")
        accepted = s > score or (accept_ties and s == score)
        history.append({"index": i, "score": s, "accepted": accepted})
        if accepted:
            soup, trial = trial, soup
            members.append(i)
            score, n = s, n + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(members=len(members), score=f"{score:.4g}")
    if bar is not None:
        bar.close()
    return GreedySoupResult(models.state_dict(soup), members, score, history, individual)

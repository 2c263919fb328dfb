"""Prediction averaging: the baseline a soup is compared with (the Model soups paper's ensembles)."""

from __future__ import annotations


def ensemble(models, inputs, weights=None):
    """p(x) = sum_a softmax(v)_a * mean_{i in a} softmax(f_i(x)).

    Args:
        models: callables (e.g. torch modules) returning logits — one tier — or a list of lists of them: groups
            averaged inside, then mixed by softmax(weights) (AWARE-NET's two tiers).
        inputs: the batch given to every model.
        weights: the group logits v (default: equal). With one tier they weigh the models.

    Returns:
        Averaged class probabilities.

    Example:
        >>> probs = ensemble([net_a, net_b], x)   # doctest: +SKIP
    """
    import torch

    from pysoup.errors import PlanError

    if not models:
        raise PlanError("ensemble needs at least one model")
    groups = [list(g) for g in models] if isinstance(models[0], (list, tuple)) else [[m] for m in models]
    v = torch.zeros(len(groups)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if v.numel() != len(groups):
        raise PlanError(f"{v.numel()} weights for {len(groups)} groups")
    mix = torch.softmax(v, 0)
    with torch.no_grad():
        probs = None
        for w, group in zip(mix, groups):
            p = torch.stack([torch.softmax(m(inputs).float(), dim=-1) for m in group]).mean(0)
            probs = w * p if probs is None else probs + w * p
    return probs

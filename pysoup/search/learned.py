"""Soups whose mixing coefficients are trained by gradient descent: the learned soup (Model soups) and the
alignment-tax paper's adaptive layer-group ratios. Only the coefficients train; memory is the k inputs plus
one model."""

from __future__ import annotations

from dataclasses import dataclass, field

from pysoup.errors import PlanError
from pysoup.search.candidates import PackedModels
from pysoup.strategies.params import layer_index


@dataclass
class LearnedSoupResult:
    """coefficients: {tensor name: k mixing weights} (softmax, summing to 1) or one row for all tensors."""

    coefficients: dict
    state_dict: dict
    losses: list = field(default_factory=list)


def _train(params, step_loss, batches, epochs, lr):
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in batches:
            opt.zero_grad()
            loss = step_loss(batch)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            count += 1
        losses.append(total / max(count, 1))
    return losses


def _loss_of(model, soup, loss_fn):
    """batch -> loss_fn(model run with the soup's parameters on the batch's inputs, the batch's targets)."""
    from torch.func import functional_call

    def step_loss(batch):
        inputs, targets = batch if isinstance(batch, (tuple, list)) else (batch, None)
        return loss_fn(functional_call(model, soup(), (inputs,)), targets)

    return step_loss


def learned_soup(
    candidates,
    model,
    loss_fn,
    batches,
    *,
    per_tensor: bool = True,
    epochs: int = 5,
    lr: float = 0.05,
    temperature: float = 1.0,
) -> LearnedSoupResult:
    """Learned soup: theta_l = sum_i softmax(temperature * a_l)_i theta_{i,l}, a initialised uniform (zeros) and
    trained with AdamW (the paper's defaults: lr 0.05, 5 epochs) on loss_fn(model outputs, targets) over
    held-out batches of (inputs, targets).

    Args:
        candidates: state dicts or paths.
        model: a torch.nn.Module of the architecture (its own weights are not used).
        loss_fn: loss_fn(outputs, targets) -> scalar tensor.
        batches: a re-iterable of (inputs, targets).
        per_tensor: one coefficient row per tensor (else one row for the whole model).

    Returns:
        LearnedSoupResult; coefficients sum to 1 per tensor.
    """
    import torch

    packed = PackedModels(candidates)
    k = len(packed)
    sds = [packed.state_dict(f) for f in packed.flats]
    names = list(packed.layout)
    rows = names if per_tensor else ["*"]
    logits = torch.zeros(len(rows), k, requires_grad=True)

    def soup():
        # A sum over the inputs, not a stacked copy: memory stays the k inputs plus one model.
        w = torch.softmax(temperature * logits, dim=1)
        params = {}
        for r, n in enumerate(names):
            row = w[r if per_tensor else 0]
            acc = row[0] * sds[0][n].float()
            for i in range(1, k):
                acc = acc + row[i] * sds[i][n].float()
            params[n] = acc
        params.update(packed.extras)
        return params

    losses = _train([logits], _loss_of(model, soup, loss_fn), batches, epochs, lr)
    with torch.no_grad():
        w = torch.softmax(temperature * logits, dim=1)
        final = {n: t.detach().to(sds[0][n].dtype) for n, t in soup().items()}
    coefficients = {row: w[i].tolist() for i, row in enumerate(rows)}
    return LearnedSoupResult(coefficients, {n: final[n] for n in packed.names}, losses)


@dataclass
class LayerGroupResult:
    """alphas: one ratio per layer group (their mean is mean_alpha); groups: the layer indices of each group."""

    alphas: list
    groups: list
    state_dict: dict
    losses: list = field(default_factory=list)


def group_ratios(a, mean_alpha: float, eps: float):
    """alpha_g = mean_alpha * (sigmoid(a_g) + eps) / mean_j(sigmoid(a_j) + eps): the mean stays mean_alpha.

    Example:
        >>> [round(float(x), 3) for x in group_ratios(torch.tensor([-1.0, 0.0, 1.0]), 0.2, 0.2)]  # doctest: +SKIP
        [0.134, 0.2, 0.266]
    """
    import torch

    s = torch.sigmoid(a) + eps
    return mean_alpha * s / s.mean()


def layer_group_ratios(
    model_a,
    model_b,
    model,
    loss_fn,
    batches,
    *,
    groups: int = 3,
    mean_alpha: float = 0.2,
    eps: float = 0.2,
    epochs: int = 5,
    lr: float = 0.05,
) -> LayerGroupResult:
    """Adaptive model averaging (the alignment-tax paper): theta = (1 - alpha_g) a + alpha_g b, the layers split
    into `groups` contiguous ranges each with its own alpha_g (see group_ratios), tensors outside the layer stack
    at mean_alpha; the a_g are trained on loss_fn over batches.
    """
    import torch

    if groups < 1:
        raise PlanError(f"groups must be >= 1, got {groups}")
    packed = PackedModels([model_a, model_b], "model")
    sa, sb = (packed.state_dict(f) for f in packed.flats)
    names = list(packed.layout)
    layers = sorted({i for i in map(layer_index, names) if i is not None})
    if len(layers) < groups:
        raise PlanError(f"{groups} groups for {len(layers)} layers")
    bounds = [layers[len(layers) * g // groups] for g in range(groups)] + [layers[-1] + 1]
    group_of = {}
    for n in names:
        i = layer_index(n)
        group_of[n] = None if i is None else max(g for g in range(groups) if bounds[g] <= i)
    a = torch.zeros(groups, requires_grad=True)

    def soup():
        alphas = group_ratios(a, mean_alpha, eps)
        params = {}
        for n in names:
            g = group_of[n]
            alpha = torch.tensor(mean_alpha) if g is None else alphas[g]
            params[n] = (1 - alpha) * sa[n].float() + alpha * sb[n].float()
        params.update(packed.extras)
        return params

    losses = _train([a], _loss_of(model, soup, loss_fn), batches, epochs, lr)
    with torch.no_grad():
        alphas = group_ratios(a, mean_alpha, eps).tolist()
        final = {n: t.detach().to(sa[n].dtype) for n, t in soup().items()}
    members = [[i for i in layers if bounds[g] <= i < bounds[g + 1]] for g in range(groups)]
    return LayerGroupResult(alphas, members, {n: final[n] for n in packed.names}, losses)

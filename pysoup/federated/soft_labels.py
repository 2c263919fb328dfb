"""Soft labels from crowd annotations: one probability distribution over the classes per item, from the labels that
several annotators gave it, ready as a training target (rows sum to 1).

The methods are those compared by Wright & Augenstein, "Aggregating Soft Labels from Crowd Annotations Improves
Uncertainty Estimation Under Distribution Shift" (2022; code: copenlu/aggregating-crowd-annotations-ood), whose
point is their plain average (`average_soft_labels`):

- `vote_shares`: each label's share of the item's votes (the paper's "standard" normalisation); with ``alpha > 0``,
  additive (Laplace) smoothing, (count + alpha) / (votes + K alpha).
- `softmax_votes`: softmax of the vote counts (the paper's "softmax"), with a temperature.
- `dawid_skene`: Dawid & Skene (1979): a confusion matrix per annotator and class priors, fitted by EM; the soft
  label is the posterior over the true class.
- `mace`: MACE (Hovy et al. 2013, "Learning Whom to Trust with MACE"): each annotator knows the answer with
  probability theta and otherwise spams labels from a distribution of their own; EM; posterior over the true class.
- `majority_vote`: the hard baseline (ties to the lowest class id).

Annotations are an (items x annotators) integer matrix of class ids, -1 where an annotator did not label an item.
numpy only; everything is deterministic (no random restarts). Both EMs start from the vote shares and stop when no
posterior moves by more than ``tol``.

Example:
    >>> import numpy as np
    >>> a = np.array([[0, 0, 1], [1, -1, 1], [2, 2, -1]])
    >>> vote_shares(a, n_classes=3)[0].round(3).tolist()
    [0.667, 0.333, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pysoup.errors import PlanError

__all__ = [
    "DawidSkeneResult",
    "MaceResult",
    "average_soft_labels",
    "dawid_skene",
    "mace",
    "majority_vote",
    "softmax_votes",
    "vote_counts",
    "vote_shares",
]

# log(0) is -inf; a confusion entry of exactly 0 (an annotator never seen giving l for class k) gets this floor
# instead, so that an item's posterior is exp(-708) rather than NaN when every class has a zero somewhere.
_TINY = np.finfo(np.float64).tiny


@dataclass(frozen=True)
class _Observed:
    """The annotation matrix as triples: item, annotator, label of every annotation (row-major order)."""

    item: np.ndarray
    annotator: np.ndarray
    label: np.ndarray
    n_items: int
    n_annotators: int
    n_classes: int


def _observed(annotations, n_classes: int | None, who: str) -> _Observed:
    a = np.asarray(annotations)
    if a.ndim != 2:
        raise PlanError(f"{who}: annotations must be a 2-D (items x annotators) matrix, got shape {a.shape}")
    if a.size == 0:
        raise PlanError(f"{who}: annotations are empty (shape {a.shape})")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise PlanError(f"{who}: annotations must be integer class ids (or -1 for missing), got non-integers")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise PlanError(f"{who}: annotations must be integer class ids (or -1 for missing), got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if n_classes is None:
        n_classes = int(a.max()) + 1
    elif isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise PlanError(f"{who}: n_classes must be a positive integer, got {n_classes!r}")
    n_classes = int(n_classes)
    bad = np.argwhere((a < -1) | (a >= n_classes))
    if len(bad):
        i, j = (int(v) for v in bad[0])
        raise PlanError(
            f"{who}: annotations[{i}, {j}] = {int(a[i, j])} is outside 0..{n_classes - 1} "
            f"(n_classes {n_classes}; -1 marks a missing annotation); {len(bad)} such entries"
        )
    unlabelled = np.flatnonzero((a >= 0).sum(axis=1) == 0)
    if len(unlabelled):
        raise PlanError(
            f"{who}: item {int(unlabelled[0])} has no annotations ({len(unlabelled)} such items); "
            "drop them or label them first"
        )
    item, annotator = np.nonzero(a >= 0)
    return _Observed(item, annotator, a[item, annotator], a.shape[0], a.shape[1], n_classes)


def _counts(obs: _Observed) -> np.ndarray:
    flat = obs.item * obs.n_classes + obs.label
    return np.bincount(flat, minlength=obs.n_items * obs.n_classes).reshape(obs.n_items, obs.n_classes)


def _normalise_rows(p: np.ndarray) -> np.ndarray:
    return p / p.sum(axis=1, keepdims=True)


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return _normalise_rows(z)


def _sum_per_item(obs: _Observed, values: np.ndarray) -> np.ndarray:
    """(n_obs, K) -> (n_items, K): each item's sum over its annotations, in annotation order (deterministic)."""
    out = np.empty((obs.n_items, values.shape[1]))
    for k in range(values.shape[1]):
        out[:, k] = np.bincount(obs.item, weights=values[:, k], minlength=obs.n_items)
    return out


def _check_tol(who: str, tol, max_iter) -> None:
    if not isinstance(tol, (int, float)) or not tol > 0:
        raise PlanError(f"{who}: tol must be a positive number, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise PlanError(f"{who}: max_iter must be a positive integer, got {max_iter!r}")


def _check_pseudo_count(who: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not value >= 0:
        raise PlanError(f"{who}: {name} must be a number >= 0, got {value!r}")
    return float(value)


# -- counting methods -------------------------------------------------------------------------------------------
def vote_counts(annotations, n_classes: int | None = None) -> np.ndarray:
    """How many annotators gave each item each label.

    Args:
        annotations: (items x annotators) integer class ids, -1 for missing.
        n_classes: the number of classes K; by default the largest label + 1 (pass it when a class may be unused).

    Returns:
        (items x K) int64 counts.

    Example:
        >>> vote_counts([[0, 1, 1], [2, -1, 2]], n_classes=3).tolist()
        [[1, 2, 0], [0, 0, 2]]
    """
    return _counts(_observed(annotations, n_classes, "vote_counts"))


def vote_shares(annotations, n_classes: int | None = None, alpha: float = 0.0) -> np.ndarray:
    """Each label's share of an item's votes, (count + alpha) / (votes + K alpha): alpha 0 is the paper's "standard"
    normalisation, alpha > 0 additive smoothing (no class gets probability 0).

    Args:
        annotations: (items x annotators) integer class ids, -1 for missing.
        n_classes: the number of classes K (default: the largest label + 1).
        alpha: the pseudo-count added to every class, >= 0.

    Returns:
        (items x K) float64 soft labels; rows sum to 1.

    Example:
        >>> vote_shares([[0, 0, 1]], n_classes=3, alpha=1.0).tolist()
        [[0.5, 0.3333333333333333, 0.16666666666666666]]
    """
    alpha = _check_pseudo_count("vote_shares", "alpha", alpha)
    counts = _counts(_observed(annotations, n_classes, "vote_shares"))
    return _normalise_rows(counts + alpha)


def softmax_votes(annotations, n_classes: int | None = None, temperature: float = 1.0) -> np.ndarray:
    """softmax(counts / temperature) per item (the paper's "softmax" at temperature 1): a vote moves probability by
    a factor e^(1/temperature), however many annotators there are, so a class with no votes keeps some mass.

    Args:
        annotations: (items x annotators) integer class ids, -1 for missing.
        n_classes: the number of classes K (default: the largest label + 1).
        temperature: > 0; larger is flatter.

    Returns:
        (items x K) float64 soft labels; rows sum to 1.

    Example:
        >>> softmax_votes([[1, 1]], n_classes=2).round(4).tolist()
        [[0.1192, 0.8808]]
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise PlanError(f"softmax_votes: temperature must be a positive number, got {temperature!r}")
    counts = _counts(_observed(annotations, n_classes, "softmax_votes"))
    return _softmax_rows(counts / float(temperature))


def majority_vote(annotations, n_classes: int | None = None) -> np.ndarray:
    """The most frequent label of each item; a tie goes to the lowest class id (deterministic).

    Args:
        annotations: (items x annotators) integer class ids, -1 for missing.
        n_classes: the number of classes K (default: the largest label + 1).

    Returns:
        (items,) int64 class ids.

    Example:
        >>> majority_vote([[2, 1, 1], [0, 1, -1]]).tolist()
        [1, 0]
    """
    return _counts(_observed(annotations, n_classes, "majority_vote")).argmax(axis=1)


# -- Dawid-Skene ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DawidSkeneResult:
    """What `dawid_skene` fitted.

    soft_labels: (items x K) posterior over each item's true class (rows sum to 1).
    confusion: (annotators x K x K); confusion[j, k, l] = P(annotator j says l | true class k), rows sum to 1 (an
        annotator with no posterior mass on class k gets a uniform row k).
    priors: (K,) class priors.
    iterations: EM iterations run (one = an M-step, then an E-step).
    converged: whether the last iteration moved no posterior by more than tol.
    log_likelihood: log P(annotations) under the returned parameters, before their final E-step.
    """

    soft_labels: np.ndarray
    confusion: np.ndarray
    priors: np.ndarray
    iterations: int
    converged: bool
    log_likelihood: float


def _ds_m_step(obs: _Observed, posterior: np.ndarray, confusion_prior: float):
    K, J = obs.n_classes, obs.n_annotators
    priors = posterior.mean(axis=0)
    flat = obs.annotator * K + obs.label  # (annotator, said label)
    mass = np.empty((J * K, K))
    for k in range(K):  # mass[j*K + l, k] = sum over j's annotations "l" of P(true class k)
        mass[:, k] = np.bincount(flat, weights=posterior[obs.item, k], minlength=J * K)
    counts = mass.reshape(J, K, K).transpose(0, 2, 1) + confusion_prior  # [j, k, l]
    totals = counts.sum(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        confusion = np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), 1.0 / K)
    return priors, confusion


def _ds_e_step(obs: _Observed, priors: np.ndarray, confusion: np.ndarray):
    log_confusion = np.log(np.maximum(confusion, _TINY))
    per_annotation = log_confusion[obs.annotator, :, obs.label]  # (n_obs, K): log P(said label | class k)
    logits = np.log(np.maximum(priors, _TINY)) + _sum_per_item(obs, per_annotation)
    top = logits.max(axis=1, keepdims=True)
    log_likelihood = float(np.sum(top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))))
    return _softmax_rows(logits), log_likelihood


def dawid_skene(
    annotations,
    n_classes: int | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 500,
    confusion_prior: float = 0.0,
) -> DawidSkeneResult:
    """Dawid & Skene (1979) by EM: each annotator j has a confusion matrix pi_j[k, l] = P(j says l | true k), the
    classes have priors p_k, annotators are independent given the true class. Starts from the vote shares (the soft
    majority vote, as Dawid & Skene and crowd-kit do); each iteration re-estimates priors and confusion matrices from
    the current posteriors (M-step), then the posteriors from them (E-step); stops when no posterior moves by more
    than ``tol``. Deterministic.

    Args:
        annotations: (items x annotators) integer class ids, -1 for missing.
        n_classes: the number of classes K (default: the largest label + 1).
        tol: stop when max |posterior change| <= tol.
        max_iter: the most EM iterations.
        confusion_prior: a pseudo-count added to every confusion entry before normalising (0: maximum likelihood,
            as the paper; > 0 keeps a sparse annotator's matrix off exact zeros).

    Returns:
        `DawidSkeneResult` (soft_labels, confusion, priors, iterations, converged, log_likelihood).

    Example:
        >>> a = np.array([[0, 0, 1], [1, 1, 0], [0, 0, 1], [1, 1, 0]])  # two agree, the third always dissents
        >>> r = dawid_skene(a)
        >>> r.soft_labels.argmax(axis=1).tolist(), r.confusion[2].round(3).tolist()
        ([0, 1, 0, 1], [[0.0, 1.0], [1.0, 0.0]])
    """
    _check_tol("dawid_skene", tol, max_iter)
    confusion_prior = _check_pseudo_count("dawid_skene", "confusion_prior", confusion_prior)
    obs = _observed(annotations, n_classes, "dawid_skene")
    posterior = _normalise_rows(_counts(obs).astype(np.float64))
    converged, iterations = False, 0
    while iterations < max_iter:
        iterations += 1
        priors, confusion = _ds_m_step(obs, posterior, confusion_prior)
        new, log_likelihood = _ds_e_step(obs, priors, confusion)
        change = float(np.max(np.abs(new - posterior)))
        posterior = new
        if change <= tol:
            converged = True
            break
    return DawidSkeneResult(posterior, confusion, priors, iterations, converged, log_likelihood)


# -- MACE -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaceResult:
    """What `mace` fitted.

    soft_labels: (items x K) posterior over each item's true class (rows sum to 1).
    competence: (annotators,) theta_j, the probability that annotator j gives the true label rather than spam.
    spam: (annotators x K) the distribution annotator j draws from when spamming.
    iterations, converged: as `DawidSkeneResult`.
    """

    soft_labels: np.ndarray
    competence: np.ndarray
    spam: np.ndarray
    iterations: int
    converged: bool


def _mace_e_step(obs: _Observed, competence: np.ndarray, spam: np.ndarray) -> np.ndarray:
    theta = competence[obs.annotator]
    spam_said = (1.0 - theta) * spam[obs.annotator, obs.label]  # P(spam and this label), the same for every class
    likelihood = np.repeat(spam_said[:, None], obs.n_classes, axis=1)
    likelihood[np.arange(len(theta)), obs.label] += theta  # ... plus P(knows), if the class is the label said
    return _softmax_rows(_sum_per_item(obs, np.log(np.maximum(likelihood, _TINY))))  # uniform prior over classes


def _mace_m_step(obs: _Observed, posterior: np.ndarray, competence: np.ndarray, spam: np.ndarray, smoothing: float):
    theta = competence[obs.annotator]
    spam_said = (1.0 - theta) * spam[obs.annotator, obs.label]
    right = posterior[obs.item, obs.label]  # P(true class = the label said)
    knew = right * theta / np.maximum(theta + spam_said, _TINY)  # E[not spamming]
    J, K = obs.n_annotators, obs.n_classes
    knew_sum = np.bincount(obs.annotator, weights=knew, minlength=J)
    n = np.bincount(obs.annotator, minlength=J)
    new_competence = (knew_sum + smoothing) / (n + 2 * smoothing)
    spam_mass = np.bincount(obs.annotator * K + obs.label, weights=1.0 - knew, minlength=J * K).reshape(J, K)
    spam_mass += smoothing
    totals = spam_mass.sum(axis=1, keepdims=True)
    new_spam = np.where(totals > 0, spam_mass / np.where(totals > 0, totals, 1.0), 1.0 / K)
    return new_competence, new_spam


def mace(
    annotations,
    n_classes: int | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 500,
    smoothing: float = 0.01,
) -> MaceResult:
    """MACE (Hovy, Berg-Kirkpatrick, Vaswani & Hovy, NAACL 2013) by EM: annotator j labels an item correctly with
    probability theta_j and otherwise draws a label from their own spam distribution xi_j; true classes are uniform a
    priori. Deterministic, no random restarts: starts from theta = 0.5 and uniform xi for every annotator (so the first
    posteriors are softmax(counts * ln(K + 1)), a sharpened vote share); stops as `dawid_skene`.

    Args:
        annotations: (items x annotators) integer class ids, -1 for missing.
        n_classes: the number of classes K (default: the largest label + 1).
        tol: stop when max |posterior change| <= tol.
        max_iter: the most EM iterations.
        smoothing: the pseudo-count added to the expected counts of theta and xi (MACE's EM smoothing), >= 0.

    Returns:
        `MaceResult` (soft_labels, competence, spam, iterations, converged).

    Example:
        >>> a = np.array([[0, 0, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]])  # the third annotator always says 1
        >>> r = mace(a)
        >>> r.soft_labels.argmax(axis=1).tolist(), bool(r.competence[2] < 0.5 < r.competence[0])
        ([0, 1, 0, 1], True)
    """
    _check_tol("mace", tol, max_iter)
    smoothing = _check_pseudo_count("mace", "smoothing", smoothing)
    obs = _observed(annotations, n_classes, "mace")
    competence = np.full(obs.n_annotators, 0.5)
    spam = np.full((obs.n_annotators, obs.n_classes), 1.0 / obs.n_classes)
    posterior = _mace_e_step(obs, competence, spam)
    converged, iterations = False, 0
    while iterations < max_iter:
        iterations += 1
        competence, spam = _mace_m_step(obs, posterior, competence, spam, smoothing)
        new = _mace_e_step(obs, competence, spam)
        change = float(np.max(np.abs(new - posterior)))
        posterior = new
        if change <= tol:
            converged = True
            break
    return MaceResult(posterior, competence, spam, iterations, converged)


# -- the average ------------------------------------------------------------------------------------------------
def average_soft_labels(soft_labels: Sequence, weights: Sequence[float] | None = None) -> np.ndarray:
    """The (weighted) mean of several methods' soft labels for the same items: the paper's proposal ("ensemble_basic"
    in its code), sum_m w_m P_m / sum_m w_m, renormalised so that each row sums to 1 in float64.

    Args:
        soft_labels: a sequence of (items x K) arrays (or `DawidSkeneResult` / `MaceResult`), each row a
            distribution.
        weights: one non-negative weight per method, not all 0 (default: equal).

    Returns:
        (items x K) float64 soft labels; rows sum to 1.

    Example:
        >>> average_soft_labels([[[1.0, 0.0]], [[0.5, 0.5]]], weights=[1, 3]).tolist()
        [[0.625, 0.375]]
    """
    who = "average_soft_labels"
    if isinstance(soft_labels, np.ndarray) and soft_labels.ndim == 2:
        raise PlanError(f"{who}: expected a sequence of (items x K) soft-label arrays, got one array")
    arrays = [np.asarray(getattr(p, "soft_labels", p), dtype=np.float64) for p in soft_labels]
    if not arrays:
        raise PlanError(f"{who}: no soft labels to average")
    shape = arrays[0].shape
    for m, p in enumerate(arrays):
        if p.ndim != 2 or p.shape != shape:
            raise PlanError(f"{who}: soft labels {m} have shape {p.shape}, soft labels 0 {shape}; all must be equal")
        if not np.all(np.isfinite(p)) or np.any(p < 0):
            raise PlanError(f"{who}: soft labels {m} have negative or non-finite entries")
        worst = float(np.max(np.abs(p.sum(axis=1) - 1.0))) if p.size else 0.0
        if worst > 1e-6:
            raise PlanError(f"{who}: soft labels {m} have a row summing to 1 {worst:+.3g}; rows must be distributions")
    if weights is None:
        w = np.full(len(arrays), 1.0 / len(arrays))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(arrays),):
            raise PlanError(f"{who}: {w.size} weights for {len(arrays)} soft labels")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise PlanError(f"{who}: weights must be finite, >= 0 and not all 0, got {w.tolist()}")
        w = w / w.sum()
    out = np.zeros(shape)
    for wm, p in zip(w, arrays):
        out += wm * p
    return _normalise_rows(out)

"""Soft labels from crowd annotations (pysoup.federated.soft_labels): the counting methods exactly, Dawid-Skene and
MACE on cases worked out by hand, the planted parameters of a simulated crowd recovered, the average, and one line
per bad input."""

import numpy as np
import pytest

from pysoup.errors import PlanError
from pysoup.federated.soft_labels import (
    average_soft_labels,
    dawid_skene,
    mace,
    majority_vote,
    softmax_votes,
    vote_counts,
    vote_shares,
)

# 4 items, 3 annotators, 3 classes; -1 = not labelled.
CROWD = np.array([[0, 0, 1], [2, -1, 2], [1, 2, -1], [-1, -1, 0]])


def simulated_crowd(n_items=1500, n_classes=3, seed=0):
    """Five annotators with planted confusion matrices (accuracy 0.9, 0.8, 0.6, a constant, an adversary who shifts
    every label by one), 20% of annotations missing."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(n_classes, size=n_items)
    eye = np.eye(n_classes)
    off = (1 - eye) / (n_classes - 1)
    confusions = [0.9 * eye + 0.1 * off, 0.8 * eye + 0.2 * off, 0.6 * eye + 0.4 * off]
    confusions.append(np.tile(np.eye(n_classes)[0], (n_classes, 1)))
    confusions.append(np.roll(eye, 1, axis=1))
    a = np.empty((n_items, len(confusions)), dtype=np.int64)
    for j, c in enumerate(confusions):
        u = rng.random(n_items)[:, None]
        a[:, j] = (u > np.cumsum(c[truth], axis=1)).sum(axis=1)
    a[rng.random(a.shape) < 0.2] = -1
    a[:, 0] = np.where((a >= 0).sum(axis=1) == 0, truth, a[:, 0])  # every item keeps one annotation
    return a, truth, np.stack(confusions)


# -- counting methods, exactly ------------------------------------------------------------------------------------
def test_vote_counts_and_shares_exact():
    assert vote_counts(CROWD, 3).tolist() == [[2, 1, 0], [0, 0, 2], [0, 1, 1], [1, 0, 0]]
    shares = vote_shares(CROWD, 3)
    np.testing.assert_array_equal(shares, [[2 / 3, 1 / 3, 0], [0, 0, 1], [0, 0.5, 0.5], [1, 0, 0]])
    smoothed = vote_shares(CROWD, 3, alpha=0.5)  # (count + 0.5) / (votes + 1.5)
    np.testing.assert_allclose(smoothed[0], [2.5 / 4.5, 1.5 / 4.5, 0.5 / 4.5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(smoothed[3], [1.5 / 2.5, 0.5 / 2.5, 0.5 / 2.5], rtol=0, atol=1e-15)
    assert vote_counts(CROWD).shape == (4, 3)  # n_classes inferred: the largest label + 1
    assert vote_shares(CROWD, 5).shape == (4, 5)  # an unused class keeps its column


def test_softmax_votes_exact():
    e = np.e
    np.testing.assert_allclose(softmax_votes(CROWD, 3)[0], np.array([e**2, e, 1]) / (e**2 + e + 1), atol=1e-15)
    np.testing.assert_allclose(softmax_votes(CROWD, 3, temperature=2.0)[1], np.array([1, 1, e]) / (2 + e), atol=1e-15)


def test_majority_vote_ties_to_lowest_class():
    assert majority_vote(CROWD, 3).tolist() == [0, 2, 1, 0]


# -- Dawid-Skene on cases worked out by hand ------------------------------------------------------------------------
def test_dawid_skene_perfect_and_adversarial_annotator():
    """Two annotators, 2 classes: A is perfect and labels items 0-3; B is adversarial (always the other class) and
    labels only items 2 and 3, where A and B disagree.

        item   0  1  2  3
        A      0  1  0  1
        B      -  -  1  0

    Start: the vote shares; P(truth) is q = 1 on items 0-1 (one vote each) and p = 1/2 on items 2-3 (a tie).
    M-step from (q, p): priors (1/2, 1/2) by symmetry. Annotator A's row 0 collects q (item 0, says 0) + (1 - q)
    (item 1, says 1) + p (item 2, says 0) + (1 - p) (item 3, says 1), total 2, so A = [[a, 1-a], [1-a, a]] with
    a = (q + p) / 2. B's row 0 collects p (item 2, says 1) and 1 - p (item 3, says 0): B = [[1-p, p], [p, 1-p]].
    E-step: item 0: a·1/2 against (1-a)·1/2, so q' = a; item 2 (A says 0, B says 1): class 0 a·p, class 1
    (1-a)(1-p), so p' = a p / (a p + (1-a)(1-p)).

    Iteration 1: a = 3/4, A = [[.75, .25], [.25, .75]], B = [[.5, .5], [.5, .5]]; q = 3/4, p = 3/4.
    Iteration 2: a = 3/4, B = [[.25, .75], [.75, .25]]; q = 3/4, p = .5625 / .625 = 9/10.
    Fixed point q = p = 1: A the identity, B the swap; the adversary's labels end up as informative as A's.
    """
    a = np.array([[0, -1], [1, -1], [0, 1], [1, 0]])
    truth = np.array([0, 1, 0, 1])

    r1 = dawid_skene(a, 2, max_iter=1)
    np.testing.assert_allclose(r1.confusion[0], [[0.75, 0.25], [0.25, 0.75]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r1.confusion[1], [[0.5, 0.5], [0.5, 0.5]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r1.priors, [0.5, 0.5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r1.soft_labels[np.arange(4), truth], [0.75] * 4, rtol=0, atol=1e-15)
    assert r1.iterations == 1 and not r1.converged

    r2 = dawid_skene(a, 2, max_iter=2)
    np.testing.assert_allclose(r2.confusion[1], [[0.25, 0.75], [0.75, 0.25]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r2.soft_labels[np.arange(4), truth], [0.75, 0.75, 0.9, 0.9], rtol=0, atol=1e-15)

    q, p = 1.0, 0.5  # the recursion above, run further
    for t in range(1, 7):
        aa = (q + p) / 2
        q, p = aa, aa * p / (aa * p + (1 - aa) * (1 - p))
        r = dawid_skene(a, 2, max_iter=t)
        np.testing.assert_allclose(r.soft_labels[np.arange(4), truth], [q, q, p, p], rtol=0, atol=1e-12)

    final = dawid_skene(a, 2, tol=1e-10, max_iter=200)
    assert final.converged
    np.testing.assert_allclose(final.soft_labels, np.eye(2)[truth], atol=1e-9)
    np.testing.assert_allclose(final.confusion[0], np.eye(2), atol=1e-9)
    np.testing.assert_allclose(final.confusion[1], [[0, 1], [1, 0]], atol=1e-9)


def test_dawid_skene_perfect_and_constant_annotator_stays_at_the_vote():
    """Two annotators, 2 classes: A perfect, B says 0 whatever the item (no information). Start: items where A says
    0 have P(class 0) = 1 (two votes for 0), items where A says 1 have 1/2 (a tie).
    M-step: priors (3/4, 1/4); A = [[2/3, 1/3], [0, 1]] (row 0 collects 1 + 1 on "0" and 1/2 + 1/2 on "1");
    B = [[1, 0], [1, 0]]. E-step: A says 1: class 0 3/4·1/3·1 = 1/4, class 1 1/4·1·1 = 1/4: still 1/2; A says 0:
    class 1 has A[1, 0] = 0: still 1. So the vote shares are a fixed point, reached after one iteration. Dawid-Skene
    cannot do better: this fit's likelihood, 2^-4, equals that of "A is right" (priors 1/2, A the identity), so the
    data do not say which of the two explanations holds."""
    a = np.array([[0, 0], [1, 0], [0, 0], [1, 0]])
    r = dawid_skene(a, 2)
    assert r.converged and r.iterations == 1
    np.testing.assert_allclose(r.soft_labels, vote_shares(a, 2), rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.priors, [0.75, 0.25], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.confusion[0], [[2 / 3, 1 / 3], [0, 1]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.confusion[1], [[1, 0], [1, 0]], rtol=0, atol=1e-15)
    assert r.log_likelihood == pytest.approx(4 * np.log(0.5), abs=1e-12)


def test_dawid_skene_two_right_one_adversary_cubes_the_odds():
    """Three annotators label every item: A and B perfect, C always wrong (2 classes). The vote gives the truth
    p = 2/3. With P(truth) = p on every item, each M-step gives A = B = [[p, 1-p], [1-p, p]] and C the same matrix
    with its columns swapped, priors 1/2; the E-step's odds of the truth are then (p / (1-p))^3: the odds go 2, 8,
    512, 2^27, ..."""
    a = np.array([[0, 0, 1], [1, 1, 0], [0, 0, 1], [1, 1, 0]])
    truth = np.array([0, 1, 0, 1])
    odds = 2.0
    for t in range(1, 4):
        odds = odds**3
        r = dawid_skene(a, 2, max_iter=t)
        np.testing.assert_allclose(r.soft_labels[np.arange(4), truth], odds / (1 + odds), rtol=0, atol=1e-15)
    np.testing.assert_allclose(dawid_skene(a, 2, max_iter=1).confusion[2], [[1 / 3, 2 / 3], [2 / 3, 1 / 3]], atol=1e-15)


def test_dawid_skene_recovers_a_simulated_crowd():
    a, truth, confusions = simulated_crowd()
    r = dawid_skene(a, 3)
    assert r.converged
    assert np.max(np.abs(r.confusion - confusions)) < 0.06
    ds_accuracy = float(np.mean(r.soft_labels.argmax(axis=1) == truth))
    vote_accuracy = float(np.mean(majority_vote(a, 3) == truth))
    assert ds_accuracy > vote_accuracy + 0.1  # the adversary and the constant annotator mislead the vote
    again = dawid_skene(a, 3)
    np.testing.assert_array_equal(again.soft_labels, r.soft_labels)  # deterministic, bit for bit


def test_mace_finds_the_spammer():
    a, truth, _ = simulated_crowd(n_items=600, seed=1)
    a = a[:, :4]  # three honest annotators and the constant one (MACE has no notion of an adversary)
    a[:, 0] = np.where((a >= 0).sum(axis=1) == 0, truth, a[:, 0])
    r = mace(a, 3)
    assert r.converged
    assert r.competence[3] < 0.1 and r.competence[0] > 0.8
    assert r.competence[0] > r.competence[1] > r.competence[2] > r.competence[3]
    assert r.spam[3, 0] > 0.95  # it spams class 0
    assert float(np.mean(r.soft_labels.argmax(axis=1) == truth)) > float(np.mean(majority_vote(a, 3) == truth))
    np.testing.assert_array_equal(mace(a, 3).soft_labels, r.soft_labels)


def test_every_method_gives_distributions():
    a, _, _ = simulated_crowd(n_items=300, seed=2)
    methods = {
        "votes": vote_shares(a, 3),
        "smoothed": vote_shares(a, 3, alpha=1.0),
        "softmax": softmax_votes(a, 3),
        "dawid_skene": dawid_skene(a, 3).soft_labels,
        "mace": mace(a, 3).soft_labels,
    }
    methods["average"] = average_soft_labels(list(methods.values()))
    for name, p in methods.items():
        assert p.shape == (300, 3) and p.dtype == np.float64, name
        assert np.all(p >= 0), name
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12, err_msg=name)


def test_average_soft_labels():
    p1 = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    p2 = np.array([[0.0, 0.5, 0.5], [0.6, 0.3, 0.1]])
    np.testing.assert_allclose(average_soft_labels([p1, p2]), (p1 + p2) / 2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(average_soft_labels([p1, p2], weights=[3, 1]), 0.75 * p1 + 0.25 * p2, atol=1e-15)
    np.testing.assert_array_equal(average_soft_labels([p1, p2], weights=[1, 0]), p1)
    r = dawid_skene(CROWD, 3)
    np.testing.assert_allclose(
        average_soft_labels([r, vote_shares(CROWD, 3)]), (r.soft_labels + vote_shares(CROWD, 3)) / 2, atol=1e-15
    )


def test_docstring_examples():
    import doctest

    import pysoup.federated.soft_labels as module

    result = doctest.testmod(module)
    assert result.attempted >= 10 and result.failed == 0


# -- bad inputs: one line each --------------------------------------------------------------------------------------
BAD = [
    ("label out of range", lambda: vote_shares([[0, 3]], n_classes=3), "annotations[0, 1] = 3 is outside 0..2"),
    ("label below -1", lambda: dawid_skene([[0, -2]], n_classes=2), "annotations[0, 1] = -2 is outside 0..1"),
    ("item with no annotations", lambda: mace([[0, 1], [-1, -1]], n_classes=2), "item 1 has no annotations"),
    ("negative alpha", lambda: vote_shares(CROWD, 3, alpha=-0.5), "alpha must be a number >= 0, got -0.5"),
    ("one-dimensional", lambda: majority_vote([0, 1, 1]), "must be a 2-D (items x annotators) matrix"),
    ("fractional labels", lambda: vote_counts([[0.5, 1.0]]), "must be integer class ids"),
    ("string labels", lambda: vote_counts([["a", "b"]]), "must be integer class ids"),
    ("zero classes", lambda: vote_counts(CROWD, 0), "n_classes must be a positive integer, got 0"),
    ("zero temperature", lambda: softmax_votes(CROWD, 3, temperature=0), "temperature must be a positive number"),
    ("zero tol", lambda: dawid_skene(CROWD, 3, tol=0), "tol must be a positive number"),
    ("negative confusion prior", lambda: dawid_skene(CROWD, 3, confusion_prior=-1), "confusion_prior must be"),
    ("negative smoothing", lambda: mace(CROWD, 3, smoothing=-1), "smoothing must be a number >= 0"),
    ("average of nothing", lambda: average_soft_labels([]), "no soft labels to average"),
    ("average of one array", lambda: average_soft_labels(np.eye(2)), "got one array"),
    ("average, shapes differ", lambda: average_soft_labels([np.eye(2), np.eye(3)]), "have shape (3, 3)"),
    ("average, not distributions", lambda: average_soft_labels([np.ones((2, 2))]), "row summing to 1 +1"),
    ("average, negative weight", lambda: average_soft_labels([np.eye(2)] * 2, weights=[1, -1]), "weights must be"),
    ("average, weight count", lambda: average_soft_labels([np.eye(2)] * 2, weights=[1]), "1 weights for 2"),
]


@pytest.mark.parametrize("call, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(call, expected):
    with pytest.raises(PlanError) as info:
        call()
    message = str(info.value)
    assert expected in message and "\n" not in message

"""Soups that search: greedy, LCSC, learned, layer-group ratios; diagnostics; ensembles."""

import math

import pytest
import torch
from helpers.checkpoints import save_st
from helpers.tensors import assert_bit_equal

import pysoup
from pysoup.errors import PlanError
from pysoup.ops import reference


def vectors(*rows, dtype=torch.float32):
    return [
        {"w": torch.tensor(r, dtype=dtype), "step": torch.tensor([i], dtype=torch.int64)} for i, r in enumerate(rows)
    ]


def closeness(target):
    t = torch.tensor(target, dtype=torch.float64)
    return lambda sd: -float(((sd["w"].double() - t) ** 2).sum())


def test_greedy_soup_by_construction():
    target = [1.0, 1.0, 1.0]
    cands = vectors([1.2, 0.9, 1.0], [0.8, 1.1, 1.0], [5.0, -3.0, 2.0], [1.0, 1.3, 0.6])
    res = pysoup.greedy_soup(cands, closeness(target))
    assert res.members[0] == max(range(4), key=lambda i: res.individual[i])
    assert res.score >= max(res.individual)
    assert res.score == closeness(target)(res.state_dict)
    assert 2 not in res.members  # the outlier never helps
    accepted = [h for h in res.history if h["accepted"]]
    assert [h["index"] for h in accepted] == res.members
    assert all(a["score"] < b["score"] for a, b in zip(accepted, accepted[1:]))
    assert {h["index"] for h in res.history} == set(range(4))
    assert torch.equal(res.state_dict["step"], cands[0]["step"])  # non-float tensors come from the first


def test_greedy_soup_follows_the_running_formula(tmp_path):
    """When every candidate is accepted, the soup is (n soup + c) / (n + 1) step by step, in the inputs' dtype."""
    rows = [[0.3, -1.25, 2.0], [0.1, -1.0, 2.5], [0.5, -1.5, 1.5]]
    cands = vectors(*rows, dtype=torch.bfloat16)
    paths = [save_st(tmp_path / f"c{i}.safetensors", {"w": c["w"], "step": c["step"]}) for i, c in enumerate(cands)]
    res = pysoup.greedy_soup(paths, lambda sd: 1.0, accept_ties=True)  # every soup ties: all accepted
    assert res.members == [0, 1, 2]
    soup = cands[0]["w"]
    for n, i in enumerate(res.members[1:], start=1):
        soup = reference.weighted_sum([soup, cands[i]["w"]], [float(n), 1.0], torch.bfloat16, True)
    assert_bit_equal(res.state_dict["w"], soup)
    rejected = pysoup.greedy_soup(paths, lambda sd: 1.0)  # ties are not accepted by default
    assert rejected.members == [0]


def test_greedy_soup_bad_input():
    with pytest.raises(PlanError, match="no candidates"):
        pysoup.greedy_soup([], lambda sd: 0.0)
    with pytest.raises(PlanError, match="candidate 1: tensor 'w' has shape"):
        pysoup.greedy_soup([{"w": torch.ones(3)}, {"w": torch.ones(4)}], lambda sd: 0.0)
    with pytest.raises(PlanError, match="candidate 1: tensor 'w' is missing"):
        pysoup.greedy_soup([{"w": torch.ones(3)}, {"v": torch.ones(3)}], lambda sd: 0.0)

    def flaky(sd):
        if float(sd["w"][0]) == 2.0:
            raise RuntimeError("out of memory")
        return 0.0

    with pytest.raises(PlanError, match=r"evaluate\(\) raised on candidate 1: RuntimeError: out of memory"):
        pysoup.greedy_soup(vectors([1.0], [2.0]), flaky)
    with pytest.raises(PlanError, match=r"evaluate\(\) returned nan on candidate 0"):
        pysoup.greedy_soup(vectors([1.0], [2.0]), lambda sd: math.nan)


def test_lcsc_reproducible_and_extrapolates():
    # The best combination, 2 * last - first, lies outside the simplex: it needs a negative coefficient.
    cands = vectors([0.0, 0.0], [0.5, 0.25], [1.0, 0.5])
    evaluate = closeness([2.0, 1.0])
    a = pysoup.lcsc_search(cands, evaluate, population=8, generations=30, seed=3, sigma=0.5)
    b = pysoup.lcsc_search(cands, evaluate, population=8, generations=30, seed=3, sigma=0.5)
    assert a.coefficients == b.coefficients and a.score == b.score
    uniform = evaluate({"w": sum(c["w"] for c in cands) / 3})
    assert a.score > uniform and a.score == evaluate(a.state_dict)
    assert min(a.coefficients) < 0
    assert a.history == sorted(a.history) and len(a.history) == 31
    with pytest.raises(PlanError, match="population must be at least 2"):
        pysoup.lcsc_search(cands, evaluate, population=1)


def _tiny_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def test_learned_soup_coefficients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 2))
    good = {"0.weight": torch.tensor([[-3.0, 0, 0, 0, 0], [3.0, 0, 0, 0, 0]]), "0.bias": torch.zeros(2)}
    bad = {"0.weight": -good["0.weight"], "0.bias": torch.zeros(2)}
    res = pysoup.learned_soup([bad, good], model, torch.nn.functional.cross_entropy, _tiny_task(), epochs=5, lr=0.5)
    for row in res.coefficients.values():
        assert sum(row) == pytest.approx(1.0)
    assert res.coefficients["0.weight"][1] > 0.6  # moved toward the model that fits
    assert res.coefficients["0.bias"] == pytest.approx([0.5, 0.5])  # equal biases: no gradient
    assert res.losses[-1] < res.losses[0]
    one = pysoup.learned_soup(
        [bad, good], model, torch.nn.functional.cross_entropy, _tiny_task(), per_tensor=False, epochs=1
    )
    assert list(one.coefficients) == ["*"] and sum(one.coefficients["*"]) == pytest.approx(1.0)


def test_layer_group_ratios():
    from pysoup.search import group_ratios

    assert [round(float(v), 3) for v in group_ratios(torch.tensor([-1.0, 0.0, 1.0]), 0.2, 0.2)] == [0.134, 0.2, 0.266]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(5, 5) for _ in range(3)])
            self.head = torch.nn.Linear(5, 2)

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.head(x)

    torch.manual_seed(1)
    a, b = Net().state_dict(), Net().state_dict()
    res = pysoup.layer_group_ratios(a, b, Net(), torch.nn.functional.cross_entropy, _tiny_task(), groups=3, epochs=2)
    assert len(res.alphas) == 3 and sum(res.alphas) / 3 == pytest.approx(0.2)
    assert res.groups == [[0], [1], [2]]
    alpha0 = res.alphas[0]
    want = (1 - alpha0) * a["layers.0.weight"] + alpha0 * b["layers.0.weight"]
    torch.testing.assert_close(res.state_dict["layers.0.weight"], want)
    torch.testing.assert_close(res.state_dict["head.bias"], 0.8 * a["head.bias"] + 0.2 * b["head.bias"])


def test_diagnose():
    base = {"w": torch.zeros(4)}
    same = pysoup.diagnose([{"w": torch.tensor([1.0, -2, 3, 1])}] * 2, base=base)
    assert same.overall["cosine"] == pytest.approx(1.0) and same.overall["sign_agreement"] == 1.0
    opposite = pysoup.diagnose(
        [{"w": torch.tensor([1.0, -2, 3, 1])}, {"w": torch.tensor([-1.0, 2, -3, -1])}], base={"w": torch.ones(4) * 0.5}
    )
    assert "w" in opposite.per_tensor and opposite.per_tensor["w"]["cosine"] < 0
    assert opposite.pairwise_cosine[0][0] == pytest.approx(1.0)


def test_interpolation_curve():
    a, b = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}
    flat = pysoup.interpolation_curve(a, b, lambda sd: float(sd["w"][0]), points=5)
    assert flat.alphas == [0, 0.25, 0.5, 0.75, 1.0] and flat.scores == [0, 0.5, 1.0, 1.5, 2.0] and flat.barrier == 0
    bowl = pysoup.interpolation_curve(a, b, lambda sd: float((sd["w"][0] - 1) ** 2), points=3)  # 1, 0, 1
    assert bowl.barrier == pytest.approx(1.0)
    with pytest.raises(PlanError, match="points must be at least 2"):
        pysoup.interpolation_curve(a, b, lambda sd: 0.0, points=1)


def test_ensemble_is_the_mean_of_predictions():
    torch.manual_seed(0)
    nets = [torch.nn.Linear(4, 3) for _ in range(3)]
    x = torch.randn(6, 4)
    with torch.no_grad():
        want = torch.stack([torch.softmax(n(x), -1) for n in nets]).mean(0)
    torch.testing.assert_close(pysoup.ensemble(nets, x), want)
    two_tier = pysoup.ensemble([[nets[0], nets[1]], [nets[2]]], x, weights=[0.0, math.log(3.0)])
    with torch.no_grad():
        g0 = torch.stack([torch.softmax(n(x), -1) for n in nets[:2]]).mean(0)
        want = 0.25 * g0 + 0.75 * torch.softmax(nets[2](x), -1)
    torch.testing.assert_close(two_tier, want)
    with pytest.raises(PlanError, match="at least one model"):
        pysoup.ensemble([], x)

"""The sparsified task-vector methods (pysoup.strategies.sparsify): breadcrumbs, breadcrumbs_ties, della,
della_linear, sce, ram, ramplus_tl.

Per method: a worked example on tiny tensors (numbers computed here with numpy, from the formulas in
docs/methods.md); the cpu backend equal to the reference bit for bit; and agreement with mergekit 0.1.5 (run
in-process, computing in fp32) on tiny Llama models written by transformers, every tensor compared. The deterministic
methods agree within fp32 rounding (mergekit rounds w_i * tau_i before summing where pysoup fuses it, and sums its
norms in fp32 where pysoup sums in fp64); DELLA draws its own random masks, so it is compared in distribution: the
fraction kept per row rank and the L1 ratio, against two mergekit seeds.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pysoup
from pysoup.ops import get_backend

METHODS = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl")


# -- tiny real models --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A base Llama (hidden 32, 2 layers) and three fine-tunes: fp32 noise of different sizes on every weight, some
    entries left exactly equal to the base (RAM counts the models that change an entry)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("sparsify")
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    base = str(root / "base")
    model.save_pretrained(base)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = []
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        with torch.no_grad():
            for k, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g) * (0.02 * (i + 1))
                keep = torch.rand(p.shape, generator=g) < 0.7  # 30% of the entries unchanged
                p.copy_(sd[k] + torch.where(keep, noise, torch.zeros_like(noise)))
        path = str(root / f"ft{i}")
        model.save_pretrained(path)
        fts.append(path)
    return base, fts


def tensors(path: str) -> dict:
    return load_file(os.path.join(path, "model.safetensors"))


_MK_CACHE: dict = {}


def mergekit_merge(tmp_path_factory, method, base, fts, params=None, model_params=None, seed=None) -> dict:
    """mergekit 0.1.5's merge of the same config, in-process, in fp32 (cached per module run)."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    key = repr((method, params, model_params, seed))
    if key in _MK_CACHE:
        return _MK_CACHE[key]
    cfg = {
        "merge_method": method,
        "base_model": base,
        "dtype": "float32",
        "parameters": dict(params or {}),
        "models": [{"model": m, "parameters": dict(model_params or {})} for m in fts],
    }
    out = str(tmp_path_factory.mktemp("mk"))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed)
    run_merge(MergeConfiguration.model_validate(cfg), out, options)
    result = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            result.update(load_file(os.path.join(out, f)))
    _MK_CACHE[key] = result
    return result


def ours(method, base, fts, params=None, model_params=None, backend="cpu") -> dict:
    return pysoup.merge(
        list(fts),
        strategy=method,
        base=base,
        params=dict(params or {}),
        model_params=[dict(model_params or {}) for _ in fts],
        backend=backend,
    )


def magnitudes(base, fts) -> dict:
    """Per entry, the largest |value| among the base and the models: the scale at which fp32 rounding errs."""
    out = {k: v.abs() for k, v in tensors(base).items()}
    for f in fts:
        for k, v in tensors(f).items():
            out[k] = torch.maximum(out[k], v.abs())
    return out


def assert_within_rounding(mine: dict, theirs: dict, scale: dict, ulps: int = 4):
    """Every tensor within `ulps` fp32 ulps of the inputs' magnitude (a difference in the order of the rounded
    operations errs at the scale of the operands, not of a result that cancels to near 0)."""
    assert set(mine) == set(theirs)
    for k in theirs:
        a, b = mine[k].float(), theirs[k].float()
        tol = ulps * torch.finfo(torch.float32).eps * torch.maximum(scale[k], torch.maximum(a.abs(), b.abs()))
        bad = (a - b).abs() > tol
        assert not bool(bad.any()), f"{k}: {int(bad.sum())} of {a.numel()} beyond {ulps} ulp, max {(a - b).abs().max()}"


DETERMINISTIC = [
    ("breadcrumbs", {}, {"density": 0.5, "gamma": 0.05, "weight": 0.7}),
    ("breadcrumbs", {"rescale": True, "lambda": 0.9}, {"density": 0.3, "weight": 1.0, "gamma": 0.0}),
    ("breadcrumbs_ties", {}, {"density": 0.4, "gamma": 0.1, "weight": 0.5}),
    ("breadcrumbs_ties", {"normalize": True}, {"density": 0.6, "weight": 0.4}),
    ("sce", {}, {}),
    ("sce", {"select_topk": 0.3}, {}),
    ("ram", {}, {}),
    ("ram", {"epsilon": 0.01}, {}),
    ("ramplus_tl", {}, {}),
    ("ramplus_tl", {"r": 0.5, "alpha": 0.9, "epsilon": 0.02}, {}),
]


@pytest.mark.parametrize("method,params,model_params", DETERMINISTIC)
def test_agrees_with_mergekit(tmp_path_factory, llama, method, params, model_params):
    base, fts = llama
    theirs = mergekit_merge(tmp_path_factory, method, base, fts, params, model_params)
    # With rescale, mergekit's L1 ratio comes from fp32 sums (pysoup's from fp64): the scale differs by up to a few
    # ulps, and the scaled tau (up to 1 / density times the inputs) carries it.
    ulps = 4 if not params.get("rescale") else int(4 / model_params["density"]) + 4
    assert_within_rounding(ours(method, base, fts, params, model_params), theirs, magnitudes(base, fts), ulps)


# -- DELLA: random masks, compared in distribution -----------------------------------------------------------------
def _row_ranks(tau):
    """Each entry's 0-based rank of |tau| along dimension 1 (a 1-D tensor is one row), normalized to [0, 1]."""
    t = tau.abs().unsqueeze(0) if tau.dim() == 1 else tau.abs()
    ranks = t.argsort(dim=1).argsort(dim=1).float() / (t.shape[1] - 1)
    return ranks.reshape(tau.shape)


def keep_profile(out: dict, base: dict, ft: dict) -> tuple:
    """Over every tensor of 2+ dims, per fifth of the row rank: the fraction of the changed entries (tau != 0) kept
    (out != base), and the mean keep probability 0.3 + 0.4 * rank of those entries (density 0.5, epsilon 0.2)."""
    kept, total, prob = np.zeros(5), np.zeros(5), np.zeros(5)
    for k, b in base.items():
        tau = ft[k] - b
        if tau.dim() < 2:
            continue
        ranks = _row_ranks(tau).flatten()
        bins = (ranks * 4.999).long()
        changed = (tau != 0).flatten()
        keep = (out[k] != b).flatten() & changed
        total += np.bincount(bins[changed].numpy(), minlength=5)
        kept += np.bincount(bins[keep].numpy(), minlength=5)
        prob += np.bincount(bins[changed].numpy(), weights=(0.3 + 0.4 * ranks[changed]).numpy(), minlength=5)
    return kept / total, prob / total, total


@pytest.mark.parametrize("method", ["della_linear", "della"])
def test_della_in_distribution(tmp_path_factory, llama, method):
    """One fine-tune, density 0.5, epsilon 0.2: entries are kept with probability 0.3 at the bottom of their row's
    ranks up to 0.7 at the top; pysoup's fractions per fifth of the ranks lie as close to mergekit's as two mergekit
    seeds lie to each other (or within 4 binomial standard deviations), and the kept entries, rescaled to the L1 norm
    of tau, restore it (ratio 1 per tensor, as in mergekit)."""
    base, fts = llama
    mp = {"density": 0.5, "epsilon": 0.2, "weight": 1.0}
    runs = [mergekit_merge(tmp_path_factory, method, base, fts[:1], {}, mp, seed=s) for s in (1, 2)]
    mine = ours(method, base, fts[:1], {}, mp)
    b, ft = tensors(base), tensors(fts[0])
    (p1, _, _), (p2, _, _) = keep_profile(runs[0], b, ft), keep_profile(runs[1], b, ft)
    p0, expected, n = keep_profile(mine, b, ft)
    sd = np.sqrt(expected * (1 - expected) / n)
    tol = np.maximum(2 * np.abs(p1 - p2), 4 * sd)
    assert np.all(np.abs(p0 - (p1 + p2) / 2) <= tol), (p0, p1, p2)
    assert np.all(np.abs(p0 - expected) <= 4 * sd), (p0, expected)
    for out in (mine, *runs):
        for k, v in b.items():
            tau = (ft[k] - v).abs().double().sum()
            if tau > 1e-6:
                ratio = float((out[k] - v).abs().double().sum() / tau)
                assert abs(ratio - 1) < 1e-4, (k, ratio)


def test_della_three_models_in_distribution(tmp_path_factory, llama):
    """DELLA (TIES) over three fine-tunes: the L1 size of the merged change and the fraction of entries changed match
    mergekit's two seeds as closely as they match each other."""
    base, fts = llama
    mp = {"density": 0.4, "epsilon": 0.1, "weight": 0.5}
    runs = [mergekit_merge(tmp_path_factory, "della", base, fts, {}, mp, seed=s) for s in (1, 2)]
    mine = ours("della", base, fts, {}, mp)
    b = tensors(base)

    def summary(out):
        l1 = sum(float((out[k] - v).abs().double().sum()) for k, v in b.items())
        changed = sum(int((out[k] != v).sum()) for k, v in b.items()) / sum(v.numel() for v in b.values())
        return np.array([l1, changed])

    s1, s2, s0 = summary(runs[0]), summary(runs[1]), summary(mine)
    tol = np.maximum(3 * np.abs(s1 - s2), 0.02 * np.abs(s1))
    assert np.all(np.abs(s0 - (s1 + s2) / 2) <= tol), (s0, s1, s2)

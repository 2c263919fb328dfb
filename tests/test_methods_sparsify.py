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
import pysoup.engine.execute as engine
from pysoup.errors import PlanError
from pysoup.ops.reference import philox_words
from pysoup.strategies.task_vector import dare_key

METHODS = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl")


# -- worked examples: tiny tensors, the expected numbers computed here from the formulas -----------------------------
def merge_vectors(strategy, models, base, params=None, model_params=None, backend="cpu"):
    sds = [{"w": torch.tensor(m, dtype=torch.float32)} for m in models]
    b = {"w": torch.tensor(base, dtype=torch.float32)}
    mp = [dict(model_params or {}) for _ in models]
    return pysoup.merge(sds, strategy=strategy, base=b, params=params or {}, model_params=mp, backend=backend)["w"]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_breadcrumbs_worked_example(backend):
    """10 entries, density 0.5, gamma 0.1: target 5, top int(0.1 * 10) = 1, bottom 10 - 5 - 1 = 4: the largest
    magnitude and the 4 smallest are dropped; ties (the two 6s, at the band's lower edge) are kept in index order."""
    tau = np.array([0.5, -9.0, 6.0, 1.0, -7.0, 2.0, 6.0, -3.0, 8.0, 4.0], dtype=np.float32)
    base = np.full(10, 1.0, dtype=np.float32)
    # descending |tau|: 9 (1), 8 (8), 7 (4), 6 (2), 6 (6), 4 (9), ... -> ranks [1, 6) kept: 8, 7, 6, 6, 4
    keep = np.zeros(10, bool)
    keep[[8, 4, 2, 6, 9]] = True
    want = base + 0.5 * np.where(keep, tau, 0)
    got = merge_vectors(
        "breadcrumbs", [base + tau], base, model_params={"density": 0.5, "gamma": 0.1, "weight": 0.5}, backend=backend
    )
    assert got.tolist() == want.tolist()
    # rescale: kept L1 = 8 + 7 + 6 + 6 + 4 = 31 of 46.5 -> the kept entries times 46.5 / 31 = 1.5
    got = merge_vectors(
        "breadcrumbs", [base + tau], base, {"rescale": True}, {"density": 0.5, "gamma": 0.1}, backend=backend
    )
    assert got.tolist() == (base + np.where(keep, tau * np.float32(1.5), 0)).tolist()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_breadcrumbs_ties_worked_example(backend):
    """Two models, 4 entries, density 0.5, gamma 0.25: target 2, top 1, bottom 1: each keeps its 2nd and 3rd
    largest; then TIES: sign of the sum elected, agreeing entries summed (normalize false by default)."""
    a = np.array([4.0, -3.0, 2.0, 1.0], np.float32)  # keeps -3, 2
    b = np.array([-1.0, 5.0, -4.0, 3.0], np.float32)  # keeps -4, 3
    ka = np.array([0, -3.0, 2.0, 0], np.float32)
    kb = np.array([0, 0, -4.0, 3.0], np.float32)
    s = ka + kb  # [0, -3, -2, 3]: signs +, -, -, +
    agree_a = np.where(s >= 0, ka > 0, ka < 0)
    agree_b = np.where(s >= 0, kb > 0, kb < 0)
    want = np.where(agree_a, ka, 0) + np.where(agree_b, kb, 0)
    got = merge_vectors(
        "breadcrumbs_ties", [a, b], np.zeros(4, np.float32), {}, {"density": 0.5, "gamma": 0.25}, backend=backend
    )
    assert got.tolist() == want.tolist() == [0.0, -3.0, -4.0, 3.0]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_della_worked_example(backend):
    """One row of 5 entries, density 0.5, epsilon 0.2: keep probabilities 0.3, 0.4, 0.5, 0.6, 0.7 by rank of |tau|
    (fp32: 0.3 + (2 r / 4) * 0.2), each kept where its Philox word (key from seed, tensor name, model) is below
    round(p * 2^32); survivors rescaled to the L1 norm of tau; della_linear adds them (weight 1, lambda 1)."""
    tau = np.array([0.5, -2.0, 1.0, 3.0, -0.25], np.float32)
    ranks = np.argsort(np.argsort(np.abs(tau), kind="stable"), kind="stable")
    prob = np.float32(0.5 - 0.2) + (np.float32(ranks) / np.float32(4) * np.float32(2)) * np.float32(0.2)
    below = np.minimum(np.floor(prob.astype(np.float64) * 2.0**32 + 0.5), 2.0**32 - 1)
    words = philox_words(dare_key(7, "w", 0), torch.arange(5)).numpy()
    keep = words < below
    assert keep.any() and not keep.all()  # seed 7 keeps some: the example tests both branches
    kept = np.where(keep, tau, np.float32(0))
    scale = np.float32(np.abs(tau).sum(dtype=np.float64) / np.abs(kept).sum(dtype=np.float64))
    want = np.where(keep, tau * scale, np.float32(0))
    got = merge_vectors(
        "della_linear", [tau], np.zeros(5, np.float32), {"seed": 7}, {"density": 0.5, "epsilon": 0.2}, backend=backend
    )
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sce_worked_example(backend):
    """3 models, 4 entries, select_topk 0.5: k = int(#nonzero variances * 0.5) entries of highest variance across the
    models kept (one mask for every model); weights = mean squared kept tau per model over their sum; the sign of
    sum_i tau_i elected; base + sum_agree w_i tau_i / max(sum_agree w_i, 1e-6)."""
    taus = np.array([[1.0, 2.0, -1.0, 0.5], [1.0, -2.0, 3.0, 0.5], [1.0, 1.0, -2.0, 0.0]], np.float32)
    var = taus.astype(np.float64).var(axis=0)  # [0, 3.55.., 4.66.., 0.055..]
    k = int(np.float32(np.count_nonzero(var)) * np.float32(0.5))
    mask = np.zeros(4, bool)
    mask[np.argsort(-var, kind="stable")[:k]] = True
    kept = np.where(mask, taus, 0)
    w = (kept.astype(np.float64) ** 2).mean(axis=1)
    w = (w / w.sum()).astype(np.float32)
    s = kept.sum(axis=0)
    agree = np.where(s >= 0, kept > 0, kept < 0)
    num = (np.where(agree, kept, 0) * w[:, None]).sum(axis=0)
    den = np.maximum((agree * w[:, None]).sum(axis=0), np.float32(1e-6))
    want = num / den
    got = merge_vectors("sce", list(taus), np.zeros(4, np.float32), {"select_topk": 0.5}, backend=backend)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert mask.tolist() == [False, False, True, False]  # 3 nonzero variances: int(3 * 0.5) = 1 entry kept


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ram_worked_examples(backend):
    """RAM: an entry changed (|tau| > epsilon) by one model takes its tau, by several their mean; RAM+ scales each
    model's unique entries by 1 + r * clamp(#shared / #unique, 0, alpha)."""
    a = np.array([1.0, 2.0, 0.0, 4.0, 0.0], np.float32)
    b = np.array([3.0, 0.0, 0.0, 8.0, 5.0], np.float32)
    zero = np.zeros(5, np.float32)
    want = np.array([2.0, 2.0, 0.0, 6.0, 5.0], np.float32)
    assert merge_vectors("ram", [a, b], zero, backend=backend).tolist() == want.tolist()
    # a: 2 shared, 1 unique -> rho 2 -> clamp 0.9 -> 1 + 0.5 * 0.9 = 1.45; b: 2 shared, 1 unique -> 1.45
    lam = np.float32(1) + np.float32(0.5) * np.float32(0.9)
    want_plus = np.array([2.0, 2.0 * lam, 0.0, 6.0, 5.0 * lam], np.float32)
    got = merge_vectors("ramplus_tl", [a, b], zero, {"r": 0.5, "alpha": 0.9}, backend=backend)
    assert got.tolist() == want_plus.tolist()


def test_bad_parameters_are_one_line_errors():
    one = [np.ones(4, np.float32)]
    zero = np.zeros(4, np.float32)
    with pytest.raises(PlanError, match="density \\+/- epsilon"):
        merge_vectors("della", one, zero, {}, {"density": 0.9, "epsilon": 0.15})
    with pytest.raises(PlanError, match="gamma"):
        merge_vectors("breadcrumbs", one, zero, {}, {"density": 0.5, "gamma": 2})
    with pytest.raises(PlanError, match="no per-model parameter 'gamma'"):
        merge_vectors("della", one, zero, {}, {"gamma": 0.1})
    with pytest.raises(PlanError, match="needs a base"):
        pysoup.merge([{"w": torch.ones(2)}], strategy="ram")
    sds = [{"w": torch.ones(4, 1)}]
    with pytest.raises(PlanError, match="one element"):
        pysoup.merge(sds, strategy="della", base={"w": torch.zeros(4, 1)}, model_params=[{"density": 0.5}])


# -- the cpu backend equals the reference bit for bit ---------------------------------------------------------------
BIT_CASES = [
    ("breadcrumbs", {"rescale": True}, {"density": 0.5, "gamma": 0.05, "weight": 0.7}),
    ("breadcrumbs_ties", {"normalize": True, "lambda": 1.3}, {"density": 0.4, "gamma": 0.1}),
    ("della", {"seed": 3}, {"density": 0.5, "epsilon": 0.2, "weight": 0.6}),
    ("della_linear", {"rescale": False, "lambda": 0.8}, {"density": 0.3, "epsilon": 0.1}),
    ("sce", {"select_topk": 0.3}, {}),
    ("sce", {}, {}),
    ("ram", {"epsilon": 0.001}, {}),
    ("ramplus_tl", {"r": 0.5, "alpha": 0.9}, {}),
]


@pytest.fixture(scope="module")
def bit_inputs(tmp_path_factory):
    """A base and three models in files: a [100, 700] matrix (two 64 Ki blocks; rows of 700), a [6, 50, 40]
    tensor (DELLA's rows interleaved, stride 40), a vector; bf16, so magnitudes tie often (the tie quotas matter)."""
    root = tmp_path_factory.mktemp("bits")
    g = torch.Generator().manual_seed(5)
    shapes = {"m": (100, 700), "c": (6, 50, 40), "v": (5000,)}
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    paths = []
    for name in ("base", "a", "b", "c"):
        sd = (
            base
            if name == "base"
            else {
                k: (
                    v.float() + torch.randn(v.shape, generator=g) * 0.05 * (torch.rand(v.shape, generator=g) < 0.8)
                ).bfloat16()
                for k, v in base.items()
            }
        )
        path = str(root / f"{name}.safetensors")
        save_file(sd, path)
        paths.append(path)
    return paths[0], paths[1:]


_REFERENCE: dict = {}


def _reference_bytes(tmp_path, bit_inputs, case) -> bytes:
    """The reference backend's merge of BIT_CASES[case] (merged once per module run)."""
    if case not in _REFERENCE:
        method, params, mp = BIT_CASES[case]
        base, fts = bit_inputs
        _REFERENCE[case] = _bit_merge(method, params, mp, base, fts, str(tmp_path / "ref.safetensors"), "reference")
    return _REFERENCE[case]


def _bit_merge(method, params, mp, base, fts, out, backend, threads=None):
    pysoup.merge(
        fts,
        out,
        strategy=method,
        base=base,
        params=params,
        model_params=[dict(mp) for _ in fts],
        backend=backend,
        threads=threads,
    )
    with open(out, "rb") as f:
        return f.read()


@pytest.mark.parametrize("case", range(len(BIT_CASES)), ids=lambda i: BIT_CASES[i][0])
def test_cpu_equals_reference(tmp_path, bit_inputs, monkeypatch, case):
    """Every ISA, 1 and 2 threads, and small chunks (DELLA's rows whole in each, TIES-style tie quotas carried from
    chunk to chunk): the same bytes as the reference."""
    method, params, model_params = BIT_CASES[case]
    base, fts = bit_inputs
    want = _reference_bytes(tmp_path, bit_inputs, case)
    for isa in pysoup.info()["cpu_isas"]:
        for threads in (1, 2):
            monkeypatch.setenv("PYSOUP_CPU_ISA", isa)
            got = _bit_merge(method, params, model_params, base, fts, str(tmp_path / "c.safetensors"), "cpu", threads)
            assert got == want, f"{method} differs on {isa} with {threads} threads"
    monkeypatch.delenv("PYSOUP_CPU_ISA")
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 4096 * 3)
    assert _bit_merge(method, params, model_params, base, fts, str(tmp_path / "s.safetensors"), "cpu") == want


def test_della_thresholds_follow_the_parameters(tmp_path, bit_inputs):
    """The CPU kernels keep DELLA's per-rank thresholds from call to call while the row length and every model's
    density - epsilon and epsilon stay: two merges in a row with the same density - epsilon (0.4) but another epsilon
    each give the reference's bytes, not the first merge's thresholds."""
    paths = []
    base, fts = bit_inputs
    for i, path in enumerate([base, *fts]):  # one tensor only, so its rows come one call after another
        paths.append(str(tmp_path / f"{i}.safetensors"))
        save_file({"m": load_file(path)["m"]}, paths[-1])
    base, fts = paths[0], paths[1:]
    for density, epsilon in ((0.5, 0.1), (0.6, 0.2)):
        mp = {"density": density, "epsilon": epsilon}
        want = _bit_merge("della", {"seed": 1}, mp, base, fts, str(tmp_path / "r.safetensors"), "reference")
        got = _bit_merge("della", {"seed": 1}, mp, base, fts, str(tmp_path / "c.safetensors"), "cpu", 1)
        assert got == want, (density, epsilon)


@pytest.mark.parametrize("method, masks", [("della", 3), ("sce", 1)])
def test_kept_bits_and_selecting_again_agree(tmp_path, bit_inputs, monkeypatch, method, masks):
    """DELLA's and SCE's combine read the selection their statistics pass kept as bits (DELLA: per model; SCE: one
    mask), so no row is ranked and no variance computed twice; a tensor whose bits would exceed KEEP_MASK_BYTES
    selects again in the combine. Both give the reference's bytes, and the bits are really kept."""
    from pysoup.ops.cpu import CpuBackend
    from pysoup.strategies import sparsify

    case = next(i for i, c in enumerate(BIT_CASES) if c[0] == method and c[1])
    method, params, model_params = BIT_CASES[case]
    base, fts = bit_inputs
    want = _reference_bytes(tmp_path, bit_inputs, case)
    sizes = []
    real = CpuBackend.keep_mask_buffer
    monkeypatch.setattr(CpuBackend, "keep_mask_buffer", lambda self, n: sizes.append(n) or real(self, n))
    assert _bit_merge(method, params, model_params, base, fts, str(tmp_path / "a.safetensors"), "cpu", 2) == want
    assert sorted(sizes) == sorted(masks * ((n + 7) // 8) for n in (100 * 700, 6 * 50 * 40, 5000))
    sizes.clear()
    monkeypatch.setattr(sparsify, "KEEP_MASK_BYTES", masks * ((6 * 50 * 40 + 7) // 8))  # the [6, 50, 40] tensor's
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 4096 * 3)
    assert _bit_merge(method, params, model_params, base, fts, str(tmp_path / "b.safetensors"), "cpu", 2) == want
    assert sorted(sizes) == sorted(masks * ((n + 7) // 8) for n in (6 * 50 * 40, 5000))


def _variance_counted(monkeypatch) -> tuple:
    """Records (tensor, pass) of every chunk the CPU backend's variance selection counts from the inputs, and the
    keep_mask_mode of every statistics and combine call (tensor -> modes)."""
    from pysoup.ops.cpu import CpuBackend, _VarianceTopK

    counted, modes = [], {}
    count, stats, combine = _VarianceTopK._count, CpuBackend.sparse_stats_raw, CpuBackend.sparse_task_vector_raw

    def counting(self, chunk, pass_):
        counted.append((chunk.name, pass_))
        return count(self, chunk, pass_)

    def stats_mode(self, chunk, p, *args):
        modes.setdefault(chunk.name, set()).add(("stats", p.keep_mask_mode))
        return stats(self, chunk, p, *args)

    def combine_mode(self, chunk, p, *args):
        modes.setdefault(chunk.name, set()).add(("combine", p.keep_mask_mode))
        return combine(self, chunk, p, *args)

    monkeypatch.setattr(_VarianceTopK, "_count", counting)
    monkeypatch.setattr(CpuBackend, "sparse_stats_raw", stats_mode)
    monkeypatch.setattr(CpuBackend, "sparse_task_vector_raw", combine_mode)
    return counted, modes


STORED = {("stats", 2), ("combine", 2)}  # both read the bits the selection wrote
SELECTED_IN_STATS = {("stats", 1), ("combine", 2)}  # the statistics pass selects and stores, the combine reads


def test_sce_selects_from_stored_variances(tmp_path, bit_inputs, monkeypatch):
    """Tensors whose variances fit VARIANCE_STORE_BYTES are counted from the inputs in pass 0 only: pass 1's
    histogram and the keep bits come from the variances pass 0 stored, and the statistics pass and the combine read
    those bits. The reference's bytes with 1 and 2 threads, and with chunks starting mid-byte of the bits."""
    case = BIT_CASES.index(("sce", {"select_topk": 0.3}, {}))
    method, params, mp = BIT_CASES[case]
    base, fts = bit_inputs
    want = _reference_bytes(tmp_path, bit_inputs, case)
    for threads, chunk in ((1, None), (2, None), (2, 12289)):
        if chunk:
            monkeypatch.setattr(engine, "CHUNK_ELEMENTS", chunk)
        counted, modes = _variance_counted(monkeypatch)
        assert _bit_merge(method, params, mp, base, fts, str(tmp_path / "o.safetensors"), "cpu", threads) == want
        assert {name for name, _ in counted} == {"m", "c", "v"} and {p for _, p in counted} == {0}
        assert modes == {"m": STORED, "c": STORED, "v": STORED}


def test_sce_over_the_variance_bound_takes_both_passes(tmp_path, bit_inputs, monkeypatch):
    """A tensor whose variances exceed VARIANCE_STORE_BYTES (here the [100, 700] matrix, the bound lowered) counts
    both passes from the inputs and selects again in the statistics pass, as before; the others still select from
    memory. The reference's bytes."""
    from pysoup.ops import cpu

    case = BIT_CASES.index(("sce", {"select_topk": 0.3}, {}))
    method, params, mp = BIT_CASES[case]
    base, fts = bit_inputs
    want = _reference_bytes(tmp_path, bit_inputs, case)
    monkeypatch.setattr(cpu, "VARIANCE_STORE_BYTES", 4 * 6 * 50 * 40)  # the [6, 50, 40] tensor's
    counted, modes = _variance_counted(monkeypatch)
    assert _bit_merge(method, params, mp, base, fts, str(tmp_path / "o.safetensors"), "cpu", 2) == want
    assert {name for name, p in counted if p == 1} == {"m"}
    assert modes == {"m": SELECTED_IN_STATS, "c": STORED, "v": STORED}


@pytest.mark.parametrize("threads", [1, 2])
def test_sce_tie_quota_from_stored_variances(monkeypatch, threads):
    """bf16 task vectors of a few levels, so thousands of entries share each variance, and select_topk ending inside
    the top variance's ties: the keep bits written from memory keep part of those ties, the first in index order
    (across the threads' blocks), as the reference keeps them."""
    import pysoup._native as native
    from pysoup.ops.reference import variance, variance_keep

    g = torch.Generator().manual_seed(21)
    n = 140_000  # 3 blocks of 64 Ki entries
    levels = torch.tensor([-0.5, 0.0, 0.5])
    taus = [levels[torch.randint(0, 3, (n,), generator=g)] for _ in range(3)]
    base = (torch.randint(-16, 16, (n,), generator=g) * 0.25).bfloat16()  # base + tau exact in bf16
    models = [{"w": (base.float() + t).bfloat16()} for t in taus]
    var = variance([m["w"].float() - base.float() for m in models])
    top = var.max()
    nonzero, ties = int((var != 0).sum()), int((var == top).sum())
    topk = (ties // 2 + 0.5) / nonzero
    assert 0 < variance_keep(nonzero, topk) < ties  # the quota is partial
    calls = []
    real = native.native.stored_variance_keep_ties

    def keep_ties(variances, n, in_bin, prefix, threshold, quota, *args):
        left = real(variances, n, in_bin, prefix, threshold, quota, *args)
        calls.append((quota, left))
        return left

    monkeypatch.setattr(native.native, "stored_variance_keep_ties", keep_ties)
    outs = {}
    for backend in ("reference", "cpu"):
        outs[backend] = pysoup.merge(
            models, strategy="sce", base={"w": base}, params={"select_topk": topk}, backend=backend, threads=threads
        )["w"]
    assert len(calls) == 1 and 0 < calls[0][0] < ties and calls[0][1] == 0
    assert torch.equal(outs["cpu"].view(torch.int16), outs["reference"].view(torch.int16))


@pytest.mark.parametrize("threads", [1, 2])
def test_sce_long_ranges_count_in_split_histograms(monkeypatch, threads):
    """A range of at least kSplitHistogramMin (2^18) entries counts pass 0 into two interleaved histograms added at
    the end (csrc/cpu/blocking.h): here each thread's range, over bf16 task vectors of a few levels, so neighbours
    share variances. The reference's bits, with the variances stored and not."""
    from pysoup.ops import cpu

    g = torch.Generator().manual_seed(8)
    n = (1 << 19) + 12345
    levels = torch.tensor([-0.25, 0.0, 0.25, 0.5])
    base = (torch.randint(-16, 16, (n,), generator=g) * 0.25).bfloat16()
    models = [{"w": (base.float() + levels[torch.randint(0, 4, (n,), generator=g)]).bfloat16()} for _ in range(3)]

    def merged(backend):
        out = pysoup.merge(
            models, strategy="sce", base={"w": base}, params={"select_topk": 0.4}, backend=backend, threads=threads
        )
        return out["w"].view(torch.int16)

    want = merged("reference")
    for bound in (cpu.VARIANCE_STORE_BYTES, 0):
        monkeypatch.setattr(cpu, "VARIANCE_STORE_BYTES", bound)
        assert torch.equal(merged("cpu"), want), f"variances stored: {bound > 0}"


@pytest.mark.parametrize("case", ["keeps nothing", "zero variances", "fp32 models"])
def test_sce_stored_edges(monkeypatch, case):
    """The selection from stored variances where it keeps nothing (select_topk below one entry; every variance 0)
    and on fp32 models (variances with low halves of every kind), over two blocks of 64 Ki and an odd tail: the
    reference's bits, the stored path taken."""
    g = torch.Generator().manual_seed(4)
    n = 70001
    base = torch.randn(n, generator=g).bfloat16()
    noise = [torch.randn(n, generator=g) * 0.1 for _ in range(3)]
    models, topk = [{"w": (base.float() + e).bfloat16()} for e in noise], 1e-9
    if case == "zero variances":
        models, topk = [{"w": base.clone()} for _ in noise], 0.5
    elif case == "fp32 models":
        models, topk = [{"w": base.float() + e} for e in noise], 0.37
    counted, _ = _variance_counted(monkeypatch)
    outs = [
        pysoup.merge(models, strategy="sce", base={"w": base}, params={"select_topk": topk}, backend=b)["w"]
        for b in ("reference", "cpu")
    ]
    assert {p for _, p in counted} == {0}
    assert torch.equal(outs[0].float().view(torch.int32), outs[1].float().view(torch.int32))


def _della_rows() -> dict:
    """Rows of tau (the base is 0) of every kind DELLA's CPU ranking tells apart: bf16 magnitudes (ranked by counting
    their high halves), the same with a few fp32 magnitudes among them (their bins sorted apart), fp32 magnitudes
    throughout and a span of magnitudes too wide for counting (both radix-sorted), all zeros, and zeros with
    magnitudes equal to one another."""
    g = torch.Generator().manual_seed(11)
    n = 700
    bf16 = (torch.randn(n, generator=g) * 0.05 * (torch.rand(n, generator=g) < 0.8)).bfloat16().float()
    # Eight magnitudes, so each bin holds ~90 equal entries, and 1/20 of the entries given low halves: each is
    # larger than its bin's other entries, and they rank among themselves by those low halves.
    levels = torch.tensor([0.001, 0.003, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2]).bfloat16().float()
    mixed = levels[torch.randint(0, 8, (n,), generator=g)] * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    at = torch.randperm(n, generator=g)[: n // 20]
    low = torch.randint(1, 0x10000, (len(at),), generator=g, dtype=torch.int32)
    mixed[at] = (mixed[at].view(torch.int32) | low).view(torch.float32)
    wide = torch.randn(n, generator=g).bfloat16().float() * torch.pow(10.0, torch.randint(-30, 30, (n,), generator=g))
    rows = [bf16, mixed, mixed.flip(0), torch.randn(n, generator=g) * 0.05, wide.bfloat16().float(), torch.zeros(n)]
    rows.append(torch.where(torch.rand(n, generator=g) < 0.5, 0.0, 0.25))
    return torch.stack(rows)


def test_della_row_kinds_equal_reference(tmp_path):
    """Every way the CPU backend ranks a row (counting, counting with sorted bins, the radix sort) gives the
    reference's draws: the same bytes, for each model of three."""
    rows = _della_rows()
    g = torch.Generator().manual_seed(12)
    models = [{"w": rows[torch.randperm(len(rows), generator=g)] * s} for s in (1.0, -1.0, 0.5)]
    base = {"w": torch.zeros_like(rows)}
    got = {}
    for backend in ("reference", "cpu"):
        for threads in (1, 2):
            out = pysoup.merge(
                models,
                strategy="della",
                base=base,
                params={"seed": 9},
                model_params=[{"density": 0.5, "epsilon": 0.3} for _ in models],
                backend=backend,
                threads=threads,
            )["w"]
            got[backend, threads] = out
    want = got["reference", 1]
    assert (want != 0).any() and (want == 0).any()
    for key, out in got.items():
        assert torch.equal(out.view(torch.int32), want.view(torch.int32)), key


def _passes_counted(monkeypatch) -> list:
    """Records the pass of every chunk the CPU backend's magnitude selections count."""
    from pysoup.ops.cpu import _RadixTopK

    passes = []
    real = _RadixTopK._count
    monkeypatch.setattr(
        _RadixTopK, "_count", lambda self, chunk, pass_: passes.append(pass_) or real(self, chunk, pass_)
    )
    return passes


def _one_bin_tau(m: int, z: int, above: int, seed: int) -> torch.Tensor:
    """tau with `above` large values, z copies of 0.25 (a zero low half) and m values 0.25 with a nonzero low half
    (all above 0.25, in its high-half bin), shuffled, among 4 * (m + z + above) small ones."""
    g = torch.Generator().manual_seed(seed)
    big = torch.full((above,), 8.0)
    mixed = torch.full((m,), 0.25).view(torch.int32) | torch.randint(1, 0x10000, (m,), generator=g, dtype=torch.int32)
    small = torch.rand(4 * (m + z + above), generator=g) * 0.01
    tau = torch.cat([big, torch.full((z,), 0.25), mixed.view(torch.float32), small])
    return tau[torch.randperm(len(tau), generator=g)]


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("extra, one_pass", [(0, False), (1, True), (7, True), (9, True), (10, False)])
def test_selection_ends_after_pass_0_on_a_zero_low_half(monkeypatch, method, extra, one_pass):
    """The CPU backend's magnitude selection ends after its first pass when the threshold is a value with a zero low
    half (then the values of its bin with a nonzero low half are all kept, and the ties in index order), and counts
    the second pass otherwise; both give the reference's bytes. The top-k here is 5 large values, then the 6 mixed
    values of 0.25's bin, then `extra` of its 9 copies of 0.25 (0: the threshold is a mixed value; 10: the bin is
    exhausted and the threshold lies below it)."""
    m, z, above = 6, 9, 5
    tau = _one_bin_tau(m, z, above, seed=extra)
    models = [{"w": tau.clone()}, {"w": -tau.flip(0)}]
    density = (above + m + extra) / len(tau)
    mp = {"density": density, "gamma": 0.0} if method == "breadcrumbs_ties" else {"density": density}
    outs = {}
    passes = _passes_counted(monkeypatch)
    for backend in ("reference", "cpu"):
        outs[backend] = pysoup.merge(
            models,
            strategy=method,
            base={"w": torch.zeros_like(tau)},
            model_params=[dict(mp) for _ in models],
            backend=backend,
        )["w"]
    assert sorted(set(passes)) == ([0] if one_pass else [0, 1])
    assert torch.equal(outs["cpu"].view(torch.int32), outs["reference"].view(torch.int32))
    kept = (outs["cpu"] != 0).sum().item()
    assert kept >= above + m + extra  # the two models keep mirrored entries, so at least one model's count


def test_bf16_breadcrumbs_and_ties_select_in_one_pass(tmp_path, bit_inputs, monkeypatch):
    """On the bf16 inputs (the fine-tunes of real use) every tensor's selection ends after pass 0, with the
    reference's bytes."""
    base, fts = bit_inputs
    for case, (method, params, mp) in enumerate(BIT_CASES):
        if method not in ("breadcrumbs", "breadcrumbs_ties"):
            continue
        want = _reference_bytes(tmp_path, bit_inputs, case)
        passes = _passes_counted(monkeypatch)
        assert _bit_merge(method, params, mp, base, fts, str(tmp_path / "o.safetensors"), "cpu", 2) == want
        assert passes and set(passes) == {0}, method


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
    mine = ours(method, base, fts, params, model_params)
    assert_within_rounding(mine, theirs, magnitudes(base, fts), ulps)
    if method.startswith("ram"):  # the same fp32 operations in the same order: bit for bit
        for k in theirs:
            assert torch.equal(mine[k].view(torch.int32), theirs[k].view(torch.int32)), k


@pytest.mark.parametrize("case", [2, 8], ids=lambda i: DETERMINISTIC[i][0])
def test_mergekit_config_gives_the_same(tmp_path_factory, llama, case):
    """The same merge written as a mergekit config and run by `pysoup merge --config` (in-process): mergekit's result
    within rounding (RAM+: bit for bit), and pysoup.merge's bytes."""
    from pysoup.cli import main

    yaml = pytest.importorskip("yaml")
    method, params, mp = DETERMINISTIC[case]
    base, fts = llama
    cfg = {
        "merge_method": method,
        "base_model": base,
        "dtype": "float32",
        "parameters": dict(params),
        "models": [{"model": m, "parameters": dict(mp)} for m in fts],
    }
    d = tmp_path_factory.mktemp("cfg")
    (d / "soup.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", "--config", str(d / "soup.yaml"), "-o", str(d / "out"), "--no-progress"]) in (0, None)
    got = tensors(str(d / "out"))
    mine = ours(method, base, fts, params, mp)
    assert all(torch.equal(got[k], mine[k]) for k in mine)
    theirs = mergekit_merge(tmp_path_factory, method, base, fts, params, mp)
    assert_within_rounding(got, theirs, magnitudes(base, fts), 4 if case != 8 else 0)


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


@pytest.mark.parametrize("case", [0, 2, 4, 7], ids=lambda i: BIT_CASES[i][0])
def test_device_path_equals_reference(tmp_path, bit_inputs, case):
    """device= merges (the triton backend, here under TRITON_INTERPRET=1): these methods have no Triton kernel and run
    the reference's op on the host ranges (breadcrumbs' histograms on the device): the same bytes."""
    pytest.importorskip("triton")
    method, params, mp = BIT_CASES[case]
    base, fts = bit_inputs
    want = _reference_bytes(tmp_path, bit_inputs, case)
    pysoup.merge(
        fts,
        tmp_path / "dev.safetensors",
        strategy=method,
        base=base,
        params=params,
        model_params=[dict(mp) for _ in fts],
        device="cpu",
    )
    assert (tmp_path / "dev.safetensors").read_bytes() == want

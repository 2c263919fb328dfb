"""The merge methods: C++ = the torch reference bit for bit (every ISA, thread count and chunking), worked examples
computed by hand from the definitions in docs/methods.md, properties, and bad input."""

import math
import re

import pytest
import torch
from helpers.checkpoints import save_st
from helpers.cli import run_cli
from helpers.methods import METHOD_IDS, METHODS, family, merge_kwargs
from helpers.parametrize import ISAS, id_formatter
from helpers.tensors import assert_bit_equal
from safetensors.torch import load_file

import pysoup
import pysoup.engine.execute as engine
from pysoup import _native
from pysoup.errors import PlanError
from pysoup.search.weights import ema, mwa


@pytest.fixture(scope="module", params=METHODS, ids=METHOD_IDS)
def reference_merge(request, tmp_path_factory):
    """A method's inputs, merge arguments and the reference backend's output bytes: merged once per method,
    compared with every ISA, thread count and chunking."""
    method = request.param
    tmp = tmp_path_factory.mktemp(request.param[0])
    bp, fps, _, _ = family(tmp, sparse=method[0] == "sparse")
    kw = merge_kwargs(method, bp)
    pysoup.merge(fps, tmp / "ref.safetensors", backend="reference", **kw)
    return fps, kw, (tmp / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("threads", [1, 2], ids=id_formatter("threads"))
@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
def test_cpu_equals_reference(reference_merge, isa, threads, tmp_path, monkeypatch):
    fps, kw, want = reference_merge
    monkeypatch.setenv("PYSOUP_CPU_ISA", isa)
    out = tmp_path / "cpu.safetensors"
    pysoup.merge(fps, out, backend="cpu", threads=threads, **kw)
    assert out.read_bytes() == want, f"{kw['strategy']} differs from the reference on {isa} with {threads} threads"


def test_small_chunks_equal_reference(reference_merge, tmp_path, monkeypatch):
    """Reductions and TIES tie quotas carried across many chunks give the same bytes."""
    fps, kw, want = reference_merge
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 4096 * 3)
    pysoup.merge(fps, tmp_path / "chunked.safetensors", backend="cpu", **kw)
    assert (tmp_path / "chunked.safetensors").read_bytes() == want


def merge_vectors(strategy, models, base=None, **kw):
    sds = [{"w": torch.tensor(m, dtype=torch.float32)} for m in models]
    b = {"w": torch.tensor(base, dtype=torch.float32)} if base is not None else None
    return pysoup.merge(sds, strategy=strategy, base=b, **kw)["w"].tolist()


def test_ties_worked_example():
    got = merge_vectors("ties", [[3, -1, 0.5, -2], [-1, -2, 1, 2]], base=[0, 0, 0, 0], params={"density": 0.5})
    assert got == [3, -2, 0, 2]


def test_ties_threshold_ties_broken_by_index():
    got = merge_vectors("ties", [[1, 1, 1, 1, 1, 1]], base=[0] * 6, params={"density": 0.5})
    assert got == [1, 1, 1, 0, 0, 0]


def test_ties_keeps_floor_of_density_times_numel():
    """k = max(1, floor(density * numel)) as mergekit and PEFT: 10 entries at density 0.25 keep 2 (rounding kept 3);
    density 0.01 still keeps one."""
    tau = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert merge_vectors("ties", [tau], base=[0] * 10, params={"density": 0.25}) == [10, 9] + [0] * 8
    assert merge_vectors("ties", [tau], base=[0] * 10, params={"density": 0.01}) == [10] + [0] * 9


@pytest.mark.parametrize("threads", [1, 2], ids=id_formatter("threads"))
def test_ties_tie_quota_across_blocks_and_threads(threads):
    """200k equal magnitudes, keep 70001: exactly the first 70001 by index, whatever the threads or chunks."""
    n = 200_000
    sd = {"w": torch.ones(n)}
    base = {"w": torch.zeros(n)}
    out = pysoup.merge([sd], strategy="ties", base=base, params={"density": 70001 / n}, threads=threads)["w"]
    assert int(out.sum()) == 70001 and bool(out[:70001].all()) and not bool(out[70001:].any())


def test_task_arithmetic_example():
    got = merge_vectors("task_arithmetic", [[2, 3], [4, 1]], base=[1, 1], params={"lambda": 0.5})
    assert got == [1 + 0.5 * (1 + 3), 1 + 0.5 * (2 + 0)]


def test_dare_density_one_is_task_arithmetic(tmp_path):
    bp, fps, _, _ = family(tmp_path, big=False)
    a = pysoup.merge(fps, strategy="dare_linear", base=bp, params={"density": 1.0}, weights=[0.3, 0.3, 0.4])
    b = pysoup.merge(fps, strategy="task_arithmetic", base=bp, weights=[0.3, 0.3, 0.4])
    for k in a:
        assert_bit_equal(a[k], b[k])


def test_dare_drop_rate_and_seed():
    n = 100_000
    sd, base = {"w": torch.ones(n)}, {"w": torch.zeros(n)}
    out = pysoup.merge([sd], strategy="dare_linear", base=base, params={"density": 0.25, "seed": 1})["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.all(out[kept] == 4.0)  # survivors rescaled by 1/density
    again = pysoup.merge([sd], strategy="dare_linear", base=base, params={"density": 0.25, "seed": 1})["w"]
    other = pysoup.merge([sd], strategy="dare_linear", base=base, params={"density": 0.25, "seed": 2})["w"]
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_philox_known_answer():
    """Philox4x32-10 with key 0 and counter 0 (the Random123 known-answer vector)."""
    words = [_native.native.philox_word(0, e) for e in range(4)]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_slerp_example_and_endpoints():
    got = merge_vectors("slerp", [[1, 0], [0, 1]], params={"t": 0.5})
    assert got == pytest.approx([math.sqrt(0.5)] * 2, abs=1e-7)
    assert merge_vectors("slerp", [[1, 2], [3, -4]], params={"t": 0.0}) == [1, 2]
    assert merge_vectors("slerp", [[1, 2], [2, 4]], params={"t": 0.25}) == [1.25, 2.5]  # parallel: linear


def test_slerp_cpu_equals_reference(tmp_path):
    _, fps, _, _ = family(tmp_path)
    a = pysoup.merge(fps[:2], strategy="slerp", params={"t": 0.3}, backend="reference")
    b = pysoup.merge(fps[:2], strategy="slerp", params={"t": 0.3}, backend="cpu")
    for k in a:
        assert_bit_equal(a[k], b[k])


def test_model_stock_extremes():
    base = [0.0, 0.0]
    # Orthogonal task vectors: c = 0, t = 0, the base.
    assert merge_vectors("model_stock", [[1, 0], [0, 1]], base=base) == [0, 0]
    # Identical task vectors: c = 1, t = 1, their mean.
    assert merge_vectors("model_stock", [[1, 2], [1, 2]], base=base) == [1, 2]


def test_variance_corrected_worked_example():
    got = merge_vectors("variance_corrected", [[1, -1, 1, -1], [-1, 1, 1, -1]])
    assert got == pytest.approx([0, 0, 1.414161, -1.414161], abs=1e-6)
    bn = pysoup.merge(
        [{"bn.running_var": torch.tensor([1.0, 3.0])}, {"bn.running_var": torch.tensor([3.0, 5.0])}],
        strategy="variance_corrected",
    )
    assert bn["bn.running_var"].tolist() == [2.0, 4.0]  # buffers are averaged, never rescaled


def test_interpolate_and_layer_groups(models):
    _, sds = models
    got = pysoup.merge(
        sds[:2], strategy="interpolate", params={"alpha": [{"filter": "mlp", "value": 0.9}, {"value": 0.1}]}
    )
    from pysoup.ops import reference

    for k in got:
        a = 0.9 if "mlp" in k else 0.1
        assert_bit_equal(got[k], reference.weighted_sum([sds[0][k], sds[1][k]], [1 - a, a], torch.bfloat16, False))


def test_sparse_keeps_the_zero_pattern(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 64, generator=g) < 0.85
    sds = [{"w": torch.where(mask, torch.zeros(64, 64), torch.randn(64, 64, generator=g))} for _ in range(3)]
    paths = [save_st(tmp_path / f"s{i}.safetensors", sd) for i, sd in enumerate(sds)]
    report = pysoup.merge(paths, tmp_path / "soup.safetensors", strategy="sparse")
    out = load_file(str(tmp_path / "soup.safetensors"))["w"]
    assert torch.equal(out == 0, mask)
    assert report.stats["sparsity"] == pytest.approx(mask.float().mean().item())


def test_sparse_shared_mask_mismatch_is_refused_before_output(tmp_path):
    sds = [{"a": torch.ones(8), "b": torch.tensor([0.0, 1.0])}, {"a": torch.ones(8), "b": torch.tensor([1.0, 0.0])}]
    paths = [save_st(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(sds)]
    with pytest.raises(PlanError, match="tensor 'b': the inputs' zero patterns differ"):
        pysoup.merge(paths, tmp_path / "out.safetensors", strategy="sparse")
    assert not (tmp_path / "out.safetensors").exists()


def test_weights_from_metrics():
    assert [round(w, 4) for w in mwa([1.0, 0.8, 0.5], mode="loss", penalty=1)] == [0.2353, 0.2941, 0.4706]
    assert mwa([100, 200, 300], mode="step", penalty=1) == pytest.approx([1 / 6, 1 / 3, 1 / 2])
    assert mwa([1.0, 0.8, 0.5], penalty=0) == pytest.approx([1 / 3] * 3)
    for k, beta in ((1, 0.9), (5, 0.5), (20, 0.99)):
        assert sum(ema(k, beta)) == pytest.approx(1.0)
    assert ema(3, 0.5) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    with pytest.raises(PlanError):
        mwa([1.0, -1.0])
    with pytest.raises(PlanError):
        ema(3, 1.5)


@pytest.mark.parametrize(
    "strategy,n_models,base,params,match",
    [
        ("slerp", 3, False, {"t": 0.5}, "takes 2 models, got 3"),
        ("slerp", 2, False, {"t": 1.5}, "outside [0, 1]"),
        ("slerp", 2, False, {}, "needs the parameter t"),
        ("model_stock", 1, True, {}, "at least 2 models"),
        ("ties", 2, False, {"density": 0.5}, "needs a base model"),
        ("ties", 2, True, {"density": 0.0}, "outside (0, 1]"),
        ("ties", 2, True, {"density": 1.5}, "outside (0, 1]"),
        ("ties", 2, True, {"densty": 0.5}, "no parameter 'densty' (valid: density, lambda, normalize, weight)"),
        ("sparse", 2, False, {"mask": "some"}, "must be one of shared, intersection, union"),
        ("interpolate", 2, False, {"alpha": -0.1}, "outside [0, 1]"),
    ],
)
def test_bad_method_input(tmp_path, strategy, n_models, base, params, match):
    bp, fps, _, _ = family(tmp_path, big=False)
    with pytest.raises(PlanError, match=re.escape(match)):
        pysoup.merge(
            fps[:n_models], tmp_path / "o.safetensors", strategy=strategy, base=bp if base else None, params=params
        )
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_equals_api_for_a_method(tmp_path):
    bp, fps, _, _ = family(tmp_path, big=False)
    run_cli(
        "merge",
        *fps,
        "--base",
        bp,
        "--strategy",
        "ties",
        "--param",
        "density=0.4",
        "--param",
        "lambda=0.9",
        "--weights",
        "1,0.5,0.25",
        "-o",
        tmp_path / "cli.safetensors",
        check=True,
    )
    pysoup.merge(
        fps,
        tmp_path / "api.safetensors",
        strategy="ties",
        base=bp,
        weights=[1, 0.5, 0.25],
        params={"density": 0.4, "lambda": 0.9},
    )
    assert (tmp_path / "cli.safetensors").read_bytes() == (tmp_path / "api.safetensors").read_bytes()
    proc = run_cli("merge", *fps, "--strategy", "sparse", "--param", "mask=union", "-o", tmp_path / "s.safetensors")
    assert proc.returncode == 0 and "sparsity" in proc.stdout

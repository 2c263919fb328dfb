"""LoRA adapters against PEFT on a tiny Llama: adapter merges (delta: concat and SVD, with linear and TIES
strategies; factors), folding into the base (= PEFT's merge_and_unload), extraction, the CLI, and one-line errors
for every bad adapter directory."""

import json
import os
import pathlib
import re
import shutil

import pytest
import torch
from helpers.checkpoints import tree_snapshot
from helpers.cli import run_cli

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import pysoup  # noqa: E402
from pysoup.errors import PlanError, SoupError  # noqa: E402
from pysoup.lora import extract_lora, fold, merge_adapters, open_adapter  # noqa: E402

# Reading ΔW back through PEFT and comparing it with sums computed in another order: fp32 rounding of values ~1.
ATOL, RTOL = 2e-6, 1e-5


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _load_base(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)


def _make_adapter(base_dir, out, seed, **cfg):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_load_base(base_dir), LoraConfig(init_lora_weights=False, **cfg))
    with torch.no_grad():  # init_lora_weights=False draws B too; make every module's ΔW clearly non-zero
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    """A tiny fp32 Llama and four PEFT adapters of it: embeddings, rank and alpha patterns, rslora, modules_to_save."""
    root = tmp_path_factory.mktemp("lora")
    base = str(root / "base")
    _llama().save_pretrained(base)
    ad = {
        "a": _make_adapter(
            base, str(root / "a"), 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
            rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
        ),
        "b": _make_adapter(
            base, str(root / "b"), 2, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"]
        ),
        "c": _make_adapter(
            base, str(root / "c"), 3, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
            modules_to_save=["lm_head"],
        ),
        "d": _make_adapter(base, str(root / "d"), 4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    }  # fmt: skip
    return root, base, ad


def _peft_deltas(base_dir, adapter_dir):
    """{weight name: ΔW} as PEFT computes it (get_delta_weight of every LoRA layer), in the base weight's layout."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(_load_base(base_dir), adapter_dir)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            out[name + ".weight"] = module.get_delta_weight("default").detach().clone()
    return out


def _merged(base_dir, adapter_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_base(base_dir), adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _combine(deltas, coeffs):
    out = {}
    for d, c in zip(deltas, coeffs):
        for k, v in d.items():
            out[k] = out.get(k, torch.zeros_like(v, dtype=torch.float64)) + c * v.double()
    return out


def _assert_deltas(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=ATOL, rtol=RTOL, msg=k)


# -- delta --------------------------------------------------------------------------------------------------
def test_delta_concat_loads_in_peft_and_equals_weighted_sum(peft_dirs, tmp_path):
    root, base, ad = peft_dirs
    out = tmp_path / "ab"
    report = merge_adapters([ad["a"], ad["b"]], out, mode="delta", strategy="task_arithmetic", weights=[0.3, -0.7])
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    want = _combine([_peft_deltas(base, ad["a"]), _peft_deltas(base, ad["b"])], [0.3, -0.7])
    _assert_deltas(_peft_deltas(base, str(out)), want)
    # concat keeps every rank: q_proj has both adapters (4 + 2), v_proj only a's (rank_pattern 2)
    assert report.ranks["model.layers.0.self_attn.q_proj"] == 6
    assert report.ranks["model.layers.0.self_attn.v_proj"] == 2
    assert report.ranks["model.layers.1.self_attn.o_proj"] == 2
    assert report.ranks["model.embed_tokens"] == 4
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["r"] == cfg["lora_alpha"]
    # the folded model PEFT makes from the merged adapter is the base plus the weighted sum
    merged, base_sd = _merged(base, str(out)), _load_base(base).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(merged[k].double(), base_sd[k].double() + v, atol=ATOL, rtol=RTOL)


def test_delta_concat_equals_peft_cat(peft_dirs, tmp_path):
    """PEFT's 'cat' combination is exact for linear combinations: pysoup's linear merge equals it."""
    from peft import PeftModel

    root, base, ad = peft_dirs
    model = PeftModel.from_pretrained(_load_base(base), ad["a"], adapter_name="a")
    model.load_adapter(ad["d"], adapter_name="d")
    model.add_weighted_adapter(["a", "d"], [0.25, 0.75], "cat", combination_type="cat")
    peft_cat = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "cat" in getattr(module, "scaling", {}):
            peft_cat[name + ".weight"] = module.get_delta_weight("cat").detach().clone()
    merge_adapters([ad["a"], ad["d"]], tmp_path / "ad", mode="delta", weights=[1, 3])  # linear: normalized
    _assert_deltas(_peft_deltas(base, str(tmp_path / "ad")), peft_cat)


def test_delta_svd_full_rank_exact_and_truncation_error_is_discarded_energy(peft_dirs, tmp_path):
    root, base, ad = peft_dirs
    want = _combine([_peft_deltas(base, ad["a"]), _peft_deltas(base, ad["b"])], [0.5, 0.5])
    full = merge_adapters([ad["a"], ad["b"]], tmp_path / "full", mode="delta", refactor="svd", rank=6)
    _assert_deltas(_peft_deltas(base, str(tmp_path / "full")), want)
    assert full.max_discarded_energy < 1e-12
    # rank-deficient concatenations (the same adapter twice): the Grams' null space is dropped, the result exact
    twice = merge_adapters([ad["d"], ad["d"]], tmp_path / "twice", mode="delta", refactor="svd", rank=8)
    _assert_deltas(_peft_deltas(base, str(tmp_path / "twice")), _peft_deltas(base, ad["d"]))
    assert twice.max_discarded_energy < 1e-12
    low = merge_adapters([ad["a"], ad["b"]], tmp_path / "low", mode="delta", refactor="svd", rank=1)
    got = _peft_deltas(base, str(tmp_path / "low"))
    assert set(low.ranks.values()) == {1}
    for module, lost in low.discarded_energy.items():
        key = module + ".weight"
        err = float(((got[key].double() - want[key]) ** 2).sum() / (want[key] ** 2).sum())
        assert lost > 1e-3
        assert err == pytest.approx(lost, rel=1e-4), module  # Eckart-Young: the error is the dropped spectrum


def test_delta_ties_equals_reference_merge_of_the_deltas(peft_dirs, tmp_path):
    """A non-linear strategy on ΔW: the same as pysoup's reference backend on the ΔW's with a zero base."""
    root, base, ad = peft_dirs
    deltas = [_peft_deltas(base, ad[k]) for k in ("a", "b", "d")]
    keys = sorted(set().union(*deltas))
    dense = [{k: d.get(k, torch.zeros_like(deltas[0].get(k, deltas[1].get(k)))) for k in keys} for d in deltas]
    zeros = {k: torch.zeros_like(v) for k, v in dense[0].items()}
    params = {"density": 0.5}
    want = pysoup.merge(dense, strategy="ties", base=zeros, params=params, weights=[1, 2, 1], backend="reference")
    out = tmp_path / "ties"
    report = merge_adapters(
        [ad["a"], ad["b"], ad["d"]], out, mode="delta", strategy="ties", params=params, weights=[1, 2, 1],
        refactor="svd", rank=32, backend="reference",
    )  # fmt: skip
    _assert_deltas(_peft_deltas(base, str(out)), want)
    assert report.max_discarded_energy < 1e-10


def test_delta_refuses_concat_for_nonlinear_and_bad_ranks(peft_dirs, tmp_path):
    root, base, ad = peft_dirs
    with pytest.raises(PlanError, match="not linear in ΔW"):
        merge_adapters([ad["a"], ad["b"]], tmp_path / "x", mode="delta", strategy="ties")
    with pytest.raises(PlanError, match="positive integer rank"):
        merge_adapters([ad["a"]], tmp_path / "x", mode="delta", refactor="svd", rank=0)
    with pytest.raises(PlanError, match="mode must be one of"):
        merge_adapters([ad["a"]], tmp_path / "x", mode="sum")
    assert not (tmp_path / "x").exists()


# -- factors ------------------------------------------------------------------------------------------------
def test_factors_one_adapter_equals_peft_linear(peft_dirs, tmp_path):
    from peft import PeftModel

    root, base, ad = peft_dirs
    model = PeftModel.from_pretrained(_load_base(base), ad["d"], adapter_name="d")
    model.add_weighted_adapter(["d"], [1.0], "lin", combination_type="linear")
    peft_lin = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "lin" in getattr(module, "scaling", {}):
            peft_lin[name + ".weight"] = module.get_delta_weight("lin").detach().clone()
    merge_adapters([ad["d"]], tmp_path / "f", mode="factors")
    _assert_deltas(_peft_deltas(base, str(tmp_path / "f")), peft_lin)


def test_factors_with_shared_A_is_exact_and_cross_terms_otherwise(peft_dirs, tmp_path):
    """With equal A's, (Σ cᵢBᵢ)·A = Σ cᵢΔWᵢ; with different A's the factors merge is not the average update."""
    from safetensors.torch import load_file, save_file

    root, base, ad = peft_dirs
    twin = tmp_path / "d_twin"
    shutil.copytree(ad["d"], twin)
    sd = load_file(str(twin / "adapter_model.safetensors"))
    sd = {k: (v * -2.0 + 0.1 if "lora_B" in k else v) for k, v in sd.items()}
    save_file(sd, str(twin / "adapter_model.safetensors"), metadata={"format": "pt"})
    want = _combine([_peft_deltas(base, ad["d"]), _peft_deltas(base, str(twin))], [0.25, 0.75])
    merge_adapters([ad["d"], str(twin)], tmp_path / "f", mode="factors", weights=[1, 3])
    _assert_deltas(_peft_deltas(base, str(tmp_path / "f")), want)
    # A and B both scaled by 2: the factors' average is 1.5A·1.5B = 2.25·ΔW (cross terms), the update's is 2.5·ΔW
    double = tmp_path / "d_double"
    shutil.copytree(ad["d"], double)
    sd = load_file(str(double / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in sd.items()}, str(double / "adapter_model.safetensors"), metadata={"format": "pt"})
    merge_adapters([ad["d"], str(double)], tmp_path / "g", mode="factors")
    merge_adapters([ad["d"], str(double)], tmp_path / "h", mode="delta")
    one = _peft_deltas(base, ad["d"])
    _assert_deltas(_peft_deltas(base, str(tmp_path / "g")), _combine([one], [2.25]))
    _assert_deltas(_peft_deltas(base, str(tmp_path / "h")), _combine([one], [2.5]))


def test_factors_refuses_different_modules_or_scalings(peft_dirs, tmp_path):
    root, base, ad = peft_dirs
    with pytest.raises(PlanError, match=r"module 'model.layers.0.self_attn.o_proj' is not adapted here.*factors"):
        merge_adapters([ad["d"], ad["b"]], tmp_path / "x", mode="factors")
    louder = _edit(pathlib.Path(ad["d"]), tmp_path / "louder", config={"lora_alpha": 16})
    with pytest.raises(PlanError, match=r"q_proj' has rank 4, scaling 4 but rank 4, scaling 2 in"):
        merge_adapters([ad["d"], louder], tmp_path / "x", mode="factors")


# -- fold ---------------------------------------------------------------------------------------------------
def test_fold_equals_merge_and_unload(peft_dirs, tmp_path):
    """modules_to_save (lm_head), an embedding's LoRA, rank/alpha patterns: the same model as PEFT's."""
    root, base, ad = peft_dirs
    for name in ("a", "c"):
        out = tmp_path / name
        report = fold(base, [ad[name]], out)
        assert os.path.isfile(out / "config.json")  # the base's files beside the weights
        from safetensors.torch import load_file

        got, want = load_file(str(out / "model.safetensors")), _merged(base, ad[name])
        assert sorted(got) == sorted(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL, msg=k)
        assert report.folded and report.peak_rss_bytes > 0
    assert "lm_head.weight" in report.replaced


def test_fold_equals_mergekit_model_plus_lora(peft_dirs, tmp_path):
    """mergekit's `MODEL+LORA` reference (PEFT merge_and_unload into its cache) is what pysoup.lora.folded gives."""
    from mergekit.common import ModelReference
    from safetensors.torch import load_file

    from pysoup.lora import folded

    root, base, ad = peft_dirs
    ref = ModelReference.parse(f"{base}+{ad['c']}").merged(cache_dir=str(tmp_path / "cache"))
    theirs = load_file(os.path.join(ref.model.path, "model.safetensors"))
    with folded(f"{base}+{ad['c']}", dir=tmp_path) as path:
        ours = load_file(os.path.join(path, "model.safetensors"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".pysoup-folded-")]  # removed on exit
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=ATOL, rtol=RTOL, msg=k)


def test_fold_several_adapters_weighted_bf16(peft_dirs, tmp_path):
    """W + Σ wᵢΔWᵢ in fp32, rounded once to the base's bf16."""
    from safetensors.torch import load_file, save_file

    root, base, ad = peft_dirs
    sd = load_file(os.path.join(base, "model.safetensors"))
    bf = tmp_path / "base_bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in sd.items()}, str(bf), metadata={"format": "pt"})
    fold(str(bf), [ad["a"], ad["b"]], tmp_path / "out.safetensors", weights=[0.5, 2.0])
    fold(str(bf), [ad["a"], ad["b"]], tmp_path / "ref.safetensors", weights=[0.5, 2.0], backend="reference")
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    got = load_file(str(tmp_path / "out.safetensors"))
    deltas = _combine([_peft_deltas(base, ad["a"]), _peft_deltas(base, ad["b"])], [0.5, 2.0])
    for k, v in sd.items():
        # a's file carries the embedding's base weight (fp32, PEFT's save_embedding_layers): it replaces the base's
        w = v if k == "model.embed_tokens.weight" else v.bfloat16()
        want = w.double() + deltas.get(k, 0.0)
        assert got[k].dtype == torch.bfloat16
        # one rounding of the fp32 sum: within half a bf16 ulp (plus fp32 noise)
        torch.testing.assert_close(got[k], want.float().bfloat16(), atol=0, rtol=2**-8, msg=k)


def test_fold_cli_and_errors(peft_dirs, tmp_path):
    root, base, ad = peft_dirs
    out = tmp_path / "m"
    argv = ("merge", base, "--lora", ad["a"], "--lora", ad["b"], "--lora-weights", "1,0.5", "--threads", "1")
    proc = run_cli(*argv, "-o", out)
    assert proc.returncode == 0, proc.stderr
    api = fold(base, [ad["a"], ad["b"]], tmp_path / "api", weights=[1, 0.5])
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "api" / "model.safetensors").read_bytes()
    assert api.bytes_written == os.path.getsize(out / "model.safetensors")
    before = tree_snapshot(str(root))
    for argv, match in [
        ((base, ad["a"], "--lora", ad["b"]), "--lora folds adapters into one base model, got 2 inputs"),
        ((base, "--lora", ad["a"], "--lora-weights", "1,2"), "2 adapter weights for 1 adapters"),
        ((base, "--lora", ad["a"], "--strategy", "ties"), "folding takes --lora-weights"),
        ((ad["b"], "--lora", ad["a"]), "has no tensor 'model.embed_tokens.weight'"),
        ((ad["a"], ad["b"], "--lora-mode", "delta", "--threads", "2"), "--threads applies to folding (--lora)"),
    ]:
        proc = run_cli("merge", *argv, "-o", tmp_path / "bad")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and match in lines[0], proc.stderr
    assert tree_snapshot(str(root)) == before and not (tmp_path / "bad").exists()


# -- extract ------------------------------------------------------------------------------------------------
def test_extract_full_rank_reproduces_finetuned(peft_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    root, base, ad = peft_dirs
    sd = load_file(os.path.join(base, "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) if ("proj" in k or "norm" in k) else v for k, v in sd.items()}
    ft_dir = tmp_path / "ft"
    ft_dir.mkdir()
    save_file(ft, str(ft_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(base, "config.json"), ft_dir)
    report = extract_lora(str(ft_dir), base, tmp_path / "x", rank=64)
    assert min(report.retained_energy.values()) > 1 - 1e-9
    assert report.modules_to_save and all("norm" in m for m in report.modules_to_save)
    merged = _merged(base, str(tmp_path / "x"))
    for k, v in ft.items():
        torch.testing.assert_close(merged[k], v, atol=1e-5, rtol=1e-5, msg=k)
    # low rank through the CLI: retained energy reported, below 1 for the full-rank noise
    proc = run_cli("extract-lora", ft_dir, base, "-o", tmp_path / "x4", "--rank", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    low = json.loads(proc.stdout)
    q = low["retained_energy"]["model.layers.0.self_attn.q_proj"]
    assert 0 < q < 0.9 and low["ranks"]["model.layers.0.self_attn.q_proj"] == 4
    with open_adapter(tmp_path / "x4") as x4:
        assert x4.modules["model.layers.0.self_attn.q_proj"].rank == 4


# -- the merge command and API on adapters --------------------------------------------------------------------
def test_merge_cli_on_adapters_needs_a_mode(peft_dirs, tmp_path):
    root, base, ad = peft_dirs
    proc = run_cli("merge", ad["a"], ad["d"], "-o", tmp_path / "o")
    assert proc.returncode == 1 and "choose how adapters merge" in proc.stderr and not (tmp_path / "o").exists()
    with pytest.raises(PlanError, match="choose how adapters merge"):
        pysoup.merge([ad["a"], ad["d"]], tmp_path / "o")
    proc = run_cli("merge", ad["a"], ad["d"], "--lora-mode", "delta", "--lora-rank", "3", "-o", tmp_path / "o")
    assert proc.returncode == 0 and "discarded spectral energy" in proc.stdout, proc.stderr
    report = pysoup.merge([ad["a"], ad["d"]], tmp_path / "p", lora="delta", lora_rank=3)
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "p" / "adapter_model.safetensors"
    ).read_bytes()
    assert set(report.ranks.values()) == {3}


# -- bad adapter directories ----------------------------------------------------------------------------------
def _edit(src, dst, config=None, drop=(), rename=None, reshape=None):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(dst / "adapter_model.safetensors"))
    sd = {k: v for k, v in sd.items() if not any(d in k for d in drop)}
    for old, new in (rename or {}).items():
        sd[new] = sd.pop(old)
    for k, shape in (reshape or {}).items():
        sd[k] = torch.zeros(shape)
    save_file(sd, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
BAD = [
    ("no_config", lambda s, d: (shutil.copytree(s, d), os.remove(d / "adapter_config.json")), "no adapter_config.json"),
    ("no_weights", lambda s, d: (shutil.copytree(s, d), os.remove(d / "adapter_model.safetensors")),
     "adapter has no adapter_model.safetensors"),
    ("bad_json", lambda s, d: (shutil.copytree(s, d), (d / "adapter_config.json").write_text("{r: 4")),
     "not valid JSON"),
    ("missing_A", lambda s, d: _edit(s, d, drop=[f"{Q0}.lora_A"]),
     "module 'model.layers.0.self_attn.q_proj': lora_A is missing"),
    ("missing_B", lambda s, d: _edit(s, d, drop=[f"{Q0}.lora_B"]),
     "module 'model.layers.0.self_attn.q_proj': lora_B is missing"),
    ("rank_mismatch", lambda s, d: _edit(s, d, reshape={f"{Q0}.lora_B.weight": (32, 3)}),
     "lora_A has rank 4 but lora_B has rank 3"),
    ("rank_vs_config", lambda s, d: _edit(s, d, config={"r": 8}), "has rank 4 in adapter_model.safetensors but 8"),
    ("dora_config", lambda s, d: _edit(s, d, config={"use_dora": True}), "DoRA"),
    ("dora_tensor", lambda s, d: _edit(s, d, reshape={f"{Q0}.lora_magnitude_vector": (32,)}),
     "module 'model.layers.0.self_attn.q_proj' has a DoRA magnitude vector"),
    ("not_lora", lambda s, d: _edit(s, d, config={"peft_type": "IA3"}), "peft_type 'IA3' is not a LoRA adapter"),
    ("bias", lambda s, d: _edit(s, d, config={"bias": "all"}), "bias='all' adapters"),
    ("stray", lambda s, d: _edit(s, d, reshape={"base_model.model.model.norm.weight": (32,)}),
     "neither a LoRA factor nor in modules_to_save"),
    ("conv", lambda s, d: _edit(s, d, reshape={f"{Q0}.lora_A.weight": (4, 32, 1, 1),
                                                f"{Q0}.lora_B.weight": (32, 4, 1, 1)}),
     "not convolutions"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_adapter_one_line_error(peft_dirs, tmp_path, case):
    root, base, ad = peft_dirs
    _, make, match = case
    bad = tmp_path / "bad"
    make(pathlib.Path(ad["d"]), bad)
    before = tree_snapshot(str(tmp_path))
    with pytest.raises(SoupError, match=re.escape(match)):
        fold(base, [bad], tmp_path / "out")
    with pytest.raises(SoupError, match=re.escape(match)):
        pysoup.merge([ad["d"], bad], tmp_path / "out", lora="factors")
    # the command line, for a few (each run is a fresh process: ~1 s)
    if case[0] in ("no_config", "missing_A", "dora_tensor"):
        for argv in (
            ["merge", base, "--lora", bad, "-o", tmp_path / "out"],
            ["merge", ad["d"], bad, "--lora-mode", "delta", "-o", tmp_path / "out"],
        ):
            proc = run_cli(*argv)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr
            assert lines[0].startswith("pysoup: error:") and match in lines[0], lines[0]
    assert tree_snapshot(str(tmp_path)) == before and not (tmp_path / "out").exists()


def test_adapters_that_do_not_go_together(peft_dirs, tmp_path):
    root, base, ad = peft_dirs
    other = _edit(pathlib.Path(ad["d"]), tmp_path / "other", config={"base_model_name_or_path": "x/y"})
    mine = _edit(pathlib.Path(ad["d"]), tmp_path / "mine", config={"base_model_name_or_path": "x/z"})
    with pytest.raises(PlanError, match=r"other: adapter of base model 'x/y', but .*mine adapts 'x/z'"):
        merge_adapters([mine, other], tmp_path / "o", mode="delta")
    fif = _edit(pathlib.Path(ad["d"]), tmp_path / "fif", config={"fan_in_fan_out": True})
    with pytest.raises(PlanError, match="fan_in_fan_out=True but"):
        merge_adapters([ad["d"], fif], tmp_path / "o", mode="delta")
    # fan_in_fan_out adapters target [in, out] weights: the Llama's [out, in] q_proj (32 x 32) fits, v_proj does not
    with pytest.raises(PlanError, match=r"module 'model.layers.0.self_attn.v_proj' adapts a \[32, 16\] weight"):
        fold(base, [fif], tmp_path / "o")
    wide = _edit(
        pathlib.Path(ad["d"]), tmp_path / "wide",
        reshape={f"{Q0}.lora_A.weight": (4, 48)},
    )  # fmt: skip
    with pytest.raises(
        PlanError, match=r"wide: module 'model.layers.0.self_attn.q_proj' is a linear of weight \[32, 48\]"
    ):
        merge_adapters([ad["d"], wide], tmp_path / "o", mode="delta")
    with pytest.raises(PlanError, match="overwrite an input adapter"):
        merge_adapters([ad["d"], ad["a"]], ad["d"], mode="delta")
    assert not (tmp_path / "o").exists()


# -- MWA over Trainer checkpoint folders ------------------------------------------------------------------------
def test_mwa_from_trainer_checkpoints(tmp_path):
    """trainer_state.json as the Trainer writes it (TrainerState.save_to_json): step = global_step, loss = the last
    logged training loss; the CLI's --weights mwa:loss,penalty=P prints and uses the same weights."""
    from helpers.checkpoints import save_st, small_model
    from safetensors.torch import load_file
    from transformers import TrainerState

    run = tmp_path / "run"
    losses = {100: 1.25, 200: 0.8, 300: 0.5}
    for i, step in enumerate(losses):
        ckpt = run / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        save_st(ckpt / "model.safetensors", small_model(seed=i))
        history = [{"loss": losses[s], "step": s, "epoch": s / 300, "grad_norm": 1.0} for s in losses if s <= step]
        history.append({"eval_loss": 9.0, "step": step})  # evaluation entries are not the training loss
        TrainerState(global_step=step, log_history=history).save_to_json(str(ckpt / "trainer_state.json"))
    folders = [str(run / f"checkpoint-{s}") for s in losses]
    assert pysoup.weights.trainer_metrics(folders)[1] == {"path": folders[1], "step": 200, "loss": 0.8}
    by_loss = pysoup.weights.mwa(folders, mode="loss", penalty=2)
    assert by_loss == pysoup.weights.mwa(list(losses.values()), mode="loss", penalty=2)
    assert pysoup.weights.mwa(folders, mode="step", penalty=1) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    proc = run_cli("merge", *folders, "--weights", "mwa:loss,penalty=2", "-o", tmp_path / "mwa.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "mwa weights (loss, penalty=2):" in proc.stderr
    assert f"checkpoint-300: step 300, loss 0.5 -> weight {by_loss[2]:.6f}" in proc.stderr
    want = pysoup.merge(folders, tmp_path / "api.safetensors", weights=by_loss)
    assert want.outputs and (tmp_path / "mwa.safetensors").read_bytes() == (tmp_path / "api.safetensors").read_bytes()
    assert load_file(str(tmp_path / "mwa.safetensors")).keys() == load_file(str(tmp_path / "api.safetensors")).keys()
    for bad, match in [("mwa:acc", "expected mwa:loss or mwa:step"), ("mwa:loss,p=1", "expected mwa:loss")]:
        proc = run_cli("merge", *folders, "--weights", bad, "-o", tmp_path / "bad.safetensors")
        assert proc.returncode == 1 and match in proc.stderr, proc.stderr
    (run / "checkpoint-100" / "trainer_state.json").unlink()
    with pytest.raises(PlanError, match="checkpoint-100: no trainer_state.json"):
        pysoup.weights.mwa(folders)


def test_fold_fan_in_fan_out_gpt2_equals_merge_and_unload(tmp_path):
    """GPT-2's Conv1D weights are [in, out]: PEFT's fan_in_fan_out adapters update them by (B·A)ᵀ."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).save_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), cfg)
    model.save_pretrained(tmp_path / "ad")
    fold(str(base), [str(tmp_path / "ad")], tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(tmp_path / "ad")).merge_and_unload()
    want = merged.state_dict()
    assert got["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], atol=ATOL, rtol=RTOL, msg=k)

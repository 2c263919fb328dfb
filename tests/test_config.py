"""mergekit YAML configs: read into the same merge as the API, unsupported keys refused."""

import pytest
import yaml
from helpers.cli import run_cli

import pysoup
from pysoup.errors import PlanError
from pysoup.strategies.config import load_config


@pytest.fixture
def family(tmp_path):
    from pysoup.testing import make_family

    fts = make_family(str(tmp_path / "models"), 2, 400_000, dtype="BF16", layout="hf")
    return str(tmp_path / "models" / "base"), fts


def write(tmp_path, cfg):
    p = tmp_path / "soup.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_ties_config_equals_api(tmp_path, family):
    base, (a, b) = family
    cfg = {
        "models": [{"model": base}, {"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                   {"model": b, "parameters": {"weight": 0.3, "density": 0.8}}],
        "merge_method": "ties", "base_model": base, "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32", "out_dtype": "bfloat16",
    }  # fmt: skip
    path = write(tmp_path, cfg)
    spec = load_config(path)
    assert spec.inputs == [a, b] and spec.base == base and spec.dtype == "bfloat16"
    assert spec.model_params == [{"density": 0.5, "weight": 0.7}, {"density": 0.8, "weight": 0.3}]
    assert spec.params == {"lambda": 1.0, "normalize": True}  # int8_mask changes no value: dropped
    run_cli("merge", "--config", path, "-o", tmp_path / "cli.safetensors", check=True)
    pysoup.merge(
        [a, b],
        tmp_path / "api.safetensors",
        strategy="ties",
        base=base,
        weights=[0.7, 0.3],
        model_params=[{"density": 0.5}, {"density": 0.8}],
        dtype="bfloat16",
    )
    assert (tmp_path / "cli.safetensors").read_bytes() == (tmp_path / "api.safetensors").read_bytes()


def test_mergekit_defaults_for_dare_and_slerp(tmp_path, family):
    base, (a, b) = family
    spec = load_config(
        write(
            tmp_path,
            {
                "models": [{"model": a}, {"model": b}],
                "merge_method": "dare_ties",
                "base_model": base,
                "parameters": {"density": 0.5, "weight": 1},
            },
        )
    )
    # mergekit's dare_ties: no normalization, survivors rescaled to the task vector's L1 norm (rescale: true)
    assert spec.params == {"lambda": 1.0, "rescale": "l1", "normalize": False}
    assert spec.model_params == [{"density": 0.5, "weight": 1.0}] * 2
    spec = load_config(
        write(
            tmp_path,
            {
                "models": [{"model": base}, {"model": a}],
                "merge_method": "slerp",
                "base_model": base,
                "parameters": {"t": [0, 0.5, 1]},
            },
        )
    )
    assert spec.inputs == [base, a] and spec.base is None and spec.strategy == "slerp"
    run_cli("merge", "--config", tmp_path / "soup.yaml", "-o", tmp_path / "s.safetensors", check=True)


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"merge_method": "linear", "models": [{"model": "x"}], "slice": []}, "unknown key 'slice'"),
        ({"merge_method": "nuslerp2", "models": [{"model": "x"}]}, "merge_method 'nuslerp2' is not a mergekit"),
        ({"merge_method": "linear", "models": [{"parameters": {}}]}, "needs a 'model' path"),
        ({"merge_method": "slerp", "models": [{"model": "x"}, {"model": "y"}]}, "'slerp' needs a base_model"),
        ("just a string", "a config is a mapping"),
    ],
)
def test_bad_configs(tmp_path, cfg, match):
    path = write(tmp_path, cfg)
    with pytest.raises(PlanError, match=match):
        load_config(path)
    proc = run_cli("merge", "--config", path, "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 1 and match in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_config_and_inputs_conflict(tmp_path, family):
    base, (a, b) = family
    path = write(tmp_path, {"merge_method": "linear", "models": [{"model": a}, {"model": b}]})
    proc = run_cli("merge", a, "--config", path, "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 1 and "not both" in proc.stderr
    proc = run_cli("merge", "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 1 and "needs input checkpoints" in proc.stderr

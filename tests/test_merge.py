"""Whole merges: API = CLI = in-memory, single file = sharded, the reference backend = the C++ one."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.checkpoints import hf_dir, save_st, small_model
from helpers.cli import run_cli
from helpers.tensors import assert_bit_equal
from safetensors.torch import load_file

import pysoup
from pysoup.ops import reference


def expected(sds, weights, normalize=True, dtype=None):
    return {
        k: reference.weighted_sum([sd[k] for sd in sds], weights, dtype or sds[0][k].dtype, normalize) for k in sds[0]
    }


def assert_same_tensors(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert_bit_equal(a[k], b[k])


def test_api_cli_memory_agree(tmp_path, models):
    paths, sds = models
    w = [0.5, 0.3, 0.2]
    want = expected(sds, w)
    report = pysoup.merge(paths, tmp_path / "api.safetensors", weights=w, threads=2)
    run_cli("merge", *paths, "-o", tmp_path / "cli.safetensors", "--weights", "0.5,0.3,0.2", check=True)
    mem = pysoup.merge(sds, weights=w)
    assert list(mem) == list(sds[0])  # the first input's order
    assert_same_tensors(load_file(str(tmp_path / "api.safetensors")), want)
    assert_same_tensors(load_file(str(tmp_path / "cli.safetensors")), want)
    assert_same_tensors(mem, want)
    assert open(tmp_path / "api.safetensors", "rb").read() == open(tmp_path / "cli.safetensors", "rb").read()
    assert report.outputs == [str(tmp_path / "api.safetensors")]
    assert report.bytes_read == 3 * sum(t.numel() * 2 for t in sds[0].values())
    assert report.bytes_written == os.path.getsize(tmp_path / "api.safetensors")
    assert report.peak_rss_bytes > 0 and report.seconds > 0 and report.tensors == len(sds[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("threads", [1, 2])
def test_backends_and_threads_identical(tmp_path, models, backend, threads):
    paths, sds = models
    out = tmp_path / "o.safetensors"
    pysoup.merge(paths, out, weights=[1, 2, 3], backend=backend, threads=threads, dtype="float16")
    assert_same_tensors(load_file(str(out)), expected(sds, [1, 2, 3], dtype=torch.float16))


def test_uniform_and_identical_copies(tmp_path, models):
    paths, sds = models
    out = tmp_path / "u.safetensors"
    pysoup.merge([paths[0]] * 4, out, strategy="uniform")
    assert open(out, "rb").read() == open(paths[0], "rb").read()  # a soup of copies is the copy, byte for byte
    assert_same_tensors(pysoup.merge(sds, strategy="uniform"), expected(sds, [1, 1, 1]))


def test_unnormalized_linear(models):
    _, sds = models
    got = pysoup.merge(sds, weights=[1.0, -1.0, 0.5], params={"normalize": False})
    assert_same_tensors(got, expected(sds, [1.0, -1.0, 0.5], normalize=False))


def test_mixed_inputs_and_dtypes(tmp_path, models):
    paths, sds = models
    f32 = {k: v.float() for k, v in sds[1].items()}
    got = pysoup.merge([paths[0], f32, sds[2]], weights=[1, 1, 2], dtype="float32")
    want = {k: reference.weighted_sum([sds[0][k], f32[k], sds[2][k]], [1, 1, 2], torch.float32, True) for k in sds[0]}
    assert_same_tensors(got, want)


def test_integer_buffers_are_copied(tmp_path):
    sds = [small_model(seed=s, extra_int=True) for s in range(2)]
    paths = [save_st(tmp_path / f"i{i}.safetensors", sd) for i, sd in enumerate(sds)]
    out = tmp_path / "o.safetensors"
    pysoup.merge(paths, out)
    got = load_file(str(out))
    assert torch.equal(got["model.position_ids"], sds[0]["model.position_ids"])


def test_per_tensor_weights(models):
    _, sds = models
    weights = [
        [0.0, 1.0],  # a gradient over the layers
        [{"filter": "mlp", "value": 3.0}, {"value": 1.0}],
        1.0,
    ]
    got = pysoup.merge(sds, weights=weights)
    positions = {"model.layers.0": 0.0, "model.layers.1": 0.5, "model.layers.2": 1.0}
    for k in sds[0]:
        t = next((v for p, v in positions.items() if k.startswith(p + ".")), 0.0)  # non-layer tensors: t = 0
        w = [t, 3.0 if "mlp" in k else 1.0, 1.0]
        assert_bit_equal(got[k], reference.weighted_sum([sd[k] for sd in sds], w, torch.bfloat16, True))


def test_filter_matching_nothing_warns(models):
    _, sds = models
    with pytest.warns(UserWarning, match="'conv' matches no tensor"):
        pysoup.merge(sds, weights=[[{"filter": "conv", "value": 2.0}, {"value": 1.0}], 1, 1])


def test_sharded_in_and_out_equal_single_file(tmp_path, models):
    paths, sds = models
    dirs = [hf_dir(tmp_path / f"hf{i}", sd, shards=1 + i) for i, sd in enumerate(sds)]
    single = tmp_path / "single.safetensors"
    pysoup.merge(paths, single, weights=[1, 2, 3])
    out = tmp_path / "outdir"
    report = pysoup.merge(dirs, out, weights=[1, 2, 3], shard_size="3KB")
    files = sorted(os.listdir(out))
    assert "config.json" in files and "tokenizer.json" in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    index = json.load(open(out / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(sds[0]) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in sds[0].values())
    merged = {}
    for s in shards:
        part = load_file(str(out / s))
        assert all(index["weight_map"][k] == s for k in part)
        merged.update(part)
    assert_same_tensors(merged, load_file(str(single)))
    assert report.outputs[-1].endswith("model.safetensors.index.json")
    # A directory output without a shard size is one model.safetensors, like save_pretrained.
    pysoup.merge(dirs, tmp_path / "one", weights=[1, 2, 3])
    assert open(tmp_path / "one" / "model.safetensors", "rb").read() == open(single, "rb").read()


@pytest.mark.parametrize("entry", ["api", "cli"])
def test_file_merge_does_not_import_torch(tmp_path, models, entry):
    paths, _ = models
    snippets = {
        "api": (
            "import sys, pysoup; assert 'torch' not in sys.modules; "
            f"pysoup.merge({paths!r}, {str(tmp_path / 'o.safetensors')!r}, progress=False); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'numpy' not in sys.modules, 'numpy was imported'"
        ),
        "cli": (
            "import sys; from pysoup.cli import main; "
            f"assert main(['merge', *{paths!r}, '-o', {str(tmp_path / 'c.safetensors')!r}, '--no-progress']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'"
        ),
    }
    # Without TRITON_INTERPRET (conftest sets it): asking whether triton could run must not import torch either.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", snippets[entry]], check=True, env=env)


def test_inspect(models):
    paths, sds = models
    proc = run_cli("inspect", paths[0], check=True)
    assert "lm_head.weight" in proc.stdout and "BF16" in proc.stdout
    assert f"{len(sds[0])} tensors" in proc.stdout.splitlines()[-1]


def test_progress_bar_and_json(tmp_path, models, capsys):
    paths, _ = models
    pysoup.merge(paths, tmp_path / "p.safetensors", progress=True)
    assert "merging" in capsys.readouterr().err
    proc = run_cli("merge", *paths, "-o", tmp_path / "j.safetensors", "--json", check=True)
    rep = json.loads(proc.stdout)
    assert rep["strategy"] == "linear" and rep["outputs"] == [str(tmp_path / "j.safetensors")]


def test_info_command():
    """`pysoup info` shows pysoup.info(); --json gives it whole."""
    proc = run_cli("info", "--json", check=True)
    assert json.loads(proc.stdout) == pysoup.info()
    text = run_cli("info", check=True).stdout
    assert text.startswith(f"pysoup {pysoup.__version__}\n") and f"CPU ISA: {pysoup.info()['cpu_isa']}" in text


def test_nonfinite_values_warn(tmp_path, models):
    _, sds = models
    bad = dict(sds[0])
    bad["lm_head.weight"] = bad["lm_head.weight"].clone()
    bad["lm_head.weight"][0, 0] = float("nan")
    path = save_st(tmp_path / "nan.safetensors", bad)
    with pytest.warns(pysoup.NonFiniteWarning, match="lm_head.weight"):
        report = pysoup.merge([path, sds[1]], tmp_path / "o.safetensors")
    assert report.nonfinite_tensors == ["lm_head.weight"]
    assert torch.isnan(load_file(str(tmp_path / "o.safetensors"))["lm_head.weight"][0, 0])
    proc = run_cli("merge", path, path, "-o", tmp_path / "c.safetensors")
    assert proc.returncode == 0 and "warning" in proc.stderr and "lm_head.weight" in proc.stderr


def test_written_aux_files_and_weights_name(tmp_path):
    """A directory output can hold generated files (a config that states the merge's dtype, an adapter config)
    beside copied ones, and name its one weights file as PEFT does."""
    import numpy as np
    from safetensors.numpy import load_file as load_np

    from pysoup.io.writer import write_arrays

    copied = tmp_path / "tokenizer.json"
    copied.write_text('{"v": 1}')
    out = tmp_path / "adapter"
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_arrays(
        out,
        {"x": a},
        {"x": "F32"},
        aux_files=[("adapter_config.json", b'{"r": 2}\n'), str(copied)],
        weights_name="adapter_model.safetensors",
    )
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    assert (out / "adapter_config.json").read_bytes() == b'{"r": 2}\n'
    assert (out / "tokenizer.json").read_text() == '{"v": 1}'
    np.testing.assert_array_equal(load_np(str(out / "adapter_model.safetensors"))["x"], a)

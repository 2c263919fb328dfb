"""Every broken input of the core issue: a one-line error naming the file and tensor, a non-zero exit, no file
and no temporary file at the target, inputs untouched, an older file at the target intact."""

import math
import os
import subprocess
import uuid

import pytest
import torch
from helpers.checkpoints import save_st, small_model, tree_snapshot
from helpers.cli import run_cli
from helpers.faults import BAD_HEADERS, disk_full_after

import pysoup
from pysoup.errors import FormatError, OutputError, PlanError, SoupError
from pysoup.strategies import strategy_names

OLD = b"an older merge result that must survive"


@pytest.fixture
def workspace(tmp_path):
    """Good inputs a.safetensors, b.safetensors; an older file at the target."""
    sds = [small_model(seed=s) for s in range(2)]
    a = save_st(tmp_path / "a.safetensors", sds[0])
    b = save_st(tmp_path / "b.safetensors", sds[1])
    target = tmp_path / "out" / "soup.safetensors"
    target.parent.mkdir()
    target.write_bytes(OLD)
    return tmp_path, [a, b], sds, target


def assert_nothing_lost(tmp_path, before, target):
    assert tree_snapshot(str(tmp_path)) == before, "an input or the older output changed"
    debris = [f for _r, _d, fs in os.walk(tmp_path) for f in fs if "pysoup-tmp" in f]
    assert not debris, debris
    assert target.read_bytes() == OLD


def check_cli_and_api(tmp_path, target, inputs, match, api_error, cli_extra=(), api_kwargs=None):
    before = tree_snapshot(str(tmp_path))
    proc = run_cli("merge", *inputs, "-o", target, "--no-progress", *cli_extra)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pysoup: error:"), proc.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert_nothing_lost(tmp_path, before, target)
    with pytest.raises(api_error) as info:
        pysoup.merge(inputs, target, progress=False, **(api_kwargs or {}))
    assert match in str(info.value) and "\n" not in str(info.value)
    assert_nothing_lost(tmp_path, before, target)


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_input_file(workspace, case):
    tmp_path, (a, _b), _sds, target = workspace
    bad = tmp_path / "bad.safetensors"
    BAD_HEADERS[case][0](bad)
    check_cli_and_api(tmp_path, target, [a, str(bad)], str(bad), FormatError)


def test_truncated_data(workspace):
    tmp_path, (a, b), _sds, target = workspace
    cut = tmp_path / "cut.safetensors"
    data = open(b, "rb").read()
    cut.write_bytes(data[: len(data) - 100])
    check_cli_and_api(tmp_path, target, [a, str(cut)], "truncated", FormatError)


def test_missing_tensor(workspace):
    tmp_path, (a, _b), sds, target = workspace
    partial = dict(sds[1])
    del partial["model.layers.1.mlp.up_proj.weight"]
    p = save_st(tmp_path / "partial.safetensors", partial)
    check_cli_and_api(tmp_path, target, [a, p], "'model.layers.1.mlp.up_proj.weight' is missing from", PlanError)
    assert "partial.safetensors" in str(pytest.raises(PlanError, pysoup.merge, [a, p]).value)


def test_shape_mismatch(workspace):
    tmp_path, (a, _b), sds, target = workspace
    other = dict(sds[1])
    other["lm_head.weight"] = torch.zeros(41, 24, dtype=torch.bfloat16)
    p = save_st(tmp_path / "other.safetensors", other)
    check_cli_and_api(tmp_path, target, [a, p], "'lm_head.weight': shape [41, 24] in", PlanError)


def test_missing_path(workspace):
    tmp_path, (a, _b), _sds, target = workspace
    check_cli_and_api(
        tmp_path, target, [a, str(tmp_path / "nope.safetensors")], "nope.safetensors: no such file", PlanError
    )


def test_directory_without_checkpoint(workspace):
    tmp_path, (a, _b), _sds, target = workspace
    d = tmp_path / "emptymodel"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"x")
    check_cli_and_api(tmp_path, target, [a, str(d)], "has no safetensors checkpoint", PlanError)


def test_index_with_missing_shard(workspace):
    tmp_path, (a, _b), _sds, target = workspace
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "model-1.safetensors"}}')
    check_cli_and_api(tmp_path, target, [a, str(d)], "shard 'model-1.safetensors'", FormatError)


@pytest.mark.parametrize(
    "weights,cli,match",
    [
        ([1.0], "1", "1 weights for 2 models"),
        ([1.0, math.nan], "1,nan", "must be a finite number"),
        ([1.0, math.inf], "1,inf", "must be a finite number"),
        ([1.0, -1.0], "1,-1", "sum to 0.0; cannot normalize"),
    ],
    ids=["count", "nan", "inf", "zero-sum"],
)
def test_bad_weights(workspace, weights, cli, match):
    tmp_path, inputs, _sds, target = workspace
    check_cli_and_api(
        tmp_path, target, inputs, match, PlanError, cli_extra=("--weights", cli), api_kwargs={"weights": weights}
    )


def test_unknown_strategy_and_param(workspace):
    tmp_path, inputs, _sds, target = workspace
    check_cli_and_api(
        tmp_path,
        target,
        inputs,
        f"unknown strategy 'soup9' (valid: {', '.join(strategy_names())})",
        PlanError,
        cli_extra=("--strategy", "soup9"),
        api_kwargs={"strategy": "soup9"},
    )
    check_cli_and_api(
        tmp_path,
        target,
        inputs,
        "no parameter 'densty' (valid: normalize, weight)",
        PlanError,
        cli_extra=("--param", "densty=0.5"),
        api_kwargs={"params": {"densty": 0.5}},
    )


def test_output_equal_to_input(workspace):
    tmp_path, (a, b), _sds, _target = workspace
    before = tree_snapshot(str(tmp_path))
    proc = run_cli("merge", a, b, "-o", b)
    assert proc.returncode != 0 and "would overwrite an input" in proc.stderr
    with pytest.raises(PlanError, match="would overwrite an input"):
        pysoup.merge([a, b], os.path.join(os.path.dirname(a), ".", "a.safetensors"))
    with pytest.raises(PlanError, match="holds an input"):
        pysoup.merge([a, b], os.path.dirname(a))
    assert tree_snapshot(str(tmp_path)) == before


def test_disk_full_mid_write(workspace, monkeypatch):
    """The writer thread's pwrite fails with ENOSPC after some data went out: the error is clean."""
    tmp_path, inputs, _sds, target = workspace
    disk_full_after(monkeypatch)
    before = tree_snapshot(str(tmp_path))
    with pytest.raises(OutputError, match="No space left on device"):
        pysoup.merge(inputs, target, progress=False)
    assert_nothing_lost(tmp_path, before, target)


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 64 KiB tmpfs (needs root; skipped elsewhere)."""
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_real_filesystem(tmp_path, tiny_fs):
    sds = [small_model(seed=s, hidden=128) for s in range(2)]
    inputs = [save_st(tmp_path / f"big{i}.safetensors", sd) for i, sd in enumerate(sds)]
    target = tiny_fs / "soup.safetensors"
    target.write_bytes(OLD)
    for out in (target, tiny_fs / "hfdir"):
        proc = run_cli("merge", *inputs, "-o", out)
        assert proc.returncode == 1 and "No space left on device" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert sorted(os.listdir(tiny_fs)) == ["soup.safetensors"] and target.read_bytes() == OLD
    with pytest.raises(SoupError, match="No space left"):
        pysoup.merge(inputs, target)
    assert sorted(os.listdir(tiny_fs)) == ["soup.safetensors"] and target.read_bytes() == OLD

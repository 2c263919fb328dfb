import json
import os
import subprocess
import sys

# Triton kernels run on CPU tensors through the interpreter; it must be set before any kernel module imports.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def id_formatter(label):
    """Readable test ids: id_formatter("threads")(2) -> "threads=2"."""

    def fmt(value):
        return f"{label}={getattr(value, '__name__', str(value).replace('torch.', ''))}"

    return fmt


def random_tensor(shape, dtype, seed=0, wide=False):
    """Normal values; `wide` spreads exponents over 2^-30..2^30 to exercise rounding everywhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if wide:
        x = x * torch.exp2(torch.randint(-30, 30, x.shape, generator=g).float())
    return x.to(dtype)


def bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def assert_bit_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (bits(a) != bits(b)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} elements differ; first at {diff[0].tolist()}"


def save_st(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    return str(path)


def small_model(seed=0, dtype=torch.bfloat16, layers=3, hidden=24, vocab=40, extra_int=False):
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * hidden + 3, hidden, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden, generator=g)
    sd["model.norm.weight"] = torch.randn(hidden, generator=g)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    if extra_int:
        sd["model.position_ids"] = torch.arange(7, dtype=torch.int64)
    return sd


def hf_dir(path, sd, shards):
    """A Hugging Face model directory: `shards` safetensors files (+ index when > 1), config and tokenizer."""
    os.makedirs(path, exist_ok=True)
    keys = list(sd)
    per = -(-len(keys) // shards)
    wm = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = keys[s * per : (s + 1) * per]
        save_st(os.path.join(path, name), {k: sd[k] for k in part})
        wm.update({k: name for k in part})
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{}")
    return str(path)


def disk_full_after(monkeypatch, writes=1):
    """Makes pysoup's writer fail with ENOSPC after `writes` pwrite calls went through (the first: a header).
    Returns a function that starts the count again."""
    import errno

    import pysoup.io.writer as writer

    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full)
    return lambda: calls.update(n=0)


@pytest.fixture
def models(tmp_path):
    """Three small bf16 checkpoints written by the safetensors package, and their state dicts."""
    sds = [small_model(seed=s) for s in range(3)]
    paths = [save_st(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(sds)]
    return paths, sds


def run_cli(*args, check=False, env=None):
    """Runs `python -m pysoup ARGS` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "pysoup", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def tree_snapshot(path):
    """{relative path: bytes} of every file under path (or the file itself)."""
    out = {}
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    for root, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


__all__ = [
    "assert_bit_equal",
    "bits",
    "disk_full_after",
    "hf_dir",
    "id_formatter",
    "np",
    "random_tensor",
    "run_cli",
    "save_st",
    "small_model",
    "tree_snapshot",
]

"""Fixtures and session setup only; what tests share otherwise lives in tests/helpers/ (see its __init__)."""

import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before any kernel module imports.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

torch = pytest.importorskip("torch")

from helpers.checkpoints import save_st, small_model  # noqa: E402
from helpers.cli import ROOT  # noqa: E402, F401 - test_wheel.py and test_bench.py import it from here


@pytest.fixture
def models(tmp_path):
    """Three small bf16 checkpoints written by the safetensors package, and their state dicts."""
    sds = [small_model(seed=s) for s in range(3)]
    paths = [save_st(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(sds)]
    return paths, sds

"""The examples, in their CI-sized form: they run, and their own checks hold (sparse pattern kept exactly,
greedy soup >= the best single model on validation)."""

import subprocess
import sys

import pytest
from helpers.cli import ROOT

pytest.importorskip("sklearn")


def test_digits_soups_quick():
    proc = subprocess.run(
        [sys.executable, f"{ROOT}/examples/digits_soups.py", "--quick"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| greedy soup |" in proc.stdout and "pattern kept exactly: True" in proc.stdout


def test_mwa_lora_quick():
    """LoRA checkpoints in Trainer folders, merged by MWA (pysoup.weights.mwa over the folders, factors and delta
    merges), folded and evaluated."""
    proc = subprocess.run(
        [sys.executable, f"{ROOT}/examples/mwa_lora.py", "--quick"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("| final checkpoint |", "| uniform average (delta, exact) |", "| MWA loss, penalty 1 |"):
        assert row in proc.stdout
    assert "step p=1: 0.17 0.33 0.50" in proc.stdout  # checkpoints at steps 20, 40, 60

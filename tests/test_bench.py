"""`pysoup bench` runs from the package alone: from a directory outside the repository, without importing anything
under benchmarks/, it prints the table and writes JSON, markdown and (with matplotlib) a chart; its work directory
is removed, also when it is interrupted; a bad --out is a one-line error before anything runs."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

import pysoup
from pysoup.bench import baselines
from pysoup.testing import make_family

BENCHMARKS = os.path.join(ROOT, "benchmarks") + os.sep

# `pysoup bench ...` in a fresh interpreter; afterwards it lists every loaded module that lives under benchmarks/.
_CLI = f"""
import sys
from pysoup.cli import main

rc = main(sys.argv[1:])


def paths(m):
    found = [str(getattr(m, "__file__", None) or "")]
    try:
        found += [str(p) for p in m.__path__]
    except Exception:  # not a package, or one whose __path__ is not a list of folders (torch.classes)
        pass
    return found


from_benchmarks = sorted(n for n, m in list(sys.modules.items()) if any(p.startswith({BENCHMARKS!r}) for p in paths(m)))
print("modules from benchmarks/:", from_benchmarks)
sys.exit(rc)
"""


def _env():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _bench(cwd, *args, **kw):
    return subprocess.run(
        [sys.executable, "-c", _CLI, "bench", *args], cwd=cwd, env=_env(), capture_output=True, text=True, **kw
    )


def _work_dir(stdout: str) -> str:
    """The work directory a run printed (its synthetic checkpoints are made in WORK/data/...)."""
    m = re.search(r" in (\S+)/data/", stdout)
    assert m, stdout
    return m.group(1)


@pytest.mark.slow  # ~30 s on 2 idle cores: mergekit's and torch's start-up are most of it
def test_quick_suite_from_outside_the_repository(tmp_path):
    out = tmp_path / "results"
    t = time.perf_counter()
    proc = _bench(tmp_path, "--quick", "--out", str(out), timeout=240)
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr
    assert "modules from benchmarks/: []" in proc.stdout
    assert not os.path.exists(_work_dir(proc.stdout))

    naive = "naive" if baselines.torch_and_safetensors_available() else "naive_numpy"
    want = ["pysoup", "io_floor", naive] + (["mergekit"] if baselines.mergekit_executable() else [])
    lines = proc.stdout.splitlines()
    columns = ["case", "contender", "seconds", "spread", "runs", "GB/s", "peak", "RSS"]
    assert any(line.split() == columns for line in lines)
    rows = {line.split()[1]: line.split() for line in lines if line.startswith("  4x16MiB ")}
    assert sorted(rows) == sorted(want)

    report = json.loads((out / "linear.json").read_text())
    assert report["suite"] == "linear merge" and report["quick"] is True
    assert report["command"] == "pysoup bench --quick"
    assert report["machine"]["pysoup"] == pysoup.__version__ and report["machine_line"] in proc.stdout
    (case,) = report["cases"]
    assert case["case"] == "4x16MiB" and case["inputs"] == 4 and case["read_bytes"] == 4 * case["model_bytes"] > 0
    assert list(case["contenders"]) == want
    for name, c in case["contenders"].items():
        assert c["seconds"]["n"] == len(c["samples"]) == (1 if name in ("naive", "mergekit") else 3)
        assert all(s > 0 for s in c["samples"]) and c["seconds"]["median"] > 0
        assert c["peak_rss_bytes"] > 0 and c["gb_per_s"] > 0
        if name != "pysoup":
            speedup = case["contenders"]["pysoup"][f"speedup_vs_{name}"]
            assert speedup == pytest.approx(c["seconds"]["median"] / case["contenders"]["pysoup"]["seconds"]["median"])
    assert case["contenders"]["pysoup"]["ratio_to_floor"] > 0

    md = (out / "linear.md").read_text()
    assert md.startswith("# pysoup benchmarks: linear merge")
    assert "| case | contender | seconds (median) | spread | GB/s | peak RSS | vs pysoup |" in md
    for name in want:
        assert f"| 4x16MiB | {name} | " in md
    if importlib.util.find_spec("torch"):
        assert report["kernel"]["pysoup"]["gb_per_s"] > 0 and "In-memory kernel" in md
    has_png = importlib.util.find_spec("matplotlib") is not None
    assert (out / "linear.png").exists() == has_png
    assert ("matplotlib is not installed" in proc.stdout) != has_png
    print(f"pysoup bench --quick: {seconds:.1f} s")

    # Earlier results are kept unless --force.
    again = _bench(tmp_path, "--quick", "--out", str(out), timeout=60)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"pysoup: error: {out / 'linear.json'} exists (earlier results); pass --force to overwrite, or another --out"
    )


def _unwritable_dir(tmp_path) -> str:
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o500)
    return str(d) if not os.access(d, os.W_OK) else "/proc"  # root writes anywhere, but not into /proc


@pytest.mark.parametrize("kind", ["a file", "under a file", "unwritable"])
def test_bad_out_is_one_line_before_anything_runs(tmp_path, kind):
    f = tmp_path / "file"
    f.write_text("x")
    out = {"a file": str(f), "under a file": str(f / "sub"), "unwritable": _unwritable_dir(tmp_path)}[kind]
    proc = _bench(tmp_path, "--quick", "--out", out, timeout=60)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"pysoup: error: --out {out}: ")
    assert "machine" not in proc.stdout and "contender" not in proc.stdout  # refused before it ran
    assert f.read_text() == "x"


def test_unknown_options_and_suites_are_usage_errors(tmp_path):
    for args in (["--bogus"], ["--suite", "nope"], ["--runs", "0"]):
        proc = _bench(tmp_path, *args, "--out", str(tmp_path / "r"), timeout=60)
        assert proc.returncode == 2, args
        assert proc.stderr.splitlines()[-1].startswith("pysoup bench: error: ")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_removes_its_work_directory(tmp_path, sig):
    """Interrupted while a contender runs: the contender's process session is killed and the work directory
    removed; no results are written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pysoup", "bench", "--quick", "--no-mergekit", "--out", str(tmp_path / "r")],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    for line in proc.stdout:
        seen += line
        if "  done in " in line:  # checkpoints made: the first contender starts now
            break
    time.sleep(0.5)
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=60)
    work = _work_dir(seen)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGTERM), err
    assert not os.path.exists(work)
    assert not (tmp_path / "r").exists()  # the results folder it had made, still empty
    for pid in filter(str.isdigit, os.listdir("/proc")):  # nothing still writing into it
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert work.encode() not in f.read()
        except OSError:
            pass


def test_baselines_compute_the_uniform_soup(tmp_path):
    """The naive numpy script's soup is pysoup's uniform soup to within one bf16 rounding (it multiplies, then
    adds; pysoup fuses the two); the I/O floor writes the output's size."""
    inputs = make_family(str(tmp_path / "m"), 3, 1 << 16, dtype="BF16", seed=1)
    naive, floor, want = (str(tmp_path / f"{n}.safetensors") for n in ("naive", "floor", "want"))
    baselines.naive_numpy(naive, inputs)
    baselines.io_floor(floor, inputs)
    pysoup.merge(inputs, want, strategy="uniform")
    assert os.path.getsize(floor) == os.path.getsize(inputs[0])
    with pysoup.open(naive) as a, pysoup.open(want) as b:
        assert a.keys() == b.keys() and a.metadata == b.metadata
        for k in b.keys():
            x, y = a[k].float().numpy(), b[k].float().numpy()
            np.testing.assert_allclose(x, y, rtol=2**-7, atol=1e-6, err_msg=k)


def test_della_bound_variants_still_apply():
    """benchmarks/della_bound.py builds its timing-only variants by replacing lines of the sparse kernels: each line
    it replaces is still there exactly once, so the script builds what it says (it stops otherwise)."""
    spec = importlib.util.spec_from_file_location("della_bound", os.path.join(BENCHMARKS, "della_bound.py"))
    della_bound = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(della_bound)
    with open(os.path.join(ROOT, della_bound.KERNELS)) as f:
        text = f.read()
    edits = [e for variant in della_bound.VARIANTS.values() for e in variant]
    assert edits
    for old, new in edits:
        assert text.count(old) == 1, old
        assert new != old

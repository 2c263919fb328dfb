"""Merges with `device=`: the host ranges stream through staging buffers to the device and the Triton kernels
merge there. CI runs the whole path on the CPU under TRITON_INTERPRET=1 (device="cpu"); the `gpu` tests run it
on a CUDA device, with pysoup._cuda's histograms when it was built."""

import os
import subprocess
import sys

import pytest
import torch
from helpers.checkpoints import save_st, small_model
from helpers.cli import ROOT
from helpers.methods import METHODS, family, merge_kwargs
from helpers.tensors import assert_bit_equal, random_tensor

pytest.importorskip("triton")

import pysoup  # noqa: E402
from pysoup.engine import execute as engine  # noqa: E402
from pysoup.errors import BackendError, PlanError  # noqa: E402
from pysoup.ops import reference  # noqa: E402
from pysoup.ops.cpu import CpuBackend  # noqa: E402
from pysoup.ops.table import Chunk, MaskedSumMode  # noqa: E402
from pysoup.ops.triton import TritonBackend  # noqa: E402

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Every method, and SLERP twice: its coefficients come from the fp64 statistics pass.
ALL = [
    ("linear", False, {}, None),
    ("interpolate", False, {"alpha": 0.3}, None),
    ("slerp", False, {"t": [0.0, 0.3, 0.9]}, None),
    ("slerp", False, {"t": 0.6}, None),
    *METHODS,
]
ALL_IDS = [f"{m[0]}-{i}" for i, m in enumerate(ALL)]


def _merge_both(tmp_path, method, device, **family_kw):
    bp, fps, _, _ = family(tmp_path, sparse=method[0] == "sparse", **family_kw)
    if method[0] in ("slerp", "interpolate"):
        fps = fps[:2]
    kw = merge_kwargs(method, bp)
    report = pysoup.merge(fps, tmp_path / "dev.safetensors", device=device, **kw)
    pysoup.merge(fps, tmp_path / "cpu.safetensors", backend="cpu", **kw)
    return report


@pytest.mark.parametrize("method", ALL, ids=ALL_IDS)
def test_every_method_streams_to_the_cpu_backends_bytes(tmp_path, method, monkeypatch):
    """Small chunks: several uploads per tensor, the statistics and TIES histograms summed over them. A file merge
    with backend="triton" runs this same path (test_triton checks that entry with a linear merge)."""
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 3 * 4096)
    report = _merge_both(tmp_path, method, "cpu")
    assert (report.backend, report.device) == ("triton", "cpu")
    assert (tmp_path / "dev.safetensors").read_bytes() == (tmp_path / "cpu.safetensors").read_bytes()


def test_returned_state_dict_and_cli(tmp_path):
    sds = [small_model(seed=s) for s in range(2)]
    paths = [save_st(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(sds)]
    got = pysoup.merge(paths, weights=[0.25, 0.75], device="cpu")
    want = pysoup.merge(paths, weights=[0.25, 0.75], backend="cpu")
    assert list(got) == list(want)
    for k in want:
        assert_bit_equal(got[k], want[k])
    out = tmp_path / "cli.safetensors"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pysoup.cli", "merge", *paths, "-o", str(out), "--device", "cpu", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "backend triton on cpu" in run.stdout


def test_bad_devices(tmp_path):
    sds = [small_model(seed=s) for s in range(2)]
    paths = [save_st(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(sds)]
    before = [open(p, "rb").read() for p in paths]
    out = tmp_path / "x.safetensors"
    with pytest.raises(BackendError, match="unknown device 'tpu'"):
        pysoup.merge(paths, out, device="tpu")
    with pytest.raises(PlanError, match="backend must be 'auto' or 'triton'"):
        pysoup.merge(paths, out, device="cpu", backend="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="torch sees no CUDA device"):
            pysoup.merge(paths, out, device="cuda")
    else:
        with pytest.raises(BackendError, match="CUDA device"):
            pysoup.merge(paths, out, device=f"cuda:{torch.cuda.device_count()}")
    assert not out.exists() and [open(p, "rb").read() for p in paths] == before
    assert not [f for f in os.listdir(tmp_path) if "pysoup-tmp" in f]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not torch.cuda.is_available():  # without the interpreter a CPU "device" is refused too
        cmd = [sys.executable, "-m", "pysoup.cli", "merge", *paths, "-o", str(out), "--device", "cpu"]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
        assert "TRITON_INTERPRET=1" in run.stderr and not out.exists()


@pytest.mark.slow
def test_gpu_benchmark_script_runs_without_a_gpu():
    """gpu_bench.py --smoke: the file-merge and EMA cases of the device check, tiny and interpreted, so the
    script's own code is checked before the one GPU run it gets."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.mark.parametrize("n", [1, 4095, 4096, 3 * 4096 + 77])
def test_block_sums_kernel_is_the_reference_order(n):
    """The GPU statistics kernel adds in the CPU kernels' lane/block order, bit for bit; a plain sum differs."""
    from pysoup.kernels.statistics import block_sums

    g = torch.Generator().manual_seed(n)
    scale = torch.exp2(torch.randint(-40, 40, (n,), generator=g).double())
    q = torch.randn(n, generator=g, dtype=torch.float64) * scale
    q[::97] = -0.0
    rows = torch.stack([q, q.flip(0), q * q])
    want = torch.stack([reference.lane_block_sums(r) for r in rows])
    assert torch.equal(block_sums(rows).view(torch.int64), want.view(torch.int64))
    if n > 4096:
        assert float(want[0].sum()) != float(q.sum())  # the order matters for these values


def _histograms(backend, xs, base, keep):
    """Thresholds and tie quotas a backend's selector finds over the tensors, fed in two ranges."""
    sel = backend.top_k_selector(keep)
    n = base.numel()
    half = (n // 2) // 4096 * 4096
    for pass_ in range(sel.passes):
        for lo, hi in ((0, half), (half, n)):
            sel.add(Chunk("w", [x[lo:].data_ptr() for x in [*xs, base]], ["BF16"] * (len(xs) + 1), lo, hi - lo), pass_)
        sel.finish(pass_)
        if sel.thresholds is not None:  # the CPU's selection may end after pass 0
            break
    return sel.thresholds, sel.quotas


def _tie_heavy(n):
    """bf16 fine-tunes of a bf16 base: |tau| repeats few bit patterns, so thresholds fall inside runs of ties."""
    base = random_tensor((n,), torch.bfloat16, seed=3)
    xs = [(base.float() + 0.02 * random_tensor((n,), torch.float32, seed=4 + i)).to(torch.bfloat16) for i in range(3)]
    return xs, base


def test_device_top_k_matches_the_cpu_selector():
    xs, base = _tie_heavy(50000)
    keep = [1, 12345, 49999]
    want = _histograms(CpuBackend(), xs, base, keep)
    got = _histograms(TritonBackend(device="cpu"), xs, base, keep)
    assert got == want and any(q >= 0 for q in want[1])


# -- on a CUDA device (benchmarks/gpu_check.sh) ------------------------------------------------------------------
@pytest.mark.gpu
@on_gpu
def test_cuda_module_is_built_when_required():
    """gpu_check.sh builds with PYSOUP_CUDA=ON and sets PYSOUP_REQUIRE_CUDA_MODULE: the fused histograms must run."""
    from pysoup.ops.triton import cuda_module

    if os.environ.get("PYSOUP_REQUIRE_CUDA_MODULE") == "1":
        assert cuda_module() is not None
    elif cuda_module() is None:
        pytest.skip("pysoup._cuda was not built (PYSOUP_CUDA=OFF)")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtypes", [("BF16", "BF16"), ("F16", "F32"), ("F32", "BF16")], ids=str)
def test_cuda_histograms_count_what_the_cpu_counts(dtypes):
    from pysoup.dtypes import KERNEL_CODE, to_torch
    from pysoup.ops.triton import cuda_module

    module = cuda_module()
    if module is None:
        pytest.skip("pysoup._cuda was not built")
    n = (1 << 20) + 3
    xs, base = _tie_heavy(n)
    xs = [x.to(to_torch(dtypes[0])) for x in xs]
    base = base.to(to_torch(dtypes[1]))
    xs[1][::5] = base[::5].to(xs[1].dtype)  # many zero deltas: one hot bin
    prefix = [0x3C00, 0x3B80, 0]
    import ctypes

    for pass_ in (0, 1):
        host = (ctypes.c_uint64 * (3 * 65536))()
        pysoup._native.native.magnitude_histogram(
            [x.data_ptr() for x in xs], [KERNEL_CODE[dtypes[0]]] * 3, base.data_ptr(), KERNEL_CODE[dtypes[1]],
            n, pass_, prefix, ctypes.addressof(host), 2, CpuBackend()._isa,
        )  # fmt: skip
        dev = torch.zeros(3 * 65536, dtype=torch.int64, device="cuda")
        xg, bg = [x.cuda() for x in xs], base.cuda()
        module.magnitude_histogram(
            [x.data_ptr() for x in xg], [KERNEL_CODE[dtypes[0]]] * 3, bg.data_ptr(), KERNEL_CODE[dtypes[1]],
            n, pass_, prefix if pass_ else [], dev.data_ptr(), torch.cuda.current_stream().cuda_stream,
        )  # fmt: skip
        assert torch.equal(dev.cpu(), torch.frombuffer(host, dtype=torch.int64)), f"pass {pass_}"


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("method", ALL, ids=ALL_IDS)
def test_every_method_on_the_gpu_writes_the_cpu_backends_bytes(tmp_path, method):
    report = _merge_both(tmp_path, method, "cuda")
    assert report.device.startswith("cuda")
    assert (tmp_path / "dev.safetensors").read_bytes() == (tmp_path / "cpu.safetensors").read_bytes()


@pytest.mark.gpu
@on_gpu
def test_gpu_ties_on_large_tensors(tmp_path, monkeypatch):
    """A tensor of several chunks with thresholds among ties: the quotas carry across chunks on the GPU too."""
    from safetensors.torch import save_file

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1 << 20)
    xs, base = _tie_heavy(5 * (1 << 20) + 11)
    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    paths = []
    for i, x in enumerate(xs):
        save_file({"w": x}, str(tmp_path / f"x{i}.safetensors"))
        paths.append(str(tmp_path / f"x{i}.safetensors"))
    kw = dict(strategy="ties", base=str(tmp_path / "base.safetensors"), model_params=[{"density": 0.3}] * 3)
    pysoup.merge(paths, tmp_path / "g.safetensors", device="cuda", **kw)
    pysoup.merge(paths, tmp_path / "c.safetensors", backend="cpu", **kw)
    assert (tmp_path / "g.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_gpu_divisions_round_correctly(mode):
    """Triton's fp32 `/` is approximate on NVIDIA GPUs (2 ulp); the kernels divide with div_rn, as the CPU does.
    Divisors that are not powers of two, over a million elements, catch an approximate division."""
    from pysoup.kernels.masked_sum import masked_sum
    from pysoup.kernels.weighted_sum import weighted_sum

    n = 1 << 20
    g = torch.Generator().manual_seed(mode)
    xs = [random_tensor((n,), torch.float32, seed=10 + i, wide=True) for i in range(3)]
    xs = [torch.where(torch.rand(n, generator=g) < 0.3, torch.zeros_like(x), x) for x in xs]
    ws = [0.3, 0.45, 0.7]
    want = torch.empty(n, dtype=torch.float32)
    chunk = Chunk("w", [x.data_ptr() for x in xs], ["F32"] * 3, 0, n, want.data_ptr(), "F32")
    reference.ReferenceBackend(1).masked_sum_raw(chunk, ws, MaskedSumMode(mode), 0.1, 1.3)
    got = masked_sum([x.cuda() for x in xs], ws, mode, torch.float32, center=0.1, scale=1.3)
    assert_bit_equal(got.cpu(), want)
    got = weighted_sum([x.cuda() for x in xs], ws, torch.float32, True)
    assert_bit_equal(got.cpu(), reference.weighted_sum(xs, ws, torch.float32, True))

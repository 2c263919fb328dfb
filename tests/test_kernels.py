"""The C++ kernels against the torch reference, bit for bit, over dtypes, shapes, ISAs and thread counts."""

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers.parametrize import FLOAT_DTYPES, ISAS, id_formatter
from helpers.tensors import assert_bit_equal, random_tensor

import pysoup
from pysoup.dtypes import from_torch
from pysoup.errors import BackendError, PlanError
from pysoup.ops import reference
from pysoup.ops.cpu import CpuBackend
from pysoup.ops.reference import ReferenceBackend
from pysoup.ops.table import Chunk

DTYPES = FLOAT_DTYPES
SHAPES = [(0,), (1,), (7,), (4097,), (3, 5, 17), (300_007,)]
WEIGHTS = [0.3, -1.7, 2.5e-3]


@functools.cache
def three_inputs(shape, dtype):
    """Read only: shared by the ISA and thread-count cases of one shape and dtype."""
    k = SHAPES.index(shape)
    return [random_tensor(shape, dtype, seed=10 * k + i, wide=True) for i in range(3)]


@functools.cache
def reference_sum(shape, in_dtype, out_dtype, normalize):
    """The reference's result, computed once for every ISA and thread count."""
    return reference.weighted_sum(three_inputs(shape, in_dtype), WEIGHTS, out_dtype, normalize)


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("threads", [1, 2, 3], ids=id_formatter("threads"))
@pytest.mark.parametrize("shape", SHAPES, ids=id_formatter("shape"))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=id_formatter("out"))
@pytest.mark.parametrize("in_dtype", DTYPES, ids=id_formatter("in"))
@pytest.mark.parametrize("normalize", [False, True], ids=id_formatter("normalize"))
def test_weighted_sum_matches_reference(isa, threads, shape, out_dtype, in_dtype, normalize):
    got = CpuBackend(threads, isa).weighted_sum(three_inputs(shape, in_dtype), WEIGHTS, out_dtype, normalize)
    assert_bit_equal(got, reference_sum(shape, in_dtype, out_dtype, normalize))


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=id_formatter("out"))
def test_fp16_nan_payloads_match_reference(isa, out_dtype):
    """fp16 NaNs keep sign and payload into fp32 on every backend (torch's own fp16 -> fp32 conversion turns them
    all into 0x7FFFFFFF; the fuzzer found the reference differing from the kernels there)."""
    nans = [0xFE01, 0x7C01, 0x7E45, 0xFFFF, 0x7D00]
    x = torch.tensor([b - 0x10000 if b >= 0x8000 else b for b in nans] * 7, dtype=torch.int16).view(torch.float16)
    y = torch.full_like(x, 0.5)
    want = reference.weighted_sum([x, y], [0.5, 2.0], out_dtype, True)
    assert_bit_equal(CpuBackend(2, isa).weighted_sum([x, y], [0.5, 2.0], out_dtype, True), want)
    if out_dtype == torch.float16:
        assert [b & 0xFFFF for b in want.view(torch.int16)[:5].tolist()] == [0xFE01, 0x7E01, 0x7E45, 0xFFFF, 0x7F00]


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 9], ids=id_formatter("inputs"))
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
def test_every_input_count(isa, count, dtype):
    """The kernels unroll for 1, 2, 3, 4 and 8 inputs and loop for the others: all agree with the reference,
    in place (the output is input 0, as in an EMA step) and not, with streaming stores (large aligned output)."""
    xs = [random_tensor((70_011,), dtype, seed=i, wide=True) for i in range(count)]
    ws = [(-1.0) ** i * (0.3 + i) for i in range(count)]
    want = reference.weighted_sum(xs, ws, dtype, True)
    assert_bit_equal(CpuBackend(2, isa).weighted_sum(xs, ws, dtype, True), want)
    chunk = Chunk("x", [x.data_ptr() for x in xs], [from_torch(dtype)] * count, 0, xs[0].numel(), xs[0].data_ptr())
    chunk.out_dtype = from_torch(dtype)
    CpuBackend(2, isa).weighted_sum_raw(chunk, ws, True)
    assert_bit_equal(xs[0], want)


SELECT_N = (1 << 19) + 77
# How many entries of each model's |tau| TIES keeps: the extremes, 90% (the threshold in bin 0), none and all.
KEEPS = {
    "first-half-last": [1, SELECT_N // 2, SELECT_N - 1],
    "90%": [int(0.9 * SELECT_N)] * 3,
    "all-none-some": [SELECT_N, 0, 12345],
}


@functools.cache
def select_inputs():
    """Three bf16 fine-tunes and their base, a third of each model's task vector exactly zero. Read only."""
    n = SELECT_N
    base = random_tensor((n,), torch.bfloat16, seed=1)
    g = torch.Generator().manual_seed(2)
    xs = []
    for i in range(3):
        x = (base.float() + 0.01 * random_tensor((n,), torch.float32, seed=3 + i)).to(torch.bfloat16)
        xs.append(torch.where(torch.rand(n, generator=g) < 0.33, base, x))
    return xs, base


@functools.cache
def sorted_select(keep_case):
    xs, base = select_inputs()
    return sorted_thresholds(xs, base, KEEPS[keep_case])


SELECTORS = [("reference", None, None)] + [("cpu", isa, threads) for isa in ISAS for threads in (1, 2)]


@pytest.mark.parametrize("keep_case", list(KEEPS))
@pytest.mark.parametrize(
    "backend,isa,threads", SELECTORS, ids=[b if i is None else f"isa={i}-threads={t}" for b, i, t in SELECTORS]
)
def test_top_k_selector_matches_the_reference(backend, isa, threads, keep_case):
    """TIES' radix select against a stable sort: ranges long enough for the split pass-0 histograms, a last tile
    of 77 elements (the vector pass-1 packing's masked lanes), and a third of the task-vector entries exactly
    zero, so that keeping 90% puts the threshold in bin 0 (prefix 0, where a masked lane would also match)."""
    xs, base = select_inputs()
    keep = KEEPS[keep_case]
    chunk = Chunk("x", [x.data_ptr() for x in [*xs, base]], ["BF16"] * 4, 0, SELECT_N)
    sel = (ReferenceBackend() if backend == "reference" else CpuBackend(threads, isa)).top_k_selector(keep)
    for pass_ in range(sel.passes):
        sel.add(chunk, pass_)
        sel.finish(pass_)
        if sel.thresholds is not None:  # the CPU's selection may end after pass 0, as the engine sees
            break
    assert (sel.thresholds, sel.quotas) == sorted_select(keep_case)


def sorted_thresholds(xs, base, keep):
    """TIES' thresholds by a stable sort of the bits of |x_i - base|: the oracle of the radix selects."""
    thresholds, quotas = [], []
    for x, k in zip(xs, keep):
        if k == 0:
            thresholds.append(0xFFFFFFFF)
            quotas.append(0)
            continue
        bits = (x.float() - base.float()).view(torch.int32).to(torch.int64) & 0x7FFFFFFF
        thr = int(torch.sort(bits, descending=True, stable=True).values[k - 1])
        greater, ties = int((bits > thr).sum()), int((bits == thr).sum())
        thresholds.append(thr)
        quotas.append(-1 if k - greater == ties else k - greater)
    return thresholds, quotas


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=id_formatter("out"))
def test_mixed_input_dtypes(isa, out_dtype):
    xs = [random_tensor((5003,), d, seed=i, wide=True) for i, d in enumerate(DTYPES * 2)]
    ws = [0.5, 1.25, -0.75, 3.0, 1e-3, 7.0]
    assert_bit_equal(
        CpuBackend(2, isa).weighted_sum(xs, ws, out_dtype, True),
        reference.weighted_sum(xs, ws, out_dtype, True),
    )


def every_16_bit_pattern(dtype):
    """All 65536 values: NaN payloads, infinities, subnormals, -0."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


SIXTEEN_BIT_WEIGHTS = [[1.0], [0.37], [1e30]]


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("ws", SIXTEEN_BIT_WEIGHTS, ids=lambda ws: f"weight={ws[0]}")
@pytest.mark.parametrize("out_dtype", DTYPES, ids=id_formatter("out"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=id_formatter("dtype"))
def test_every_16_bit_pattern(isa, dtype, out_dtype, ws):
    """Every value of a 16-bit dtype, weighted, into every output dtype."""
    x = every_16_bit_pattern(dtype)
    assert_bit_equal(
        CpuBackend(None, isa).weighted_sum([x], ws, out_dtype, False),
        reference.weighted_sum([x], ws, out_dtype, False),
    )


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("ws", SIXTEEN_BIT_WEIGHTS, ids=lambda ws: f"weight={ws[0]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=id_formatter("dtype"))
def test_every_16_bit_pattern_pairs(isa, dtype, ws):
    """Every value of a 16-bit dtype against every other (the reversed order), normalized, into that dtype."""
    x = every_16_bit_pattern(dtype)
    y = x.flip(0)
    assert_bit_equal(
        CpuBackend(None, isa).weighted_sum([x, y], ws * 2, dtype, True),
        reference.weighted_sum([x, y], ws * 2, dtype, True),
    )


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=id_formatter("out"))
def test_random_fp32_bit_patterns(isa, out_dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-(2**31), 2**31 - 1, (100_003,), generator=g, dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32)
    assert_bit_equal(
        CpuBackend(None, isa).weighted_sum([x, x.flip(0)], [0.37, -2.2], out_dtype, False),
        reference.weighted_sum([x, x.flip(0)], [0.37, -2.2], out_dtype, False),
    )


def test_reference_fma_is_exactly_rounded():
    """fma_f32 must equal the exactly rounded w*x + acc; checked with rational arithmetic."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(2000) * 2.0 ** rng.integers(-20, 20, 2000)).astype(np.float32)
    acc = (rng.standard_normal(2000) * 2.0 ** rng.integers(-20, 20, 2000)).astype(np.float32)
    w = np.float32(0.1)
    got = reference.fma_f32(float(w), torch.from_numpy(x), torch.from_numpy(acc)).numpy()
    for xi, ai, gi in zip(x, acc, got):
        exact = Fraction(float(w)) * Fraction(float(xi)) + Fraction(float(ai))
        # nearest fp32 to `exact`, ties to even: compare against both neighbours of the float64 rounding
        cand = np.float32(float(exact))
        lo, hi = np.nextafter(cand, np.float32(-np.inf)), np.nextafter(cand, np.float32(np.inf))
        best = min(
            (abs(Fraction(float(c)) - exact), int(np.float32(c).view(np.int32)) & 1, float(c)) for c in (lo, cand, hi)
        )
        assert float(gi) == best[2]


@pytest.mark.parametrize("copies", [2, 3, 8], ids=id_formatter("copies"))
def test_identical_copies_soup_is_the_copy(copies):
    x = random_tensor((10_001,), torch.bfloat16, seed=5, wide=True)
    x[::7] = -0.0
    out = CpuBackend().weighted_sum([x] * copies, [1.0] * copies, torch.bfloat16, True)
    assert_bit_equal(out, x)


def test_nonfinite_count():
    x = torch.tensor([1.0, float("nan"), float("inf"), 7e4, 1.0], dtype=torch.float32)
    out = torch.empty(5, dtype=torch.float16)
    n = CpuBackend().weighted_sum_raw(Chunk("x", [x.data_ptr()], ["F32"], 0, 5, out.data_ptr(), "F16"), [1.0], False)
    assert n == 3  # nan, inf, and 7e4 which overflows float16


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"], ids=id_formatter("backend"))
def test_public_op_dispatch(backend):
    a, b = random_tensor((33,), torch.float16, 1), random_tensor((33,), torch.float16, 2)
    want = reference.weighted_sum([a, b], [1.0, 2.0], torch.bfloat16, False)
    assert_bit_equal(pysoup.ops.weighted_sum([a, b], [1, 2], out_dtype=torch.bfloat16, backend=backend), want)


def test_public_op_errors_and_environment(monkeypatch):
    a, b = random_tensor((33,), torch.float16, 1), random_tensor((33,), torch.float16, 2)
    want = reference.weighted_sum([a, b], [1.0, 2.0], torch.bfloat16, False)
    assert pysoup.ops.weighted_sum([a, b], [1, 2]).dtype == torch.float16
    with pytest.raises(BackendError, match="usable here"):
        pysoup.ops.weighted_sum([a, b], [1, 2], backend="nope")
    with pytest.raises(PlanError, match="2 weights for 1 tensors"):
        pysoup.ops.weighted_sum([a], [1, 2])
    with pytest.raises(PlanError, match="shape"):
        pysoup.ops.weighted_sum([a, a[:3]], [1, 2])
    with pytest.raises(PlanError, match="finite"):
        pysoup.ops.weighted_sum([a, b], [1, math.nan])
    with pytest.raises(PlanError, match="sum to 0"):
        pysoup.ops.weighted_sum([a, b], [1, -1], normalize=True)
    with pytest.raises(PlanError, match="dtype"):
        pysoup.ops.weighted_sum([a.to(torch.int32)], [1])
    monkeypatch.setenv("PYSOUP_CPU_ISA", "scalar")
    assert pysoup.info()["cpu_isa"] == "scalar"
    assert_bit_equal(pysoup.ops.weighted_sum([a, b], [1, 2], out_dtype=torch.bfloat16), want)
    monkeypatch.setenv("PYSOUP_CPU_ISA", "sse9")
    with pytest.raises(BackendError, match="PYSOUP_CPU_ISA"):
        pysoup.ops.weighted_sum([a, b], [1, 2])
    monkeypatch.delenv("PYSOUP_CPU_ISA")
    monkeypatch.setenv("PYSOUP_BACKEND", "reference")
    assert pysoup.ops.get_backend("auto").name == "reference"


def test_non_contiguous_inputs():
    base = random_tensor((64, 33), torch.bfloat16, seed=9)
    xs = [base.t(), (base * 2).t()]
    assert_bit_equal(
        CpuBackend().weighted_sum(xs, [0.25, 0.75], torch.bfloat16, False),
        reference.weighted_sum([x.contiguous() for x in xs], [0.25, 0.75], torch.bfloat16, False),
    )


def test_info():
    i = pysoup.info()
    assert i["version"] == pysoup.__version__
    assert i["cpu_isas"][0] == "scalar" and i["cpu_isa"] in i["cpu_isas"]
    assert "cpu" in i["backends"] and "reference" in i["backends"]
    assert i["threads"] >= 1


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("offset", [0, 1, 3], ids=id_formatter("offset"))
def test_output_alignment(isa, offset):
    """Aligned outputs take the streaming-store path, misaligned ones the cached one: same bytes."""
    n = 200_003
    xs = [random_tensor((n,), torch.bfloat16, seed=i) for i in range(4)]
    ws = [0.1, 0.2, 0.3, 0.4]
    want = reference.weighted_sum(xs, ws, torch.bfloat16, True)
    buf = torch.empty(n + offset, dtype=torch.bfloat16)
    out = buf[offset:]
    chunk = Chunk("x", [x.data_ptr() for x in xs], ["BF16"] * 4, 0, n, out.data_ptr(), "BF16")
    CpuBackend(2, isa).weighted_sum_raw(chunk, ws, True)
    assert_bit_equal(out, want)


_SELECTOR_PEAK = """
import resource, sys, torch
from pysoup.ops.reference import ReferenceBackend
from pysoup.ops.table import Chunk

n, chunk = int(sys.argv[1]), 1 << 18
sel = ReferenceBackend().top_k_selector([n // 3, n // 2])
g = torch.Generator().manual_seed(0)
parts = [torch.randn(chunk, generator=g).to(torch.bfloat16) for _ in range(3)]  # reused: memory stays flat
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for pass_ in range(sel.passes):
    for start in range(0, n, chunk):
        sel.add(Chunk("w", [p.data_ptr() for p in parts], ["BF16"] * 3, start, min(chunk, n - start)), pass_)
    sel.finish(pass_)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_reference_top_k_memory_does_not_grow_with_the_tensor():
    """The reference TIES selector counts histograms: its peak memory is one chunk's temporaries, for a tensor of
    256 Ki elements and one of 2 Mi alike (keeping every |tau|'s bits, as it once did, grows by 28 MiB). Large
    blocks are mmap'd by malloc, so the peak RSS measures live memory, not the heap's fragmentation."""
    import os
    import subprocess
    import sys

    def growth_kib(n):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        cmd = [sys.executable, "-c", _SELECTOR_PEAK, str(n)]
        return int(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)

    small, large = growth_kib(1 << 18), growth_kib(1 << 21)
    assert large - small < 8 * 1024, (small, large)

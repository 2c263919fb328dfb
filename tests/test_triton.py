"""The Triton kernels under TRITON_INTERPRET=1 (set in conftest), bit for bit against the reference backend."""

import pytest
import torch
from helpers.checkpoints import save_st, small_model
from helpers.parametrize import FLOAT_DTYPES, id_formatter
from helpers.tensors import assert_bit_equal, random_tensor

pytest.importorskip("triton")

import pysoup  # noqa: E402
from pysoup.errors import BackendError  # noqa: E402
from pysoup.ops import reference  # noqa: E402
from pysoup.ops.reference import ReferenceBackend  # noqa: E402
from pysoup.ops.table import Chunk, MaskedSumMode  # noqa: E402

DTYPES = FLOAT_DTYPES
SHAPES = [(1,), (7,), (4097,), (3, 5, 17)]


@pytest.mark.parametrize("shape", SHAPES, ids=id_formatter("shape"))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=id_formatter("out"))
@pytest.mark.parametrize("in_dtype", DTYPES, ids=id_formatter("in"))
@pytest.mark.parametrize("normalize", [False, True], ids=id_formatter("normalize"))
def test_weighted_sum_matches_reference(in_dtype, out_dtype, normalize, shape):
    from pysoup.kernels.weighted_sum import weighted_sum

    k = SHAPES.index(shape)
    xs = [random_tensor(shape, in_dtype, seed=10 * k + i, wide=True) for i in range(3)]
    ws = [0.3, -1.7, 2.5e-3]
    assert_bit_equal(weighted_sum(xs, ws, out_dtype, normalize), reference.weighted_sum(xs, ws, out_dtype, normalize))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=id_formatter("out"))
@pytest.mark.parametrize("count", [1, 8, 11], ids=id_formatter("inputs"))
def test_any_number_of_inputs(count, out_dtype):
    """Inputs arrive as a tuple of any length (one compiled launch per count and dtypes): same bits."""
    from pysoup.kernels.weighted_sum import weighted_sum

    dtypes = [DTYPES[i % 3] for i in range(count)]
    xs = [random_tensor((5000,), d, seed=i, wide=True) for i, d in enumerate(dtypes)]
    ws = [0.1 * (i + 1) * (-1) ** i for i in range(count)]
    assert_bit_equal(weighted_sum(xs, ws, out_dtype, True), reference.weighted_sum(xs, ws, out_dtype, True))


def every_16_bit_pattern(dtype):
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("ws", [[1.0], [0.37], [1e30]], ids=lambda ws: f"weight={ws[0]}")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=id_formatter("out"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=id_formatter("dtype"))
def test_every_16_bit_pattern(dtype, out_dtype, ws):
    from pysoup.kernels.weighted_sum import weighted_sum

    x = every_16_bit_pattern(dtype)
    assert_bit_equal(weighted_sum([x], ws, out_dtype, False), reference.weighted_sum([x], ws, out_dtype, False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=id_formatter("dtype"))
def test_every_finite_16_bit_pattern_into_fp16(dtype):
    from pysoup.kernels.weighted_sum import weighted_sum

    x = every_16_bit_pattern(dtype)
    finite = x[torch.isfinite(x.float())]  # fp16 outputs: NaN payloads are the converter's business
    assert_bit_equal(
        weighted_sum([finite, finite.flip(0)], [0.37, 0.63], torch.float16, True),
        reference.weighted_sum([finite, finite.flip(0)], [0.37, 0.63], torch.float16, True),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=id_formatter("dtype"))
def test_multi_tensor_lerp(dtype):
    """One launch updates every tensor of a model like the per-tensor weighted sum would (EMA with beta 0.9)."""
    from pysoup.kernels.multi_tensor import TensorTable, lerp_

    sizes = [(1,), (7,), (1000,), (4097,), (3, 5, 17), (0,)]
    avg = [random_tensor(s, dtype, seed=i) for i, s in enumerate(sizes)]
    new = [random_tensor(s, dtype, seed=100 + i) for i, s in enumerate(sizes)]
    want = [reference.weighted_sum([a, b], [0.9, 0.1], dtype, False) for a, b in zip(avg, new)]
    lerp_(TensorTable(avg, new), 0.1)
    for got, w in zip(avg, want):
        assert_bit_equal(got, w)


def test_backend_dispatch_and_file_merge(tmp_path):
    a, b = random_tensor((999,), torch.bfloat16, 1), random_tensor((999,), torch.float16, 2)
    assert_bit_equal(
        pysoup.ops.weighted_sum([a, b], [1, 2], backend="triton"),
        reference.weighted_sum([a, b], [1.0, 2.0], torch.bfloat16, False),
    )
    assert "triton" in pysoup.info()["backends"]
    sds = [small_model(seed=s) for s in range(2)]
    paths = [save_st(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(sds)]
    pysoup.merge(paths, tmp_path / "t.safetensors", weights=[0.4, 0.6], backend="triton")
    pysoup.merge(paths, tmp_path / "c.safetensors", weights=[0.4, 0.6], backend="cpu")
    assert (tmp_path / "t.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        pysoup.merge(paths, tmp_path / "x.safetensors", backend="cuda")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weighted_sum_on_gpu():
    from pysoup.kernels.weighted_sum import weighted_sum

    xs = [random_tensor((1 << 20,), torch.bfloat16, seed=i, wide=True) for i in range(4)]
    want = reference.weighted_sum(xs, [0.1, 0.2, 0.3, 0.4], torch.bfloat16, True)
    got = weighted_sum([x.cuda() for x in xs], [0.1, 0.2, 0.3, 0.4], torch.bfloat16, True).cpu()
    assert_bit_equal(got, want)


@pytest.mark.parametrize(
    "case",
    ["task_arithmetic", "ties", "ties_partial_quota", "dare", "dare_ties"],
)
def test_task_vector_combine_matches_reference(case):
    from pysoup.kernels.task_vector import task_vector_combine
    from pysoup.ops.table import TaskVectorParams
    from pysoup.strategies.task_vector import dare_key, keep_below

    n = 9000
    base = random_tensor((n,), torch.bfloat16, seed=50)
    # bf16 differences repeat, so TIES thresholds have ties: the partial-quota case exercises index order.
    xs = [(base.float() + 0.05 * random_tensor((n,), torch.float32, seed=60 + i)).to(torch.bfloat16) for i in range(3)]
    ws = (0.5, 0.3, 0.2)
    p = TaskVectorParams(ws, 0.9, case != "task_arithmetic", case.startswith(("ties", "dare_ties")))
    quota = [-1, -1, -1]
    if case.startswith("ties"):
        sel = ReferenceBackend().top_k_selector([2000, 3100, 4500])
        for pass_ in range(sel.passes):
            sel.add(Chunk("w", [x.data_ptr() for x in [*xs, base]], ["BF16"] * 4, 0, n), pass_)
            sel.finish(pass_)
        p = TaskVectorParams(ws, 0.9, True, True, trim_bits=tuple(sel.thresholds))
        quota = list(sel.quotas)
        if case == "ties_partial_quota":
            assert any(q >= 0 for q in quota)
    if case.startswith("dare"):
        keys = tuple(dare_key(5, "w", i) for i in range(3))
        p = TaskVectorParams(
            ws,
            0.9,
            False,
            case == "dare_ties",
            keys,
            tuple(keep_below(d) for d in (0.3, 0.6, 0.9)),
            (1 / 0.3, 1 / 0.6, 1 / 0.9),
        )
    start = 4096 * 3  # a range inside a larger tensor: DARE's counters must start there
    want = torch.empty(n, dtype=torch.bfloat16)
    chunk = Chunk("w", [x.data_ptr() for x in [*xs, base]], ["BF16"] * 4, start, n, want.data_ptr(), "BF16")
    _, want_quota = ReferenceBackend().task_vector_raw(chunk, p, quota)
    got, got_quota = task_vector_combine(xs, base, p, start, quota, torch.bfloat16)
    assert_bit_equal(got, want)
    assert got_quota == want_quota


@pytest.mark.parametrize("mode", [0, 1, 2, 3], ids=["shared", "intersection", "union", "affine-mean"])
def test_masked_sum_matches_reference(mode):
    from pysoup.kernels.masked_sum import masked_sum

    n = 7001
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(n, generator=g) < 0.7
    xs = []
    for i in range(3):
        x = random_tensor((n,), torch.bfloat16, seed=i, wide=True)
        zero = pattern if mode == 0 or i < 2 else torch.rand(n, generator=g) < 0.5
        xs.append(torch.where(zero, torch.zeros_like(x), x))
    xs[0][5] = -0.0  # a signed zero of the first input survives under "shared"
    ws = [0.5, 1.5, 2.0]
    want = torch.empty(n, dtype=torch.bfloat16)
    chunk = Chunk("w", [x.data_ptr() for x in xs], ["BF16"] * 3, 0, n, want.data_ptr(), "BF16")
    ReferenceBackend().masked_sum_raw(chunk, ws, MaskedSumMode(mode), center=0.125, scale=1.7)
    assert_bit_equal(masked_sum(xs, ws, mode, torch.bfloat16, center=0.125, scale=1.7), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_task_vector_and_lerp_on_gpu():
    from pysoup.kernels.multi_tensor import TensorTable, lerp_
    from pysoup.kernels.task_vector import task_vector_combine
    from pysoup.ops.table import TaskVectorParams
    from pysoup.strategies.task_vector import dare_key, keep_below

    n = 1 << 20
    base = random_tensor((n,), torch.bfloat16, seed=1)
    xs = [(base.float() + 0.05 * random_tensor((n,), torch.float32, seed=2 + i)).to(torch.bfloat16) for i in range(3)]
    p = TaskVectorParams(
        (0.5, 0.3, 0.2),
        1.0,
        True,
        True,
        tuple(dare_key(0, "w", i) for i in range(3)),
        (keep_below(0.5),) * 3,
        (2.0,) * 3,
    )
    want = torch.empty(n, dtype=torch.bfloat16)
    chunk = Chunk("w", [x.data_ptr() for x in [*xs, base]], ["BF16"] * 4, 0, n, want.data_ptr(), "BF16")
    ReferenceBackend().task_vector_raw(chunk, p, [-1] * 3)
    got, _ = task_vector_combine([x.cuda() for x in xs], base.cuda(), p, 0, [-1] * 3, torch.bfloat16)
    assert_bit_equal(got.cpu(), want)
    avg = [random_tensor((s,), torch.bfloat16, seed=s) for s in (1, 1000, 4097)]
    new = [random_tensor((s,), torch.bfloat16, seed=s + 1) for s in (1, 1000, 4097)]
    want = [reference.weighted_sum([a, b], [0.9, 0.1], torch.bfloat16, False) for a, b in zip(avg, new)]
    avg_gpu = [a.cuda() for a in avg]
    lerp_(TensorTable(avg_gpu, [b.cuda() for b in new]), 0.1)
    for got, w in zip(avg_gpu, want):
        assert_bit_equal(got.cpu(), w)

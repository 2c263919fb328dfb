"""pysoup.ops.lerp_, the multi-tensor update behind averaging during training: every backend against the
reference, bit for bit, and every bad argument refused before a tensor is touched."""

import math

import pytest
import torch
from helpers.parametrize import FLOAT_DTYPES, ISAS, id_formatter
from helpers.tensors import assert_bit_equal, random_tensor

import pysoup
from pysoup import _native
from pysoup.dtypes import to_f32
from pysoup.errors import BackendError, PlanError
from pysoup.ops import reference

DTYPES = FLOAT_DTYPES
# A model's mix: many small tensors (norms, biases) and a few large ones, so that with 2 or 3 threads the
# even split of all elements falls inside tensors, between them, and on empty ones.
SIZES = [(1,), (7,), (0,), (64, 33), (150_001,), (5,), (3, 5, 17), (0,), (70_000, 3), (4097,)]


def model(dtype, seed, sizes=SIZES, wide=True):
    return [random_tensor(s, dtype, seed=seed + i, wide=wide) for i, s in enumerate(sizes)]


def expected(avg, cur, t):
    return [reference.weighted_sum([a, b], [1.0 - t, t], a.dtype, False) for a, b in zip(avg, cur)]


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("threads", [1, 2, 3], ids=id_formatter("threads"))
@pytest.mark.parametrize("cur_dtype", DTYPES, ids=id_formatter("cur"))
@pytest.mark.parametrize("avg_dtype", DTYPES, ids=id_formatter("avg"))
def test_cpu_matches_reference(isa, threads, avg_dtype, cur_dtype):
    from pysoup.ops.cpu import CpuBackend

    avg, cur = model(avg_dtype, 0), model(cur_dtype, 100)
    want = expected(avg, cur, 0.001)
    CpuBackend(threads, isa).lerp_(avg, cur, 0.001)
    for got, w in zip(avg, want):
        assert_bit_equal(got, w)


@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("threads", [1, 2, 3], ids=id_formatter("threads"))
def test_weighted_sum_many_matches_per_tensor_calls(isa, threads):
    """The C++ entry in general: 3 inputs per tensor, mixed dtypes, normalized, into separate outputs."""
    dtypes = [torch.bfloat16, torch.float32, torch.float16]
    xs = [model(d, 10 * i) for i, d in enumerate(dtypes)]
    ws = [0.3, -1.7, 2.5]
    outs = [torch.empty(s, dtype=torch.bfloat16) for s in SIZES]
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    nonfinite = _native.native.weighted_sum_many(
        [x[t].data_ptr() for t in range(len(SIZES)) for x in xs],
        [code[d] for d in dtypes],
        ws,
        [math.prod(s) for s in SIZES],
        [o.data_ptr() for o in outs],
        code[torch.bfloat16],
        True,
        threads,
        isa,
    )
    wants = [reference.weighted_sum([x[t] for x in xs], ws, torch.bfloat16, True) for t in range(len(SIZES))]
    for got, want in zip(outs, wants):
        assert_bit_equal(got, want)
    assert nonfinite == sum(int((~torch.isfinite(w.float())).sum()) for w in wants)


def test_weighted_sum_many_refuses_bad_tables():
    many = _native.native.weighted_sum_many
    with pytest.raises(ValueError, match="k input pointers and one output pointer per tensor"):
        many([1, 2, 3], [0, 0], [0.5, 0.5], [4, 4], [1, 2], 0, False, 1, "scalar")
    with pytest.raises(ValueError, match="negative element count"):
        many([1, 2], [0, 0], [0.5, 0.5], [-1], [1], 0, False, 1, "scalar")
    with pytest.raises(ValueError, match="null input pointer"):
        many([1, 0], [0, 0], [0.5, 0.5], [4], [1], 0, False, 1, "scalar")
    with pytest.raises(ValueError, match="sum to zero"):
        many([1, 2], [0, 0], [0.5, -0.5], [4], [1], 0, True, 1, "scalar")
    assert many([0, 0], [0, 0], [0.5, 0.5], [0], [0], 0, False, 1, "scalar") == 0  # empty tensors: no pointers


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"], ids=id_formatter("backend"))
def test_public_op_mixed_dtype_groups(backend):
    """Pairs of several dtype combinations in one call: each group is one launch, the result as if one by one."""
    sizes = [(33,), (1000,), (7, 9), (4097,), (2,)]
    avg = [random_tensor(s, d, seed=i) for i, (s, d) in enumerate(zip(sizes, DTYPES * 2))]
    cur = [random_tensor(s, d, seed=50 + i) for i, (s, d) in enumerate(zip(sizes, reversed(DTYPES * 2)))]
    want = expected(avg, cur, 0.25)
    ids = [id(a) for a in avg]
    assert pysoup.ops.lerp_(avg, cur, 0.25, backend=backend) is None
    assert [id(a) for a in avg] == ids  # in place
    for got, w in zip(avg, want):
        assert_bit_equal(got, w)


def test_triton_tables_are_reused_and_stay_correct():
    """The second call on the same tensors reuses the launch plan; a plan outlives its tensors harmlessly."""
    from pysoup.ops import triton as triton_backend

    triton_backend._PLANS.clear()
    avg, cur = model(torch.bfloat16, 0, wide=False), model(torch.float32, 7, wide=False)
    want = expected(avg, cur, 0.1)
    want = expected(want, cur, 0.1)
    for _ in range(2):
        pysoup.ops.lerp_(avg, cur, 0.1, backend="triton")
    assert len(triton_backend._PLANS) == 1
    for got, w in zip(avg, want):
        assert_bit_equal(got, w)
    for step in range(triton_backend._PLANS_KEPT + 2):  # new tensors each time: the cache stays bounded
        a, b = [random_tensor((100 + step,), torch.float32, seed=step)], [random_tensor((100 + step,), torch.float32)]
        w = expected(a, b, 0.5)
        pysoup.ops.lerp_(a, b, 0.5, backend="triton")
        assert_bit_equal(a[0], w[0])
    assert len(triton_backend._PLANS) == triton_backend._PLANS_KEPT


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"], ids=id_formatter("backend"))
def test_bound_form_matches_one_shot_calls(backend):
    avg = model(torch.float32, 0, wide=False) + model(torch.bfloat16, 20, sizes=[(9,), (4097,)], wide=False)
    cur = model(torch.bfloat16, 100, wide=False) + model(torch.bfloat16, 120, sizes=[(9,), (4097,)], wide=False)
    want = [a.clone() for a in avg]
    step = pysoup.ops.MultiTensorLerp(avg, cur, backend=backend)
    assert len(step) == len(avg)
    for t in [0.1, 0.001, 0.5]:
        for b in cur:
            b.mul_(1.5)  # the model trains in place between steps
        pysoup.ops.lerp_(want, cur, t, backend="reference")
        assert step(t) is None
        for got, w in zip(avg, want):
            assert_bit_equal(got, w)


def test_bound_form_refuses_moved_tensors_and_strided_current():
    layer = torch.nn.Linear(8, 4)
    ema = [p.detach().clone() for p in layer.parameters()]
    step = pysoup.ops.MultiTensorLerp(ema, list(layer.parameters()))  # the parameters themselves, not detached
    with torch.no_grad():
        step(0.5)
        layer.bias.data = torch.zeros(4)  # the model's tensor now lives elsewhere
        before = [e.clone() for e in ema]
        with pytest.raises(PlanError, match="current tensor 1 no longer holds the memory it had"):
            step(0.5)
    for e, b in zip(ema, before):
        assert_bit_equal(e, b)
    with pytest.raises(PlanError, match="current tensor 0 is not contiguous; MultiTensorLerp reads it in place"):
        pysoup.ops.MultiTensorLerp([torch.zeros(4, 3)], [torch.zeros(3, 4).t()])
    with pytest.raises(PlanError, match="must be a number, got str"):
        step("0.5")
    empty = pysoup.ops.MultiTensorLerp([], [])
    assert len(empty) == 0 and empty(0.5) is None


def test_ema_and_swa_worked_examples():
    # EMA with beta = 0.5: the midpoint.
    a, b = torch.tensor([0.0, 4.0, -2.0]), torch.tensor([2.0, 0.0, 2.0])
    pysoup.ops.lerp_(a, b, 1 - 0.5)
    assert a.tolist() == [1.0, 2.0, 0.0]
    # SWA: theta_s <- (n theta_s + theta_t) / (n + 1) is lerp_ with weight 1 / (n + 1): the running mean.
    runs = [torch.tensor([3.0, -1.0]), torch.tensor([6.0, 2.0]), torch.tensor([9.0, 5.0]), torch.tensor([2.0, 2.0])]
    swa = runs[0].clone()
    for n, theta in enumerate(runs[1:], start=1):
        pysoup.ops.lerp_([swa], [theta], 1 / (n + 1))
    assert swa.tolist() == pytest.approx([5.0, 2.0], rel=2**-22)
    # weight 1 copies the current tensor, weight 0 keeps the average (fp32 weights 0 and 1 are exact).
    c = torch.tensor([1.5, -7.25])
    pysoup.ops.lerp_(c, torch.tensor([3.0, 8.0]), 1)
    assert c.tolist() == [3.0, 8.0]
    pysoup.ops.lerp_(c, torch.tensor([0.0, 0.0]), 0)
    assert c.tolist() == [3.0, 8.0]


def test_parameters_under_no_grad_and_non_contiguous_current():
    layer = torch.nn.Linear(17, 9)
    ema = torch.nn.Linear(17, 9)
    cur = [layer.weight.detach().t().contiguous().t(), layer.bias.detach()]  # a transposed, strided view
    assert not cur[0].is_contiguous()
    want = expected([p.detach() for p in ema.parameters()], [c.contiguous() for c in cur], 0.01)
    with torch.no_grad():
        pysoup.ops.lerp_(list(ema.parameters()), cur, 0.01)
    for got, w in zip(ema.parameters(), want):
        assert_bit_equal(got.detach(), w)


def test_empty_lists_are_a_no_op():
    assert pysoup.ops.lerp_([], [], 0.5) is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda a, b: ([a, a], [b], 0.1), "2 averaged tensors for 1 current ones"),
        (lambda a, b: ([a], [b[:-1]], 0.1), "pair 0: averaged shape \\[12\\], current shape \\[11\\]"),
        (lambda a, b: ([a], [b.to(torch.int32)], 0.1), "current tensor 0 has dtype torch.int32"),
        (lambda a, b: ([a], [b.double()], 0.1), "current tensor 0 has dtype torch.float64"),
        (lambda a, b: ([a], [b], float("nan")), "finite in float32"),
        (lambda a, b: ([a], [b], 1e39), "finite in float32"),
        (lambda a, b: ([a], [b], True), "must be a number, got bool"),
        (lambda a, b: ([a], [b], "0.1"), "must be a number, got str"),
        (lambda a, b: ([a], [b], torch.tensor([0.1, 0.2])), "must be a number, got Tensor"),
        (lambda a, b: ([a], [b.to("meta")], 0.1), "current tensor 0 is on meta"),
        (lambda a, b: ([a], [1.0], 0.1), "pair 0: expected tensors, got Tensor and float"),
    ],
)
def test_bad_arguments_are_refused_and_touch_nothing(make, message):
    a, b = random_tensor((12,), torch.float32, seed=1), random_tensor((12,), torch.float32, seed=2)
    before = a.clone()
    with pytest.raises(PlanError, match=message):
        pysoup.ops.lerp_(*make(a, b))
    assert_bit_equal(a, before)


def test_in_place_preconditions():
    grid = random_tensor((6, 4), torch.float32)
    with pytest.raises(PlanError, match="averaged tensor 0 is not contiguous; it is updated in place"):
        pysoup.ops.lerp_([grid.t()], [grid.t().contiguous()], 0.5)
    p = torch.nn.Parameter(random_tensor((5,), torch.float32))
    with pytest.raises(PlanError, match="requires grad: update it under torch.no_grad"):
        pysoup.ops.lerp_([p], [torch.zeros(5)], 0.5)
    with pytest.raises(PlanError, match="lerp_ updates CPU or CUDA tensors, got meta"):
        pysoup.ops.lerp_([grid.to("meta")], [grid.to("meta")], 0.5)
    with pytest.raises(BackendError, match="unknown backend 'gpu'"):
        pysoup.ops.lerp_([grid], [grid.clone()], 0.5, backend="gpu")


def test_weights_round_like_the_contract():
    """1 - weight is formed in double and rounded to fp32 once, as the per-tensor weighted sum would."""
    a, b = random_tensor((999,), torch.bfloat16, seed=3), random_tensor((999,), torch.bfloat16, seed=4)
    t = 1 - 0.9999
    want = reference.weighted_sum([a, b], [to_f32(1 - t), to_f32(t)], torch.bfloat16, False)
    pysoup.ops.lerp_(a, b, t, backend="cpu")
    assert_bit_equal(a, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_public_op_on_gpu_matches_cpu():
    avg, cur = model(torch.bfloat16, 0), model(torch.float32, 100)
    avg_gpu, cur_gpu = [a.cuda() for a in avg], [b.cuda() for b in cur]
    for _ in range(2):  # the second GPU call runs on the cached table
        pysoup.ops.lerp_(avg, cur, 0.001, backend="cpu")
        pysoup.ops.lerp_(avg_gpu, cur_gpu, 0.001)
    for got, w in zip(avg_gpu, avg):
        assert_bit_equal(got.cpu(), w)

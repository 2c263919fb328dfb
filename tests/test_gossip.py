"""pysoup.federated.gossip: one node's gossip step against its formula in float64, the backends and ISAs against
each other bit for bit, the plain mode against the variance_corrected file strategy, what is kept (batch-norm
statistics, integer buffers), and bad inputs refused in one line before anything is written."""

import pytest

torch = pytest.importorskip("torch")

from helpers.parametrize import FLOAT_DTYPES, ISAS, id_formatter  # noqa: E402
from helpers.tensors import assert_bit_equal, random_tensor  # noqa: E402

import pysoup  # noqa: E402
from pysoup.errors import PlanError  # noqa: E402
from pysoup.federated.gossip import gossip_step  # noqa: E402

EPS = 1e-4
# |result - float64 formula| <= TOL * max|formula|: one rounding into the dtype, plus fp32 arithmetic before it.
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _peers(shape, dtype, r, seed=0):
    """A node and r received tensors of unrelated spreads (uncorrelated models, as gossip from random inits)."""
    own = random_tensor(shape, dtype, seed=seed) * 0.5
    return own, [(random_tensor(shape, dtype, seed=seed + 1 + j) * (1 + j)).to(dtype) for j in range(r)]


def _formula(own, received, mode):
    """The step in float64, straight from ALGORITHMS.md."""
    w = own.double()
    rs = [x.double() for x in received]
    mean = 0.5 * w + 0.5 * sum(rs) / len(rs) if mode == "vc" else (w + sum(rs)) / (len(rs) + 1)
    if mode == "mean" or w.numel() == 1:
        return mean
    variances = [x.var() for x in (rs if mode == "vc" else [w] + rs)]
    target = sum(variances) / len(variances)
    return (mean - mean.mean()) * torch.sqrt((target + EPS) / (mean.var() + EPS)) + mean.mean()


@pytest.mark.parametrize("mode", ["vc", "plain", "mean"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (4097,), (64, 130)], ids=id_formatter("shape"))
@pytest.mark.parametrize("r", [1, 3], ids=id_formatter("received"))
def test_step_matches_the_formula_in_float64(mode, dtype, shape, r):
    own, received = _peers(shape, dtype, r)
    want = _formula(own, received, mode)
    state = {"w": own.clone()}
    ptr = state["w"].data_ptr()
    step = gossip_step(state, [{"w": x} for x in received], mode=mode)
    got = state["w"]
    assert got.dtype == dtype and got.data_ptr() == ptr  # in place
    err = float((got.double() - want).abs().max())
    assert err <= TOL[dtype] * float(want.abs().max()), err
    assert ("w" in step.scales) == (mode != "mean" and own.numel() > 1)


def test_vc_targets_the_received_variance_and_plain_all():
    """A node of tiny spread among wide peers: VC restores the peers' spread; plain the mean of all spreads (each
    up to eps's share: Var' = (target + eps) Var(W_bar) / (Var(W_bar) + eps))."""
    own = random_tensor((5000,), torch.float32, seed=1) * 0.01
    received = [random_tensor((5000,), torch.float32, seed=2 + j) for j in range(4)]
    target = float(sum(x.double().var() for x in received) / 4)
    vc, plain = {"w": own.clone()}, {"w": own.clone()}
    gossip_step(vc, [{"w": x} for x in received])
    gossip_step(plain, [{"w": x} for x in received], mode="plain")
    assert float(vc["w"].double().var()) == pytest.approx(target, rel=2e-3)
    assert float(plain["w"].double().var()) == pytest.approx((target * 4 + float(own.double().var())) / 5, rel=2e-3)
    mean = {"w": own.clone()}
    gossip_step(mean, [{"w": x} for x in received], mode="mean")
    assert float(mean["w"].double().var()) < 0.3 * target  # the vanishing variance itself: ~1/5 of the spread


@pytest.mark.parametrize("mode", ["vc", "plain", "mean"])
@pytest.mark.parametrize("isa", ISAS, ids=id_formatter("isa"))
@pytest.mark.parametrize("threads", [1, 2], ids=id_formatter("threads"))
def test_cpu_kernels_equal_the_reference_bit_for_bit(monkeypatch, mode, isa, threads):
    monkeypatch.setenv("PYSOUP_CPU_ISA", isa)
    states = {}
    for backend in ("cpu", "reference"):
        own, received = {}, [{} for _ in range(3)]
        for i, (shape, dtype) in enumerate(
            [((70, 61), torch.bfloat16), ((4097,), torch.float32), ((9,), torch.float16), ((1,), torch.float32)]
        ):
            x, rs = _peers(shape, dtype, 3, seed=10 * i)
            own[f"t{i}"] = x
            for peer, y in zip(received, rs):
                peer[f"t{i}"] = y.float() if i == 0 else y  # mixed input dtypes
        gossip_step(own, received, mode=mode, backend=backend, threads=threads)
        states[backend] = own
    for name in states["cpu"]:
        assert_bit_equal(states["cpu"][name], states["reference"][name])


def test_plain_mode_equals_the_variance_corrected_merge():
    """mode="plain" is the file strategy over the node and its peers (batch-norm statistics aside)."""
    sds = [_model(seed).state_dict() for seed in range(4)]
    merged = pysoup.merge(sds, strategy="variance_corrected", params={"eps": EPS})
    own = {k: v.clone() for k, v in sds[0].items()}
    gossip_step(own, sds[1:], mode="plain")
    for name, t in own.items():
        if "running" not in name and "num_batches" not in name:
            assert_bit_equal(t, merged[name])


def _model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3), torch.nn.PReLU()
    )
    with torch.no_grad():  # models that differ everywhere (BatchNorm's affine starts at 1 and 0 in every model)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
        model[4].weight.uniform_()
    return model


def test_module_in_place_batchnorm_and_integer_buffers_kept():
    node = _model(0)
    peers = [_model(s) for s in (1, 2)]
    with torch.no_grad():
        for p in peers:
            p[1].running_mean.add_(1.0)
            p[1].running_var.mul_(3.0)
            p[1].num_batches_tracked.fill_(7)
    node[1].num_batches_tracked.fill_(2)
    before = {k: v.clone() for k, v in node.state_dict().items()}
    ptrs = {n: p.data_ptr() for n, p in node.named_parameters()}
    want = {k: v.clone() for k, v in before.items()}
    gossip_step(want, [p.state_dict() for p in peers])
    step = gossip_step(node, [p.state_dict() for p in peers])
    assert step.kept == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert "4.weight" in step.averaged and "4.weight" not in step.scales  # PReLU's one weight: plainly averaged
    after = node.state_dict()
    for name in step.kept:
        assert torch.equal(after[name], before[name]), name
    for name, p in node.named_parameters():
        assert p.data_ptr() == ptrs[name] and torch.equal(p.detach(), want[name]), name
        assert not torch.equal(p.detach(), before[name]), name


def test_strided_tensors_and_tied_weights():
    own, received = _peers((40, 30), torch.float32, 2, seed=3)
    contiguous = {"w": own.clone()}
    gossip_step(contiguous, [{"w": x} for x in received])
    strided = {"w": own.t().contiguous().t()}  # column-major storage
    gossip_step(strided, [{"w": x.t().contiguous().t()} for x in received])
    assert not strided["w"].is_contiguous()
    assert_bit_equal(strided["w"], contiguous["w"])
    tied = own.clone()
    step = gossip_step({"a": tied, "b": tied}, [{"a": x, "b": x} for x in received])
    assert_bit_equal(tied, contiguous["w"])  # written once, not corrected twice
    assert step.averaged == ["a", "b"] and list(step.scales) == ["a"]


def _bad(received_edit=None, own_edit=None):
    def make():
        own = {"w": random_tensor((4, 3), torch.float32, seed=0), "b": random_tensor((3,), torch.float32, seed=1)}
        received = [{k: v + 1 for k, v in own.items()} for _ in range(2)]
        if own_edit:
            own_edit(own)
        if received_edit:
            received_edit(received)
        return own, received

    return make


BAD = {
    "no received models": (_bad(lambda r: r.clear()), {}, "no received models"),
    "received not a list": (_bad(), {"received": {"w": torch.zeros(4, 3)}}, "received must be a list"),
    "missing key": (_bad(lambda r: r[1].pop("b")), {}, "received model 1 lacks 'b'"),
    "extra key": (_bad(lambda r: r[0].update(c=torch.zeros(2))), {}, "received model 0 has 'c'"),
    "shape mismatch": (_bad(lambda r: r[1].update(w=torch.zeros(3, 4))), {}, "'w' is [3, 4] in received model 1"),
    "integer received": (_bad(lambda r: r[0].update(b=torch.zeros(3, dtype=torch.int64))), {}, "'b' is int64"),
    "float64 node": (_bad(own_edit=lambda o: o.update(b=o["b"].double())), {}, "'b' is float64 in the node"),
    "not a tensor": (_bad(lambda r: r[0].update(w=[0.0] * 12)), {}, "is a list, not a tensor"),
    "unknown mode": (_bad(), {"mode": "fedavg"}, "unknown mode 'fedavg'"),
    "negative eps": (_bad(), {"eps": -1.0}, "eps must be"),
    "own not a model": (_bad(), {"own": [1, 2]}, "the node's model is a list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_one_line_before_anything_changes(case):
    make, kwargs, message = BAD[case]
    own, received = make()
    before = {k: v.clone() for k, v in own.items()}
    kwargs = dict(kwargs)
    with pytest.raises(PlanError) as err:
        gossip_step(kwargs.pop("own", own), kwargs.pop("received", received), **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    for k, v in own.items():
        assert torch.equal(v, before[k]), k

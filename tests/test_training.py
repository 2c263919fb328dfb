"""pysoup.training's EMA, SWA and weight ensemble against plain-torch references of their formulas."""

import copy

import pytest
import torch

import pysoup
from pysoup.errors import PlanError
from pysoup.ops.reference import weighted_sum
from pysoup.training import EMA, SWA, WeightEnsemble


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )
    return model.to(dtype)


def train(model, steps, averages=(), seed=1, start=0):
    """SGD steps on random data; every average is updated after each step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    snapshots = []
    for _ in range(start):  # the same data stream when resuming
        torch.randn(32, 6, generator=g)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=g).to(next(model.parameters()).dtype)
        loss = model(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for a in averages:
            a.update()
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snapshots


def lerp_reference(avg, cur, t):
    """a <- weighted_sum([a, x], [1 - t, t]) in a's dtype: the numerical contract, in plain torch."""
    return weighted_sum([avg, cur.to(avg.dtype) if avg.dtype == torch.float32 else cur], [1.0 - t, t], avg.dtype, False)


@pytest.mark.parametrize("warmup", [False, True], ids=["plain", "warmup"])
@pytest.mark.parametrize(
    "model_dtype,avg_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)], ids=str
)
def test_ema_matches_the_formula_bit_for_bit(warmup, model_dtype, avg_dtype):
    model = make_model(dtype=model_dtype)
    ema = EMA(model, decay=0.9, warmup=warmup, dtype=avg_dtype)
    want = {n: p.detach().to(avg_dtype or p.dtype, copy=True) for n, p in model.named_parameters()}
    snaps = train(model, 6, [ema])
    for step, snap in enumerate(snaps, start=1):
        decay = ema.decay_at(step)
        for n in want:
            if decay == 0:
                want[n] = snap[n].to(want[n].dtype)
            else:
                want[n] = weighted_sum([want[n], snap[n]], [decay, 1.0 - decay], want[n].dtype, False)
    for n, w in want.items():
        assert torch.equal(ema.averaged[n].view(torch.uint8), w.view(torch.uint8)), n


def test_warmup_schedule_values():
    """timm's ModelEmaV3 / diffusers' EMAModel warm-up: 1 - (1 + n / gamma) ** -power, clamped; n from 1 after
    start_step, the first update a copy."""
    ema = EMA(make_model(), decay=0.999, warmup=True, warmup_gamma=1.0, warmup_power=0.75, min_decay=0.1, start_step=2)
    assert [ema.decay_at(s) for s in (1, 2, 3)] == [0.0, 0.0, 0.0]
    for step in (4, 10, 100):
        n = step - 3
        assert ema.decay_at(step) == max(0.1, min(0.999, 1 - (1 + n) ** -0.75))
    assert ema.decay_at(10**9) == 0.999
    assert EMA(make_model(), decay=0.9).decay_at(1) == 0.9  # no warm-up: the decay from the start


def test_ema_matches_torch_averaged_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_model()
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = EMA(model, decay=0.9)

    class Hook:
        def update(self):
            theirs.update_parameters(model)

    train(model, 8, [ema, Hook()])
    # AveragedModel copies at its first update and lerps with torch's own rounding: equal to fp32 rounding.
    ema2 = EMA(make_model(), decay=0.9, start_step=1)  # the same schedule: first update copies
    train(ema2._model, 8, [ema2])
    for n, t in ema2.averaged.items():
        assert torch.allclose(t, theirs.module.state_dict()[n].float(), rtol=1e-5, atol=1e-6), n


def test_swa_is_the_running_mean_and_matches_averaged_model():
    from torch.optim.swa_utils import AveragedModel

    model = make_model()
    theirs = AveragedModel(model)
    swa = SWA(model, start_step=2, update_every=2)

    class Hook:
        step = 0

        def update(self):
            self.step += 1
            if self.step >= 2 and self.step % 2 == 0:
                theirs.update_parameters(model)

    snaps = train(model, 9, [swa, Hook()])
    members = [snaps[s - 1] for s in (2, 4, 6, 8)]
    assert swa.count == 4
    for n, t in swa.averaged.items():
        mean = torch.stack([m[n] for m in members]).mean(0)
        assert torch.allclose(t, mean, rtol=1e-6, atol=1e-7), n
        assert torch.allclose(t, theirs.module.state_dict()[n], rtol=1e-6, atol=1e-7), n


def test_swa_update_bn_matches_torch():
    from torch.optim.swa_utils import update_bn

    model = make_model()
    swa = SWA(model)
    train(model, 5, [swa])
    loader = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    swa.update_bn(loader)
    other = make_model()
    other.load_state_dict(swa.state_dict_of_average())
    update_bn(loader, other)
    for n, b in other.named_buffers():
        got = swa.state_dict_of_average()[n]
        assert torch.equal(got, b), n
    assert not torch.equal(swa.copied["1.running_mean"], model[1].running_mean)


def test_weight_ensemble_counts_the_initial_weights_and_step_zero():
    model = make_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    we = WeightEnsemble(model, every=3)
    snaps = train(model, 8, [we])  # iterations 0..7: members at 0, 3, 6
    assert we.members == 4
    for n, t in we.averaged.items():
        members = [init[n], snaps[0][n], snaps[3][n], snaps[6][n]]
        assert torch.allclose(t, torch.stack(members).mean(0), rtol=1e-6, atol=1e-7), n
        want = init[n]
        for k, s in enumerate((0, 3, 6), start=2):  # the running mean by the contract, bit for bit
            want = weighted_sum([want, snaps[s][n]], [1.0 - 1.0 / k, 1.0 / k], want.dtype, False)
        assert torch.equal(t, want), n


@pytest.mark.parametrize("cls", [EMA, SWA, WeightEnsemble], ids=lambda c: c.__name__)
def test_resuming_gives_the_same_bytes(cls):
    kw = {"decay": 0.8, "warmup": True} if cls is EMA else {"every": 3} if cls is WeightEnsemble else {}
    first = make_model()
    b = cls(first, **kw)
    train(first, 4, [b])
    state, model_state = b.state_dict(), copy.deepcopy(first.state_dict())
    resumed = make_model(seed=5)
    resumed.load_state_dict(model_state)
    c = cls(resumed, **kw)
    c.load_state_dict(state)
    # The optimizer's momentum restarts here; compare against a run that restarted it the same way.
    second = make_model()
    d = cls(second, **kw)
    train(second, 4, [d])
    train(second, 6, [d], start=4)
    train(resumed, 6, [c], start=4)
    for n in c.averaged:
        assert torch.equal(c.averaged[n], d.averaged[n]), n
    assert c.state_dict().keys() == d.state_dict().keys()
    assert (c.step, c.state_dict().get("members")) == (d.step, d.state_dict().get("members"))


def test_swapped_evaluates_the_average_and_restores_the_model():
    model = make_model()
    ema = EMA(model, decay=0.5)
    train(model, 3, [ema])
    before = copy.deepcopy(model.state_dict())
    with ema.swapped() as m:
        assert m is model
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.averaged[n])
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    train(model, 1, [ema])  # still bound to the same memory


def test_save_feeds_merge(tmp_path):
    model = make_model(dtype=torch.bfloat16)
    ema = EMA(model, decay=0.5, dtype=torch.float32)
    train(model, 3, [ema])
    path = tmp_path / "ema.safetensors"
    ema.save(path)
    with pysoup.open(path) as ckpt:
        assert set(ckpt.keys()) == set(model.state_dict())
        for n, t in ema.averaged.items():
            assert torch.equal(ckpt.torch(n), t), n
    soup = pysoup.merge([str(path), str(path)], strategy="uniform")
    assert torch.equal(soup["0.weight"], ema.averaged["0.weight"])


def test_bad_arguments():
    model = make_model()
    for decay in (-0.1, 1.5, float("nan"), "0.9", True):
        with pytest.raises(PlanError, match="decay must be a number in"):
            EMA(model, decay=decay)
    with pytest.raises(PlanError, match="buffers must be one of"):
        EMA(model, buffers="sum")
    with pytest.raises(PlanError, match="dtype must be"):
        EMA(model, dtype=torch.int32)
    with pytest.raises(PlanError, match="torch.nn.Module"):
        SWA({"w": torch.zeros(3)})
    with pytest.raises(PlanError, match="update_every"):
        SWA(model, update_every=0)
    with pytest.raises(PlanError, match="every must be"):
        WeightEnsemble(model, every=0)
    with pytest.raises(PlanError, match="no float parameters"):
        EMA(torch.nn.ReLU())
    ema = EMA(model, decay=0.5)
    ema.update()
    saved = {n: t.clone() for n, t in ema.averaged.items()}
    model[0].weight.data = torch.zeros(16, 6)
    with pytest.raises(PlanError, match=r"EMA: '0.weight' no longer holds the memory"):
        ema.update()
    assert ema.step == 1 and all(torch.equal(saved[n], t) for n, t in ema.averaged.items())
    other = EMA(make_model(), decay=0.5)
    with pytest.raises(PlanError, match="state is of a 'SWA'"):
        other.load_state_dict(SWA(make_model()).state_dict())
    wrong = EMA(torch.nn.Linear(2, 2), decay=0.5).state_dict()
    with pytest.raises(PlanError, match="differ from the model's"):
        other.load_state_dict(wrong)

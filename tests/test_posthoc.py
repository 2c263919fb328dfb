"""Post-hoc EMA (pysoup.training.posthoc): the formulas against independent computations (the EMA recursion run on
impulse trains, numerical integration of the impulse responses), then the whole path on a tiny model: snapshots
during training, synthesis by one streaming merge, resuming, and the bad inputs."""

import io
import math
import os

import numpy as np
import pytest
import torch
from helpers.checkpoints import tree_snapshot
from safetensors.torch import load_file

from pysoup.errors import FormatError, PlanError
from pysoup.training.posthoc import (
    MANIFEST_NAME,
    SIGMA_REL_MAX,
    PostHocEMA,
    Snapshot,
    coefficients,
    fit,
    gamma_to_sigma_rel,
    power_beta,
    read_manifest,
    sigma_rel_to_gamma,
    synthesize,
)


# -- independent references -----------------------------------------------------------------------------------------
def impulse_response(tau, gamma, t):
    """p_{γ,t}(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t], 0 after."""
    tau = np.asarray(tau, dtype=np.float64)
    return np.where(tau <= t, (gamma + 1) * (tau / t) ** gamma / t, 0.0)


def integrate(f, breakpoints):
    """∫ f over [0, max(breakpoints)] by 40-point Gauss-Legendre on each piece between breakpoints, the first piece
    cut geometrically toward 0 (τ^γ with small γ is not smooth there)."""
    nodes, weights = np.polynomial.legendre.leggauss(40)
    points = sorted({0.0, *map(float, breakpoints)})
    first = points[1]
    edges = [0.0] + [first * 2.0**-k for k in range(40, 0, -1)] + points[1:]
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        x = 0.5 * (b - a) * nodes + 0.5 * (a + b)
        total += 0.5 * (b - a) * float(np.sum(weights * f(x)))
    return total


def inner_product(g1, t1, g2, t2, cuts):
    return integrate(lambda x: impulse_response(x, g1, t1) * impulse_response(x, g2, t2), cuts)


def ema_recursion(trajectory, gamma):
    """The power-function EMA run step by step in float64 over trajectory[0] = θ_1, ..., the first update a copy."""
    avg = None
    for t, theta in enumerate(trajectory, start=1):
        beta = (1 - 1 / t) ** (gamma + 1)
        avg = np.array(theta, dtype=np.float64) if avg is None else beta * avg + (1 - beta) * np.asarray(theta)
    return avg


# -- the formulas -----------------------------------------------------------------------------------------------------
def test_beta_schedule():
    assert power_beta(1, 6.94) == 0.0  # the first update copies
    assert power_beta(2, 0.0) == 0.5  # γ = 0: the running mean, β = 1 - 1/t
    assert power_beta(4, 0.0) == 0.75
    assert power_beta(2, 1.0) == 0.25
    assert power_beta(10, 6.94) == pytest.approx(0.9**7.94, rel=1e-15)
    # β -> 1 - (γ+1)/t for long runs
    assert 1 - power_beta(1e6, 6.94) == pytest.approx(7.94e-6, rel=1e-4)


@pytest.mark.parametrize("gamma", [-0.3, 0.0, 0.17, 6.94, 16.97])
def test_recursion_weights_are_the_integrated_impulse_response(gamma):
    """Run on an impulse train (θ_τ = 1 at one step, 0 elsewhere), the recursion's output at t is the weight of step
    τ: ∫_{τ-1}^{τ} p_{γ,t}, so the continuous impulse response describes the discrete EMA exactly."""
    t = 30
    weights = ema_recursion(np.eye(t), gamma)  # trajectory θ_τ = e_τ: the output is the vector of weights
    for k in range(t):
        exact = integrate(lambda x, k=k: impulse_response(x + k, gamma, t), [1.0])  # ∫_k^{k+1} p
        assert weights[k] == pytest.approx(exact, rel=1e-9, abs=1e-15)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.28, 0.3, SIGMA_REL_MAX])
def test_sigma_rel_gamma_round_trip(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma >= (math.sqrt(5) - 3) / 2 - 1e-12  # the EMA branch (the larger root)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    # σ_rel is the standard deviation of the impulse response over [0, t], relative to t: checked by integration
    t = 1.0
    mean = integrate(lambda x: x * impulse_response(x, gamma, t), [t])
    second = integrate(lambda x: x * x * impulse_response(x, gamma, t), [t])
    assert math.sqrt(second - mean**2) / t == pytest.approx(sigma_rel, rel=1e-7)


@pytest.mark.parametrize("gamma", [-0.38, 0.0, 1.0, 6.94, 16.97, 100.0])
def test_gamma_sigma_rel_round_trip(gamma):
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-6)


def test_edm2_profiles():
    # EDM2 (Karras et al. 2024), section 3.1: σ_rel 0.05 <-> γ 16.97, σ_rel 0.10 <-> γ 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert SIGMA_REL_MAX == pytest.approx(0.30028, abs=1e-5)


SNAPSHOTS = [(g, t) for t in (40, 80, 120, 160, 200) for g in (sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.28))]


@pytest.mark.parametrize("target,t", [(0.10, 200), (0.15, 200), (0.2, 160), (0.05, 130), (0.28, 200)])
def test_coefficients_match_numerical_integration(target, t):
    """The closed-form Gram matrix and target products against quadrature of the impulse responses; then the
    least-squares solution, divided by its sum, and its residual."""
    f = fit(SNAPSHOTS, target, t)
    used = [(g, s) for g, s in SNAPSHOTS if s <= t]
    g_r = sigma_rel_to_gamma(target)
    cuts = [s for _, s in used] + [t]
    a = np.array([[inner_product(gi, ti, gj, tj, cuts) for gj, tj in used] for gi, ti in used])
    b = np.array([inner_product(gi, ti, g_r, t, cuts) for gi, ti in used])
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x /= x.sum()
    got = np.array([c for (g, s), c in zip(SNAPSHOTS, f.coefficients) if s <= t])
    assert sum(f.coefficients) == pytest.approx(1.0, abs=1e-12)
    assert all(c == 0.0 for (g, s), c in zip(SNAPSHOTS, f.coefficients) if s > t)
    # the combination's impulse response, not each coefficient: Gram matrices this ill-conditioned (cond ~1e9) move
    # individual coefficients with rounding while the fitted function stays put
    np.testing.assert_allclose(got, x, atol=1e-4 * np.abs(x).max())

    def error(z):
        return lambda s: (
            sum(c * impulse_response(s, gi, ti) for c, (gi, ti) in zip(z, used)) - impulse_response(s, g_r, t)
        )

    norm = math.sqrt(integrate(lambda s: impulse_response(s, g_r, t) ** 2, cuts))
    residual = math.sqrt(integrate(lambda s: error(got)(s) ** 2, cuts)) / norm
    assert f.residual == pytest.approx(residual, rel=1e-3, abs=1e-7)
    # before the division, the least-squares solution: any step away from it fits worse
    unnormalized = got * f.coefficient_sum
    best = integrate(lambda s: error(unnormalized)(s) ** 2, cuts)
    for d in np.random.default_rng(0).normal(size=(3, len(got))):
        moved = unnormalized + 1e-3 * d / np.abs(d).max()
        assert integrate(lambda s, z=moved: error(z)(s) ** 2, cuts) >= best * (1 - 1e-9)


def test_tracked_profile_gives_one_hot():
    for k, (g, t) in enumerate(SNAPSHOTS):
        c = coefficients(SNAPSHOTS, gamma=g, t=t)
        expected = np.eye(len(SNAPSHOTS))[k]
        np.testing.assert_allclose(c, expected, atol=1e-6)
        assert fit(SNAPSHOTS, gamma=g, t=t).residual < 1e-6


def test_discrete_weights_within_the_residual():
    """The synthesized EMA's weight on each training step (the coefficients applied to the recursions' weights)
    differs from the target EMA's by at most what the continuous residual allows: Σ_τ |d_τ| <= sqrt(t) ‖e‖₂."""
    t = 200
    for target in (0.1, 0.15, 0.2):
        f = fit(SNAPSHOTS, target, t)
        synthesized = sum(c * np.pad(_weights(g, s), (0, t - s)) for c, (g, s) in zip(f.coefficients, SNAPSHOTS))
        d = synthesized - _weights(f.gamma, t)
        bound = f.residual * (f.gamma + 1) / math.sqrt(2 * f.gamma + 1)  # sqrt(t) ‖p_r‖₂ · residual
        assert abs(d.sum()) < 1e-12
        assert np.abs(d).sum() <= bound * (1 + 1e-9)
        assert bound < 0.25


def _weights(gamma, t):
    """The weights the EMA at step t gives steps 1..t, by the recursion."""
    return ema_recursion(np.eye(t), gamma)


# -- the training loop ------------------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.norm = torch.nn.BatchNorm1d(5)  # a float buffer (averaged) and an integer one (copied)
        self.b = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


TARGET = torch.Generator().manual_seed(123)
W_TRUE = torch.randn(3, 6, generator=TARGET)


def train(model, opt, ema, steps, record=None):
    """A noisy regression: the batch of step t depends on t only, so a resumed run sees the same data."""
    for t in steps:
        g = torch.Generator().manual_seed(1000 + t)
        x = torch.randn(32, 6, generator=g)
        y = x @ W_TRUE.T + 0.5 * torch.randn(32, 3, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for e in ema:
            e.update()
        if record is not None:
            record.append({n: p.detach().double().clone() for n, p in model.state_dict().items()})


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """A 300-step loop on a 6-5-3 network runs 30x slower with torch's threads fighting over two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """300 steps; snapshots of σ_rel 0.05 and 0.28 every 25; EMAs of σ_rel 0.10, 0.15, 0.20 tracked alongside."""
    directory = str(tmp_path_factory.mktemp("phema"))
    model, opt = make()
    ema = PostHocEMA(model, sigma_rels=(0.05, 0.28), snapshot_every=25, directory=directory)
    tracked = PostHocEMA(model, sigma_rels=(0.10, 0.15, 0.20))
    record = []
    train(model, opt, [ema, tracked], range(1, 301), record)
    return directory, model, ema, tracked, record


def test_snapshots_and_manifest(trained):
    directory, model, ema, _, _ = trained
    snaps = read_manifest(directory)
    assert [s.step for s in snaps] == [t for t in range(25, 301, 25) for _ in range(2)]
    assert [s.gamma for s in snaps[:2]] == list(ema.gammas)
    assert sorted(os.listdir(directory)) == sorted([s.file for s in snaps] + [MANIFEST_NAME])
    last = load_file(os.path.join(directory, snaps[-2].file))
    assert set(last) == set(model.state_dict())
    assert last["norm.num_batches_tracked"].item() == 300  # integer buffers: the model's, at the snapshot
    for name, value in ema.ema_state_dict(0).items():
        torch.testing.assert_close(last[name], value, rtol=0, atol=0)


def test_ema_matches_the_recursion(trained):
    """The fused fp32 update against the float64 recursion over the recorded weights."""
    _, _, ema, tracked, record = trained
    for e in (ema, tracked):
        for k, gamma in enumerate(e.gammas):
            for name, value in e.ema_state_dict(k).items():
                if value.dtype != torch.float32:
                    continue
                want = ema_recursion([r[name].numpy() for r in record], gamma)
                np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_synthesizing_a_snapshot_gives_that_snapshot(trained, tmp_path):
    directory, _, ema, _, _ = trained
    for profile, step in [(0, 300), (1, 150), (0, 25)]:
        out = tmp_path / f"p{profile}-{step}.safetensors"
        r = synthesize(directory, gamma=ema.gammas[profile], step=step, out=out, progress=False)
        hot = [s.profile == profile and s.step == step for s in map(_snapshot_of, r.files)]
        np.testing.assert_allclose(r.coefficients, np.array(hot, dtype=float), atol=1e-6)
        got = load_file(out)
        want = load_file(os.path.join(directory, f"ema{profile}-step{step:09d}.safetensors"))
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9)


def _snapshot_of(path):
    name = os.path.basename(path)
    return Snapshot(file=name, profile=int(name[3]), gamma=0.0, step=int(name[-21:-12]))


@pytest.mark.parametrize("sigma_rel", [0.10, 0.15, 0.20])
def test_synthesized_matches_tracked(trained, sigma_rel):
    """The EMA synthesized from σ_rel 0.05 and 0.28 snapshots against the one tracked during training.

    Tolerance, from the fit's residual: the synthesized weights on the training steps differ from the target's by
    d_τ with Σ d_τ = 0 and Σ|d_τ| <= sqrt(t)‖e‖₂ = residual (γ+1)/sqrt(2γ+1), so per element
    |synthesized − tracked| <= that times half the range the element took during training, plus fp32 rounding of
    the EMAs and the merge (≤ (Σ|x| + 1)(t + n) 2⁻²³ max|θ|)."""
    directory, _, _, tracked, record = trained
    k = tracked.sigma_rels.index(pytest.approx(sigma_rel))
    r = synthesize(directory, sigma_rel, progress=False)
    assert r.step == 300 and len(r.files) == 24
    assert r.residual < 0.05
    spread = r.residual * (r.gamma + 1) / math.sqrt(2 * r.gamma + 1)
    rounding = (sum(map(abs, r.coefficients)) + 1) * (300 + len(r.files)) * 2.0**-23
    worst = 0.0
    for name, want in tracked.ema_state_dict(k).items():
        if not want.dtype.is_floating_point:
            continue
        path = torch.stack([rec[name] for rec in record])
        half_range = (path.max(0).values - path.min(0).values) / 2
        tol = spread * half_range + rounding * path.abs().max(0).values
        err = (r.tensors[name].double() - want.double()).abs()
        assert (err <= tol).all(), (name, (err - tol).max())
        moved = half_range > 1e-4  # a.bias, before a batch norm, has no gradient: it never moves
        if moved.any():
            worst = max(worst, float((err[moved] / half_range[moved]).max()))
    # the bound is not vacuous: a small fraction of how far the weights moved, and the errors are inside it
    assert spread < 0.1 and 0 < worst <= spread


def test_resume_gives_the_same_bytes(tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    model, opt = make(1)
    ema = PostHocEMA(model, snapshot_every=10, directory=whole, gammas=(16.97, 0.17))
    train(model, opt, [ema], range(1, 61))

    model, opt = make(1)
    ema = PostHocEMA(model, snapshot_every=10, directory=split, gammas=(16.97, 0.17))
    train(model, opt, [ema], range(1, 36))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}, buf)
    train(model, opt, [ema], range(36, 46))  # the interrupted run got further, past a snapshot, then died
    del model, opt, ema

    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model, opt = make(2)  # another initialization: everything comes from the state
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    ema = PostHocEMA(model, snapshot_every=10, directory=split, gammas=(16.97, 0.17))
    ema.load_state_dict(state["ema"])
    assert [s.step for s in read_manifest(split)] == [10, 10, 20, 20, 30, 30]  # cut back to the state
    train(model, opt, [ema], range(36, 61))
    assert tree_snapshot(split) == tree_snapshot(whole)


def test_bf16_model_in_its_own_dtype(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 4).to(torch.bfloat16)
    ema = PostHocEMA(model, snapshot_every=5, directory=tmp_path, dtype=None)
    for _ in range(10):
        with torch.no_grad():
            model.weight.add_(0.01)
        ema.update()
    snap = load_file(tmp_path / "ema1-step000000010.safetensors")
    assert snap["weight"].dtype == torch.bfloat16
    assert torch.equal(snap["weight"], ema.ema_state_dict(1)["weight"])
    r = synthesize(tmp_path, gamma=ema.gammas[1], progress=False)
    assert r.tensors["weight"].dtype == torch.bfloat16
    assert torch.equal(r.tensors["weight"], snap["weight"])


# -- bad inputs: one line, nothing changed -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sigma_rels": (0.05, 0.31)}, "outside (0, 0.3003]"),
        ({"sigma_rels": (0.0,)}, "outside (0, 0.3003]"),
        ({"sigma_rels": (-0.1,)}, "outside"),
        ({"sigma_rels": (float("nan"),)}, "sigma_rel must be a number"),
        ({"sigma_rels": ("0.1",)}, "sigma_rel must be a number"),
        ({"sigma_rels": ()}, "at least one profile"),
        ({"sigma_rels": (0.1, 0.1)}, "profiles repeat"),
        ({"gammas": (-0.5, 3.0)}, "must be > -0.5"),
        ({"gammas": (float("inf"),)}, "finite number"),
        ({"snapshot_every": 0, "directory": "x"}, "snapshot_every must be a positive integer"),
        ({"snapshot_every": 2.5, "directory": "x"}, "snapshot_every must be a positive integer"),
        ({"snapshot_every": True, "directory": "x"}, "snapshot_every must be a positive integer"),
        ({"snapshot_every": 10}, "needs a directory"),
        ({"dtype": "int8"}, "unsupported output dtype"),
    ],
)
def test_bad_construction(kwargs, match, tmp_path):
    with pytest.raises(PlanError) as info:
        PostHocEMA(torch.nn.Linear(2, 2), **kwargs)
    assert match in str(info.value) and "\n" not in str(info.value)


def test_bad_models():
    with pytest.raises(PlanError, match="expected a torch.nn.Module"):
        PostHocEMA({"w": torch.zeros(2)})
    with pytest.raises(PlanError, match="float64"):
        PostHocEMA(torch.nn.Linear(2, 2).double())
    with pytest.raises(PlanError, match="no float parameters"):
        PostHocEMA(torch.nn.ReLU())


CHANGES = {
    "cast": (lambda m: m.half(), "'a.weight' changed since it was bound ([5, 6] torch.float32 on cpu -> [5, 6] "
             "torch.float16"),
    "data": (lambda m: setattr(m.a.weight, "data", torch.zeros(5, 6)), "'a.weight' no longer holds the memory it had"),
    "reshaped": (lambda m: setattr(m, "b", torch.nn.Linear(5, 4)), "'b.weight' changed since it was bound ([3, 5]"),
    "swapped": (lambda m: setattr(m, "b", torch.nn.Linear(5, 3)), "'b.weight' is not the tensor bound"),
    "added": (lambda m: setattr(m, "extra", torch.nn.Linear(1, 1)), "'extra.weight' was added"),
    "removed": (lambda m: delattr(m, "norm") or setattr(m, "norm", torch.nn.Identity()), "'norm.weight' was removed"),
}  # fmt: skip


def check_refused(ema, directory, match):
    """update() raises one line naming the change; the EMAs, the step and the directory are as they were."""
    before = [{n: t.clone() for n, t in ema.ema_state_dict(k).items()} for k in range(2)]
    files, step = tree_snapshot(str(directory)), ema.step
    with pytest.raises(PlanError) as info:
        ema.update()
    assert match in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert ema.step == step and tree_snapshot(str(directory)) == files
    for k in range(2):
        for n, t in before[k].items():
            assert torch.equal(ema.ema_state_dict(k)[n], t)


@pytest.mark.parametrize("change", list(CHANGES))
def test_model_changed_before_a_snapshot(tmp_path, change):
    model, opt = make()
    ema = PostHocEMA(model, snapshot_every=5, directory=tmp_path)
    train(model, opt, [ema], range(1, 5))
    CHANGES[change][0](model)
    check_refused(ema, tmp_path, CHANGES[change][1])


@pytest.mark.parametrize("change", ["cast", "data"])
def test_model_changed_between_snapshots(tmp_path, change):
    """Between snapshots the fused update's own check (every tensor's memory) catches a cast or new memory."""
    model, opt = make()
    ema = PostHocEMA(model, snapshot_every=5, directory=tmp_path)
    train(model, opt, [ema], range(1, 3))
    CHANGES[change][0](model)
    check_refused(ema, tmp_path, CHANGES[change][1])


def test_swapped_module_is_caught_before_the_next_snapshot(tmp_path):
    """A module swapped for another leaves the bound tensors alive and in place: walking the model on every update
    would cost ~10 us per tensor, so the walk runs before each snapshot, and nothing averaged since is written."""
    model, opt = make()
    ema = PostHocEMA(model, snapshot_every=5, directory=tmp_path)
    train(model, opt, [ema], range(1, 3))
    CHANGES["swapped"][0](model)
    ema.update()
    ema.update()
    check_refused(ema, tmp_path, CHANGES["swapped"][1])
    assert not os.path.exists(tmp_path / MANIFEST_NAME)


def test_directory_of_another_run(tmp_path):
    model, opt = make()
    train(model, opt, [PostHocEMA(model, snapshot_every=2, directory=tmp_path)], range(1, 5))
    files = tree_snapshot(str(tmp_path))
    other = PostHocEMA(model, snapshot_every=2, directory=tmp_path)
    with pytest.raises(PlanError, match="holds another run's snapshots"):
        other.update()  # at the first update, not at the first snapshot
    assert other.step == 0 and tree_snapshot(str(tmp_path)) == files
    with pytest.raises(PlanError, match="profiles"):
        PostHocEMA(model, sigma_rels=(0.1, 0.2), directory=tmp_path).load_state_dict(other.state_dict())


def test_bad_synthesis(tmp_path):
    directory = tmp_path / "snaps"
    model, opt = make()
    ema = PostHocEMA(model, snapshot_every=10, directory=directory)
    train(model, opt, [ema], range(1, 31))
    out = tmp_path / "out.safetensors"
    cases = [
        (dict(sigma_rel=0.31), PlanError, "outside (0, 0.3003]"),
        (dict(sigma_rel=0.1, step=31), PlanError, "target step 31 is after the last snapshot (step 30)"),
        (dict(sigma_rel=0.1, step=9), PlanError, "needs at least 2 snapshots at or before step 9, got 0"),
        (dict(sigma_rel=0.1, step=0), PlanError, "target step must be a positive number"),
        (dict(sigma_rel=0.1, gamma=3.0), PlanError, "exactly one of sigma_rel or gamma"),
        (dict(), PlanError, "exactly one of sigma_rel or gamma"),
    ]
    before = tree_snapshot(str(tmp_path))
    for kwargs, error, match in cases:
        with pytest.raises(error) as info:
            synthesize(directory, out=out, progress=False, **kwargs)
        assert match in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert tree_snapshot(str(tmp_path)) == before

    with pytest.raises(FormatError, match="no post-hoc EMA manifest"):
        synthesize(tmp_path, 0.1, out)
    os.remove(directory / "ema1-step000000020.safetensors")
    with pytest.raises(FormatError, match="ema1-step000000020.safetensors: a snapshot the manifest lists is missing"):
        synthesize(directory, 0.1, out)
    (directory / MANIFEST_NAME).write_text('{"format": "pysoup.posthoc_ema", "version": 1, "snapshots": [{"file": '
                                           '"../x", "profile": 0, "gamma": 1.0, "step": 1}]}')  # fmt: skip
    with pytest.raises(FormatError, match="not a file name inside the directory"):
        synthesize(directory, 0.1, out)
    (directory / MANIFEST_NAME).write_text("{")
    with pytest.raises(FormatError, match="not valid JSON"):
        synthesize(directory, 0.1, out)
    assert not out.exists()
    single = [Snapshot("a", 0, 1.0, 10)]
    with pytest.raises(PlanError, match="at least 2 snapshots at or before step 10, got 1"):
        coefficients(single, 0.1)
    with pytest.raises(PlanError, match="at least 2 snapshots, got none"):
        coefficients([], 0.1)


@pytest.mark.slow  # ~30 s on 2 busy cores: 3 x 600 training steps and 60 syntheses
def test_example_quick():
    import re
    import subprocess
    import sys

    from helpers.cli import ROOT

    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, f"{ROOT}/examples/posthoc_ema.py", "--quick"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    inside = float(re.search(r"Largest distance between the snapshot profiles' σ_rel: ([0-9.]+)", proc.stdout)[1])
    assert inside < 0.01, proc.stdout

"""pysoup.federated.noloco: NoLoCo's worked example and group rule, its outer step against the formula in float64,
a 4-process gloo run equal to the one-process simulation bit for bit (and DiLoCo's to fp32 rounding), the DiLoCo
baseline against torch.optim.SGD with Nesterov momentum, and refusals.

The 4 workers are forked (one launch for the file): spawning 4 interpreters that import torch took ~30 s on this
2-core machine, forking 0.3 s. A forked child must not start OpenMP threads its parent had started (libgomp hangs),
so the workers run the kernels and torch on one thread; every thread count gives the same bits."""

import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from helpers.tensors import assert_bit_equal  # noqa: E402

from pysoup.errors import PlanError  # noqa: E402
from pysoup.federated.noloco import (  # noqa: E402
    DiLoCo,
    NoLoCo,
    noloco_groups,
    simulate_diloco_step,
    simulate_outer_step,
)

WORLD = 4
OUTER_STEPS = (50, 100, 150)
DILOCO_STEPS = (50, 100)
RUN_TIMEOUT_S = 120


def _init(rank):
    """A worker's parameters: two float32 tensors of odd sizes and a bfloat16 one (two flat buffers, two tags)."""
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(7, 5, generator=g), torch.randn(4097, generator=g).bfloat16(), torch.randn(13, generator=g)]


def _inner_steps(params, rank, step):
    """Stands in for H inner optimizer steps: a drift that differs by worker and by round."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    with torch.no_grad():
        for p in params:
            p.copy_((p.float() + 0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        out = {}
        params = _init(rank)
        noloco = NoLoCo(params, sync_every=50, threads=1)
        out["noloco"] = []
        for step in OUTER_STEPS:
            _inner_steps(params, rank, step)
            group = noloco.outer_step(step)
            state = noloco.state_dict()
            out["noloco"].append(
                {
                    "group": group,
                    "theta": [p.clone() for p in params],
                    "phi": [t.clone() for t in state["phi"]],
                    "m": [t.clone() for t in state["momentum"]],
                }
            )
        out["noloco_bytes"] = noloco.bytes_per_outer_step()
        shared = _init(0)  # DiLoCo: one initialisation on every worker
        diloco = DiLoCo(shared, sync_every=50, threads=1)
        out["diloco"] = []
        for step in DILOCO_STEPS:
            _inner_steps(shared, rank, step)
            diloco.outer_step(step)
            out["diloco"].append([p.clone() for p in shared])
        out["diloco_bytes"] = diloco.bytes_per_outer_step()
        try:  # refused on every worker before any exchange (a send without its receive would hang)
            NoLoCo(params, group_size=3, threads=1).outer_step(200)
            out["error"] = None
        except PlanError as exc:
            out["error"] = str(exc)
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    """One 4-rank gloo run of _worker; each rank's record."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("noloco")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    start = time.monotonic()
    context = mp.start_processes(_worker, args=(str(tmp),), nprocs=WORLD, join=False, start_method=method)
    try:
        while not context.join(timeout=1):
            if time.monotonic() - start > RUN_TIMEOUT_S:
                pytest.fail(f"the {WORLD}-rank run took over {RUN_TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _assert_close(a, b, atol):
    """|a - b| <= atol everywhere (torch.testing.assert_close imports torch.distributed.tensor: 2.4 s here)."""
    err = float((a.double() - b.double()).abs().max())
    assert err <= atol, err


# -- the rule and the worked example --------------------------------------------------------------------------------
def test_worked_example():
    """ALGORITHMS.md: phi = (0, 1), theta = (0.2, 0.8), m = 0 -> phi_0' = 0.35 (alpha 0.7, g 2)."""
    phis = [torch.zeros(1), torch.ones(1)]
    thetas = [torch.full((1,), 0.2), torch.full((1,), 0.8)]
    ms = [torch.zeros(1), torch.zeros(1)]
    assert simulate_outer_step(thetas, phis, ms, step=0) == [[0, 1]]
    assert float(phis[0]) == pytest.approx(0.35, abs=1e-7) and float(phis[1]) == pytest.approx(0.65, abs=1e-7)
    assert float(ms[0]) == pytest.approx(0.35, abs=1e-7) and float(ms[1]) == pytest.approx(-0.35, abs=1e-7)
    assert torch.equal(thetas[0], phis[0]) and torch.equal(thetas[1], phis[1])


@pytest.mark.parametrize("world,g", [(4, 2), (8, 2), (6, 3), (8, 4), (5, 1), (2, 2)])
def test_group_rule(world, g):
    assert noloco_groups(100, 4) == [[0, 3], [1, 2]]
    for step in (0, 50, 100, 12345):
        perm = np.random.default_rng(step + 1).permutation(world)
        groups = noloco_groups(step, world, g)
        assert groups == [[int(perm[i]) for i in range(world) if i % (world // g) == k] for k in range(world // g)]
        assert sorted(r for grp in groups for r in grp) == list(range(world)) and {len(x) for x in groups} == {g}
        assert groups == NoLoCo([torch.zeros(2)], group_size=g).groups(step, world)


@pytest.mark.parametrize("world,g", [(3, 2), (6, 4), (4, 0)])
def test_world_not_a_multiple_of_the_group_size(world, g):
    with pytest.raises(PlanError, match="NoLoCo: (world size|group_size)"):
        noloco_groups(0, world, g)
    thetas = [torch.zeros(3) for _ in range(world)]
    with pytest.raises(PlanError):
        simulate_outer_step(thetas, [t.clone() for t in thetas], [t.clone() for t in thetas], 0, group_size=g)


# -- the arithmetic ---------------------------------------------------------------------------------------------------
def _random_workers(world, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(9, 4), (1,), (4097,)]
    thetas = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(world)]
    phis = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(world)]
    ms = [[0.1 * torch.randn(s, generator=g) for s in shapes] for _ in range(world)]
    return thetas, phis, ms


def test_outer_step_matches_the_formula_in_float64():
    alpha, beta, step = 0.7, 0.5, 100
    thetas, phis, ms = _random_workers(8)
    t64, p64, m64 = ([[t.double() for t in w] for w in x] for x in (thetas, phis, ms))
    groups = simulate_outer_step(thetas, phis, ms, step, outer_lr=alpha, momentum=beta)
    for group in groups:
        for i in group:
            for k in range(3):
                dbar = sum(t64[j][k] - p64[j][k] for j in group) / len(group)
                pbar = sum(p64[j][k] for j in group) / len(group)
                m = beta * m64[i][k] + alpha * dbar + alpha * (pbar - p64[i][k])
                phi = p64[i][k] + m
                scale = float(phi.abs().max())
                assert float((ms[i][k].double() - m).abs().max()) <= 4e-7 * scale
                assert float((phis[i][k].double() - phi).abs().max()) <= 4e-7 * scale
                assert torch.equal(thetas[i][k], phis[i][k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_simulation_bits_do_not_depend_on_backend_or_threads(dtype):
    runs = []
    for backend, threads in (("cpu", 1), ("cpu", 2), ("reference", None)):
        thetas, phis, ms = _random_workers(4, seed=1, dtype=dtype)
        simulate_outer_step(thetas, phis, ms, 50, backend=backend, threads=threads)
        runs.append(thetas + ms)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            for x, y in zip(a, b):
                assert_bit_equal(x, y)


def test_diloco_is_nesterov_sgd_on_the_outer_gradient():
    """Three outer steps against torch.optim.SGD's Nesterov update (lr 0.7, momentum 0.9, dampening 0) in float64
    with grad G = phi - mean(theta): b <- mu b + G, phi <- phi - lr (G + mu b). (Written out: making a torch
    optimizer costs ~5 s of imports here.) outer_lr 1 and momentum 0 is plain model averaging (local SGD)."""
    world, lr, mu = 4, 0.7, 0.9
    g = torch.Generator().manual_seed(3)
    phi, buf = [torch.randn(6, 5, generator=g)], [torch.zeros(6, 5)]
    ref, ref_buf = phi[0].double(), torch.zeros(6, 5, dtype=torch.float64)
    for _ in range(3):
        thetas = [[phi[0] + 0.1 * torch.randn(6, 5, generator=g)] for _ in range(world)]
        grad = ref - sum(t[0].double() for t in thetas) / world
        ref_buf = mu * ref_buf + grad
        ref = ref - lr * (grad + mu * ref_buf)
        simulate_diloco_step(thetas, phi, buf)
        _assert_close(phi[0].double(), ref, 2e-6)
        _assert_close(buf[0].double(), ref_buf, 2e-6)
        assert all(torch.equal(t[0], phi[0]) for t in thetas)
    thetas = [[torch.randn(6, 5, generator=g)] for _ in range(world)]
    mean = sum(t[0] for t in thetas) / world
    simulate_diloco_step(thetas, phi, [torch.zeros(6, 5)], outer_lr=1.0, momentum=0.0)
    _assert_close(phi[0], mean, 1e-6)


# -- the distributed steps -------------------------------------------------------------------------------------------
def test_gloo_noloco_equals_the_simulation_bit_for_bit(gloo_run):
    thetas = [_init(r) for r in range(WORLD)]
    phis = [[p.clone() for p in w] for w in thetas]
    ms = [[torch.zeros(p.shape) for p in w] for w in thetas]
    for n, step in enumerate(OUTER_STEPS):
        for r in range(WORLD):
            _inner_steps(thetas[r], r, step)
        groups = simulate_outer_step(thetas, phis, ms, step)
        for r, out in enumerate(gloo_run):
            got = out["noloco"][n]
            assert got["group"] == next(grp for grp in groups if r in grp)  # every worker derived the same groups
            for name, want in (("theta", thetas[r]), ("phi", phis[r]), ("m", ms[r])):
                for a, b in zip(got[name], want):
                    assert_bit_equal(a, b)


def test_gloo_diloco_matches_the_simulation(gloo_run):
    shared = [_init(0) for _ in range(WORLD)]
    phi = [p.clone() for p in shared[0]]
    buf = [torch.zeros(p.shape) for p in phi]
    for n, step in enumerate(DILOCO_STEPS):
        for r in range(WORLD):
            _inner_steps(shared[r], r, step)
        simulate_diloco_step(shared, phi, buf)
        for out in gloo_run:
            for a, b in zip(out["diloco"][n], gloo_run[0]["diloco"][n]):
                assert_bit_equal(a, b)  # one all-reduce result: the same bits on every worker
            for a, b in zip(out["diloco"][n], phi):
                tol = 1e-5 if a.dtype == torch.float32 else 2e-2  # the all-reduce's summation order; bf16 rounding
                _assert_close(a.float(), b.float(), tol)


def test_gloo_bytes_and_refusal(gloo_run):
    n = 7 * 5 * 4 + 4097 * 2 + 13 * 4
    for out in gloo_run:
        assert out["noloco_bytes"] == 2 * n  # theta - phi and phi, to one peer
        assert out["diloco_bytes"] == 2 * 3 * 4 * (35 + 4097 + 13) // 4  # a ring all-reduce in float32
        assert out["error"] == "NoLoCo: world size 4 is not a multiple of group_size 3"


# -- refusals ---------------------------------------------------------------------------------------------------------
BAD = {
    "integer parameter": (lambda: NoLoCo([torch.zeros(3, dtype=torch.int64)]), "parameter 0 is torch.int64"),
    "float64 parameter": (lambda: DiLoCo([torch.zeros(3, dtype=torch.float64)]), "parameter 0 is torch.float64"),
    "no parameters": (lambda: NoLoCo([]), "NoLoCo: no parameters"),
    "sync_every 0": (lambda: NoLoCo([torch.zeros(2)], sync_every=0), "sync_every must be"),
    "nan lr": (lambda: DiLoCo([torch.zeros(2)], outer_lr=float("nan")), "outer_lr must be"),
    "group_size 0": (lambda: NoLoCo([torch.zeros(2)], group_size=0), "group_size must be"),
    "momentum not float32": (
        lambda: simulate_outer_step([torch.zeros(2)] * 2, [torch.zeros(2)] * 2, [torch.zeros(2).half()] * 2, 0),
        "worker 0's momentum: tensor 0 is float16, expected float32",
    ),
    "phi shape": (
        lambda: simulate_outer_step([torch.zeros(2)] * 2, [torch.zeros(3)] * 2, [torch.zeros(2)] * 2, 0),
        "worker 0's phi: tensor 0 is [3], the parameter [2]",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_refusals(case):
    make, message = BAD[case]
    with pytest.raises(PlanError) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_due_and_state_round_trip():
    model = torch.nn.Linear(3, 2)
    noloco = NoLoCo(model, sync_every=50)
    assert [s for s in range(0, 151) if noloco.due(s)] == [50, 100, 150]
    state = {k: [t.clone() + 1 for t in v] for k, v in noloco.state_dict().items()}
    noloco.load_state_dict(state)
    for key in ("phi", "momentum"):
        for a, b in zip(noloco.state_dict()[key], state[key]):
            assert torch.equal(a, b)

"""Server-side aggregators (pysoup.federated.aggregators): each one against its plain-torch definition
(pysoup.federated.server_reference) bit for bit, in memory and out of core with identical bytes, FedAU's worked
example and cutoff, FedAdam's bias correction, a resumed server equal to one that never stopped, and every bad
input as a one-line error that writes nothing.

What is bit-exact: the weighted sums (FedAvg, FedAU, and FedOpt's client mean) follow the numerical contract
(fp32 fma in input order, round to nearest even), so they equal pysoup.ops.reference's definition; FedOpt's and
FedAvgM's rules are torch fp32 elementwise ops (each correctly rounded) and equal the same ops written plainly on
whole tensors. Float64 versions of the formulas (as Flower writes them) check the maths, to a tolerance.
"""

import json
import math
import os

import pytest
import torch
from helpers.checkpoints import hf_dir, save_st, small_model, tree_snapshot
from helpers.tensors import assert_bit_equal
from safetensors.torch import load_file, save_file

import pysoup.federated.optimizer_step as optimizer_step
from pysoup.errors import PlanError
from pysoup.federated import server_reference as ref
from pysoup.federated.aggregators import (
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAU,
    FedAvg,
    FedAvgM,
    FedYogi,
)

COUNTS = [30, 10, 45, 15]


def model(seed, bf16=torch.bfloat16):
    """A few kB: bf16 matrices, an fp32 norm, an fp16 bias, an int64 buffer."""
    sd = small_model(seed=seed, dtype=bf16, layers=2, hidden=16, vocab=24)
    g = torch.Generator().manual_seed(100 + seed)
    sd["model.norm.weight"] = torch.randn(16, generator=g)
    sd["head.bias"] = torch.randn(24, generator=g).half()
    sd["bn.num_batches_tracked"] = torch.tensor([seed], dtype=torch.int64)
    return sd


def fine_tune(base, seed, scale=0.05):
    """A client's model: base plus a small change (as after local training)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if v.is_floating_point():
            out[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
        else:
            out[k] = v + seed
    return out


def delta_of(client, base):
    return {k: (client[k].float() - base[k].float()) if v.is_floating_point() else v for k, v in base.items()}


@pytest.fixture
def fl(tmp_path):
    """A global model and four clients, in memory and as files (client 2 as a sharded Hugging Face directory)."""
    g = model(0)
    clients = [fine_tune(g, s) for s in range(1, 5)]
    gpath = save_st(tmp_path / "global.safetensors", g)
    paths = [save_st(tmp_path / f"c{i}.safetensors", c) for i, c in enumerate(clients)]
    paths[2] = hf_dir(tmp_path / "c2", clients[2], shards=2)
    return g, clients, gpath, paths


def updates(clients, counts=COUNTS, ids=None, kind="weights"):
    ids = ids or list(range(len(clients)))
    return [ClientUpdate(i, num_examples=n, **{kind: c}) for i, c, n in zip(ids, clients, counts)]


def assert_sd_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        if a[k].is_floating_point():
            assert_bit_equal(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


def file_bytes_of(sd, path):
    """The bytes the safetensors package writes for sd (pysoup's writer matches them)."""
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    return open(path, "rb").read()


# -- FedAvg and FedAU: one fused sum ------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [1.0, 0.7], ids=lambda v: f"lr={v}")
@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_fedavg_matches_definition_in_memory_and_out_of_core(fl, tmp_path, lr, kind):
    g, clients, gpath, paths = fl
    sent = clients if kind == "weights" else [delta_of(c, g) for c in clients]
    new = FedAvg(server_lr=lr).aggregate(g, updates(sent, kind=kind))
    assert_sd_equal(new, ref.fused(g, sent, COUNTS, server_lr=lr, normalize=True, kind=kind))
    files = paths if kind == "weights" else [save_st(tmp_path / f"d{i}.safetensors", d) for i, d in enumerate(sent)]
    out = FedAvg(server_lr=lr).aggregate(gpath, updates(files, kind=kind), out=tmp_path / "new.safetensors")
    assert open(out, "rb").read() == file_bytes_of(new, tmp_path / "expected.safetensors")
    # The maths, in float64 as Flower writes it: x + lr * (sum n_k x_k / sum n_k - x).
    p = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    for k in ("lm_head.weight", "model.norm.weight"):
        mean = sum(pk * c[k].double() for pk, c in zip(p, clients))
        want = g[k].double() + lr * (mean - g[k].double())
        assert torch.allclose(new[k].double(), want, atol=2e-2 if g[k].dtype == torch.bfloat16 else 1e-6)
    assert (
        new["bn.num_batches_tracked"].item()
        == (clients[0] if kind == "weights" else g)["bn.num_batches_tracked"].item()
    )


def test_fedavg_given_weights_and_replacing_the_global_file(fl, tmp_path):
    g, clients, gpath, paths = fl
    new = FedAvg().aggregate(gpath, updates(paths), out=gpath, client_weights=[1, 1, 2, 0])
    assert new == gpath
    assert_sd_equal(
        load_file(gpath), ref.fused(g, clients, [1, 1, 2, 0], server_lr=1.0, normalize=True, kind="weights")
    )
    assert not [f for f in os.listdir(tmp_path) if "pysoup-tmp" in f]


def test_fedavgm_defaults_are_fedavg_byte_for_byte(fl):
    g, clients, _, _ = fl
    assert_sd_equal(FedAvgM().aggregate(g, updates(clients)), FedAvg().aggregate(g, updates(clients)))


@pytest.mark.parametrize(
    "first_round, expected", [(0, [1, 2, 2.5]), (1, [1, 1, 2])], ids=["rounds-from-0", "rounds-from-1"]
)
def test_fedau_worked_example(first_round, expected):
    """ALGORITHMS.md: a client that misses round 0, joins at round 1, then rounds 4 and 6 gets omega = 1, 2, 2.5;
    numbered so that round 1 is the server's first round, the same pattern gives 1, 1, 2."""
    agg = FedAU(num_clients=2, first_round=first_round)
    seen = []
    for r in (1, 4, 6):
        omega, agg.history["a"] = agg.weight(agg.history.get("a"), r)
        seen.append(float(omega))
    assert seen == expected
    rounds = [[] if r == 0 else (["a"] if r in (1, 4, 6) else ["b"]) for r in range(7)]
    by_round = ref.fedau_weights(rounds)
    assert [float(by_round[r]["a"]) for r in (1, 4, 6)] == [1, 2, 2.5]


def test_fedau_weights_follow_the_round_by_round_definition_with_cutoff():
    """Random participation over 60 rounds, cutoff 3: omega equals the per-round ticking of the definition."""
    g = torch.Generator().manual_seed(7)
    ids = ["a", "b", 3, "d", "e"]
    rounds = []
    for _ in range(60):
        pick = [cid for cid, r in zip(ids, torch.rand(len(ids), generator=g).tolist()) if r < 0.25]
        rounds.append(pick)
    want = ref.fedau_weights(rounds, cutoff=3)
    agg = FedAU(num_clients=5, first_round=0, cutoff=3)
    for r, (pick, expected) in enumerate(zip(rounds, want)):
        for cid in pick:
            omega, agg.history[cid] = agg.weight(agg.history.get(cid), r)
            assert omega == expected[cid], (r, cid)
    assert any(v > 3 for w in want for v in w.values()) is False  # the cutoff bounds every interval
    assert any(v == 3 for w in want for v in w.values())


@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_fedau_aggregates_with_omega_over_n(fl, tmp_path, kind):
    """Three rounds of FedAU (N = 6 clients, 4 of them ever seen): each round equals x + lr * (1/N) sum omega_n
    Delta_n with the definition's omegas, in memory and from files, byte for byte."""
    g, clients, gpath, paths = fl
    plan = [[0, 1], [2], [0, 3, 2]]  # rounds 1, 2, 3 (first_round 1)
    agg, agg_files = FedAU(6, server_lr=0.9), FedAU(6, server_lr=0.9)
    omegas = ref.fedau_weights(plan)
    x, xpath = g, gpath
    for r, pick in enumerate(plan, start=1):
        sent = [clients[i] if kind == "weights" else delta_of(clients[i], x) for i in pick]
        files = [
            paths[i] if kind == "weights" else save_st(tmp_path / f"d{r}{i}.safetensors", d) for i, d in zip(pick, sent)
        ]
        w = [omegas[r - 1][i] / 6 for i in pick]
        want = ref.fused(x, sent, w, server_lr=0.9, normalize=False, kind=kind)
        new = agg.aggregate(x, updates(sent, counts=[1] * len(pick), ids=pick, kind=kind))
        assert agg.last_weights == {i: float(omegas[r - 1][i]) for i in pick}
        assert_sd_equal(new, want)
        out = tmp_path / f"x{r}.safetensors"
        agg_files.aggregate(xpath, updates(files, counts=[1] * len(pick), ids=pick, kind=kind), out=out)
        assert open(out, "rb").read() == file_bytes_of(new, tmp_path / "expected.safetensors")
        x, xpath = new, str(out)
    assert agg.last_weights == {0: 1.0, 3: 1.0, 2: 2.0}  # 2's first interval: it missed round 1


def test_fedau_one_client_is_scaled_by_one_over_n():
    g = {"w": torch.zeros(5)}
    d = {"w": torch.full((5,), 8.0)}
    new = FedAU(num_clients=4).aggregate(g, [ClientUpdate("a", delta=d)])
    assert torch.equal(new["w"], torch.full((5,), 2.0))


# -- FedOpt and FedAvgM: the chunked server step ----------------------------------------------------------------


def test_fedadam_bias_correction():
    """eta' = eta * sqrt(1 - beta_2^(r+1)) / (1 - beta_1^(r+1)) with the server round r (as Flower's FedAdam)."""
    agg = FedAdam()
    assert agg.step_size(1) == 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    assert agg.step_size(1) == pytest.approx(0.0742459788)
    assert agg.step_size(2) == pytest.approx(0.1 * math.sqrt(0.029701) / 0.271)
    assert agg.step_size(1000) == pytest.approx(0.1, rel=1e-4)
    assert FedYogi().step_size(1) == 0.01 and FedAdagrad().step_size(1) == 0.1
    # Round 1 from zero moments: m = 0.1 Delta, v = 0.01 Delta^2, so x moves by eta' * 0.1 Delta / (0.1 |Delta| + tau).
    g = {"w": torch.zeros(3)}
    c = {"w": torch.tensor([1.0, -2.0, 0.5])}
    new = FedAdam().aggregate(g, [ClientUpdate(0, weights=c)])
    d = c["w"].double()
    assert torch.allclose(new["w"].double(), agg.step_size(1) * 0.1 * d / (0.1 * d.abs() + 1e-3), rtol=1e-6)


STEP_CASES = [
    ("FedAdam", FedAdam, {"beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    ("FedYogi", FedYogi, {"beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    ("FedAdagrad", FedAdagrad, {"tau": 1e-3}),
    ("FedAvgM", lambda **kw: FedAvgM(server_lr=0.8, momentum=0.9, **kw), {"server_lr": 0.8, "momentum": 0.9}),
    ("FedAvgM-no-momentum", lambda **kw: FedAvgM(server_lr=0.8, **kw), {"server_lr": 0.8, "momentum": 0.0}),
]


@pytest.mark.parametrize("kind", ["weights", "delta"])
@pytest.mark.parametrize("method, make, params", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_server_step_matches_definition_in_memory_and_out_of_core(
    fl, tmp_path, monkeypatch, method, make, params, kind
):
    """Three rounds: in memory against the plain-torch definition, bit for bit; out of core (files, the state in
    files, chunks of 97 elements across tensor ends) to the same bytes."""
    monkeypatch.setattr(optimizer_step, "CHUNK_ELEMENTS", 97)
    g, clients, gpath, paths = fl
    mem, disk = make(), make(state_dir=tmp_path / "state")
    method = method.split("-")[0]
    x, xpath, state = g, gpath, {}
    for r in (1, 2, 3):
        sent = clients if kind == "weights" else [delta_of(c, x) for c in clients]
        files = (
            paths if kind == "weights" else [save_st(tmp_path / f"d{r}{i}.safetensors", d) for i, d in enumerate(sent)]
        )
        delta = ref.mean_update(x, sent, COUNTS, kind)
        step = mem.step_size(r) if hasattr(mem, "step_size") else None
        want, state = ref.fedopt_step(
            x, delta, state, method=method, params=params, step_size=step, kind=kind, clients=sent
        )
        new = mem.aggregate(x, updates(sent, kind=kind))
        assert_sd_equal(new, want)
        for s, tensors in state.items():
            assert_sd_equal(mem.optimizer_state[s], tensors)
        out = tmp_path / f"x{r}.safetensors"
        disk.aggregate(xpath, updates(files, kind=kind), out=out)
        assert open(out, "rb").read() == file_bytes_of(new, tmp_path / "expected.safetensors")
        for s, tensors in state.items():
            assert disk.optimizer_state[s] == str(tmp_path / "state" / f"{s}.safetensors")
            assert_sd_equal(
                load_file(disk.optimizer_state[s]), {k: tensors[k] for k in load_file(disk.optimizer_state[s])}
            )
        x, xpath = new, str(out)
    assert set(state) == set(mem.optimizer_state) == set(disk.optimizer_state)


def test_fedadam_float64_formula(fl):
    """Two rounds of FedAdam against its formulas in float64 (Flower's code, line by line), to fp32 rounding."""
    g = {k: v.float() for k, v in fl[0].items() if v.is_floating_point()}
    clients = [{k: c[k].float() for k in g} for c in fl[1]]
    agg = FedAdam()
    x = {k: v.double() for k, v in g.items()}
    m = v = None
    cur = g
    for r in (1, 2):
        cur = agg.aggregate(cur, updates(clients))
        avg = {k: sum(n * c[k].double() for n, c in zip(COUNTS, clients)) / sum(COUNTS) for k in g}
        d = {k: avg[k] - x[k] for k in g}
        m = {k: 0.9 * (m[k] if m else 0) + 0.1 * d[k] for k in g}
        v = {k: 0.99 * (v[k] if v else 0) + 0.01 * d[k] * d[k] for k in g}
        eta = 0.1 * math.sqrt(1 - 0.99 ** (r + 1)) / (1 - 0.9 ** (r + 1))
        x = {k: x[k] + eta * m[k] / (torch.sqrt(v[k]) + 1e-3) for k in g}
        for k in g:
            assert torch.allclose(cur[k].double(), x[k], rtol=1e-5, atol=1e-6), k


# -- resuming ------------------------------------------------------------------------------------------------------


def _rounds(agg, x, clients, rounds, out_dir=None):
    for r in rounds:
        pick = [i for i in range(len(clients)) if (i + r) % 3 != 0]
        ups = [ClientUpdate(f"c{i}", weights=clients[i], num_examples=COUNTS[i]) for i in pick]
        if out_dir is None:
            x = agg.aggregate(x, ups, round=r)
        else:
            x = agg.aggregate(x, ups, round=r, out=os.path.join(out_dir, f"x{r}.safetensors"))
    return x


@pytest.mark.parametrize(
    "make",
    [
        lambda d: FedAdam(state_dir=d),
        lambda d: FedYogi(state_dir=d),
        lambda d: FedAU(5, cutoff=2),
        lambda d: FedAvgM(0.5, 0.9, state_dir=d),
    ],
    ids=["FedAdam", "FedYogi", "FedAU", "FedAvgM"],
)
def test_resumed_server_gives_the_same_bytes(fl, tmp_path, make):
    """Rounds 1, 2, 4, 5 straight through, against: rounds 1 and 2, the state saved as JSON, a new server made
    from it, rounds 4 and 5. Files of the model and the optimizer state are equal byte for byte."""
    _, _, gpath, paths = fl
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    straight = make(str(a_dir / "state"))
    x_a = _rounds(straight, gpath, paths, [1, 2, 4, 5], str(a_dir))
    first = make(str(b_dir / "state"))
    x_b = _rounds(first, gpath, paths, [1, 2], str(b_dir))
    saved = json.loads(json.dumps(first.state_dict()))
    del first
    resumed = make(str(b_dir / "state"))
    resumed.load_state_dict(saved)
    x_b = _rounds(resumed, x_b, paths, [4, 5], str(b_dir))
    assert open(x_a, "rb").read() == open(x_b, "rb").read()
    assert resumed.state_dict()["round"] == straight.state_dict()["round"] == 5
    for name in os.listdir(a_dir / "state") if (a_dir / "state").exists() else []:
        assert (a_dir / "state" / name).read_bytes() == (b_dir / "state" / name).read_bytes()
    if isinstance(straight, FedAU):
        assert straight.state_dict()["clients"] == resumed.state_dict()["clients"]


def test_resume_in_memory_state(fl):
    g, clients, _, _ = fl
    straight = FedAdagrad()
    x_a = _rounds(straight, g, clients, [1, 2, 3])
    first = FedAdagrad()
    x_b = _rounds(first, g, clients, [1, 2])
    resumed = FedAdagrad()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())), tensors=first.optimizer_state)
    assert_sd_equal(_rounds(resumed, x_b, clients, [3]), x_a)


# -- bad inputs: one line, nothing written, inputs and state untouched ---------------------------------------------


def _bad(fl, tmp_path):
    g, clients, gpath, paths = fl
    nan = {k: v.clone() for k, v in clients[1].items()}
    nan["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    inf_path = save_st(
        tmp_path / "inf.safetensors",
        {**clients[1], "model.norm.weight": clients[1]["model.norm.weight"] * float("inf")},
    )
    missing = {k: v for k, v in clients[0].items() if k != "lm_head.weight"}
    extra = {**clients[0], "extra.weight": torch.zeros(2)}
    shape = {**clients[0], "lm_head.weight": torch.zeros(3, 3, dtype=torch.bfloat16)}
    dtype = {**clients[0], "lm_head.weight": clients[0]["lm_head.weight"].float()}
    ok = ClientUpdate("ok", weights=paths[0], num_examples=5)
    return {
        "no clients": ([], "no client updates"),
        "missing tensor": ([ok, ClientUpdate("m", weights=missing)], "'lm_head.weight' of the global model is missing"),
        "extra tensor": ([ok, ClientUpdate("x", weights=extra)], "'extra.weight' is not in the global model"),
        "shape": ([ok, ClientUpdate("s", weights=shape)], "has shape \\[3, 3\\]"),
        "dtype": ([ok, ClientUpdate("d", weights=dtype)], "is F32, the global model's is BF16"),
        "negative count": ([ok, ClientUpdate("n", weights=paths[1], num_examples=-1)], "non-negative"),
        "zero total": ([ClientUpdate("z", weights=paths[1], num_examples=0)], "total zero"),
        "count not a number": ([ClientUpdate("z", weights=paths[1], num_examples="5")], "must be a number"),
        "nan in a state dict": (
            [ok, ClientUpdate("bad", weights=nan)],
            "client 'bad' \\(state dict\\): tensor 'model.layers.1.mlp.up_proj.weight' holds 1 NaN",
        ),
        "inf in a file": (
            [ok, ClientUpdate("bad", weights=inf_path)],
            "client 'bad' .*inf.safetensors.*'model.norm.weight' holds 16",
        ),
        "both weights and delta": ([ClientUpdate("b", weights=paths[0], delta=paths[1])], "exactly one of"),
        "mixed kinds": ([ok, ClientUpdate("d", delta=paths[1])], "all be weights or all be deltas"),
        "duplicate id": ([ok, ClientUpdate("ok", weights=paths[1])], "two updates in one round"),
        "bool id": ([ClientUpdate(True, weights=paths[1])], "must be a str or an int"),
    }


AGGREGATORS = {
    "FedAvg": lambda d: FedAvg(),
    "FedAvg-lr": lambda d: FedAvg(server_lr=0.5),
    "FedAdam-files": lambda d: FedAdam(state_dir=d),
    "FedAU": lambda d: FedAU(10),
}


@pytest.mark.parametrize("aggregator", list(AGGREGATORS))
def test_bad_updates(fl, tmp_path, aggregator):
    g, clients, gpath, paths = fl
    target = tmp_path / "out" / "new.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"older global model")
    for case, (ups, match) in _bad(fl, tmp_path).items():
        if aggregator == "FedAU" and case == "zero total":
            continue  # FedAU weighs by participation, not by example counts (each count is still checked)
        agg = AGGREGATORS[aggregator](str(tmp_path / "state"))
        before = tree_snapshot(str(tmp_path))
        for out in (target, None):
            with pytest.raises(PlanError, match=match) as exc:
                agg.aggregate(gpath, ups, out=out)
            assert "\n" not in str(exc.value), case
        assert tree_snapshot(str(tmp_path)) == before, case
        assert agg.round is None and agg.state_dict()["round"] is None, case
        assert not [f for _r, _d, fs in os.walk(tmp_path) for f in fs if "pysoup-tmp" in f], case


def test_bad_rounds_and_state(fl, tmp_path):
    g, clients, gpath, paths = fl
    ups = updates(paths[:2], counts=[1, 2])
    au = FedAU(2, client_ids=["a", "b"])
    with pytest.raises(PlanError, match="client 0 is not one of the 2 client_ids"):
        au.aggregate(g, ups)
    with pytest.raises(PlanError, match="would be client 3 of num_clients=2"):
        FedAU(2).aggregate(g, updates(paths[:3], counts=[1, 1, 1]))
    FedAU(3, client_ids=["a"], strict=False).aggregate(g, updates(paths[:2], counts=[1, 1], ids=["a", "new"]))
    with pytest.raises(PlanError, match="takes no client_weights"):
        FedAU(2).aggregate(g, ups, client_weights=[1, 1])
    agg = FedAvg()
    agg.aggregate(g, ups, round=3)
    with pytest.raises(PlanError, match="round 3 is not after the last round aggregated \\(3\\)"):
        agg.aggregate(g, ups, round=3)
    with pytest.raises(PlanError, match="before first_round"):
        FedAvg().aggregate(g, ups, round=0)
    with pytest.raises(PlanError, match="2 client weights for 3 updates"):
        FedAvg().aggregate(g, updates(paths[:3]), client_weights=[1, 2])
    # Optimizer state: a stale file, a file of another round, state of another configuration.
    adam = FedAdam(state_dir=tmp_path / "state")
    adam.aggregate(gpath, ups)
    with pytest.raises(PlanError, match="optimizer state from an earlier run"):
        FedAdam(state_dir=tmp_path / "state").aggregate(gpath, ups)
    saved = adam.state_dict()
    adam.aggregate(gpath, ups)
    with pytest.raises(PlanError, match="in round '2', the state is 'FedAdam' at round 1"):
        FedAdam(state_dir=tmp_path / "state").load_state_dict(saved)
    with pytest.raises(PlanError, match="saved by FedAdam\\(eta=0.1"):
        FedAdam(eta=0.2, state_dir=tmp_path / "state").load_state_dict(saved)
    with pytest.raises(PlanError, match="the state is of 'FedAdam', not 'FedYogi'"):
        FedYogi().load_state_dict(saved)
    with pytest.raises(PlanError, match="pass it in load_state_dict"):
        mem = FedAdam()
        mem.aggregate(g, ups)
        FedAdam().load_state_dict(mem.state_dict())
    for bad in (lambda: FedAdam(beta_1=1.0), lambda: FedAvg(server_lr=0), lambda: FedAU(0), lambda: FedAU(2, cutoff=0)):
        with pytest.raises(PlanError):
            bad()


def test_nan_in_step_state_is_refused(fl, tmp_path):
    """A NaN reaching FedAdam's step: one line naming the client; the state files and the old model stay."""
    g, clients, gpath, paths = fl
    adam = FedAdam(state_dir=tmp_path / "state")
    out = tmp_path / "new.safetensors"
    adam.aggregate(gpath, updates(paths[:2], counts=[1, 1]), out=out)
    before = tree_snapshot(str(tmp_path))
    nan = {**clients[1], "lm_head.weight": clients[1]["lm_head.weight"] * float("nan")}
    with pytest.raises(PlanError, match="client 1 \\(state dict\\): tensor 'lm_head.weight' holds 384 NaN"):
        adam.aggregate(str(out), [ClientUpdate(0, weights=paths[0]), ClientUpdate(1, weights=nan)], out=out)
    assert tree_snapshot(str(tmp_path)) == before
    assert adam.round == 1

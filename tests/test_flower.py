"""The Flower strategy (pysoup.federated.flower.AggregatorStrategy) fed real Flower result objects (FitRes,
Parameters from ndarrays_to_parameters, Status, a minimal ClientProxy): equal bit for bit to the aggregator called
directly, and to Flower's own FedAvg and FedOpt strategies up to fp32 rounding, with what differs written out."""

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server import strategy as flower_strategies  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402

from pysoup.errors import PlanError  # noqa: E402
from pysoup.federated import aggregators  # noqa: E402
from pysoup.federated.aggregators import ClientUpdate  # noqa: E402
from pysoup.federated.flower import AggregatorStrategy  # noqa: E402

SHAPES = [(7, 3), (4097,), (1,)]


class Proxy(ClientProxy):
    """A ClientProxy that only carries its cid (aggregate_fit reads nothing else)."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def model(rng, scale=1.0):
    return [(scale * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]


def fit_results(global_arrays, counts, rng, ids=None, spread=0.1):
    """One FitRes per client: the global model plus noise; metrics carry "partition-id"; proxies' cids are
    "node-<id>"."""
    ids = list(range(len(counts))) if ids is None else ids
    clients = [[(g + spread * rng.standard_normal(g.shape)).astype(np.float32) for g in global_arrays] for _ in ids]
    results = [
        (Proxy(f"node-{i}"), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(c), n, {"partition-id": i}))
        for i, c, n in zip(ids, clients, counts)
    ]
    return results, clients


def as_state(arrays):
    import torch

    return {str(k): torch.from_numpy(a.copy()) for k, a in enumerate(arrays)}


# -- FedAvg: the aggregator, and Flower's FedAvg ----------------------------------------------------------------------
def test_fedavg_strategy_equals_the_aggregator_and_flower_to_rounding():
    """Three weighted means of the same float32 inputs, each reproduced bit for bit by an explicit emulation:

    - pysoup (the numerical contract): acc = fma(n_i, x_i, acc) in fp32 from 0, in client order, then acc / sum n_i in
      fp32 (the counts are exact in fp32);
    - Flower's FedAvg (inplace=True, its default, aggregate_inplace): each x_i * (n_i / N) computed in float64 (the
      scaling factors are a float64 array) and rounded to fp32, then summed in fp32 (one rounding per add);
    - Flower's FedAvg(inplace=False) (aggregate): fl32(x_i * n_i) summed in fp32, then / N.

    So they differ only in where fp32 rounding happens; each stays within a few ulps of the exact (float64) mean,
    measured in ulps of the largest input."""
    import torch

    rng = np.random.default_rng(0)
    global_arrays = model(rng)
    counts = [600, 37, 1234, 5]
    results, clients = fit_results(global_arrays, counts, rng)
    total = sum(counts)

    strategy = AggregatorStrategy(aggregators.FedAvg(), initial_parameters=ndarrays_to_parameters(global_arrays))
    params, metrics = strategy.aggregate_fit(1, results, [])
    ours = parameters_to_ndarrays(params)
    direct = aggregators.FedAvg().aggregate(
        as_state(global_arrays),
        [
            ClientUpdate(f"node-{i}", weights=as_state(c), num_examples=n)
            for i, (c, n) in enumerate(zip(clients, counts))
        ],
        round=1,
    )
    flower_inplace = parameters_to_ndarrays(flower_strategies.FedAvg().aggregate_fit(1, results, [])[0])
    flower_copy = parameters_to_ndarrays(flower_strategies.FedAvg(inplace=False).aggregate_fit(1, results, [])[0])
    assert metrics == {} and strategy.aggregator.last_weights["node-2"] == pytest.approx(1234 / total)
    shuffled = AggregatorStrategy(aggregators.FedAvg(), initial_parameters=ndarrays_to_parameters(global_arrays))
    for a, b in zip(parameters_to_ndarrays(shuffled.aggregate_fit(1, results[::-1], [])[0]), ours):
        np.testing.assert_array_equal(a, b)  # summed in client-id order, whatever order the results arrive in

    for k in range(len(SHAPES)):
        xs = [c[k] for c in clients]
        assert ours[k].dtype == np.float32
        np.testing.assert_array_equal(ours[k], direct[str(k)].numpy())

        acc = torch.zeros(SHAPES[k])
        for x, n in zip(xs, counts):
            acc.addcmul_(torch.from_numpy(x), torch.tensor(float(n)))
        np.testing.assert_array_equal(ours[k], (acc / torch.tensor(float(total))).numpy())

        emulated = (xs[0].astype(np.float64) * (counts[0] / total)).astype(np.float32)
        for x, n in zip(xs[1:], counts[1:]):
            emulated = emulated + (x.astype(np.float64) * (n / total)).astype(np.float32)
        np.testing.assert_array_equal(flower_inplace[k], emulated)

        emulated = xs[0] * np.float32(counts[0])
        for x, n in zip(xs[1:], counts[1:]):
            emulated = emulated + x * np.float32(n)
        np.testing.assert_array_equal(flower_copy[k], emulated / np.float32(total))

        exact = sum(x.astype(np.float64) * n for x, n in zip(xs, counts)) / total
        ulp = np.spacing(np.max(np.abs(xs), axis=0)).astype(np.float64)
        for name, got in (("pysoup", ours[k]), ("flower", flower_inplace[k]), ("flower copy", flower_copy[k])):
            assert np.max(np.abs(got - exact) / ulp) <= 2.0, name


def test_empty_rounds_and_failures_follow_fedavg():
    rng = np.random.default_rng(1)
    g = model(rng)
    results, _ = fit_results(g, [10, 20], rng)
    strategy = AggregatorStrategy(aggregators.FedAvg(), initial_parameters=ndarrays_to_parameters(g))
    assert strategy.aggregate_fit(1, [], []) == (None, {})
    strict = AggregatorStrategy(
        aggregators.FedAvg(), accept_failures=False, initial_parameters=ndarrays_to_parameters(g)
    )
    assert strict.aggregate_fit(1, results, [RuntimeError("client lost")]) == (None, {})
    assert strict.aggregator.round is None  # the aggregator never saw the round
    params, _ = strategy.aggregate_fit(1, results, [RuntimeError("client lost")])  # accepted by default
    assert params is not None and strategy.aggregator.round == 1


def test_metrics_aggregation_and_configure_fit_record_the_global_model():
    rng = np.random.default_rng(2)
    g = model(rng)
    results, _ = fit_results(g, [10, 30], rng)

    def mean_id(metrics):
        return {"mean id": sum(n * m["partition-id"] for n, m in metrics) / sum(n for n, _ in metrics)}

    strategy = AggregatorStrategy(aggregators.FedAvg(), fit_metrics_aggregation_fn=mean_id, min_fit_clients=1,
                                  min_available_clients=1)  # fmt: skip
    manager = SimpleClientManager()
    manager.register(Proxy("node-0"))
    assert strategy.global_ndarrays is None
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(g), manager)
    assert [p.cid for p, _ in instructions] == ["node-0"]
    for a, b in zip(strategy.global_ndarrays, g):
        np.testing.assert_array_equal(a, b)
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics == {"mean id": 0.75}


# -- FedAU: participation histories through Flower's results ---------------------------------------------------------
def test_fedau_strategy_over_rounds_equals_the_aggregator():
    """Four clients over 7 Flower rounds, ids from the "partition-id" metric. Client 3 misses round 1, then takes
    part in rounds 2, 5 and 7: omega = 1, 2, 2.5 (ALGORITHMS.md's example, numbered from Flower's round 1). Every
    round equals FedAU called directly on the updates in client-id order (round 5's results arrive as 2, 3, 0),
    bit for bit, and x + (1/N) sum omega_n (x_n - x) in float64 to fp32 rounding."""
    rng = np.random.default_rng(3)
    g = model(rng)
    n_clients = 4
    rounds = {1: [0, 1], 2: [0, 3], 3: [1], 4: [], 5: [2, 3, 0], 6: [1], 7: [3]}
    strategy = AggregatorStrategy(
        aggregators.FedAU(n_clients), client_id_metric="partition-id", initial_parameters=ndarrays_to_parameters(g)
    )
    direct = aggregators.FedAU(n_clients)
    x = as_state(g)
    omega_3 = []
    for r, ids in rounds.items():
        results, clients = fit_results(strategy.global_ndarrays, [100] * len(ids), rng, ids=ids)
        params, _ = strategy.aggregate_fit(r, results, [])
        if not ids:
            assert params is None
            continue
        x_old = {k: v.clone() for k, v in x.items()}
        in_id_order = sorted(zip(ids, clients), key=lambda e: e[0])  # the strategy sums a round in client-id order
        x = direct.aggregate(x, [ClientUpdate(i, weights=as_state(c)) for i, c in in_id_order], round=r)
        ours = parameters_to_ndarrays(params)
        for k in range(len(SHAPES)):
            np.testing.assert_array_equal(ours[k], x[str(k)].numpy())
            omegas = [strategy.aggregator.last_weights[i] for i in ids]
            base = x_old[str(k)].double().numpy()
            exact = base + sum(w / n_clients * (c[k].astype(np.float64) - base) for w, c in zip(omegas, clients))
            np.testing.assert_allclose(ours[k], exact, rtol=0, atol=4 * np.spacing(np.float32(np.max(np.abs(base)))))
        if 3 in ids:
            omega_3.append(strategy.aggregator.last_weights[3])
    assert omega_3 == [1.0, 2.0, 2.5]
    assert strategy.aggregator.state_dict() == direct.state_dict()


def test_client_ids_from_proxy_cid_by_default():
    rng = np.random.default_rng(4)
    g = model(rng)
    results, _ = fit_results(g, [10, 10], rng, ids=[5, 9])
    strategy = AggregatorStrategy(aggregators.FedAU(10), initial_parameters=ndarrays_to_parameters(g))
    strategy.aggregate_fit(1, results, [])
    assert sorted(strategy.aggregator.last_weights) == ["node-5", "node-9"]


class InProcessClient(Proxy):
    """A client answering in the server's process: fit() returns the received model plus a step of its own and
    records what it got and sent."""

    def __init__(self, cid: int, initial):
        super().__init__(f"node-{cid}")
        self.index, self.initial, self.log = cid, initial, []

    def get_parameters(self, ins, timeout, group_id):
        from flwr.common import GetParametersRes

        return GetParametersRes(Status(Code.OK, "ok"), ndarrays_to_parameters(self.initial))

    def fit(self, ins, timeout, group_id):
        x = parameters_to_ndarrays(ins.parameters)
        rng = np.random.default_rng([self.index, len(self.log)])
        sent = [(a + np.float32(0.05) * rng.standard_normal(a.shape).astype(np.float32)).astype(np.float32) for a in x]
        self.log.append((ins.config["round"], sent))
        return FitRes(
            Status(Code.OK, "ok"), ndarrays_to_parameters(sent), 10 + self.index, {"partition-id": self.index}
        )


def test_a_flower_server_loop_runs_fedau():
    """Flower's own Server loop (sampling half of 6 in-process clients a round, 5 rounds, the initial model fetched
    from a client because none is given): the strategy records the model the server sends, FedAU sees each round's
    participants by partition-id, and the final model equals FedAU replayed directly on what the clients sent."""
    import random

    from flwr.server.server import Server

    rng = np.random.default_rng(8)
    initial = model(rng)
    clients = [InProcessClient(i, initial) for i in range(6)]
    manager = SimpleClientManager()
    for c in clients:
        manager.register(c)
    strategy = AggregatorStrategy(
        aggregators.FedAU(6), client_id_metric="partition-id", fraction_fit=0.5, fraction_evaluate=0.0,
        min_fit_clients=2, min_available_clients=6, on_fit_config_fn=lambda r: {"round": r},
    )  # fmt: skip
    random.seed(0)  # SimpleClientManager.sample draws with the random module
    server = Server(client_manager=manager, strategy=strategy)
    server.fit(num_rounds=5, timeout=None)

    direct, x = aggregators.FedAU(6), as_state(initial)
    for r in range(1, 6):
        sent = [(c.index, arrays) for c in clients for (rr, arrays) in c.log if rr == r]
        assert len(sent) == 3
        x = direct.aggregate(x, [ClientUpdate(i, weights=as_state(a)) for i, a in sorted(sent)], round=r)
    final = parameters_to_ndarrays(server.parameters)
    for k in range(len(SHAPES)):
        np.testing.assert_array_equal(final[k], x[str(k)].numpy())
    assert strategy.aggregator.round == 5 and len(strategy.aggregator.history) >= 3


# -- FedOpt and FedAvgM against Flower's strategies -------------------------------------------------------------------
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: aggregators.FedAdam(), lambda p: flower_strategies.FedAdam(tau=1e-3, initial_parameters=p)),
        (lambda: aggregators.FedYogi(), lambda p: flower_strategies.FedYogi(initial_parameters=p)),
        (lambda: aggregators.FedAdagrad(), lambda p: flower_strategies.FedAdagrad(tau=1e-3, initial_parameters=p)),
        (lambda: aggregators.FedAvgM(momentum=0.9), lambda p: flower_strategies.FedAvgM(server_momentum=0.9,
                                                                                        initial_parameters=p)),
    ],
    ids=["FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"],
)  # fmt: skip
def test_server_optimizers_match_flower(ours, theirs):
    """Two rounds through AggregatorStrategy(FedAdam / FedYogi / FedAdagrad / FedAvgM) and through Flower's strategy
    of the same name. Flower's FedAdam and FedAdagrad default to tau 1e-9 (pysoup: 1e-3, ALGORITHMS.md), so tau is
    passed. The inputs are multiples of 2^-12 with example counts 1, 1, 2, so both sides' client mean, hence Delta,
    is exact and only the update rule's arithmetic differs: pysoup's in fp32; Flower's FedAdam in float64 (its
    bias-corrected step size is a numpy float64, which makes the whole model float64 from round 1 on)."""
    rng = np.random.default_rng(5)
    g = [np.round(a * 4096) / 4096 for a in model(rng)]
    strategy = AggregatorStrategy(ours(), initial_parameters=ndarrays_to_parameters(g))
    flower = theirs(ndarrays_to_parameters(g))
    for r in (1, 2):
        clients = [[np.round((a + 0.1 * rng.standard_normal(a.shape)) * 4096).astype(np.float32) / 4096 for a in g]
                   for _ in range(3)]  # fmt: skip
        results = [(Proxy(str(i)), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(c), n, {}))
                   for i, (c, n) in enumerate(zip(clients, [1, 1, 2]))]  # fmt: skip
        a = parameters_to_ndarrays(strategy.aggregate_fit(r, results, [])[0])
        b = parameters_to_ndarrays(flower.aggregate_fit(r, results, [])[0])
        for x, y in zip(a, b):
            assert x.dtype == np.float32
            np.testing.assert_allclose(x, y, rtol=0, atol=4 * np.spacing(np.float32(np.max(np.abs(y)))))
        g = a  # the next round from the same x on both sides (FedOpt keeps current_weights, FedAvgM its
        flower.current_weights = [w.copy() for w in a]  # initial_parameters)
        flower.initial_parameters = ndarrays_to_parameters(a)


# -- bad inputs -------------------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors():
    rng = np.random.default_rng(6)
    g = model(rng)
    results, _ = fit_results(g, [10, 10], rng)
    init = ndarrays_to_parameters(g)
    cases = [
        (lambda: AggregatorStrategy(aggregators.FedAvg()).aggregate_fit(1, results, []), "no global model"),
        (lambda: AggregatorStrategy(aggregators.FedAvg(), client_id_metric="client", initial_parameters=init)
         .aggregate_fit(1, results, []), "has no 'client' in its metrics"),
        (lambda: AggregatorStrategy(aggregators.FedAvg(), initial_parameters=ndarrays_to_parameters(g[:2]))
         .aggregate_fit(1, results, []), "sent 3 arrays, the global model has 2"),
        (lambda: AggregatorStrategy(aggregators.FedAvg(), initial_parameters=ndarrays_to_parameters(
            [a.astype(np.float64) for a in g])).aggregate_fit(1, results, []), "'0' is float64"),
        (lambda: AggregatorStrategy(object()), "object has no aggregate() method"),
        (lambda: AggregatorStrategy(aggregators.FedAvg(), parameter_names=["a", "a"]), "holds a name twice"),
    ]  # fmt: skip
    for call, expected in cases:
        with pytest.raises(PlanError) as info:
            call()
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_importing_needs_neither_flower_nor_torch():
    """The module imports without flwr (and without torch); asking for the class then says what to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['flwr'] = None\n"
        "import pysoup.federated.flower as f\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    f.AggregatorStrategy\nexcept ImportError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AggregatorStrategy needs Flower" in proc.stdout and "pip install flwr" in proc.stdout

"""A Flower strategy whose server-side aggregation is a pysoup aggregator (pysoup.federated.aggregators): FedAvg,
FedAvgM, FedAdam, FedYogi, FedAdagrad, and FedAU, which no framework ships.

`AggregatorStrategy` is Flower's own `flwr.server.strategy.FedAvg` (client sampling, configuration, evaluation,
failure handling, metrics) with `aggregate_fit` replaced: the round's results go to ``aggregator.aggregate`` as
`ClientUpdate`s and its new global model goes back to Flower. It is a legacy (``flwr.server.strategy``) strategy,
as Flower 1.x's ServerApp runs them; checked against flwr 1.42.

Client ids. FedAU weighs each update by the client's participation history, so it must know which client sent
which result, the same id every round:

- by default, ``ClientProxy.cid``: under Flower's ServerApp (deployment and simulation) it is ``str(node_id)``,
  stable for as long as the SuperNode keeps its node id in a run; a restarted SuperNode is a new client;
- ``client_id_metric="partition-id"`` (any key): the id is read from each ``FitRes.metrics``; the client puts it
  there in ``fit()`` (e.g. ``context.node_config["partition-id"]``). Recommended for FedAU: stable across restarts
  and equal to the data partition.

Order. A round's results are summed in client-id order (Flower passes them in the order the clients finished;
the fp32 sum depends on the order), so a round's result does not depend on timing.

The global model. The aggregators need the current global model x (FedAU and FedOpt step from it; FedAvg checks
the clients' tensors against it). The strategy keeps it: from ``initial_parameters``, then from each
``configure_fit`` (the parameters the server sends out) and each aggregated result.

Flower is imported when `AggregatorStrategy` is first asked for (this module's ``__getattr__`` builds the class),
so importing pysoup.federated.flower works without flwr installed.

Example:
    >>> from pysoup.federated.aggregators import FedAU                                  # doctest: +SKIP
    >>> from pysoup.federated.flower import AggregatorStrategy                           # doctest: +SKIP
    >>> strategy = AggregatorStrategy(FedAU(num_clients=100), client_id_metric="partition-id",  # doctest: +SKIP
    ...                               initial_parameters=ndarrays_to_parameters(init), fraction_fit=0.1)
"""

from __future__ import annotations

import functools

from pysoup.errors import PlanError

# numpy dtypes the aggregators take (the engine's F32, F16; numpy has no bf16) and integer buffers, which they
# carry (float64 is refused: pysoup computes in fp32, and a silent cast would change Flower's float64 result).
_FLOAT_KINDS = ("float32", "float16")


class _AggregatorStrategy:
    """A Flower FedAvg strategy whose aggregate_fit runs a pysoup aggregator.

    Args:
        aggregator: a pysoup.federated.aggregators Aggregator (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedAU),
            or anything with ``aggregate(global_model, updates, round=...)`` over state dicts of torch tensors.
        client_id_metric: None to identify clients by ``ClientProxy.cid``; else the key of ``FitRes.metrics`` that
            holds each client's id (a str or an int).
        parameter_names: one name per parameter array (default "0", "1", ...): the names the aggregator's state
            and errors use.
        **kwargs: flwr.server.strategy.FedAvg's arguments (fraction_fit, min_fit_clients, initial_parameters,
            fit_metrics_aggregation_fn, evaluate_fn, ...).

    Attributes:
        aggregator: the aggregator (its ``state_dict()`` is the server's aggregation state).
        global_ndarrays: the current global model as numpy arrays, or None.

    Example:
        >>> strategy = AggregatorStrategy(FedAvg(), initial_parameters=params)                  # doctest: +SKIP
        >>> new, metrics = strategy.aggregate_fit(1, results, failures=[])                      # doctest: +SKIP
    """

    def __init__(self, aggregator, *, client_id_metric=None, parameter_names=None, **kwargs):
        from flwr.common import parameters_to_ndarrays

        super().__init__(**kwargs)
        if not callable(getattr(aggregator, "aggregate", None)):
            raise PlanError(f"AggregatorStrategy: {type(aggregator).__name__} has no aggregate() method")
        if client_id_metric is not None and not isinstance(client_id_metric, str):
            raise PlanError(f"AggregatorStrategy: client_id_metric must be a str or None, got {client_id_metric!r}")
        self.aggregator = aggregator
        self.client_id_metric = client_id_metric
        self.parameter_names = None if parameter_names is None else [str(n) for n in parameter_names]
        if self.parameter_names is not None and len(set(self.parameter_names)) != len(self.parameter_names):
            raise PlanError("AggregatorStrategy: parameter_names holds a name twice")
        initial = kwargs.get("initial_parameters")
        self.global_ndarrays = None if initial is None else parameters_to_ndarrays(initial)

    def __repr__(self) -> str:
        return f"AggregatorStrategy({type(self.aggregator).__name__}, accept_failures={self.accept_failures})"

    def configure_fit(self, server_round, parameters, client_manager):
        """As FedAvg's; also records `parameters` as the current global model."""
        from flwr.common import parameters_to_ndarrays

        self.global_ndarrays = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        """The round's results through the aggregator (round number = Flower's server_round), in client-id order;
        FedAvg's rules for empty rounds and failures, and its metrics aggregation.

        Returns:
            (the new global model as Flower Parameters, or None when there is nothing to aggregate; metrics)
        """
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        if self.global_ndarrays is None:
            raise PlanError(
                "AggregatorStrategy: no global model to aggregate into: pass initial_parameters= (configure_fit "
                "records the parameters the server sends)"
            )
        names = self._names(len(self.global_ndarrays))
        global_model = _state_dict(names, self.global_ndarrays, "the global model")
        # Flower hands results over in the order the clients finished; the fp32 sum depends on the order, so the
        # round is summed in client-id order: the same bits whatever the arrival order.
        identified = sorted(((self._client_id(p, r), r) for p, r in results), key=lambda e: (type(e[0]).__name__, e[0]))
        updates = []
        for cid, res in identified:
            arrays = parameters_to_ndarrays(res.parameters)
            if len(arrays) != len(names):
                raise PlanError(
                    f"AggregatorStrategy: client {cid!r} sent {len(arrays)} arrays, the global model has {len(names)}"
                )
            updates.append(_client_update(cid, _state_dict(names, arrays, f"client {cid!r}"), res.num_examples))
        new = self.aggregator.aggregate(global_model, updates, round=server_round)
        self.global_ndarrays = [new[n].numpy() for n in names]
        metrics = {}
        if self.fit_metrics_aggregation_fn:
            metrics = self.fit_metrics_aggregation_fn([(res.num_examples, res.metrics) for _, res in results])
        return ndarrays_to_parameters(self.global_ndarrays), metrics

    def _names(self, n: int) -> list:
        if self.parameter_names is None:
            return [str(i) for i in range(n)]
        if len(self.parameter_names) != n:
            raise PlanError(f"AggregatorStrategy: {len(self.parameter_names)} parameter_names for {n} parameter arrays")
        return self.parameter_names

    def _client_id(self, proxy, res):
        if self.client_id_metric is None:
            return proxy.cid
        metrics = res.metrics or {}
        if self.client_id_metric not in metrics:
            raise PlanError(
                f"AggregatorStrategy: the result of client {proxy.cid!r} has no {self.client_id_metric!r} in its "
                "metrics (return it from the client's fit())"
            )
        cid = metrics[self.client_id_metric]
        if isinstance(cid, bool) or not isinstance(cid, (str, int)):
            raise PlanError(
                f"AggregatorStrategy: client {proxy.cid!r}: metrics[{self.client_id_metric!r}] = {cid!r} is not a str "
                "or an int"
            )
        return cid


def _state_dict(names, arrays, who: str) -> dict:
    import numpy as np
    import torch

    out = {}
    for name, a in zip(names, arrays):
        a = np.asarray(a)
        if a.dtype.kind == "f" and a.dtype.name not in _FLOAT_KINDS:
            raise PlanError(
                f"AggregatorStrategy: {who}: parameter {name!r} is {a.dtype}; pysoup's aggregators take float32 or "
                "float16 (cast the model's parameters before sending them)"
            )
        out[name] = torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C"))
    return out


def _client_update(cid, weights, num_examples):
    from pysoup.federated.updates import ClientUpdate

    return ClientUpdate(cid, weights=weights, num_examples=num_examples)


@functools.cache
def _strategy_class() -> type:
    try:
        from flwr.server.strategy import FedAvg
    except ImportError as e:
        raise ImportError(
            f"pysoup.federated.flower.AggregatorStrategy needs Flower, which is not importable ({e}): pip install flwr"
        ) from e
    cls = type("AggregatorStrategy", (_AggregatorStrategy, FedAvg), {"__module__": __name__})
    cls.__doc__ = _AggregatorStrategy.__doc__
    cls.__qualname__ = "AggregatorStrategy"
    return cls


def __getattr__(name: str):
    if name == "AggregatorStrategy":
        return _strategy_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# AggregatorStrategy comes from __getattr__ (built on first use), which ruff cannot see.
__all__ = ["AggregatorStrategy"]  # noqa: F822

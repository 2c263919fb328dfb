"""Server-side aggregators of federated learning: FedAvg, FedAvgM, FedOpt (FedAdam, FedYogi, FedAdagrad) and FedAU,
with their state, over state dicts or safetensors files, in bounded memory.

One interface: `agg.aggregate(global_model, updates, round=r, out=None)` returns the new global model (a dict of
torch tensors, or `out`'s path when given) and advances the aggregator's state; `state_dict()` /
`load_state_dict()` save and restore that state as JSON-able dicts, so a resumed server computes the same bytes as
one that never stopped.

How each one runs (see docs/federated.md, "Server-side aggregation"):
  - FedAvg and FedAU: the new model is a weighted sum of the global model and the clients' models, so it is one
    streaming pass of the merge engine (the fused fp32 kernel, bit-exact by the numerical contract); the file path
    imports no torch.
  - FedAvgM and FedOpt: several outputs per element (x, and m, v or the momentum), so pysoup.federated.optimizer_step
    walks the tensors in chunks: the fused kernel for the clients' mean, numpy's fp32 elementwise ops (each correctly
    rounded) for the rule; the file path imports no torch either.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

from pysoup.dtypes import to_f32
from pysoup.errors import PlanError
from pysoup.federated.fused_sum import fused_sum
from pysoup.federated.optimizer_step import STEP_WINDOW_BYTES, optimizer_step
from pysoup.federated.updates import ClientUpdate, check_updates, example_weights, open_round

STATE_VERSION = 1


def window_bytes(num_inputs: int) -> int:
    """Each input's read window for a fused pass over `num_inputs` checkpoints: 128 MiB shared out, between 4 and
    16 MiB each (a window maps at least one chunk's span: 8 MiB for the engine's 4 Mi bf16 elements). Measured on
    16 bf16 clients of 512 MiB: 184 MiB peak RSS with these 8 MiB windows, 311 MiB with the engine's 16 MiB."""
    per = (128 << 20) // max(1, num_inputs)
    return max(4 << 20, min(16 << 20, per >> 20 << 20))


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def _in_range(value, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value < hi:
        raise PlanError(f"{what} must be in [{lo}, {hi}), got {value!r}")
    return float(value)


def _round_number(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{what} must be an int, got {value!r}")
    return value


class Aggregator:
    """The interface every server aggregator has; subclasses implement `_aggregate`, `params` and their state.

    Attributes:
        round: the last round aggregated (None before the first).
        last_weights: {client id: the weight its update got in the last round} (p_n for FedAvg and FedOpt,
            omega_n for FedAU).
    """

    name = "aggregator"

    def __init__(self, *, first_round: int = 1):
        self.first_round = _round_number(first_round, "first_round")
        self.round = None
        self.last_weights = {}

    def params(self) -> dict:
        """The constructor's arguments, as JSON-able values."""
        return {"first_round": self.first_round}

    def aggregate(
        self, global_model, updates, *, round=None, out=None, client_weights=None, threads=None, durable=False
    ):
        """Aggregates one round.

        Args:
            global_model: the current global model x: a state dict of CPU torch tensors, a safetensors file or a
                Hugging Face directory.
            updates: the round's ClientUpdate list (all weights, or all deltas).
            round: this round's number (default: the last one + 1, or `first_round`); it must grow. A number
                skipped is a round no client took part in.
            out: None to get the new model as a dict of torch tensors; else a .safetensors path or a directory, which
                may be the global model's own path (the new model replaces it atomically).
            client_weights: one weight per update instead of their num_examples (FedAvg, FedAvgM, FedOpt).
            threads: CPU threads of the kernels (default: all this process may use).
            durable: fsync the outputs before renaming them into place.

        Returns:
            The new global model: a dict of torch tensors in the global model's order, or `out` as a str.

        Raises:
            PlanError (one line; nothing written, inputs untouched, the aggregator's state unchanged) for no updates,
            mismatched models, bad example counts, an unknown client (FedAU, strict), a round that does not grow,
            NaN or inf in an update.
        """
        if isinstance(updates, ClientUpdate):
            raise PlanError("updates must be a list of ClientUpdate, not one ClientUpdate")
        updates = list(updates)
        kind = check_updates(updates)
        r = self._next_round(round)
        if out is not None and os.fspath(out) == "":
            raise PlanError("empty output path")
        result = self._aggregate(global_model, updates, kind, r, out, client_weights, threads, durable)
        self.round = r
        return result if out is None else os.fspath(out)

    def _next_round(self, round) -> int:
        if round is None:
            return self.first_round if self.round is None else self.round + 1
        r = _round_number(round, "round")
        if self.round is not None and r <= self.round:
            raise PlanError(f"round {r} is not after the last round aggregated ({self.round})")
        if self.round is None and r < self.first_round:
            raise PlanError(f"round {r} is before first_round ({self.first_round})")
        return r

    def _aggregate(self, global_model, updates, kind, r, out, client_weights, threads, durable):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The aggregator's state as JSON-able values: its kind, parameters, the last round and its own state."""
        return {"aggregator": self.name, "version": STATE_VERSION, "params": self.params(), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        """Restores a state_dict() of an aggregator of the same kind and parameters."""
        if not isinstance(state, dict) or state.get("aggregator") != self.name:
            got = state.get("aggregator") if isinstance(state, dict) else type(state).__name__
            raise PlanError(f"the state is of {got!r}, not {self.name!r}")
        if state.get("version") != STATE_VERSION:
            raise PlanError(f"state version {state.get('version')!r}: this pysoup reads version {STATE_VERSION}")
        if state.get("params") != self.params():
            raise PlanError(
                f"the state was saved by {self.name}({_kwargs(state.get('params'))}); this one is "
                f"{self.name}({_kwargs(self.params())}): make it with the same parameters"
            )
        r = state.get("round")
        self.round = None if r is None else _round_number(r, "the state's round")


def _kwargs(params) -> str:
    if not isinstance(params, dict):
        return repr(params)
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def _ratio(*factors, over=1) -> float:
    """The product of `factors` divided by `over`, computed exactly and rounded once to a Python float."""
    q = Fraction(1)
    for f in factors:
        q *= Fraction(f)
    return float(q / Fraction(over))


def _fused_round(global_model, updates, kind, weights, *, eta, normalize, out, threads, durable, skip_global):
    """x + eta * sum_n w_n Delta_n (weights normalized by their sum when `normalize`), as one engine pass:

    - clients send weights, `skip_global` (eta 1, normalized): linear over the clients, sum_n w_n x_n / sum_n w_n;
    - clients send weights: task_arithmetic with base x: x + eta * sum_n w_n (x_n - x) [/ sum_n w_n];
    - clients send deltas: linear over [x, Delta_1..Delta_n] with coefficients [1, eta * w_n (/ sum w)].
    """
    g, clients = open_round(global_model, updates, kind, window_bytes(len(updates) + (0 if skip_global else 1)))
    try:
        common = {"global_ckpt": g, "clients": clients, "out": out, "threads": threads, "durable": durable}
        if kind == "weights" and skip_global:
            return fused_sum(strategy="linear", models=clients, weights=weights, params={"normalize": True}, **common)
        if kind == "weights":
            params = {"normalize": normalize, "lambda": eta}
            return fused_sum(
                strategy="task_arithmetic", models=clients, base=g, weights=weights, params=params, **common
            )
        total = sum(Fraction(w) for w in weights) if normalize else 1
        coefficients = [1.0] + [_ratio(eta, w, over=total) for w in weights]
        return fused_sum(
            strategy="linear", models=[g, *clients], weights=coefficients, params={"normalize": False}, **common
        )
    finally:
        for c in [g, *clients]:
            c.close()


class FedAvg(Aggregator):
    """FedAvg (McMahan et al.): x <- x + eta_g * sum_n p_n Delta_n, p_n proportional to the client's example count.

    With eta_g = 1 and clients sending weights, the new model is Flower's weighted mean sum_n n_n x_n / sum_n n_n
    (the global model is not read). Bit-exact by the numerical contract: one fused fp32 sum in input order.

    Args:
        server_lr: eta_g.
        first_round: the number of the server's first round (Flower's server_round starts at 1).

    Example:
        >>> agg = FedAvg()                                                                         # doctest: +SKIP
        >>> agg.aggregate("global.safetensors", [ClientUpdate("a", weights="a.safetensors", num_examples=600),
        ...                                      ClientUpdate("b", weights="b.safetensors", num_examples=400)],
        ...               out="global.safetensors")                                              # doctest: +SKIP
    """

    name = "FedAvg"

    def __init__(self, server_lr: float = 1.0, *, first_round: int = 1):
        super().__init__(first_round=first_round)
        self.server_lr = _positive(server_lr, "server_lr")

    def params(self) -> dict:
        return {"server_lr": self.server_lr, **super().params()}

    def _aggregate(self, global_model, updates, kind, r, out, client_weights, threads, durable):
        p = example_weights(updates, client_weights)
        result = _fused_round(
            global_model,
            updates,
            kind,
            p,
            eta=self.server_lr,
            normalize=True,
            out=out,
            threads=threads,
            durable=durable,
            skip_global=self.server_lr == 1,
        )
        total = sum(Fraction(w) for w in p)
        self.last_weights = {u.client_id: float(Fraction(w) / total) for u, w in zip(updates, p)}
        return result


class FedAU(Aggregator):
    """FedAU (Wang and Ji, 2023): FedAvg with each update weighted by an online estimate of the client's mean
    participation interval: x <- x + eta_g * (1/N) * sum_{n in S_t} omega_n Delta_n, N the number of clients.

    Each client counts its consecutive missed rounds; when it takes part, omega_n is the mean of its past
    participation intervals (1 with no history yet), and then (missed + 1) becomes its newest interval; after
    `cutoff` consecutive misses, `cutoff` is recorded as an interval and the count restarts. Rounds count from
    `first_round`: a client's first interval includes the rounds it missed before it first took part.
    (num_examples is not used.)

    Args:
        num_clients: N, the total number of clients.
        client_ids: the clients' ids, when known up front (ids are str or int).
        strict: with client_ids, an update from any other id is an error (else it joins, while there is room in N).
            Without client_ids, ids join as they appear, at most N of them.
        cutoff: K, the most consecutive misses counted as one interval (the paper's default 100000 never cuts).
        server_lr: eta_g.
        first_round: the number of the server's first round.

    Example:
        >>> agg = FedAU(num_clients=100)                                                           # doctest: +SKIP
        >>> new = agg.aggregate(global_sd, [ClientUpdate(7, delta=d7), ClientUpdate(42, delta=d42)])  # doctest: +SKIP
        >>> agg.last_weights                                                                       # doctest: +SKIP
        {7: 1.0, 42: 1.0}
    """

    name = "FedAU"

    def __init__(
        self,
        num_clients: int,
        *,
        client_ids=None,
        strict: bool = True,
        cutoff: int = 100_000,
        server_lr: float = 1.0,
        first_round: int = 1,
    ):
        super().__init__(first_round=first_round)
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise PlanError(f"num_clients must be an int >= 1, got {num_clients!r}")
        if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 1:
            raise PlanError(f"cutoff must be an int >= 1, got {cutoff!r}")
        self.num_clients = num_clients
        self.client_ids = None
        if client_ids is not None:
            ids = list(client_ids)
            for cid in ids:
                if not isinstance(cid, (str, int)) or isinstance(cid, bool):
                    raise PlanError(f"client id {cid!r}: must be a str or an int")
            if len(set(ids)) != len(ids):
                raise PlanError("client_ids holds an id twice")
            if len(ids) > num_clients:
                raise PlanError(f"{len(ids)} client_ids for num_clients={num_clients}")
            self.client_ids = ids
        self.strict = bool(strict)
        self.cutoff = cutoff
        self.server_lr = _positive(server_lr, "server_lr")
        # client id -> [sum of its intervals, their count, the round its history is brought up to (its last round)]
        self.history = {}

    def params(self) -> dict:
        return {
            "num_clients": self.num_clients,
            "client_ids": self.client_ids,
            "strict": self.strict,
            "cutoff": self.cutoff,
            "server_lr": self.server_lr,
            **super().params(),
        }

    def weight(self, record, r: int) -> tuple:
        """(omega_n, the client's updated record) for a client with `record` ([sum, count, last round] or None)
        taking part in round r."""
        total, count, last = record if record is not None else (0, 0, self.first_round - 1)
        full, missed = divmod(r - last - 1, self.cutoff)  # the rounds missed since: whole cutoffs, then the rest
        total, count = total + self.cutoff * full, count + full
        omega = Fraction(total, count) if count else Fraction(1)
        return omega, [total + missed + 1, count + 1, r]

    def _check_roster(self, updates) -> None:
        known = set(self.history) | set(self.client_ids or ())
        new = [u.client_id for u in updates if u.client_id not in known]
        if self.client_ids is not None and self.strict and new:
            raise PlanError(
                f"client {new[0]!r} is not one of the {len(self.client_ids)} client_ids FedAU was given (strict)"
            )
        if len(known) + len(new) > self.num_clients:
            raise PlanError(
                f"client {new[-1]!r} would be client {len(known) + len(new)} of num_clients={self.num_clients}"
            )

    def _aggregate(self, global_model, updates, kind, r, out, client_weights, threads, durable):
        if client_weights is not None:
            raise PlanError("FedAU weighs clients by their participation; it takes no client_weights")
        self._check_roster(updates)
        omegas, records = [], {}
        for u in updates:
            omega, records[u.client_id] = self.weight(self.history.get(u.client_id), r)
            omegas.append(omega)
        weights = [float(om / self.num_clients) for om in omegas]
        result = _fused_round(
            global_model,
            updates,
            kind,
            weights if kind == "weights" else [om / self.num_clients for om in omegas],
            eta=self.server_lr,
            normalize=False,
            out=out,
            threads=threads,
            durable=durable,
            skip_global=False,
        )
        self.history.update(records)
        self.last_weights = {u.client_id: float(om) for u, om in zip(updates, omegas)}
        return result

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["clients"] = [[cid, *rec] for cid, rec in self.history.items()]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        history = {}
        for entry in state.get("clients", []):
            if not isinstance(entry, list) or len(entry) != 4 or not all(isinstance(v, int) for v in entry[1:]):
                raise PlanError(f"the state's client entry {entry!r} is not [id, interval sum, count, last round]")
            history[entry[0]] = list(entry[1:])
        self.history = history


class _Rule:
    """What optimizer_step runs on each chunk: rule(x, delta, state) -> (new x, new state), all fp32."""

    def __init__(self, states: tuple, fn):
        self.states = states
        self._fn = fn

    def __call__(self, x, delta, state):
        return self._fn(x, delta, state)


class _ServerOptimizer(Aggregator):
    """An aggregator with per-element state (FedOpt's m and v, FedAvgM's momentum), kept as fp32 torch tensors in
    memory, or as safetensors files `<state_dir>/<name>.safetensors` rewritten each round."""

    states: tuple = ()

    def __init__(self, *, state_dir=None, first_round: int = 1):
        super().__init__(first_round=first_round)
        self.state_dir = None if state_dir is None else os.path.abspath(os.fspath(state_dir))
        self._state = {}  # name -> a dict of fp32 tensors (in memory) or a file's path; absent before round one

    @property
    def optimizer_state(self) -> dict:
        """{state name: a dict of fp32 torch tensors, or its file's path} (empty before the first round)."""
        return dict(self._state)

    def state_path(self, name: str) -> str:
        return os.path.join(self.state_dir, f"{name}.safetensors")

    def _rule(self, r: int) -> _Rule:
        raise NotImplementedError

    def _fused(self) -> bool:
        """Whether this configuration is plain FedAvg (one fused pass, no state)."""
        return False

    def _aggregate(self, global_model, updates, kind, r, out, client_weights, threads, durable):
        p = example_weights(updates, client_weights)
        total = sum(Fraction(w) for w in p)
        weights = {u.client_id: float(Fraction(w) / total) for u, w in zip(updates, p)}
        if self._fused():
            result = _fused_round(
                global_model, updates, kind, p, eta=1.0, normalize=True, out=out, threads=threads, durable=durable,
                skip_global=True,
            )  # fmt: skip
            self.last_weights = weights
            return result
        rule = self._rule(r)
        state_out = {}
        if self.state_dir is not None:
            for s in rule.states:
                path = self.state_path(s)
                if s not in self._state and os.path.exists(path):
                    raise PlanError(
                        f"{path}: optimizer state from an earlier run; load_state_dict() to resume, or remove it"
                    )
                state_out[s] = path
        g, clients = open_round(global_model, updates, kind, STEP_WINDOW_BYTES)
        try:
            metadata = {"format": "pt", "pysoup_aggregator": self.name, "pysoup_round": str(r)}
            x, state = optimizer_step(
                g, clients, p, kind, rule, {s: self._state.get(s) for s in rule.states},
                out=out, state_out=state_out, metadata=metadata, threads=threads, durable=durable,
            )  # fmt: skip
        finally:
            for c in [g, *clients]:
                c.close()
        for s in rule.states:
            self._state[s] = state[s] if self.state_dir is None else self.state_path(s)
        self.last_weights = weights
        return x

    def state_dict(self) -> dict:
        """As Aggregator.state_dict, plus "state": {name: its file's path, or "memory" for tensors held in memory
        (save those from optimizer_state yourself and pass them to load_state_dict)}."""
        state = super().state_dict()
        state["state"] = {s: (v if isinstance(v, str) else "memory") for s, v in self._state.items()}
        return state

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        """Restores a state_dict(); `tensors` gives {name: dict of fp32 tensors} for state kept in memory. A state file
        must be the one written in the state's round (its metadata says so)."""
        super().load_state_dict(state)
        restored = {}
        for s, where in (state.get("state") or {}).items():
            if where == "memory":
                if not tensors or s not in tensors:
                    raise PlanError(f"the state keeps {s!r} in memory: pass it in load_state_dict(state, tensors=...)")
                restored[s] = tensors[s]
                continue
            restored[s] = where
            _check_state_file(where, self.name, self.round)
        self._state = restored


def _check_state_file(path, name: str, r) -> None:
    from pysoup.io.checkpoint import open_checkpoint

    if not isinstance(path, str) or not os.path.isfile(path):
        raise PlanError(f"optimizer state file {path!r} does not exist")
    ckpt = open_checkpoint(path)
    try:
        meta = ckpt.metadata or {}
    finally:
        ckpt.close()
    if meta.get("pysoup_aggregator") != name or meta.get("pysoup_round") != str(r):
        raise PlanError(
            f"{path}: written by {meta.get('pysoup_aggregator')!r} in round {meta.get('pysoup_round')!r}, the state is "
            f"{name!r} at round {r!r}: they do not belong together"
        )


class FedAvgM(_ServerOptimizer):
    """FedAvgM (Hsu et al., as Flower implements it): the pseudo-gradient g = x - x_avg (x_avg the example-weighted
    mean of the clients' models), v <- mu v + g (v = g in the first round), x <- x - eta v.

    With momentum 0 there is no state (x <- x - eta g); with momentum 0 and server_lr 1 (the defaults) it is FedAvg,
    byte for byte.

    Args:
        server_lr: eta.
        momentum: mu.
        state_dir: where the momentum lives as `momentum.safetensors`; None keeps it in memory.
        first_round: the number of the server's first round.
    """

    name = "FedAvgM"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.0, *, state_dir=None, first_round: int = 1):
        super().__init__(state_dir=state_dir, first_round=first_round)
        self.server_lr = _positive(server_lr, "server_lr")
        self.momentum = _in_range(momentum, "momentum", 0.0, math.inf)

    def params(self) -> dict:
        return {"server_lr": self.server_lr, "momentum": self.momentum, **super().params()}

    def _fused(self) -> bool:
        return self.momentum == 0 and self.server_lr == 1

    def _rule(self, r: int) -> _Rule:
        import numpy as np

        lr, mu = np.float32(to_f32(self.server_lr)), np.float32(to_f32(self.momentum))
        keep = self.momentum > 0

        def step(x, delta, state):
            g = -delta  # x - x_avg, exactly: rounding to nearest even is symmetric
            if not keep:
                return x - g * lr, {}
            v = g if state["momentum"] is None else state["momentum"] * mu + g
            return x - v * lr, {"momentum": v}

        return _Rule(("momentum",) if keep else (), step)


class FedOpt(_ServerOptimizer):
    """FedOpt (Reddi et al. 2021, as Flower implements it): Delta = x_avg - x (x_avg the example-weighted mean of
    the clients' models; with deltas, their weighted mean), m <- beta_1 m + (1 - beta_1) Delta, v per subclass,
    x <- x + eta' m / (sqrt(v) + tau). m and v start at zero.

    Args:
        eta, beta_1, beta_2, tau: as the subclass documents.
        state_dir: where m and v live as `m.safetensors` and `v.safetensors`; None keeps them in memory.
        first_round: the number of the server's first round (FedAdam's bias correction reads the round number).
    """

    name = "FedOpt"
    states = ("m", "v")

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float, *, state_dir=None, first_round: int = 1):
        super().__init__(state_dir=state_dir, first_round=first_round)
        self.eta = _positive(eta, "eta")
        self.beta_1 = _in_range(beta_1, "beta_1", 0.0, 1.0)
        self.beta_2 = _in_range(beta_2, "beta_2", 0.0, 1.0)
        self.tau = _positive(tau, "tau")

    def params(self) -> dict:
        return {"eta": self.eta, "beta_1": self.beta_1, "beta_2": self.beta_2, "tau": self.tau, **super().params()}

    def step_size(self, r: int) -> float:
        """eta' of round r (fp64; rounded to fp32 where it multiplies)."""
        return self.eta

    def _second_moment(self, v, d2, b):
        """The new v from the old v, Delta^2 and (beta_2, 1 - beta_2) in fp32."""
        raise NotImplementedError

    def _rule(self, r: int) -> _Rule:
        import numpy as np

        f32 = np.float32
        eta, tau = f32(to_f32(self.step_size(r))), f32(to_f32(self.tau))
        b1, ob1 = f32(to_f32(self.beta_1)), f32(to_f32(1 - self.beta_1))
        b2, ob2 = f32(to_f32(self.beta_2)), f32(to_f32(1 - self.beta_2))
        with_m = "m" in self.states

        def step(x, delta, state):
            new = {}
            if with_m:
                m0 = state["m"] if state["m"] is not None else np.zeros_like(delta)
                m = new["m"] = m0 * b1 + delta * ob1
            else:
                m = delta  # beta_1 = 0: m = Delta
            v0 = state["v"] if state["v"] is not None else np.zeros_like(delta)
            v = new["v"] = self._second_moment(v0, delta * delta, (b2, ob2))
            return x + m * eta / (np.sqrt(v) + tau), new

        return _Rule(self.states, step)


class FedAdam(FedOpt):
    """FedAdam: v <- beta_2 v + (1 - beta_2) Delta^2, with the bias-corrected step
    eta' = eta * sqrt(1 - beta_2^(r+1)) / (1 - beta_1^(r+1)), r the server round (as Flower). Defaults: eta 0.1,
    beta_1 0.9, beta_2 0.99, tau 1e-3."""

    name = "FedAdam"

    def __init__(self, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, *, state_dir=None, first_round: int = 1):
        super().__init__(eta, beta_1, beta_2, tau, state_dir=state_dir, first_round=first_round)

    def step_size(self, r: int) -> float:
        return self.eta * math.sqrt(1 - self.beta_2 ** (r + 1)) / (1 - self.beta_1 ** (r + 1))

    def _second_moment(self, v, d2, b):
        b2, ob2 = b
        return v * b2 + d2 * ob2


class FedYogi(FedOpt):
    """FedYogi: v <- v - (1 - beta_2) Delta^2 sign(v - Delta^2). Defaults: eta 0.01, beta_1 0.9, beta_2 0.99,
    tau 1e-3."""

    name = "FedYogi"

    def __init__(self, eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3, *, state_dir=None, first_round: int = 1):
        super().__init__(eta, beta_1, beta_2, tau, state_dir=state_dir, first_round=first_round)

    def _second_moment(self, v, d2, b):
        import numpy as np

        _, ob2 = b
        return v - d2 * ob2 * np.sign(v - d2)


class FedAdagrad(FedOpt):
    """FedAdagrad: beta_1 is 0 (m = Delta, not stored), v <- v + Delta^2. Defaults: eta 0.1, tau 1e-3."""

    name = "FedAdagrad"
    states = ("v",)

    def __init__(self, eta=0.1, tau=1e-3, *, state_dir=None, first_round: int = 1):
        super().__init__(eta, 0.0, 0.0, tau, state_dir=state_dir, first_round=first_round)

    def params(self) -> dict:
        p = super().params()
        del p["beta_1"], p["beta_2"]
        return p

    def _second_moment(self, v, d2, b):
        return v + d2


__all__ = ["Aggregator", "ClientUpdate", "FedAU", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedOpt", "FedYogi"]

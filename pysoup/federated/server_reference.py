"""The aggregators' definitions in plain torch, on whole state dicts: what pysoup.federated.aggregators computes,
written the simple way (no files, no chunks, no state kept). Tests compare the aggregators with these bit for bit.

The weighted sums use pysoup.ops.reference (the numerical contract's definition: fp32 fma in input order, division
by the fp32 sum of the weights, round to nearest even); the optimizer rules are fp32 operations, each correctly
rounded (IEEE 754), in the order written here.
"""

from __future__ import annotations

from fractions import Fraction

from pysoup.dtypes import f32_sum, to_f32

FLOATS = ("float32", "float16", "bfloat16")


def _is_float(t) -> bool:
    return str(t.dtype).replace("torch.", "") in FLOATS


def fused(global_sd: dict, clients: list, weights: list, *, server_lr: float, normalize: bool, kind: str) -> dict:
    """x + eta * sum_n w_n Delta_n (w divided by its sum under `normalize`), as the engine computes it:
    eta 1 with weights normalized: sum_n w_n x_n / sum_n w_n; clients' weights: x + eta * (sum_n w_n (x_n - x)) [/ sum
    w]; deltas: the sum over [x, Delta_1..] with coefficients [1, eta w_n (/ sum w)] (rounded once from the exact
    rational to fp64, then to fp32). Integer buffers: the first client's (weights) or the global model's (deltas)."""
    import torch

    from pysoup.ops.reference import exact_f32, fma_f32, round_to, weighted_sum

    w32 = [to_f32(float(w)) for w in weights]
    out = {}
    for name, x in global_sd.items():
        xs = [c[name] for c in clients]
        if not _is_float(x):
            out[name] = (xs[0] if kind == "weights" else x).clone()
        elif kind == "weights" and server_lr == 1 and normalize:
            out[name] = weighted_sum(xs, w32, x.dtype, True)
        elif kind == "weights":
            b = exact_f32(x)
            mix = torch.full(b.shape, -0.0)
            for w, xn in zip(w32, xs):
                mix = fma_f32(w, exact_f32(xn) - b, mix)
            if normalize:
                mix = mix / torch.full_like(mix, f32_sum(w32))
            out[name] = round_to(fma_f32(to_f32(server_lr), mix, b), x.dtype)
        else:
            total = sum(Fraction(w) for w in weights) if normalize else 1
            coef = [1.0] + [float(Fraction(server_lr) * Fraction(w) / total) for w in weights]
            out[name] = weighted_sum([x, *xs], [to_f32(c) for c in coef], x.dtype, False)
    return out


def fedau_weights(rounds: list, *, cutoff: int = 100_000) -> list:
    """FedAU's omega_n round by round, ticking every client's miss count each round as the algorithm states it:
    `rounds` lists, from the server's first round on, the ids taking part in each; returns one {id: omega} per
    round. (A client not yet seen has missed every round so far.)"""
    intervals, missed, out = {}, {}, []
    everyone = {cid for ids in rounds for cid in ids}
    for ids in rounds:
        weights = {}
        for cid in everyone:
            if cid in ids:
                past = intervals.get(cid, [])
                weights[cid] = Fraction(sum(past), len(past)) if past else Fraction(1)
                intervals.setdefault(cid, []).append(missed.get(cid, 0) + 1)
                missed[cid] = 0
            else:
                missed[cid] = missed.get(cid, 0) + 1
                if missed[cid] == cutoff:
                    intervals.setdefault(cid, []).append(cutoff)
                    missed[cid] = 0
        out.append(weights)
    return out


def mean_update(global_sd: dict, clients: list, weights: list, kind: str) -> dict:
    """FedOpt's Delta per float tensor: the fp32 weighted mean of the clients (the fused kernel's definition), minus
    x when they send weights."""
    import torch

    from pysoup.ops.reference import exact_f32, weighted_sum

    w32 = [to_f32(float(w)) for w in weights]
    out = {}
    for name, x in global_sd.items():
        if _is_float(x):
            mean = weighted_sum([c[name] for c in clients], w32, torch.float32, True)
            out[name] = mean - exact_f32(x) if kind == "weights" else mean
    return out


def _f32_op(op, *args):
    """One fp32 operation, correctly rounded: computed in fp64 on the fp32 operands, then rounded to fp32 (exact for
    +, -, *, / and sqrt: fp64 has more than 2 * 24 + 2 bits). torch's own fp32 sqrt on the CPU is not always correctly
    rounded (1 ulp off with AVX2), so the definition does not use it."""
    import torch

    return op(*[a.double() if isinstance(a, torch.Tensor) else float(a) for a in args]).float()


def fedopt_step(
    global_sd, delta: dict, state: dict, *, method: str, params: dict, step_size: float, kind: str, clients
):
    """One FedAdam / FedYogi / FedAdagrad / FedAvgM step on whole tensors: (new global model, new state).

    `state` maps "m", "v" or "momentum" to a dict of fp32 tensors, or is empty in the first round; `params` holds
    beta_1, beta_2, tau (FedOpt) or server_lr, momentum (FedAvgM); `step_size` is eta' (FedOpt). Every operation is
    one correctly rounded fp32 operation, in the order written; constants are rounded to fp32 first."""
    import torch

    from pysoup.ops.reference import exact_f32, round_to

    def mul(a, b):
        return _f32_op(torch.mul, a, b)

    def add(a, b):
        return _f32_op(torch.add, a, b)

    def sub(a, b):
        return _f32_op(torch.sub, a, b)

    def div(a, b):
        return _f32_op(torch.div, a, b)

    new_x, new_state = {}, {k: {} for k in _states(method, params)}
    for name, x0 in global_sd.items():
        if not _is_float(x0):
            new_x[name] = (clients[0][name] if kind == "weights" else x0).clone()
            continue
        x, d = exact_f32(x0), delta[name]
        if method == "FedAvgM":
            lr, mu = to_f32(params["server_lr"]), to_f32(params["momentum"])
            g = -d
            if params["momentum"] > 0:
                v = g if not state else add(mul(state["momentum"][name], mu), g)
                new_state["momentum"][name] = v
            else:
                v = g
            y = sub(x, mul(v, lr))
        else:
            tau, eta = to_f32(params["tau"]), to_f32(step_size)
            zeros = torch.zeros_like(d)
            if method == "FedAdagrad":
                m = d
            else:
                b1, ob1 = to_f32(params["beta_1"]), to_f32(1 - params["beta_1"])
                m = add(mul(state["m"][name] if state else zeros, b1), mul(d, ob1))
                new_state["m"][name] = m
            v0 = state["v"][name] if state else zeros
            d2 = mul(d, d)
            ob2 = to_f32(1 - params.get("beta_2", 0.0))
            if method == "FedAdam":
                v = add(mul(v0, to_f32(params["beta_2"])), mul(d2, ob2))
            elif method == "FedYogi":
                v = sub(v0, mul(mul(d2, ob2), torch.sign(sub(v0, d2))))
            else:
                v = add(v0, d2)
            new_state["v"][name] = v
            y = add(x, div(mul(m, eta), add(_f32_op(torch.sqrt, v), tau)))
        new_x[name] = round_to(y, x0.dtype)
    return new_x, new_state


def _states(method: str, params: dict) -> tuple:
    if method == "FedAvgM":
        return ("momentum",) if params["momentum"] > 0 else ()
    return ("v",) if method == "FedAdagrad" else ("m", "v")

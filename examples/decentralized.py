"""Decentralized training on scikit-learn's digits (8x8 images, no download): gossip learning with and without
variance correction (Vanishing Variance, 2024) against FedAvg, and NoLoCo (2025) against DiLoCo and local SGD.

(b) Gossip from uncorrelated initialisations. 8 nodes hold a non-IID split of the training set (a Dirichlet(0.5)
    draw of each node's label mix). Each round every node runs 10 SGD steps on its data (batch 16, lr 0.1) and
    then receives the models of 2 random other nodes (the same draws for every method) and aggregates with
    pysoup.federated.gossip.gossip_step: "mean" (the uniform average: the vanishing-variance case), "vc" (the
    authors' DFL_torch preset: 1/2 own + 1/2 mean of received, rescaled to the received models' variance) or
    "plain" (uniform average rescaled to the mean variance of all). Every node starts from its own Xavier
    initialisation (the paper's premise); a control runs "mean" from one shared initialisation. FedAvg: a server
    averages the nodes' models weighted by data size each round and sends the average back (one shared init).
    The MLP is 64-64-64-64-10 (ReLU, Xavier-uniform weights, zero biases). The nodes (and in (c) the workers)
    train together as stacked tensors in one batched pass; each model's arithmetic is its own.

(c) Low-communication data parallelism. 8 workers, IID shards of the training set, one shared initialisation of an
    MLP 64-64-10; each runs AdamW (lr 3e-3, batch 32) and every H = 20 inner steps an outer step, simulated in one
    process with pysoup.federated.noloco's functions (the arithmetic of the distributed classes, bit for bit for
    NoLoCo): NoLoCo (outer lr 0.7, momentum 0.5, groups of 2), DiLoCo (all-reduce, Nesterov outer SGD lr 0.7,
    momentum 0.9), local SGD (periodic averaging: DiLoCo with outer lr 1, momentum 0), and no communication at all.
    Communication per worker per outer step: NoLoCo sends theta - phi and phi to its one peer; DiLoCo and local SGD
    a ring all-reduce of theta - phi in float32 (2 (W - 1) / W of the model); the hops are the messages one sync
    waits for in sequence (the ring's 2 (W - 1) against one exchange).

Three seeds (data split, initialisations, topology, minibatches); mean [min-max] over them.

    python examples/decentralized.py            # ~1-2 minutes on 2 cores; writes examples/results/decentralized.*
    python examples/decentralized.py --quick    # the CI-sized run (seconds), results not written

The tables are what this run measures, including where a paper's claim does not show.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import results_io
import torch
import torch.nn.functional as F

import pysoup
from pysoup.federated.gossip import gossip_step
from pysoup.federated.noloco import DiLoCo, NoLoCo, simulate_diloco_step, simulate_outer_step

HERE = os.path.dirname(os.path.abspath(__file__))
NODES = 8
RECEIVE_FROM = 2
WORKERS = 8
H = 20


# -- data and model -------------------------------------------------------------------------------------------------
def load_data(seed):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = len(y) * 3 // 4
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def dirichlet_split(y, parts, alpha, rng):
    """Each class's examples spread over the parts by a Dirichlet(alpha) draw (label skew); no part empty."""
    while True:
        idx = [[] for _ in range(parts)]
        for c in range(10):
            members = np.flatnonzero(y.numpy() == c)
            rng.shuffle(members)
            cuts = (np.cumsum(rng.dirichlet([alpha] * parts)) * len(members)).astype(int)[:-1]
            for part, chunk in zip(idx, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in idx) >= 16:
            return [torch.tensor(sorted(p)) for p in idx]


class StackedMLPs:
    """N independent MLPs (ReLU) as stacked tensors, trained in one batched pass: parameter k of model i is row i of
    `params[k]`, shaped as nn.Linear's ([out, in] weights, [out] biases). Each model's loss is its own mean, and
    SGD and AdamW are elementwise, so the batch trains each model exactly as alone, only faster."""

    def __init__(self, widths, seeds):
        self.widths, self.n = tuple(widths), len(seeds)
        self.names = [f"layers.{k}.{w}" for k in range(len(widths) - 1) for w in ("weight", "bias")]
        self.params = []
        for a, b in zip(widths[:-1], widths[1:]):
            w = torch.empty(self.n, b, a)
            for i, seed in enumerate(seeds):  # Xavier-uniform weights, zero biases
                torch.nn.init.xavier_uniform_(w[i], generator=torch.Generator().manual_seed(seed * 31 + a * b))
            self.params += [w.requires_grad_(), torch.zeros(self.n, b, requires_grad=True)]

    def forward(self, x):
        """x: [N, batch, in] (or [batch, in] for every model) -> logits [N, batch, out]."""
        if x.dim() == 2:
            x = x.expand(self.n, *x.shape)
        layers = len(self.params) // 2
        for k in range(layers):
            x = torch.baddbmm(self.params[2 * k + 1][:, None, :], x, self.params[2 * k].transpose(1, 2))
            if k < layers - 1:
                x = F.relu(x)
        return x

    def loss(self, x, y):
        """The sum over the models of each one's mean cross-entropy (x: [N, batch, in], y: [N, batch])."""
        logits = self.forward(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").sum() / y.shape[1]

    def model(self, i) -> dict:
        """Model i's state dict: views of the stacked tensors (writing them writes the stack)."""
        return {name: p.detach()[i] for name, p in zip(self.names, self.params)}

    def snapshot(self) -> list:
        copies = [p.detach().clone() for p in self.params]
        return [{name: c[i] for name, c in zip(self.names, copies)} for i in range(self.n)]

    def evaluate(self, data):
        """Per model: (test accuracy, test loss)."""
        x, y = data
        with torch.no_grad():
            logits = self.forward(x)
            acc = (logits.argmax(-1) == y).float().mean(1)
            loss = torch.stack([F.cross_entropy(z, y) for z in logits])
        return list(zip(acc.tolist(), loss.tolist()))

    def evaluate_average(self, data):
        """(accuracy, loss) of the uniform average of the models' weights."""
        avg = StackedMLPs.__new__(StackedMLPs)
        avg.widths, avg.n, avg.names = self.widths, 1, self.names
        avg.params = [p.detach().mean(0, keepdim=True) for p in self.params]
        return avg.evaluate(data)[0]


def sample(parts, gens, batch, train):
    """One minibatch per model: [N, batch] indices drawn from each one's part (with replacement)."""
    idx = torch.stack([part[torch.randint(len(part), (batch,), generator=g)] for part, g in zip(parts, gens)])
    return train[0][idx], train[1][idx]


# -- (b) gossip with and without variance correction ----------------------------------------------------------------
GOSSIP_METHODS = {
    "FedAvg (shared init)": ("fedavg", True),
    "gossip, mean (random inits)": ("mean", False),
    "gossip, VC (random inits)": ("vc", False),
    "gossip, plain VC (random inits)": ("plain", False),
    "gossip, mean (shared init)": ("mean", True),
}
GOSSIP_WIDTHS = (64, 64, 64, 64, 10)
LOCAL_STEPS, GOSSIP_BATCH, GOSSIP_LR = 10, 16, 0.1


def gossip_run(train, test, parts, senders, seed, rounds, mode, shared_init):
    nodes = StackedMLPs(GOSSIP_WIDTHS, [seed * 100 + (0 if shared_init else i) for i in range(NODES)])
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(NODES)]  # the same for every method
    layer2 = nodes.params[2]
    init_std = layer2.detach().std(dim=(1, 2))
    sizes = [float(len(p)) for p in parts]
    curve, spread = [], []
    for rnd in range(rounds):
        for _ in range(LOCAL_STEPS):
            x, y = sample(parts, gens, GOSSIP_BATCH, train)
            for p in nodes.params:
                p.grad = None
            nodes.loss(x, y).backward()
            with torch.no_grad():
                for p in nodes.params:
                    p.sub_(GOSSIP_LR * p.grad)
        with torch.no_grad():
            if mode == "fedavg":  # the server's average, weighted by data size, back to every node
                for p in nodes.params:
                    p.copy_(pysoup.ops.weighted_sum(list(p.detach()), sizes, normalize=True).expand_as(p))
            else:
                received = nodes.snapshot()
                for i in range(NODES):
                    gossip_step(nodes.model(i), [received[j] for j in senders[rnd][i]], mode=mode)
        accs = [a for a, _ in nodes.evaluate(test)]
        curve.append(accs[0] if mode == "fedavg" else statistics.fmean(accs))
        spread.append(float((layer2.detach().std(dim=(1, 2)) / init_std).mean()))
    return {"accuracy": curve, "weight_std_ratio": spread}


def gossip_experiment(seed, rounds):
    train, test = load_data(seed)
    rng = np.random.default_rng(seed)
    parts = dirichlet_split(train[1], NODES, 0.5, rng)
    senders = [
        [rng.choice([j for j in range(NODES) if j != i], RECEIVE_FROM, replace=False).tolist() for i in range(NODES)]
        for _ in range(rounds)
    ]
    return {
        name: gossip_run(train, test, parts, senders, seed, rounds, mode, shared)
        for name, (mode, shared) in GOSSIP_METHODS.items()
    }


# -- (c) NoLoCo, DiLoCo, local SGD -------------------------------------------------------------------------------------
LOWCOMM_METHODS = ("NoLoCo", "DiLoCo", "local SGD", "no communication")
LOWCOMM_WIDTHS = (64, 64, 10)


def lowcomm_run(train, test, shards, seed, outer_steps, method):
    workers = StackedMLPs(LOWCOMM_WIDTHS, [seed] * WORKERS)  # one shared initialisation
    opt = torch.optim.AdamW(workers.params, lr=3e-3)  # elementwise: each worker's own AdamW
    gens = [torch.Generator().manual_seed(seed * 7919 + i) for i in range(WORKERS)]
    thetas = [list(workers.model(i).values()) for i in range(WORKERS)]
    phis = [[t.clone() for t in theta] for theta in thetas]
    ms = [[torch.zeros_like(t) for t in theta] for theta in thetas]
    curve = []
    for outer in range(1, outer_steps + 1):
        for _ in range(H):
            x, y = sample(shards, gens, 32, train)
            opt.zero_grad()
            workers.loss(x, y).backward()
            opt.step()
        step = outer * H
        if method == "NoLoCo":
            simulate_outer_step(thetas, phis, ms, step, outer_lr=0.7, momentum=0.5, group_size=2)
        elif method in ("DiLoCo", "local SGD"):
            lr, mu = (0.7, 0.9) if method == "DiLoCo" else (1.0, 0.0)
            simulate_diloco_step(thetas, phis[0], ms[0], outer_lr=lr, momentum=mu)
        per_worker = workers.evaluate(test)
        curve.append(
            {
                "step": step,
                "accuracy": statistics.fmean(a for a, _ in per_worker),
                "loss": statistics.fmean(loss for _, loss in per_worker),
                "average_model_accuracy": workers.evaluate_average(test)[0],
            }
        )
    return curve


def lowcomm_experiment(seed, outer_steps):
    train, test = load_data(seed)
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(seed + 17))
    shards = list(torch.chunk(order, WORKERS))  # IID shards
    return {m: lowcomm_run(train, test, shards, seed, outer_steps, m) for m in LOWCOMM_METHODS}


def communication():
    """Bytes one worker sends per outer step, and the messages one sync waits for in sequence."""
    params = [p.detach()[0].clone() for p in StackedMLPs(LOWCOMM_WIDTHS, [0]).params]
    ring = DiLoCo(params).bytes_per_outer_step(world=WORKERS)
    return {
        "parameters": sum(p.numel() for p in params),
        "NoLoCo": {"bytes_per_outer_step": NoLoCo(params, group_size=2).bytes_per_outer_step(), "hops": 1},
        "DiLoCo": {"bytes_per_outer_step": ring, "hops": 2 * (WORKERS - 1)},
        "local SGD": {"bytes_per_outer_step": ring, "hops": 2 * (WORKERS - 1)},
        "no communication": {"bytes_per_outer_step": 0, "hops": 0},
    }


# -- report ----------------------------------------------------------------------------------------------------------
def cell(values, fmt="{:.4f}"):
    return f"{fmt.format(statistics.fmean(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def first_round_reaching(curve, level):
    return next((r + 1 for r, a in enumerate(curve) if a >= level), None)


def markdown(res) -> str:
    seeds = res["seeds"]
    rounds = res["rounds"]
    checkpoints = sorted({max(1, rounds // 10), rounds // 4, rounds // 2, rounds})
    lines = [
        "# Decentralized training on scikit-learn's digits",
        "",
        f"Command: `python examples/decentralized.py` ({res['seconds']:.0f} s on {res['machine']}); mean [min-max] "
        f"over {len(seeds)} seeds.",
        "",
        "## (b) Gossip from uncorrelated initialisations, with and without variance correction",
        "",
        f"{NODES} nodes, Dirichlet(0.5) label split, MLP {'-'.join(map(str, GOSSIP_WIDTHS))} (Xavier), "
        f"{LOCAL_STEPS} SGD steps (batch {GOSSIP_BATCH}, lr {GOSSIP_LR}) per round, each node receives "
        f"{RECEIVE_FROM} random peers' models. Test accuracy averaged over the nodes "
        "(FedAvg: the server's model) after the given round; rounds until that mean first reaches 0.90; the spread "
        "of layer 2's weights at the end relative to its initial spread (a vanishing variance shows as a ratio well "
        "below 1 early on).",
        "",
        "| method | " + " | ".join(f"round {r}" for r in checkpoints) + " | rounds to 0.90 | weight std / init |",
        "|---|" + "---|" * (len(checkpoints) + 2),
    ]
    for name in GOSSIP_METHODS:
        runs = [res["gossip"][s][name] for s in seeds]
        cells = [cell([run["accuracy"][r - 1] for run in runs]) for r in checkpoints]
        reach = [first_round_reaching(run["accuracy"], 0.90) for run in runs]
        reached = [r for r in reach if r is not None]
        reach_cell = (
            f"{statistics.fmean(reached):.1f} ({len(reached)}/{len(runs)} seeds)" if reached else f"never in {rounds}"
        )
        std = cell([run["weight_std_ratio"][-1] for run in runs], "{:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {reach_cell} | {std} |")
    early = {n: statistics.fmean(res["gossip"][s][n]["weight_std_ratio"][0] for s in seeds) for n in GOSSIP_METHODS}
    early_outer = max(1, res["outer_steps"] // 4)
    lines += [
        "",
        "Layer 2's weight spread after the first aggregation, relative to its initialisation: "
        + ", ".join(f"{n} {v:.2f}" for n, v in early.items())
        + ".",
        "",
        "## (c) NoLoCo vs DiLoCo vs local SGD",
        "",
        f"{WORKERS} workers (IID shards), MLP {'-'.join(map(str, LOWCOMM_WIDTHS))}, AdamW lr 3e-3 batch 32, an outer "
        f"step every {H} inner steps, {res['outer_steps']} outer steps. Test accuracy and loss averaged over the "
        f"workers' own models after outer step {early_outer} (inner step {early_outer * H}) and after the last; the "
        "lowest test loss along the way; the accuracy of the workers' uniform average at the end; bytes one worker "
        f"sends per outer step (float32 model of {res['communication']['parameters']} parameters) and the messages "
        "one sync waits for in sequence.",
        "",
        f"| method | accuracy, step {early_outer * H} | accuracy, end | test loss, end | lowest test loss | "
        "accuracy of the average, end | bytes / worker / outer step | hops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in LOWCOMM_METHODS:
        curves = [res["lowcomm"][s][name] for s in seeds]
        com = res["communication"][name]
        lines.append(
            f"| {name} | {cell([c[early_outer - 1]['accuracy'] for c in curves])} | "
            f"{cell([c[-1]['accuracy'] for c in curves])} | {cell([c[-1]['loss'] for c in curves])} | "
            f"{cell([min(p['loss'] for p in c) for c in curves])} | "
            f"{cell([c[-1]['average_model_accuracy'] for c in curves])} | {com['bytes_per_outer_step']} | "
            f"{com['hops']} |"
        )
    order = sorted(
        LOWCOMM_METHODS, key=lambda n: -statistics.fmean(res["lowcomm"][s][n][-1]["accuracy"] for s in seeds)
    )
    lines += [
        "",
        "Order by final mean test accuracy: " + " > ".join(order) + ".",
        "",
        "NoLoCo's exchange as specified (theta - phi and phi, to its one peer) is 2 values per parameter, more than a "
        "ring all-reduce's 2 (W - 1) / W; what it saves is the waiting: one exchange with one peer per sync instead of "
        "2 (W - 1) messages passed through every worker. (alpha mean(theta - phi) + alpha (mean(phi) - phi_i) equals "
        "alpha (mean(theta) - phi_i), so sending theta alone would halve the volume; pysoup follows the algorithm's "
        "exchange.)",
    ]
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = res["seeds"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name in GOSSIP_METHODS:
        for ax, key in ((axes[0], "accuracy"), (axes[1], "weight_std_ratio")):
            curves = np.array([res["gossip"][s][name][key] for s in seeds])
            ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), label=name)
    axes[0].set(xlabel="round", ylabel="test accuracy (mean over nodes)", title="(b) gossip vs FedAvg")
    axes[1].set(xlabel="round", ylabel="layer-2 weight std / initial", title="(b) the weights' spread")
    axes[0].legend(fontsize=7)
    for name in LOWCOMM_METHODS:
        loss = np.array([[p["loss"] for p in res["lowcomm"][s][name]] for s in seeds])
        steps = [p["step"] for p in res["lowcomm"][seeds[0]][name]]
        axes[2].plot(steps, loss.mean(0), label=name)
    axes[2].set(xlabel="inner step", ylabel="test loss (mean over workers)", title="(c) low-communication training")
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: one seed, few rounds; nothing written")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)  # models this small run fastest on one thread
    seeds = [0] if args.quick else [0, 1, 2]
    rounds = 4 if args.quick else 30
    outer_steps = 3 if args.quick else 20
    res = {
        "machine": results_io.machine(),
        "seeds": seeds,
        "rounds": rounds,
        "outer_steps": outer_steps,
        "gossip": {s: gossip_experiment(s, rounds) for s in seeds},
        "lowcomm": {s: lowcomm_experiment(s, outer_steps) for s in seeds},
        "communication": communication(),
    }
    res["seconds"] = time.perf_counter() - start
    text = markdown(res)
    print(text)
    if not args.quick:
        results_io.save("decentralized", res, text, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FedAU (Wang & Ji 2023, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging")
against FedAvg on scikit-learn's digits (8x8 images, no download), with clients that take part in a round with
heterogeneous probabilities the server does not know.

The setting follows the paper's code (IBM/fedau): the training set is split over N = 50 clients by a Dirichlet
(alpha 0.1) draw of each client's label mix; each client's participation probability is its label mix dotted with a
Dirichlet(0.1) weight per label (mean 0.1, floor 0.02), so the clients that hold some labels take part far more
often than those that hold others. Three participation patterns, each with those probabilities as the long-run
fraction of rounds: Bernoulli (independent each round), Markov (a two-state chain, at most 0.05 chance a round of
turning active) and cyclic (active for a stretch of each 100-round cycle). A participating client runs 5 SGD steps
(batch 16, lr 0.05) of an MLP 64-32-10 from the global model and sends its update Delta_n. The server (global lr 1):

- FedAU: x += (1/N) sum_{n in S} omega_n Delta_n, omega_n the mean of the client's past participation intervals
  (pysoup.federated.aggregators.FedAU, told only each round's client ids);
- FedAvg, participating: x += mean_{n in S} Delta_n (uniform over the participants, as the paper's baseline);
- FedAvg, all: x += (1/N) sum_{n in S} Delta_n (non-participants count with a zero update);
- known probabilities (an oracle FedAU tries to match): x += (1/N) sum_{n in S} Delta_n / p_n.

All four see the same participation draws, data, initial model and minibatches for a given seed (three seeds: data
split, probabilities, patterns, initialisation). The clients of a round train together as one batched model (the
same arithmetic as training them one at a time, up to fp32 rounding).

    python examples/fedau.py            # ~1-2 minutes on 2 cores; writes examples/results/fedau.{json,md,png}
    python examples/fedau.py --quick    # the CI-sized run (seconds), results not written

The table is what this run measures, including where FedAU does not come first.
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

from pysoup.federated.aggregators import ClientUpdate, FedAU

HERE = os.path.dirname(os.path.abspath(__file__))
N_CLIENTS, DATA_ALPHA, PART_ALPHA, PART_MEAN, PART_MIN = 50, 0.1, 0.1, 0.1, 0.02
LOCAL_STEPS, BATCH, LR, LR_GLOBAL, HIDDEN = 5, 16, 0.05, 1.0, 32
PATTERNS = ("bernoulli", "markov", "cyclic")
MARKOV_TO_ACTIVE, CYCLE = 0.05, 100
METHODS = ("fedau", "fedavg_participating", "fedavg_all", "known_prob")
LABELS = {
    "fedau": "FedAU",
    "fedavg_participating": "FedAvg (participants)",
    "fedavg_all": "FedAvg (all, zeros)",
    "known_prob": "known p_n (oracle)",
}


# -- data and participation (as IBM/fedau's util.py) -----------------------------------------------------------------
def load_data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, stratify=d.target, random_state=seed)
    return (torch.tensor(xtr), torch.tensor(ytr)), (torch.tensor(xte), torch.tensor(yte))


def partition(labels: np.ndarray, rng) -> tuple:
    """Each client's label mix ~ Dirichlet(0.1); each label's examples cut among the clients in proportion (the
    paper's cumulative split). Redrawn until every client holds at least 4 examples."""
    k = int(labels.max()) + 1
    by_label = [np.flatnonzero(labels == c) for c in range(k)]
    while True:
        mix = rng.dirichlet(DATA_ALPHA * np.ones(k), N_CLIENTS)
        cum = np.cumsum(mix, axis=0) / mix.sum(axis=0)
        clients = [[] for _ in range(N_CLIENTS)]
        for c, idx in enumerate(by_label):
            ends = np.round(len(idx) * cum[:, c]).astype(int)
            starts = np.concatenate([[0], ends[:-1]])
            for n in range(N_CLIENTS):
                clients[n].extend(idx[starts[n] : ends[n]])
        if min(len(c) for c in clients) >= 4:
            break
    clients = [np.array(c) for c in clients]
    actual = np.stack([np.bincount(labels[c], minlength=k) / len(c) for c in clients])
    multiplier = rng.dirichlet(PART_ALPHA * np.ones(k))
    probs = np.maximum(PART_MIN, actual @ multiplier * PART_MEAN * k)
    return clients, np.minimum(probs, 1.0)


def participation(pattern: str, probs: np.ndarray, rounds: int, rng) -> np.ndarray:
    """(rounds x N) bool: who takes part in each round (IBM/fedau's WorkerSampler, all clients at once)."""
    n = len(probs)
    out = np.zeros((rounds, n), dtype=bool)
    if pattern == "bernoulli":
        return rng.random((rounds, n)) < probs
    if pattern == "markov":
        to_active = np.full(n, MARKOV_TO_ACTIVE)
        to_inactive = to_active * (1 / probs - 1)
        over = to_inactive > 1
        to_active[over] /= to_inactive[over]
        to_inactive[over] = 1.0
        active = rng.random(n) < probs
        for r in range(rounds):
            u = rng.random(n)
            active = np.where(active, u >= to_inactive, u < to_active)
            out[r] = active
        return out
    if pattern == "cyclic":
        on = np.maximum(1, np.round(CYCLE * probs).astype(int))
        off = np.maximum(1, CYCLE - on)
        active = np.zeros(n, dtype=bool)
        to_switch = rng.integers(off)
        for r in range(rounds):
            switch = to_switch == 0
            active = np.where(switch, ~active, active)
            to_switch = np.where(switch, np.where(active, on, off), to_switch) - 1
            out[r] = active
        return out
    raise ValueError(pattern)


# -- the model, trained for many clients (and all methods) at once ---------------------------------------------------
def init_model(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def forward(p, x):
    """x: (C, B, 64), p[k]: (C, ...): C independent models. Returns the first layer's pre-activation and the logits."""
    z1 = torch.baddbmm(p["0.bias"][:, None], x, p["0.weight"].transpose(1, 2))
    return z1, torch.baddbmm(p["2.bias"][:, None], torch.relu(z1), p["2.weight"].transpose(1, 2))


def local_training(models, x_train, y_train, steps) -> dict:
    """Every participating client's update Delta_n = x_n - x after LOCAL_STEPS SGD steps on the mean cross-entropy
    of its minibatch, for every method at once. models[k]: (M, ...); steps: LOCAL_STEPS (P, B) index tensors.
    Returns (M, P, ...) updates. The backward pass is written out (a 2-layer MLP): 3x faster than autograd here."""
    m, c = next(iter(models.values())).shape[0], steps[0].shape[0]
    p = {k: v[:, None].expand(m, c, *v.shape[1:]).reshape(m * c, *v.shape[1:]).clone() for k, v in models.items()}
    for idx in steps:
        x = x_train[idx].repeat(m, 1, 1)  # (M*P, B, 64)
        y = y_train[idx].repeat(m, 1)
        z1, logits = forward(p, x)
        d = torch.softmax(logits, -1)
        d.scatter_add_(-1, y[..., None], torch.full(y[..., None].shape, -1.0))
        d /= y.shape[1]  # d(mean loss)/d(logits)
        h = torch.relu(z1)
        dz1 = torch.bmm(d, p["2.weight"]) * (z1 > 0)
        p["2.weight"] -= LR * torch.bmm(d.transpose(1, 2), h)
        p["2.bias"] -= LR * d.sum(1)
        p["0.weight"] -= LR * torch.bmm(dz1.transpose(1, 2), x)
        p["0.bias"] -= LR * dz1.sum(1)
    return {k: (v.reshape(m, c, *v.shape[1:]) - models[k][:, None]) for k, v in p.items()}


def accuracy(models, x, y) -> list:
    _, logits = forward(models, x[None].expand(next(iter(models.values())).shape[0], *x.shape))
    return (logits.argmax(-1) == y).float().mean(1).tolist()


# -- the server -------------------------------------------------------------------------------------------------------
def server_step(models, deltas, participants, probs, aggregators, r) -> dict:
    """Every method's new global model. FedAU is pysoup.federated.aggregators.FedAU (one call, on FedAU's global model
    and the participants' deltas); the baselines are plain weighted sums, written out (a FedAvg aggregator call
    costs ~7 ms a round here, as much as the clients' training, for the same mean)."""
    new = {k: v.clone() for k, v in models.items()}
    for method, agg in aggregators.items():
        i = METHODS.index(method)
        updates = [
            ClientUpdate(int(n), delta={k: d[i, j] for k, d in deltas.items()}) for j, n in enumerate(participants)
        ]
        out = agg.aggregate({k: v[i] for k, v in models.items()}, updates, round=r)
        for k in new:
            new[k][i] = out[k]
    coef = {
        "fedavg_participating": torch.full((len(participants),), 1.0 / len(participants)),
        "fedavg_all": torch.full((len(participants),), 1.0 / N_CLIENTS),
        "known_prob": torch.tensor(1.0 / probs[participants], dtype=torch.float32) / N_CLIENTS,
    }
    for method, c in coef.items():
        i = METHODS.index(method)
        for k in new:
            new[k][i] = models[k][i] + LR_GLOBAL * torch.tensordot(c, deltas[k][i], dims=1)
    return new


# -- one seed ---------------------------------------------------------------------------------------------------------
def run(seed, rounds, eval_every):
    rng = np.random.default_rng(seed)
    (xtr, ytr), (xte, yte) = load_data(seed)
    clients, probs = partition(ytr.numpy(), rng)
    init = init_model(seed)
    out = {"seed": seed, "probs": probs.round(4).tolist(), "sizes": [len(c) for c in clients], "patterns": {}}
    for pattern in PATTERNS:
        active = participation(pattern, probs, rounds, np.random.default_rng([seed, PATTERNS.index(pattern)]))
        batch_rng = np.random.default_rng([seed, 100 + PATTERNS.index(pattern)])
        models = {k: v[None].repeat(len(METHODS), *([1] * v.dim())) for k, v in init.items()}
        aggregators = {"fedau": FedAU(N_CLIENTS, client_ids=range(N_CLIENTS), server_lr=LR_GLOBAL)}
        curves = []
        for r in range(rounds):
            who = np.flatnonzero(active[r])
            if len(who):
                # the same minibatches for every method: per local step, per participant, BATCH of its examples
                steps = [torch.from_numpy(np.stack([clients[c][batch_rng.integers(len(clients[c]), size=BATCH)]
                                                    for c in who])) for _ in range(LOCAL_STEPS)]  # fmt: skip
                deltas = local_training(models, xtr, ytr, steps)
                models = server_step(models, deltas, who, probs, aggregators, r + 1)
            if (r + 1) % eval_every == 0:
                curves.append(accuracy(models, xte, yte))
        out["patterns"][pattern] = {
            "curves": {m: [c[i] for c in curves] for i, m in enumerate(METHODS)},
            "participation_rate": float(active.mean()),
        }
    return out


# -- reports ----------------------------------------------------------------------------------------------------------
def spread(values, fmt=".4f"):
    values = list(values)
    return f"{format(statistics.mean(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def last_tenth(curve):
    k = max(1, len(curve) // 10)
    return statistics.mean(curve[-k:])


def markdown(res) -> str:
    runs, a = res["runs"], res["args"]
    lines = [
        "# FedAU against FedAvg, unknown heterogeneous participation, digits",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s on {res['machine']})",
        "",
        f"{N_CLIENTS} clients (Dirichlet {DATA_ALPHA} label split of 1347 training images), participation "
        f"probabilities from the paper's recipe (mean {PART_MEAN}, floor {PART_MIN}), {a['rounds']} rounds of "
        f"{LOCAL_STEPS} local SGD steps (batch {BATCH}, lr {LR}), MLP 64-{HIDDEN}-10, global lr {LR_GLOBAL}. Test "
        f"accuracy (450 images) averaged over the last tenth of the evaluations (every {a['eval_every']} rounds), "
        f"mean over {len(runs)} seeds [min-max]; the last column is the final model's.",
        "",
        "| pattern | method | accuracy, last tenth | final accuracy |",
        "|---|---|---|---|",
    ]
    for pattern in PATTERNS:
        for method in METHODS:
            curves = [r["patterns"][pattern]["curves"][method] for r in runs]
            lines.append(f"| {pattern} | {LABELS[method]} | {spread(last_tenth(c) for c in curves)} | "
                         f"{spread(c[-1] for c in curves)} |")  # fmt: skip
    rates = {p: statistics.mean(r["patterns"][p]["participation_rate"] for r in runs) for p in PATTERNS}
    probs = [p for r in runs for p in r["probs"]]
    lines += [
        "",
        "Participation: probabilities " + spread(probs, ".3f") + " over all clients and seeds; measured fraction of "
        "client-rounds active " + ", ".join(f"{p} {v:.3f}" for p, v in rates.items()) + ".",
    ]
    wins = []
    for pattern in PATTERNS:
        best = {m: statistics.mean(last_tenth(r["patterns"][pattern]["curves"][m]) for r in runs) for m in METHODS}
        order = sorted(METHODS, key=lambda m: -best[m])
        wins.append(f"{pattern}: " + " > ".join(LABELS[m] for m in order))
    lines += ["", "Order by mean accuracy over the last tenth: " + "; ".join(wins) + "."]
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, a = res["runs"], res["args"]
    fig, axes = plt.subplots(1, len(PATTERNS), figsize=(15, 4), sharey=True)
    for ax, pattern in zip(axes, PATTERNS):
        for method in METHODS:
            curves = np.array([r["patterns"][pattern]["curves"][method] for r in runs])
            x = np.arange(1, curves.shape[1] + 1) * a["eval_every"]
            line = ax.plot(x, curves.mean(0), label=LABELS[method])
            ax.fill_between(x, curves.min(0), curves.max(0), color=line[0].get_color(), alpha=0.15)
        ax.set_title(f"{pattern} participation")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy (mean of {len(runs)} seeds, band: min-max)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: 1 seed, 60 rounds; nothing written")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)  # tiny batched matmuls: threads only add contention on a busy machine
    rounds, eval_every, seeds = (60, 10, [0]) if args.quick else (500, 10, [0, 1, 2])
    runs = [run(seed, rounds, eval_every) for seed in seeds]
    res = {
        "command": "python examples/fedau.py" + (" --quick" if args.quick else ""),
        "machine": results_io.machine(),
        "args": {"rounds": rounds, "eval_every": eval_every, "seeds": seeds},
        "runs": runs,
    }
    res["seconds"] = time.perf_counter() - start
    text = markdown(res)
    print(text)
    if not args.quick:
        results_io.save("fedau", res, text, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Final weights vs EMA vs SWA (pysoup.training) on scikit-learn's digits: a small MLP with BatchNorm.

Two training runs per seed from the same initial weights and the same batch order, with SGD (Nesterov momentum 0.9,
weight decay 5e-4, batch 32) for the same number of epochs:

- "cosine": the learning rate decays from 0.05 to 0 (cosine) over all epochs; two EMAs are tracked (decay 0.995,
  chosen once on validation, and 0.999 with timm's warm-up; see EMAS).
- "SWA schedule": the learning rate decays (cosine) from 0.05 to the SWA rate 0.01 over the first 75% of the epochs
  and stays there for the last 25%; SWA averages the weights at the end of each of those epochs, then
  `update_bn` recomputes the BatchNorm statistics for the averaged weights with one pass over the training set.
  The EMAs are tracked here too, and SWA is also evaluated before `update_bn` (the statistics it then holds are the
  last model's, which do not fit the averaged weights).

Each seed draws its own data split (60% train, 20% validation, 20% test), initialisation and batch order. Measured
on the test set and on its shifted copy (each image moved by one pixel in a random direction plus Gaussian noise:
`shift` of digits_soups.py): accuracy, negative log-likelihood and expected calibration error (15 equal bins).

    python examples/averaging.py              # 5 seeds in 2 processes; writes examples/results/averaging.*
    python examples/averaging.py --quick      # 1 seed, 6 epochs, nothing written (CI-sized)
    python examples/averaging.py --tune-ema   # how the EMA decay was chosen: validation NLL of a sweep, seed 0

The numbers are whatever this run measures, including where an average does not beat the final weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time

import results_io
import torch
import torch.nn.functional as F
from digits_soups import shift

from pysoup.training import EMA, SWA

EPOCHS, QUICK_EPOCHS, SEEDS, BATCH = 40, 6, 5, 32
LR, SWA_LR, SWA_SHARE, WEIGHT_DECAY = 0.05, 0.01, 0.25, 5e-4
# Chosen once by --tune-ema (seed 0, 40 epochs = 1,360 steps; validation NLL, cosine run / SWA-schedule run): final
# weights 0.0464 / 0.0501; EMA 0.98 0.0477 / 0.0500, 0.99 0.0476 / 0.0493, 0.995 0.0473 / 0.0486, 0.998 0.102 / 0.104,
# 0.999 0.916 / 0.929 (its horizon reaches back to the first epochs), 0.999 with timm's warm-up 0.0476 / 0.0492 (the
# warm-up holds the decay at 1 - (1 + n)^(-2/3), ~0.992 at the end of this run: 0.9995 and 0.9999 give the same).
# Both are kept: the lowest validation NLL (0.995), and the usual default (0.999 with warm-up), whose warm-up spares
# the early epochs the initial weights' share 0.995^n (the EMA without it lags the model by ~10 epochs).
EMAS = {"EMA 0.995": (0.995, False), "EMA 0.999 warm-up": (0.999, True)}
SPLITS = ("test", "shift")


# -- data -----------------------------------------------------------------------------------------------------------
def load_data(seed):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = len(y)
    cut = {"train": (0, n * 6 // 10), "val": (n * 6 // 10, n * 8 // 10), "test": (n * 8 // 10, n)}
    data = {k: (x[a:b], y[a:b]) for k, (a, b) in cut.items()}
    data["shift"] = (shift(data["test"][0], seed=seed + 1), data["test"][1])
    return data


# -- model ----------------------------------------------------------------------------------------------------------
def mlp():
    """64-128-128-10 with BatchNorm after each hidden linear layer."""
    layers = []
    for a, b in ((64, 128), (128, 128)):
        layers += [torch.nn.Linear(a, b), torch.nn.BatchNorm1d(b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(128, 10))


def learning_rate(schedule, epoch_fraction):
    """The rate at a point of training (0 at the start, 1 at the end)."""
    if schedule == "cosine":
        return 0.5 * LR * (1 + math.cos(math.pi * epoch_fraction))
    decay = epoch_fraction / (1 - SWA_SHARE)  # "swa": cosine from LR to SWA_LR, then constant
    return SWA_LR if decay >= 1 else SWA_LR + 0.5 * (LR - SWA_LR) * (1 + math.cos(math.pi * decay))


def train(model, data, *, schedule, epochs, seed, emas, swa_on=False):
    """SGD with the schedule; the EMA(s) updated after every step, SWA at the end of each epoch of its phase.
    Returns the EMAs by name, the SWA (or None), and the per-epoch test accuracy of the model and the EMAs."""
    x, y = data["train"]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)
    per_epoch = math.ceil(len(y) / BATCH)
    total = epochs * per_epoch
    averages = {name: EMA(model, d, warmup=w) for name, (d, w) in emas.items()}
    swa = None
    if swa_on:  # members: the weights at the end of each epoch of the last SWA_SHARE of training
        swa_epochs = max(1, round(epochs * SWA_SHARE))
        swa = SWA(model, update_every=per_epoch, start_step=(epochs - swa_epochs + 1) * per_epoch)
    curve = {"final weights": [], **{name: [] for name in emas}}
    step = 0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            for group in opt.param_groups:
                group["lr"] = learning_rate(schedule, step / total)
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            for ema in averages.values():
                ema.update()
            if swa is not None:
                swa.update()
        curve["final weights"].append(metrics(model, data["test"])["acc"])
        for name, ema in averages.items():
            with ema.swapped():
                curve[name].append(metrics(model, data["test"])["acc"])
    if swa is not None:
        assert swa.count == max(1, round(epochs * SWA_SHARE)), swa.count
    return averages, swa, curve


def metrics(model, split) -> dict:
    """Accuracy, negative log-likelihood and expected calibration error (15 equal-width confidence bins)."""
    model.eval()
    with torch.no_grad():
        logits = model(split[0])
    y = split[1]
    prob = logits.softmax(-1)
    conf, pred = prob.max(-1)
    correct = (pred == y).float()
    bins = torch.clamp((conf * 15).long(), max=14)
    ece = sum(
        float((bins == b).sum()) / len(y) * abs(float(correct[bins == b].mean() - conf[bins == b].mean()))
        for b in range(15)
        if (bins == b).any()
    )
    return {"acc": float(correct.mean()), "nll": float(F.cross_entropy(logits, y)), "ece": ece}


def evaluate(model, data) -> dict:
    return {s: metrics(model, data[s]) for s in SPLITS}


def run_seed(seed, epochs):
    """One data split, one initialisation, one batch order: both runs and their averages."""
    torch.set_num_threads(1)
    data = load_data(seed)
    torch.manual_seed(seed)
    init = mlp()
    rows, curves = {}, {}
    model = copy.deepcopy(init)
    emas, _, curves["cosine"] = train(model, data, schedule="cosine", epochs=epochs, seed=seed, emas=EMAS)
    rows["final weights, cosine"] = evaluate(model, data)
    for name, ema in emas.items():
        with ema.swapped():
            rows[f"{name}, cosine"] = evaluate(model, data)
    model = copy.deepcopy(init)
    emas, swa, curves["SWA schedule"] = train(model, data, schedule="swa", epochs=epochs, seed=seed, emas=EMAS,
                                              swa_on=True)  # fmt: skip
    rows["final weights, SWA schedule"] = evaluate(model, data)
    for name, ema in emas.items():
        with ema.swapped():
            rows[f"{name}, SWA schedule"] = evaluate(model, data)
    with swa.swapped():
        rows["SWA, before update_bn"] = evaluate(model, data)
    x = data["train"][0]
    swa.update_bn([x[i : i + BATCH] for i in range(0, len(x), BATCH)])
    with swa.swapped():
        rows["SWA (update_bn)"] = evaluate(model, data)
    return rows, curves


def tune_ema(epochs) -> None:
    """Validation NLL and accuracy of a sweep of EMAs tracked in both runs of seed 0."""
    torch.set_num_threads(1)
    data = load_data(0)
    sweep = {f"EMA {d}{' warm-up' if w else ''}": (d, w) for d, w in
             [(0.98, False), (0.99, False), (0.995, False), (0.998, False), (0.999, False), (0.999, True)]}  # fmt: skip
    for schedule in ("cosine", "swa"):
        torch.manual_seed(0)
        model = mlp()
        emas, _, _ = train(model, data, schedule=schedule, epochs=epochs, seed=0, emas=sweep)
        print(f"{schedule}: final weights: validation {metrics(model, data['val'])}")
        for name, ema in emas.items():
            with ema.swapped():
                print(f"{schedule}: {name}: validation {metrics(model, data['val'])}")


# -- the report -----------------------------------------------------------------------------------------------------
def mean_std(vals) -> str:
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f}"


def markdown(res) -> str:
    by_seed = res["by_seed"]
    swa_epochs = max(1, round(res["epochs"] * SWA_SHARE))
    lines = [
        "# Final weights, EMA and SWA on scikit-learn's digits",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s wall, {res['cpu_seconds']:.0f} s CPU, on "
        f"{res['machine']}, torch {res['torch']})",
        "",
        f"MLP 64-128-128-10 with BatchNorm; {res['epochs']} epochs of SGD (Nesterov 0.9, weight decay "
        f"{WEIGHT_DECAY}, batch {BATCH}), two runs per seed from the same initialisation and batch order: *cosine* "
        f"(lr {LR} → 0) and *SWA schedule* (lr {LR} → {SWA_LR} by cosine over {res['epochs'] - swa_epochs} epochs, "
        f"then {SWA_LR} constant; SWA over the weights at the end of each of the last {swa_epochs} epochs, then "
        "`update_bn`). EMAs, updated every step, BatchNorm statistics averaged too: decay 0.995 (the lowest "
        "validation NLL of a sweep, seed 0) and decay 0.999 with timm's warm-up (1 - (1 + n)^(-2/3), which stays "
        f"below 0.999 throughout: ~0.992 at the end). Mean ± std (sample) over {len(by_seed)} seeds (data split, "
        "initialisation, batch order). Shifted: the test set with every image moved by one pixel and Gaussian noise "
        f"added. One test image is {1 / res['test_size']:.4f} of accuracy.",
        "",
        "| model | test acc | test NLL | test ECE | shifted acc | shifted NLL | shifted ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in by_seed[0]:
        cells = [mean_std([r[name][s][m] for r in by_seed]) for s in SPLITS for m in ("acc", "nll", "ece")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "Differences per seed (test accuracy; test NLL):", ""]
    for a, b in (("EMA 0.995, cosine", "final weights, cosine"), ("EMA 0.999 warm-up, cosine", "final weights, cosine"),
                 ("SWA (update_bn)", "final weights, cosine"), ("SWA (update_bn)", "final weights, SWA schedule"),
                 ("SWA (update_bn)", "EMA 0.995, cosine")):  # fmt: skip
        acc = [r[a]["test"]["acc"] - r[b]["test"]["acc"] for r in by_seed]
        nll = [r[a]["test"]["nll"] - r[b]["test"]["nll"] for r in by_seed]
        lines.append(
            f"- {a} minus {b}: accuracy {', '.join(f'{d:+.3f}' for d in acc)} (mean {statistics.mean(acc):+.4f}); "
            f"NLL {', '.join(f'{d:+.3f}' for d in nll)} (mean {statistics.mean(nll):+.4f}, lower on "
            f"{sum(d < 0 for d in nll)} of {len(nll)} seeds)."
        )
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    epochs = range(1, res["epochs"] + 1)
    for run, style in (("cosine", "-"), ("SWA schedule", "--")):
        for arm in ("final weights", *EMAS):
            curves = [c[run][arm] for c in res["curves_by_seed"]]
            mean = [statistics.mean(v) for v in zip(*curves)]
            axes[0].plot(epochs, mean, style, label=f"{arm}, {run}")
    swa = [r["SWA (update_bn)"]["test"]["acc"] for r in res["by_seed"]]
    axes[0].plot([res["epochs"]], [statistics.mean(swa)], "k*", markersize=12, label="SWA (update_bn)")
    axes[0].set_ylim(0.9, 1.0)  # EMA 0.995 without warm-up is below 0.9 until epoch ~9 (the initial weights' share)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title(f"accuracy during training (mean of {len(res['by_seed'])} seeds)")
    axes[0].legend(fontsize=8)
    names = list(res["by_seed"][0])
    for ax, split in zip(axes[1:], SPLITS):
        for i, name in enumerate(names):
            vals = [r[name][split]["nll"] for r in res["by_seed"]]
            ax.scatter([i] * len(vals), vals, alpha=0.5, s=12)
            ax.errorbar(i + 0.2, statistics.mean(vals), yerr=statistics.stdev(vals) if len(vals) > 1 else 0, fmt="ks")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{split} NLL: seeds (dots), mean ± std (squares)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"1 seed, {QUICK_EPOCHS} epochs; nothing written")
    p.add_argument("--tune-ema", action="store_true", help="print the validation sweep that chose the EMA decay")
    args = p.parse_args(argv)
    start = time.perf_counter()
    # Tiny matrices: a second intra-op thread only adds waiting on a shared 2-core machine. Seeds run in parallel
    # processes instead.
    torch.set_num_threads(1)
    epochs, seeds = (QUICK_EPOCHS, 1) if args.quick else (EPOCHS, SEEDS)
    if args.tune_ema:
        tune_ema(epochs)
        return 0
    res = {
        "command": "python examples/averaging.py" + (" --quick" if args.quick else ""),
        "machine": results_io.machine(),
        "torch": torch.__version__,
        "epochs": epochs,
        "emas": {name: {"decay": d, "warmup": w} for name, (d, w) in EMAS.items()},
        "test_size": len(load_data(0)["test"][1]),
        "swa": {"lr": SWA_LR, "share": SWA_SHARE},
        "seeds": list(range(seeds)),
    }
    if seeds == 1:
        results = [run_seed(0, epochs)]
    else:
        results = results_io.map_seeds(run_seed, res["seeds"], epochs)
    res["by_seed"] = [rows for rows, _ in results]
    res["curves_by_seed"] = [curves for _, curves in results]
    res["seconds"] = time.perf_counter() - start
    res["cpu_seconds"] = results_io.cpu_seconds()
    text = markdown(res)
    print(text)
    if not args.quick:
        results_io.save("averaging", res, text, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ZSCL's weight ensemble in continual learning, in miniature, on scikit-learn's digits (pysoup.training).

A network is pretrained on digits 0-3 (task 0, the "pretrained ability" that ZSCL protects), then trained on a
sequence of new tasks, digits {4, 5}, then {6, 7}, then {8, 9}, without access to earlier tasks' data. Each task
starts from the weights the previous one ended with and is trained in one of four ways:

- fine-tune: plain training; the task ends with the last weights.
- fine-tune, half the epochs: the same with half the training, a plain control for what averaging costs in learning.
- weight ensemble (ZSCL, parameter space): `WeightEnsemble(model, every=I)` over the task's training, its first
  member the task's initial weights; the task ends with the ensemble's weights, which the next task starts from.
  I = EVERY steps: ~11 members per task, as ZSCL's default I = 100 over its 1,000 iterations per task.
- EMA: the same with an exponential moving average started from the task's initial weights, decay 1 - 2/T for T
  steps per task (its mean age, decay/(1 - decay) ~ T/2 steps, is that of the uniform average over the task).

The head is CLIP-like: logits are a scaled cosine similarity to one vector per class, so classes trained in different
tasks score on one scale. Each task trains with the cross-entropy over its own classes only (ZSCL trains CLIP
against the current task's class names). Measured on the test set after each task, on every task seen so far:
class-incremental accuracy (argmax over all classes seen so far) and task-incremental accuracy (argmax within the
task's own classes). At the end: average accuracy over all tasks, average forgetting (for each earlier task, its best
accuracy at any earlier point minus its final one), the pretraining task's final accuracy, and the new tasks'
accuracy just after learning them (plasticity: what the averages cost).

ZSCL also distils the initial model's features on a reference dataset (its feature-space part), and measures the
zero-shot accuracy of CLIP on tasks it was never trained on; neither is reproduced here: only the weight ensemble,
with the pretraining task standing in for the pretrained ability.

    python examples/continual.py            # 5 seeds in 2 processes; writes examples/results/continual.*
    python examples/continual.py --quick    # 1 seed, fewer epochs, nothing written (CI-sized)

The numbers are whatever this run measures, including where the ensemble does not help.
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

from pysoup.training import EMA, WeightEnsemble

TASKS = [(0, 1, 2, 3), (4, 5), (6, 7), (8, 9)]  # task 0: the pretraining
PRETRAIN_EPOCHS, EPOCHS, QUICK_EPOCHS, SEEDS, BATCH, LR = 30, 20, 2, 5, 32, 1e-3
EVERY = 14  # ~140 steps per task (20 epochs of ~215 images): 11 members, the initial weights included
CLASSES = [c for task in TASKS for c in task]
# The head's scale changes the verdict on average accuracy, not on forgetting (class-IL, 5 seeds, this script with
# only the head changed; fine-tune / half the epochs / weight ensemble / EMA): scale 16: average accuracy 0.568 /
# 0.520 / 0.470 / 0.512, forgetting 0.385 / 0.339 / 0.228 / 0.250. A linear head (each task's logits trained only
# against each other): a new task's class-IL accuracy just after learning it is 0.31 / 0.22 / 0.12 / 0.17, the old
# classes' logits dominate, and what class-IL then measures is the heads' calibration across tasks.
HEAD_SCALE = 10.0
# name: (averaging, share of the task's epochs). "fine-tune, half the epochs": a plain control for what an average
# over the task costs in learning (a uniform average over a task is T/2 steps old on average).
ARMS = {
    "fine-tune": (None, 1.0),
    "fine-tune, half the epochs": (None, 0.5),
    "weight ensemble": ("weight ensemble", 1.0),
    "EMA": ("EMA", 1.0),
}


# -- data -----------------------------------------------------------------------------------------------------------
def load_data(seed):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = len(y)
    cut = {"train": (0, n * 6 // 10), "test": (n * 6 // 10, n)}
    data = {}
    for split, (a, b) in cut.items():
        xs, ys = x[a:b], y[a:b]
        data[split] = [(xs[torch.isin(ys, torch.tensor(t))], ys[torch.isin(ys, torch.tensor(t))]) for t in TASKS]
    return data


class CosineHead(torch.nn.Module):
    """logits = scale * cos(features, class vector), as CLIP's (scaled cosine similarity to each class's text
    embedding): every class's logits on one scale, whichever task trained it."""

    def __init__(self, width, classes, scale):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(classes, width) / width**0.5)
        self.scale = scale

    def forward(self, x):
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        CosineHead(128, len(CLASSES), HEAD_SCALE),
    )


# -- training -------------------------------------------------------------------------------------------------------
def train_task(model, task, data, *, epochs, seed, averaging=None):
    """Trains `model` on one task; for the averaging arms, the model ends holding the task's average."""
    x, y = data
    classes = torch.tensor(TASKS[task])
    target = torch.searchsorted(classes, y)  # labels as positions among the task's classes
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)  # no decay: masked head rows stay put
    steps = epochs * math.ceil(len(y) / BATCH)
    average = None
    if averaging == "weight ensemble":
        average = WeightEnsemble(model, every=EVERY)
    elif averaging == "EMA":
        average = EMA(model, decay=1 - 2 / steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(x[idx])[:, classes], target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if average is not None:
                average.update()
    if average is not None:
        model.load_state_dict(average.state_dict_of_average())
    return average


def accuracies(model, tasks_test, seen) -> dict:
    """Class-incremental (argmax over the classes of tasks 0..seen) and task-incremental accuracy per task."""
    model.eval()
    classes = torch.tensor([c for t in TASKS[: seen + 1] for c in t])
    out = {"class-IL": [], "task-IL": []}
    with torch.no_grad():
        for task, (x, y) in enumerate(tasks_test[: seen + 1]):
            logits = model(x)
            out["class-IL"].append(float((classes[logits[:, classes].argmax(-1)] == y).float().mean()))
            own = torch.tensor(TASKS[task])
            out["task-IL"].append(float((own[logits[:, own].argmax(-1)] == y).float().mean()))
    return out


def run_seed(seed, quick):
    """One data split, pretraining and batch order; the three arms from the same pretrained weights."""
    torch.set_num_threads(1)
    data = load_data(seed)
    torch.manual_seed(seed)
    pretrained = mlp()
    train_task(pretrained, 0, data["train"][0], epochs=QUICK_EPOCHS if quick else PRETRAIN_EPOCHS, seed=seed)
    out = {}
    for arm, (averaging, share) in ARMS.items():
        model = copy.deepcopy(pretrained)
        matrix = [accuracies(model, data["test"], 0)]  # matrix[k][mode][j]: task j after task k
        members = []
        for task in range(1, len(TASKS)):
            epochs = max(1, round(share * (QUICK_EPOCHS if quick else EPOCHS)))
            average = train_task(model, task, data["train"][task], epochs=epochs, seed=seed * 100 + task,
                                 averaging=averaging)  # fmt: skip
            members.append(getattr(average, "members", None))
            matrix.append(accuracies(model, data["test"], task))
        out[arm] = {"matrix": matrix, "members": members}
    return out


# -- the report -----------------------------------------------------------------------------------------------------
def summary(matrix, mode) -> dict:
    """Average accuracy at the end, average forgetting of tasks 0..K-1, and new tasks' accuracy just after learning."""
    last = len(matrix) - 1
    final = matrix[last][mode]
    forgetting = [max(matrix[k][mode][j] for k in range(j, last)) - final[j] for j in range(last)]
    return {
        "average accuracy": statistics.mean(final),
        "average forgetting": statistics.mean(forgetting),
        "pretraining task, final": final[0],
        "new task, just learned": statistics.mean(matrix[k][mode][k] for k in range(1, last + 1)),
    }


def mean_std(vals) -> str:
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"


def markdown(res) -> str:
    by_seed = res["by_seed"]
    lines = [
        "# ZSCL's weight ensemble in continual learning on scikit-learn's digits",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s wall, {res['cpu_seconds']:.0f} s CPU, on "
        f"{res['machine']}, torch {res['torch']})",
        "",
        f"MLP 64-128-128-10 pretrained on digits 0-3 ({res['pretrain_epochs']} epochs), then tasks {{4, 5}}, "
        f"{{6, 7}}, {{8, 9}} in turn ({res['epochs']} epochs each, AdamW lr {LR}, batch {BATCH}, cross-entropy over "
        f"the task's own classes), without earlier data; head: {HEAD_SCALE:g} × cosine similarity to a vector per "
        f"class. Weight ensemble: every {EVERY} steps within each task, members per task "
        f"{by_seed[0]['weight ensemble']['members']} (the task's initial weights included), carried into the next "
        "task. EMA: decay 1 - 2/T over a task of T steps, started from the task's initial weights, carried likewise. "
        f"Mean ± std (sample) over {len(by_seed)} seeds (data split, pretraining, batch order). Forgetting: best "
        "earlier accuracy minus final, averaged over tasks 0-2. ZSCL's feature distillation is not reproduced.",
        "",
    ]
    for mode, what in (("class-IL", "argmax over all classes seen so far"),
                       ("task-IL", "argmax within the task's classes")):  # fmt: skip
        lines += [f"{mode} ({what}):", "", "| arm | average accuracy | average forgetting | pretraining task (0-3), "
                  "final | new task, just learned |", "|---|---|---|---|---|"]  # fmt: skip
        for arm in ARMS:
            rows = [summary(r[arm]["matrix"], mode) for r in by_seed]
            lines.append(f"| {arm} | " + " | ".join(mean_std([row[k] for row in rows]) for k in rows[0]) + " |")
        lines.append("")
    lines += ["Differences per seed, minus fine-tune (class-IL; task-IL in brackets):", ""]
    for arm in list(ARMS)[1:]:
        parts = []
        for key in ("average accuracy", "average forgetting", "pretraining task, final"):
            diffs = {m: [summary(r[arm]["matrix"], m)[key] - summary(r["fine-tune"]["matrix"], m)[key] for r in by_seed]
                     for m in ("class-IL", "task-IL")}  # fmt: skip
            per_seed = ", ".join(f"{c:+.3f} [{t:+.3f}]" for c, t in zip(diffs["class-IL"], diffs["task-IL"]))
            better = sum((d > 0) == (key != "average forgetting") and d != 0 for d in diffs["class-IL"])
            parts.append(f"{key} {per_seed} (class-IL better on {better} of {len(by_seed)})")
        lines.append(f"- {arm}: " + "; ".join(parts) + ".")
    lines += ["", "Class-IL accuracy on each task after each task (mean over seeds; rows: after task k):", ""]
    for arm in ARMS:
        lines += [f"{arm}:", "", "| after | " + " | ".join(f"task {j} {TASKS[j]}" for j in range(len(TASKS))) + " |",
                  "|---" * (len(TASKS) + 1) + "|"]  # fmt: skip
        for k in range(len(TASKS)):
            cells = [statistics.mean(r[arm]["matrix"][k]["class-IL"][j] for r in by_seed) for j in range(k + 1)]
            lines.append(
                f"| task {k} | " + " | ".join([f"{c:.3f}" for c in cells] + [""] * (len(TASKS) - k - 1)) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_seed = res["by_seed"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    after = range(len(TASKS))
    for arm, color in zip(ARMS, ("C0", "C7", "C1", "C2")):
        pre = [[r[arm]["matrix"][k]["class-IL"][0] for r in by_seed] for k in after]
        avg = [[statistics.mean(r[arm]["matrix"][k]["class-IL"]) for r in by_seed] for k in after]
        for ax, vals in ((axes[0], pre), (axes[1], avg)):
            ax.errorbar(after, [statistics.mean(v) for v in vals], marker="o", color=color, label=arm, capsize=3,
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals])  # fmt: skip
        rows = [summary(r[arm]["matrix"], "class-IL") for r in by_seed]
        axes[2].scatter([row["new task, just learned"] for row in rows], [row["average forgetting"] for row in rows],
                        color=color, label=arm, alpha=0.7)  # fmt: skip
    for ax, title in ((axes[0], "pretraining task (digits 0-3)"), (axes[1], "average over the tasks seen so far")):
        ax.set_xticks(after, [f"after task {k}" for k in after])
        ax.set_ylabel("class-IL test accuracy")
        ax.set_title(f"{title}: mean ± std of {len(by_seed)} seeds", fontsize=10)
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    axes[2].set_xlabel("class-IL accuracy of a new task just after it (mean of tasks 1-3)")
    axes[2].set_ylabel("average forgetting at the end")
    axes[2].set_title("plasticity vs forgetting, one dot per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"1 seed, {QUICK_EPOCHS} epochs per task; nothing written")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)  # tiny matrices: seeds run in parallel processes instead
    seeds = 1 if args.quick else SEEDS
    res = {
        "command": "python examples/continual.py" + (" --quick" if args.quick else ""),
        "machine": results_io.machine(),
        "torch": torch.__version__,
        "tasks": TASKS,
        "pretrain_epochs": QUICK_EPOCHS if args.quick else PRETRAIN_EPOCHS,
        "epochs": QUICK_EPOCHS if args.quick else EPOCHS,
        "every": EVERY,
        "seeds": list(range(seeds)),
    }
    if seeds == 1:
        res["by_seed"] = [run_seed(0, args.quick)]
    else:
        res["by_seed"] = results_io.map_seeds(run_seed, res["seeds"], False)
    res["seconds"] = time.perf_counter() - start
    res["cpu_seconds"] = results_io.cpu_seconds()
    text = markdown(res)
    print(text)
    if not args.quick:
        results_io.save("continual", res, text, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

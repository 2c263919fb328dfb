"""Experts Weights Averaging (EWA) on scikit-learn's digits: a small vision transformer trained plainly, against the
same transformer trained with its feed-forward blocks as random-uniform mixtures of experts, the share step after
every optimizer step, and the experts collapsed into one block at the end (pysoup.training.experts).

The transformer: the 8x8 image cut into 4 patches of 4x4 pixels, a class token, 2 pre-norm layers of width 32
(4 heads, feed-forward 32-64-32), a linear head (16 patches of 2x2 cost 1.7x the time for lower accuracy at 20
epochs: 0.944 against 0.972 test, one seed). EWA: the feed-forward block of both layers becomes 4 experts,
share rate 0.3. Both arms start from the same initial weights and see the same batches, with the same optimizer
(AdamW, lr 3e-3 with a cosine decay, weight decay 0.05) and the same number of epochs; each seed draws its own
data split (60% train, 20% validation, 20% test), initialisation and batch order. Also measured: the mixture
before collapsing (random routing in eval, as trained), and the mixture trained without the share step
(share rate 0) then collapsed, which is what EWA's averaging is there to make work.

    python examples/ewa_digits.py            # 5 seeds in 2 processes; writes examples/results/ewa_digits.*
    python examples/ewa_digits.py --quick    # 1 seed, 3 epochs, nothing written (CI-sized)

The numbers are whatever this run measures, including where EWA does not beat plain training.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import results_io
import torch
import torch.nn.functional as F

from pysoup.training.experts import ExpertsWeightsAveraging, collapse_experts, convert_to_experts, experts_blocks

HERE = os.path.dirname(os.path.abspath(__file__))
EXPERTS, SHARE_RATE, EWA_MODULES = 4, 0.3, ["layers.0.mlp", "layers.1.mlp"]
EPOCHS, QUICK_EPOCHS, SEEDS, BATCH = 20, 3, 5, 64


# -- data -----------------------------------------------------------------------------------------------------------
def load_data(seed):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = len(y)
    cut = {"train": (0, n * 6 // 10), "val": (n * 6 // 10, n * 8 // 10), "test": (n * 8 // 10, n)}
    return {k: (x[a:b], y[a:b]) for k, (a, b) in cut.items()}


# -- model ----------------------------------------------------------------------------------------------------------
class Layer(torch.nn.Module):
    def __init__(self, width, heads, hidden):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(torch.nn.Module):
    """[batch, 8, 8] images -> 10 logits; (8 / patch)^2 patch tokens and a class token."""

    def __init__(self, patch=4, width=32, depth=2, heads=4, hidden=64):
        super().__init__()
        self.patch = patch
        tokens = (8 // patch) ** 2
        self.embed = torch.nn.Linear(patch * patch, width)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.pos = torch.nn.Parameter(0.02 * torch.randn(1, tokens + 1, width))
        self.layers = torch.nn.ModuleList(Layer(width, heads, hidden) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 10)

    def forward(self, images):
        p = self.patch
        b = images.shape[0]
        patches = images.unfold(1, p, p).unfold(2, p, p).reshape(b, -1, p * p)
        x = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], 1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x[:, 0]))


def train(model, data, *, epochs, seed, share_rate=None):
    """AdamW with a cosine decay; with `share_rate`, EWA's share step after every optimizer step."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * math.ceil(len(y) / BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    ewa = None if share_rate is None else ExpertsWeightsAveraging(model, share_rate=share_rate)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if ewa is not None:
                ewa.step()
    return model


def accuracy(model, data):
    model.eval()
    with torch.no_grad():
        return float((model(data[0]).argmax(-1) == data[1]).float().mean())


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_seed(seed, epochs):
    """One data split, one initialisation, one batch order: the four arms."""
    data = load_data(seed)
    torch.manual_seed(seed)
    init = ViT()
    rows, spread = {}, {}
    plain = train(copy.deepcopy(init), data["train"], epochs=epochs, seed=seed)
    rows["plain ViT"] = {s: accuracy(plain, data[s]) for s in ("val", "test")}
    params = {"plain": parameters(plain)}
    for name, rate in ((f"EWA (share {SHARE_RATE})", SHARE_RATE), ("MoE, no share step", 0.0)):
        model = convert_to_experts(copy.deepcopy(init), EWA_MODULES, num_experts=EXPERTS, seed=seed)
        params["training, mixture"] = parameters(model)
        train(model, data["train"], epochs=epochs, seed=seed, share_rate=rate)
        if rate:  # the mixture as trained, random routing in eval
            rows[f"{name}, before collapse"] = {s: accuracy(model, data[s]) for s in ("val", "test")}
        spread[name] = expert_spread(model)
        collapse_experts(model)
        params["after collapse"] = parameters(model)
        assert params["after collapse"] == params["plain"], "collapse must give back the plain architecture"
        assert list(model.state_dict()) == list(init.state_dict())
        rows[f"{name}, collapsed"] = {s: accuracy(model, data[s]) for s in ("val", "test")}
    return rows, params, spread


def expert_spread(model) -> float:
    """How far the experts are from their mean at the end: sum_i ||W_i - M|| / (N ||M||) over all their tensors."""
    diff = norm = 0.0
    for block in experts_blocks(model).values():
        for ws in zip(*(e.parameters() for e in block.experts)):
            stack = torch.stack([w.detach() for w in ws])
            mean = stack.mean(0)
            diff += float(sum((w - mean).norm() for w in stack)) / len(ws)
            norm += float(mean.norm())
    return diff / norm


def markdown(res) -> str:
    seeds = res["seeds"]
    lines = [
        "# Experts Weights Averaging on scikit-learn's digits",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s wall, {res['cpu_seconds']:.0f} s CPU, on "
        f"{res['machine']}, torch {res['torch']})",
        "",
        f"ViT: 4 patches of 4x4 pixels + a class token, 2 layers, width 32, 4 heads, feed-forward 64; "
        f"{res['epochs']} epochs of AdamW (lr 3e-3, cosine, weight decay 0.05), batch {BATCH}. EWA: both "
        f"feed-forward blocks as {EXPERTS} experts with the random uniform router, share rate {SHARE_RATE} after "
        f"every optimizer step, collapsed to their mean at the end. Accuracy, mean ± std (sample) over "
        f"{len(seeds)} seeds (data split, initialisation, batch order; both arms share them):",
        "",
        "| model | validation | test | test per seed |",
        "|---|---|---|---|",
    ]
    for name in res["by_seed"][0]:
        cells = []
        for s in ("val", "test"):
            vals = [r[name][s] for r in res["by_seed"]]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {std:.4f}")
        per_seed = ", ".join(f"{r[name]['test']:.3f}" for r in res["by_seed"])
        lines.append(f"| {name} | {' | '.join(cells)} | {per_seed} |")
    p = res["parameters"]
    diff = [r[f"EWA (share {SHARE_RATE}), collapsed"]["test"] - r["plain ViT"]["test"] for r in res["by_seed"]]
    lines += [
        "",
        f"Parameters: plain {p['plain']:,}; with the mixtures while training {p['training, mixture']:,}; after "
        f"collapse {p['after collapse']:,} (the plain architecture, the same state_dict keys: equal inference cost "
        "by construction).",
        "",
        "Experts' distance from their mean at the end of training, sum_i ||W_i - M|| / (N ||M||) over their "
        "tensors, per seed: "
        + "; ".join(
            f"{name} " + ", ".join(f"{sp[name]:.2g}" for sp in res["expert_spread_by_seed"])
            for name in res["expert_spread_by_seed"][0]
        )
        + ".",
        "",
        f"EWA collapsed minus plain, test accuracy per seed: {', '.join(f'{d:+.3f}' for d in diff)} "
        f"(mean {statistics.mean(diff):+.4f}; EWA better on {sum(d > 0 for d in diff)} of {len(diff)} seeds, "
        f"worse on {sum(d < 0 for d in diff)}).",
    ]
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["by_seed"][0])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for j, name in enumerate(names):
        vals = [r[name]["test"] for r in res["by_seed"]]
        ax.scatter([j] * len(vals), vals, alpha=0.6)
        ax.errorbar(j + 0.15, statistics.mean(vals), yerr=statistics.stdev(vals) if len(vals) > 1 else 0, fmt="ks")
    ax.set_xticks(range(len(names)), [n.replace(", ", ",\n") for n in names], fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"EWA on digits: {len(res['by_seed'])} seeds (dots), mean ± std (squares)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"1 seed, {QUICK_EPOCHS} epochs; nothing written")
    args = p.parse_args(argv)
    start = time.perf_counter()
    # Tiny matrices: a second intra-op thread only adds waiting (2 epochs of the plain ViT at patch 2 on a loaded
    # 2-core machine: 0.64 s per epoch with 1 thread, 17.8 s with 2). Seeds run in parallel processes instead.
    torch.set_num_threads(1)
    epochs, seeds = (QUICK_EPOCHS, 1) if args.quick else (EPOCHS, SEEDS)
    res = {
        "command": "python examples/ewa_digits.py" + (" --quick" if args.quick else ""),
        "machine": results_io.machine(),
        "torch": torch.__version__,
        "epochs": epochs,
        "experts": EXPERTS,
        "share_rate": SHARE_RATE,
        "modules": EWA_MODULES,
        "seeds": list(range(seeds)),
    }
    if seeds == 1:
        results = [run_seed(0, epochs)]
    else:
        results = results_io.map_seeds(run_seed, res["seeds"], epochs)
    res["by_seed"] = [rows for rows, _, _ in results]
    res["parameters"] = results[0][1]
    res["expert_spread_by_seed"] = [spread for _, _, spread in results]
    res["seconds"] = time.perf_counter() - start
    res["cpu_seconds"] = results_io.cpu_seconds()
    text = markdown(res)
    print(text)
    if not args.quick:
        results_io.save("ewa_digits", res, text, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

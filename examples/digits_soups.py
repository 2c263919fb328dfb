"""A small, real reproduction of the papers' claims on scikit-learn's bundled digits (8x8 images, no download).

1. Model soups: pretrain an MLP, fine-tune it 12 ways (learning rate, weight decay, seed, augmentation, label
   smoothing), then compare the best single model, the uniform soup, the greedy soup, the learned soup and the
   ensemble of all, on held-out validation, test, and a shifted test set (noise + 1-pixel translations).
2. Sparse soups: prune the pretrained model to 85% sparsity, retrain copies with varied hyperparameters on the
   fixed mask, average them with strategy="sparse"; the zero pattern is kept exactly.
3. LCSC: checkpoints saved along one training run, combined by the evolutionary search, against the final one.
4. One basin or not: the interpolation curve between two fine-tunes of one pretrained model, and between two
   models trained from different random initializations, with `pysoup.diagnose` for both.

    python examples/digits_soups.py            # ~2 minutes on 2 cores; writes examples/results/digits.{json,md,png}
    python examples/digits_soups.py --quick    # the CI-sized run (seconds), results not written

The numbers are whatever this run measures, including where a soup does not beat the best single model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import pysoup

HERE = os.path.dirname(os.path.abspath(__file__))


# -- data --------------------------------------------------------------------------------------------------
def load_data(seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n = len(y)
    # pretrain on digits 0-9 half; fine-tune / validate / test on disjoint parts
    split = {"pre": (0, n * 3 // 10), "ft": (n * 3 // 10, n * 6 // 10), "val": (n * 6 // 10, n * 8 // 10),
             "test": (n * 8 // 10, n)}  # fmt: skip
    data = {k: (x[a:b], y[a:b]) for k, (a, b) in split.items()}
    data["shift"] = (shift(data["test"][0], seed=seed + 1), data["test"][1])
    return data


def shift(x, seed=0):
    """A distribution shift: each image moved by one pixel in a random direction, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    imgs = x.view(-1, 8, 8)
    dx = torch.randint(-1, 2, (len(x),), generator=g)
    dy = torch.randint(-1, 2, (len(x),), generator=g)
    out = torch.stack([torch.roll(im, shifts=(int(a), int(b)), dims=(0, 1)) for im, a, b in zip(imgs, dy, dx)])
    return (out.view(-1, 64) + 0.1 * torch.randn(out.view(-1, 64).shape, generator=g)).clamp(0, 1.5)


def augment(x, g):
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1.5)


# -- model ---------------------------------------------------------------------------------------------------
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 128), torch.nn.Linear(128, 128)])
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


def train(model, data, *, epochs, lr, wd=0.0, seed=0, aug=False, smoothing=0.0, mask=None, checkpoints=None):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    for _epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 32):
            idx = perm[i : i + 32]
            xb = augment(x[idx], g) if aug else x[idx]
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mask is not None:  # sparse retraining: pruned weights stay exactly zero
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if name in mask:
                            p.mul_(mask[name])
        if checkpoints is not None:
            checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model


def accuracy_of(sd, data):
    model = MLP()
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    with torch.no_grad():
        return float((model(data[0]).argmax(-1) == data[1]).float().mean())


def evaluator(data):
    return lambda sd: accuracy_of(sd, data)


# -- the experiments ---------------------------------------------------------------------------------------------
def soups(data, pre, quick, seed_offset=0):
    grid = [
        dict(lr=lr, wd=wd, seed=seed + 100 * seed_offset, aug=aug, smoothing=sm)
        for lr, wd, seed, aug, sm in [
            (3e-3, 0.0, 0, False, 0.0), (1e-3, 0.0, 1, False, 0.0), (3e-3, 1e-2, 2, False, 0.0),
            (1e-3, 1e-2, 3, True, 0.0), (3e-3, 0.0, 4, True, 0.1), (1e-3, 1e-3, 5, False, 0.1),
            (5e-3, 0.0, 6, False, 0.0), (2e-3, 1e-2, 7, True, 0.1), (3e-3, 1e-3, 8, False, 0.2),
            (1e-3, 0.0, 9, True, 0.0), (5e-3, 1e-2, 10, True, 0.1), (2e-3, 0.0, 11, False, 0.05),
        ]
    ]  # fmt: skip
    epochs = 2 if quick else 8
    fts = []
    for h in grid[: 4 if quick else len(grid)]:
        m = MLP()
        m.load_state_dict(pre)
        fts.append({k: v.detach().clone() for k, v in train(m, data["ft"], epochs=epochs, **h).state_dict().items()})
    splits = ("val", "test", "shift")
    rows = {}
    singles = {s: [accuracy_of(sd, data[s]) for sd in fts] for s in splits}
    best = max(range(len(fts)), key=lambda i: singles["val"][i])
    rows["best single (by val)"] = {s: singles[s][best] for s in splits}
    uniform = pysoup.merge(fts, strategy="uniform")
    rows["uniform soup"] = {s: accuracy_of(uniform, data[s]) for s in splits}
    greedy = pysoup.greedy_soup(fts, evaluator(data["val"]))
    rows["greedy soup"] = {s: accuracy_of(greedy.state_dict, data[s]) for s in splits}
    val_batches = [(data["val"][0][i : i + 64], data["val"][1][i : i + 64]) for i in range(0, len(data["val"][1]), 64)]
    learned = pysoup.learned_soup(fts, MLP(), F.cross_entropy, val_batches, epochs=2 if quick else 5)
    rows["learned soup"] = {s: accuracy_of(learned.state_dict, data[s]) for s in splits}
    nets = []
    for sd in fts:
        m = MLP()
        m.load_state_dict(sd)
        nets.append(m)
    rows["ensemble of all"] = {
        s: float((pysoup.ensemble(nets, data[s][0]).argmax(-1) == data[s][1]).float().mean()) for s in splits
    }
    info = {"fine_tunes": len(fts), "greedy_members": greedy.members, "individual_val": singles["val"],
            "learned_coefficients_head": learned.coefficients.get("head.weight")}  # fmt: skip
    return rows, info, fts


def sparse_soup(data, pre, quick, tmp):
    """Prune to 85% sparsity by magnitude (per weight matrix), retrain copies on the fixed mask, soup them."""
    mask = {}
    sparse_pre = {}
    for k, v in pre.items():
        if k.endswith("weight"):
            thr = v.abs().flatten().kthvalue(int(0.85 * v.numel())).values
            mask[k] = (v.abs() > thr).float()
            sparse_pre[k] = v * mask[k]
        else:
            sparse_pre[k] = v.clone()
    copies = []
    for lr, seed in [(3e-3, 0), (1e-3, 1), (2e-3, 2), (3e-3, 3), (1e-3, 4)][: 3 if quick else 5]:
        m = MLP()
        m.load_state_dict(sparse_pre)
        train(m, data["ft"], epochs=2 if quick else 8, lr=lr, seed=seed, mask=mask)
        copies.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    paths = []
    from safetensors.torch import save_file

    for i, sd in enumerate(copies):
        p = os.path.join(tmp, f"sparse{i}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, p)
        paths.append(p)
    out = os.path.join(tmp, "sparse_soup.safetensors")
    report = pysoup.merge(paths, out, strategy="sparse", progress=False)
    with pysoup.open(out) as ckpt:
        soup = {k: ckpt[k].clone() for k in ckpt.keys()}
    kept = all(torch.equal(soup[k] == 0, copies[0][k] == 0) for k in mask)
    weight_sparsity = float(sum(int((soup[k] == 0).sum()) for k in mask) / sum(soup[k].numel() for k in mask))
    return {
        "copies_test": [accuracy_of(sd, data["test"]) for sd in copies],
        "soup_test": accuracy_of(soup, data["test"]),
        "copies_shift": [accuracy_of(sd, data["shift"]) for sd in copies],
        "soup_shift": accuracy_of(soup, data["shift"]),
        "weight_sparsity": weight_sparsity,
        "zero_pattern_kept_exactly": kept,
        "reported_sparsity_all_tensors": report.stats["sparsity"],
    }


def lcsc(data, quick):
    """Checkpoints along one run from scratch: LCSC coefficients vs the final checkpoint."""
    ckpts = []
    torch.manual_seed(42)
    m = MLP()
    train(m, data["ft"], epochs=4 if quick else 12, lr=3e-3, seed=42, checkpoints=ckpts)
    last = ckpts[-6:]
    res = pysoup.lcsc_search(
        last, evaluator(data["val"]), population=6 if quick else 16, generations=3 if quick else 20, seed=0, sigma=0.2
    )
    return {
        "final_val": accuracy_of(last[-1], data["val"]), "final_test": accuracy_of(last[-1], data["test"]),
        "lcsc_val": res.score, "lcsc_test": accuracy_of(res.state_dict, data["test"]),
        "coefficients": [round(c, 3) for c in res.coefficients],
    }  # fmt: skip


def basins(data, pre, fts, quick):
    """Fine-tunes of one pretrained model vs two models from different random initializations."""
    points = 5 if quick else 11
    same = pysoup.interpolation_curve(fts[0], fts[1], evaluator(data["test"]), points=points)
    scratch = []
    for seed in (100, 101):
        torch.manual_seed(seed)
        m = MLP()
        train(m, data["ft"], epochs=4 if quick else 15, lr=3e-3, seed=seed)
        scratch.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    apart = pysoup.interpolation_curve(scratch[0], scratch[1], evaluator(data["test"]), points=points)
    d_same = pysoup.diagnose(fts[:2], base=pre)
    d_apart = pysoup.diagnose(scratch, base=pre)  # task vectors from the same point, for comparison
    return {
        "fine_tunes": {"alphas": same.alphas, "test_acc": same.scores, "barrier": same.barrier,
                       "diagnose": d_same.overall},
        "different_inits": {"alphas": apart.alphas, "test_acc": apart.scores, "barrier": apart.barrier,
                            "diagnose": d_apart.overall},
    }  # fmt: skip


def markdown(res) -> str:
    n = len(res["soups_by_seed"])
    lines = ["# Model soups on scikit-learn's digits", "", f"Command: `python examples/digits_soups.py` "
             f"({res['seconds']:.0f} s on {res['machine']})", "",
             f"{res['soups_info']['fine_tunes']} fine-tunes of one pretrained MLP (64-128-128-10); accuracy, mean over "
             f"{n} data splits and seeds (min-max in brackets):", "",
             "| model | validation | test | shifted test |", "|---|---|---|---|"]  # fmt: skip
    for name in res["soups"]:
        cells = []
        for s in ("val", "test", "shift"):
            vals = [r[name][s] for r in res["soups_by_seed"]]
            cells.append(f"{sum(vals) / n:.4f} [{min(vals):.3f}-{max(vals):.3f}]")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    s = res["sparse"]
    copies_test = ", ".join(f"{a:.4f}" for a in s["copies_test"])
    copies_shift = ", ".join(f"{a:.4f}" for a in s["copies_shift"])
    lines += [
        "",
        f"Greedy soup members (best first): {res['soups_info']['greedy_members']}.",
        "",
        f"Sparse soup: {len(s['copies_test'])} copies retrained on one 85% mask (weights "
        f"{s['weight_sparsity']:.2%} zero; pattern kept exactly: {s['zero_pattern_kept_exactly']}). Test accuracy of "
        f"the copies {copies_test}; of the soup {s['soup_test']:.4f}. Shifted test: copies {copies_shift}; soup "
        f"{s['soup_shift']:.4f}.",
        "",
    ]
    lc = res["lcsc"]
    lines += [f"LCSC over the last 6 epoch checkpoints of one run: final checkpoint val {lc['final_val']:.4f} / test "
              f"{lc['final_test']:.4f}; LCSC val {lc['lcsc_val']:.4f} / test {lc['lcsc_test']:.4f}; coefficients "
              f"{lc['coefficients']}.", ""]  # fmt: skip
    b = res["basins"]
    for key, label in (
        ("fine_tunes", "two fine-tunes of one pretrained model"),
        ("different_inits", "two models from different random inits"),
    ):
        d = b[key]["diagnose"]
        lines.append(f"Interpolation between {label}: test accuracy {[round(a, 3) for a in b[key]['test_acc']]}, "
                     f"barrier {b[key]['barrier']:.4f}; task-vector cosine {d['cosine']:.3f}, sign agreement "
                     f"{d['sign_agreement']:.3f}, norm ratio {d['norm_ratio']:.3f}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = list(res["soups"])
    splits = ["val", "test", "shift"]
    runs = res["soups_by_seed"]

    def mean(n, s):
        return sum(r[n][s] for r in runs) / len(runs)

    for i, s in enumerate(splits):
        axes[0].bar([j + i * 0.27 for j in range(len(names))], [mean(n, s) for n in names], 0.27, label=s)
    axes[0].set_xticks([j + 0.27 for j in range(len(names))], names, rotation=20, ha="right")
    lo = min(mean(n, s) for n in names for s in splits)
    axes[0].set_ylim(max(0.0, lo - 0.05), 1.0)
    axes[0].set_title(f"accuracy (mean of {len(runs)} splits)")
    axes[0].legend(loc="center right", fontsize=8)
    for key, label in (("fine_tunes", "fine-tunes of one model"), ("different_inits", "different inits")):
        axes[1].plot(res["basins"][key]["alphas"], res["basins"][key]["test_acc"], marker="o", label=label)
    axes[1].set_xlabel("alpha")
    axes[1].set_ylabel("test accuracy")
    axes[1].set_title("interpolation curves")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    import platform
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: fewer models and epochs; nothing written")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(2)
    data = load_data()
    torch.manual_seed(0)  # torch's global generator starts from a random seed: every init must be seeded
    pre_model = MLP()
    train(pre_model, data["pre"], epochs=5 if args.quick else 30, lr=3e-3, seed=0)
    pre = {k: v.detach().clone() for k, v in pre_model.state_dict().items()}
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    res["soups"], res["soups_info"], fts = soups(data, pre, args.quick)
    res["soups_by_seed"] = [res["soups"]]
    for seed in range(1, 1 if args.quick else 3):  # two more data splits, pretrainings and fine-tune seeds
        d = load_data(seed)
        torch.manual_seed(seed)
        m = MLP()
        train(m, d["pre"], epochs=30, lr=3e-3, seed=seed)
        rows, _, _ = soups(d, {k: v.detach().clone() for k, v in m.state_dict().items()}, args.quick, seed)
        res["soups_by_seed"].append(rows)
    with tempfile.TemporaryDirectory() as tmp:
        res["sparse"] = sparse_soup(data, pre, args.quick, tmp)
    res["lcsc"] = lcsc(data, args.quick)
    res["basins"] = basins(data, pre, fts, args.quick)
    res["seconds"] = time.perf_counter() - start
    text = markdown(res)
    print(text)
    assert res["sparse"]["zero_pattern_kept_exactly"], "the sparse soup changed the zero pattern"
    assert res["soups"]["greedy soup"]["val"] >= max(res["soups_info"]["individual_val"]) - 1e-12
    if not args.quick:
        out = os.path.join(HERE, "results")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "digits.json"), "w") as f:
            json.dump(res, f, indent=2, default=float)
        with open(os.path.join(out, "digits.md"), "w") as f:
            f.write(text)
        plot(res, os.path.join(out, "digits.png"))
        print(f"wrote {out}/digits.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())

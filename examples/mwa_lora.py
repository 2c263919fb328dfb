"""Metrics-Weighted Averaging of LoRA checkpoints along one fine-tuning run, on scikit-learn's digits (the MWA
paper in spirit: weights from each checkpoint's training loss or step, one penalty hyperparameter).

A small MLP (64-128-128-10) is pretrained on the digits 0-4; LoRA adapters (rank 4, alpha 8, on all three linear
layers; A initialised as PEFT does, kaiming-uniform, B zero) are then fine-tuned on the digits 5-9, with a checkpoint
every CHECKPOINT_EVERY steps saved as a Hugging Face Trainer checkpoint folder of a PEFT run would be:
`checkpoint-<step>/` holding a PEFT adapter directory (adapter_model.safetensors in PEFT's key layout,
adapter_config.json) and a `trainer_state.json` with the fields the Trainer writes that MWA reads (global_step,
log_history holding the mean training loss of every LOG_EVERY steps). The LoRA layers are written here rather than
imported from PEFT so that the CI-sized run stays a few seconds (importing peft costs ~9 CPU seconds);
tests/test_lora.py checks pysoup's adapter I/O against PEFT itself and its trainer_state reading against
transformers' TrainerState. Compared, on held-out digits 5-9 (and 0-4, to see what the adapters
cost the old task):

- the final checkpoint;
- the uniform average of the checkpoints (MWA with penalty 0), as PEFT factors (A's and B's averaged: the
  checkpoint averaging the paper does) and as the exact average of the updates (pysoup's delta mode);
- MWA by training loss and by step (pysoup.weights.mwa over the checkpoint folders), penalty swept, factors mode.

Every merge runs through pysoup (pysoup.merge(..., lora=...)); every merged adapter is folded into the base with
pysoup.lora.fold and evaluated. Each seed draws its own data split, initialisation and batch order.

    python examples/mwa_lora.py            # 5 seeds in 2 processes; writes examples/results/mwa_lora.*
    python examples/mwa_lora.py --quick    # 1 seed, a short run, nothing written (CI-sized)

The numbers are whatever this run measures, including where MWA does not beat the final checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import results_io
import torch
import torch.nn.functional as F

PRETRAIN_STEPS, STEPS, CHECKPOINT_EVERY, LOG_EVERY, BATCH = 300, 400, 40, 10, 32
QUICK = {"pretrain": 60, "steps": 60, "every": 20}
PENALTIES = [0.5, 1.0, 2.0, 4.0]
SEEDS = 5
RANK, ALPHA, LR = 4, 8, 0.01
LORA_MODULES = ["fc1", "fc2", "head"]


# -- data and model -------------------------------------------------------------------------------------------------
def load_data(seed):
    """Digits 0-4 (pretraining: train) and 5-9 (fine-tuning: train / validation / test), and the 0-4 test set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    old, new = y < 5, y >= 5
    xo, yo, xn, yn = x[old], y[old], x[new], y[new]
    no, nn = len(yo), len(yn)
    return {
        "old_train": (xo[: no * 7 // 10], yo[: no * 7 // 10]),
        "old_test": (xo[no * 7 // 10 :], yo[no * 7 // 10 :]),
        "train": (xn[: nn // 2], yn[: nn // 2]),
        "val": (xn[nn // 2 : nn * 7 // 10], yn[nn // 2 : nn * 7 // 10]),
        "test": (xn[nn * 7 // 10 :], yn[nn * 7 // 10 :]),
    }


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 128)
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LoraLinear(torch.nn.Module):
    """y = W x + b + (alpha / r) B A x, W and b frozen: PEFT's lora.Linear (its init: A kaiming-uniform, B zero)."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def add_lora(model: MLP) -> list:
    """Wraps fc1, fc2 and head in LoraLinear; returns the trainable parameters."""
    for name in LORA_MODULES:
        setattr(model, name, LoraLinear(getattr(model, name), RANK, ALPHA))
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(model: MLP, path: str) -> None:
    """The adapter as PEFT saves it: base_model.model.<module>.lora_{A,B}.weight, and its adapter_config.json."""
    from safetensors.torch import save_file

    os.makedirs(path)
    tensors = {}
    for name in LORA_MODULES:
        layer = getattr(model, name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().clone()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": LORA_MODULES, "bias": "none",
              "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": None,
              "task_type": None, "inference_mode": True}  # fmt: skip
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def save_trainer_state(path: str, step: int, history: list) -> None:
    """trainer_state.json with the Trainer's field names (TrainerState.save_to_json: sorted keys, indent 2)."""
    state = {"global_step": step, "log_history": history, "max_steps": 0, "epoch": history[-1]["epoch"] if history
             else 0.0, "best_metric": None, "best_model_checkpoint": None, "is_world_process_zero": True}  # fmt: skip
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")


def accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def batches(data, steps, seed):
    x, y = data
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (BATCH,), generator=g)
        yield x[idx], y[idx]


# -- one seed -------------------------------------------------------------------------------------------------------
def run_seed(seed, cfg):
    with tempfile.TemporaryDirectory(prefix="mwa-lora-") as work:
        return _run_seed(seed, cfg, work)


def _run_seed(seed, cfg, work):
    from safetensors.torch import load_file, save_file

    import pysoup
    from pysoup.lora import fold

    torch.manual_seed(seed)
    data = load_data(seed)
    base = MLP()
    opt = torch.optim.Adam(base.parameters(), lr=1e-3)
    for xb, yb in batches(data["old_train"], cfg["pretrain"], seed):
        opt.zero_grad()
        F.cross_entropy(base(xb), yb).backward()
        opt.step()
    base_file = os.path.join(work, "base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_file)
    base_acc = {"old": accuracy(base, data["old_test"]), "test": accuracy(base, data["test"])}

    model = MLP()
    model.load_state_dict(base.state_dict())
    opt = torch.optim.SGD(add_lora(model), lr=LR, momentum=0.9)
    run = os.path.join(work, "run")
    history, window, checkpoints = [], [], []
    for step, (xb, yb) in enumerate(batches(data["train"], cfg["steps"], seed + 1000), start=1):
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if step % LOG_EVERY == 0:  # the Trainer logs the mean loss since its last log
            history.append(
                {"loss": sum(window) / len(window), "step": step, "epoch": step * BATCH / len(data["train"][1])}
            )
            window = []
        if step % cfg["every"] == 0:
            path = os.path.join(run, f"checkpoint-{step}")
            save_adapter(model, path)
            save_trainer_state(path, step, list(history))
            checkpoints.append(path)

    def evaluate(adapter) -> dict:
        out = os.path.join(work, "folded.safetensors")
        fold(base_file, [adapter], out)
        m = MLP()
        m.load_state_dict(load_file(out))
        return {
            "val": accuracy(m, data["val"]),
            "test": accuracy(m, data["test"]),
            "old": accuracy(m, data["old_test"]),
        }

    def merged(name, weights, mode="factors"):
        out = os.path.join(work, name)
        pysoup.merge(checkpoints, out, lora=mode, weights=weights)
        return evaluate(out)

    rows = {"final checkpoint": evaluate(checkpoints[-1])}
    uniform = [1.0] * len(checkpoints)
    rows["uniform average (factors)"] = merged("uniform_f", uniform)
    rows["uniform average (delta, exact)"] = merged("uniform_d", uniform, "delta")
    weights = {}
    for mode in ("loss", "step"):
        for p in cfg["penalties"]:
            w = pysoup.weights.mwa(checkpoints, mode=mode, penalty=p)
            weights[f"{mode} p={p:g}"] = w
            rows[f"MWA {mode}, penalty {p:g}"] = merged(f"mwa_{mode}_{p}", w)
    metrics = pysoup.weights.trainer_metrics(checkpoints)
    return rows, {"steps": [m["step"] for m in metrics], "losses": [m["loss"] for m in metrics]}, weights, base_acc


# -- report ---------------------------------------------------------------------------------------------------------
def markdown(res) -> str:
    by_seed = res["by_seed"]
    lines = [
        "# Metrics-Weighted Averaging of LoRA checkpoints on scikit-learn's digits",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s wall, {res['cpu_seconds']:.0f} s CPU, on "
        f"{res['machine']}, torch {res['torch']}; the machine was shared with other work)",
        "",
        f"MLP 64-128-128-10 pretrained on digits 0-4 ({res['pretrain']} Adam steps), then LoRA (rank {RANK}, "
        f"alpha {ALPHA}, on fc1, fc2, head) fine-tuned on digits 5-9: {res['steps']} SGD steps (lr {LR}, momentum "
        f"0.9, batch {BATCH}), a Trainer-style checkpoint every {res['every']} steps ({res['checkpoints']} "
        f"checkpoints; trainer_state.json logs the mean loss of every {LOG_EVERY} steps). Merged with pysoup "
        "(factors mode unless marked), folded into the base with pysoup.lora.fold. Accuracy on digits 5-9 (validation, "
        f"test) and on the held-out digits 0-4 (old task), mean ± std (sample) over {len(by_seed)} seeds:",
        "",
        "| model | validation 5-9 | test 5-9 | test 0-4 | test 5-9 per seed |",
        "|---|---|---|---|---|",
    ]
    for name in by_seed[0]:
        cells = []
        for s in ("val", "test", "old"):
            vals = [r[name][s] for r in by_seed]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {std:.4f}")
        per_seed = ", ".join(f"{r[name]['test']:.3f}" for r in by_seed)
        lines.append(f"| {name} | {' | '.join(cells)} | {per_seed} |")
    final = [r["final checkpoint"]["test"] for r in by_seed]
    best = max(
        (n for n in by_seed[0] if n.startswith("MWA")), key=lambda n: statistics.mean(r[n]["val"] for r in by_seed)
    )
    diff = [r[best]["test"] - f for r, f in zip(by_seed, final)]
    lines += [
        "",
        "The pretrained model before LoRA: test 0-4 "
        f"{statistics.mean(b['old'] for b in res['base_by_seed']):.4f}, test 5-9 "
        f"{statistics.mean(b['test'] for b in res['base_by_seed']):.4f} (it has never seen a 5-9 label).",
        "",
        f"Best MWA setting by mean validation accuracy: {best}; its test accuracy minus the final checkpoint's, per "
        f"seed: {', '.join(f'{d:+.3f}' for d in diff)} (mean {statistics.mean(diff):+.4f}; better on "
        f"{sum(d > 0 for d in diff)} of {len(diff)} seeds, worse on {sum(d < 0 for d in diff)}).",
        "",
        "Checkpoint steps and logged losses (seed 0): "
        + ", ".join(f"{s}: {v:.3f}" for s, v in zip(res["metrics"][0]["steps"], res["metrics"][0]["losses"]))
        + ".",
        "",
        "MWA weights (seed 0), first to last checkpoint: "
        + "; ".join(f"{k}: " + " ".join(f"{w:.2f}" for w in ws) for k, ws in res["weights"][0].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_seed = res["by_seed"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for mode, marker in (("loss", "o-"), ("step", "s-")):
        ps = res["penalties"]
        means = [statistics.mean(r[f"MWA {mode}, penalty {p:g}"]["test"] for r in by_seed) for p in ps]
        ax.plot(ps, means, marker, label=f"MWA by {mode}")
    for name, style in (
        ("final checkpoint", "k--"),
        ("uniform average (factors)", "g:"),
        ("uniform average (delta, exact)", "m-."),
    ):
        ax.axhline(statistics.mean(r[name]["test"] for r in by_seed), color=style[0], linestyle=style[1:], label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("penalty p")
    ax.set_ylabel("test accuracy, digits 5-9")
    ax.set_title(f"MWA of LoRA checkpoints, mean over {len(by_seed)} seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, a short run; nothing written")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)  # tiny matrices: seeds run in parallel processes instead
    if args.quick:
        cfg = {"pretrain": QUICK["pretrain"], "steps": QUICK["steps"], "every": QUICK["every"], "penalties": [1.0]}
        seeds = [0]
    else:
        cfg = {"pretrain": PRETRAIN_STEPS, "steps": STEPS, "every": CHECKPOINT_EVERY, "penalties": PENALTIES}
        seeds = list(range(SEEDS))
    results = [run_seed(0, cfg)] if len(seeds) == 1 else results_io.map_seeds(run_seed, seeds, cfg)
    res = {
        "command": "python examples/mwa_lora.py" + (" --quick" if args.quick else ""),
        "machine": results_io.machine(),
        "torch": torch.__version__,
        "pretrain": cfg["pretrain"],
        "steps": cfg["steps"],
        "every": cfg["every"],
        "checkpoints": cfg["steps"] // cfg["every"],
        "penalties": cfg["penalties"],
        "seeds": seeds,
        "by_seed": [r[0] for r in results],
        "metrics": [r[1] for r in results],
        "weights": [r[2] for r in results],
        "base_by_seed": [r[3] for r in results],
    }
    res["seconds"] = time.perf_counter() - start
    res["cpu_seconds"] = results_io.cpu_seconds()
    text = markdown(res)
    print(text)
    if not args.quick:
        results_io.save("mwa_lora", res, text, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

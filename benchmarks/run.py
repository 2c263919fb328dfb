"""pysoup's benchmark suite: file-merge cases x contenders (pysoup, the I/O floor, the naive script, mergekit),
whole processes, warm page cache, outputs to /dev/shm, contenders rotated each round, medians of >= 5 runs;
plus an in-memory kernel case against torch and the triad bandwidth.

    python benchmarks/run.py            # the full suite (~20 min; makes ~15 GB of synthetic checkpoints once)
    python benchmarks/run.py --quick    # small cases, seconds
    python benchmarks/run.py --cases 4x512MiB --runs 7
    python benchmarks/run.py --suite headers   # files of 10^5 and 10^6 tiny tensors (benchmarks/many_tensors.py)

Results: benchmarks/results/<suite>.json and .md (and .png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

import many_tensors  # noqa: E402

from pysoup.bench import machine, machine_line, markdown_head, run_process, summarize, sync  # noqa: E402
from pysoup.synthetic import make_family  # noqa: E402
from pysoup.units import parse_size  # noqa: E402

DATA = os.path.join(HERE, ".data")
OUT_DIR = "/dev/shm/pysoup-bench" if os.path.isdir("/dev/shm") else os.path.join(DATA, "out")
RESULTS = os.path.join(HERE, "results")

FULL_CASES = ["2x256MiB", "4x256MiB", "8x256MiB", "4x512MiB", "2x1GiB", "4x1GiB", "8x1GiB"]
QUICK_CASES = ["2x32MiB", "4x64MiB"]
# The targets of the core issue, checked on 4 x 512 MiB.
TARGET_CASE = "4x512MiB"


def parse_case(case: str):
    n, size = case.split("x", 1)
    return int(n), parse_size(size), size


def family(size_label: str, size: int, count: int) -> list:
    """Fine-tunes of one base shaped like a decoder LM (Hugging Face dirs), made once and cached."""
    root = os.path.join(DATA, f"lm-{size_label}")
    stamp = os.path.join(root, f".complete-{count}")
    if not os.path.exists(stamp):
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        print(f"  making {count} synthetic checkpoints of {size_label} in {root} ...", flush=True)
        make_family(root, count, size, dtype="BF16", seed=0, layout="hf")
        open(stamp, "w").close()
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return [os.path.join(root, f"ft{i + 1}") for i in range(count)]


def warm(paths):
    """Reads every input once so each contender starts from a warm page cache."""
    for p in paths:
        with open(os.path.join(p, "model.safetensors"), "rb") as f:
            while f.read(64 << 20):
                pass


# Methods measured by `--suite methods`: base + 3 fine-tunes (2 models for slerp and interpolate), each with the
# pysoup arguments and the mergekit config that compute the same merge (None: mergekit lacks the method).
METHODS = {
    "task_arithmetic": (["--param", "lambda=0.8"], 3, True, {"parameters": {"lambda": 0.8}}),
    "ties": (["--param", "density=0.5"], 3, True, {"parameters": {"density": 0.5}}),
    "dare_linear": (["--param", "density=0.5"], 3, True, {"parameters": {"density": 0.5, "rescale": False}}),
    "dare_ties": (
        ["--param", "density=0.5"],
        3,
        True,
        {"parameters": {"density": 0.5, "rescale": False, "normalize": True}},
    ),
    "slerp": (["--param", "t=0.4"], 2, False, {"parameters": {"t": 0.4}}),
    "model_stock": ([], 3, True, {}),
    "sparse": (["--param", "mask=union"], 3, False, None),
    "variance_corrected": ([], 3, False, None),
    "interpolate": (["--param", "alpha=0.3"], 2, False, None),
}


def mergekit_config(strategy: str, inputs: list, base: str | None, extra: dict) -> str:
    if strategy == "slerp":
        models = [{"model": p} for p in inputs]
        cfg = {"merge_method": "slerp", "base_model": inputs[0], "models": models, "dtype": "bfloat16", **extra}
    else:
        cfg = {
            "merge_method": strategy,
            "dtype": "bfloat16",
            "models": [{"model": p, "parameters": {"weight": 1.0}} for p in inputs],
            **extra,
        }
        if base:
            cfg["base_model"] = base
    import yaml

    path = os.path.join(OUT_DIR, f"{strategy}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def contenders(with_mergekit: bool, strategy: str = "linear", base: str | None = None) -> dict:
    py = sys.executable
    pysoup_args, mk_extra = [], {}
    if strategy != "linear":
        pysoup_args, _, _, mk_extra = METHODS[strategy]
        pysoup_args = ["--strategy", strategy, *pysoup_args] + (["--base", base] if base else [])
    c = {
        "pysoup": lambda out, ins: [
            py,
            "-m",
            "pysoup",
            "merge",
            *ins,
            "-o",
            out + ".safetensors",
            "--no-progress",
            *pysoup_args,
        ],
        "io_floor": lambda out, ins: [
            py,
            os.path.join(HERE, "baselines", "io_floor.py"),
            out + ".safetensors",
            *ins,
            *([base] if base else []),
        ],
    }
    if strategy == "linear":
        c["naive"] = lambda out, ins: [py, os.path.join(HERE, "baselines", "naive.py"), out + ".safetensors", *ins]
        mk_extra = {"parameters": {}}
    if with_mergekit and mk_extra is not None:
        c["mergekit"] = lambda out, ins: [
            py,
            os.path.join(HERE, "baselines", "mergekit_run.py"),
            mergekit_config(strategy, ins, base, mk_extra),
            out,
        ]
    return c


def clean(out: str) -> None:
    for p in (out, out + ".safetensors"):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def run_case(case: str, runs: int, with_mergekit: bool, only=None, strategy: str = "linear") -> dict:
    n, size, label = parse_case(case)
    inputs = family(label, size, 8 if size >= (256 << 20) else n)[:n]
    base = None
    if strategy != "linear":
        _, n, uses_base, _ = METHODS[strategy]
        inputs = inputs[:n]
        base = os.path.join(os.path.dirname(inputs[0]), "base") if uses_base else None
    read = inputs + ([base] if base else [])
    input_bytes = sum(os.path.getsize(os.path.join(p, "model.safetensors")) for p in read)
    out_bytes = os.path.getsize(os.path.join(inputs[0], "model.safetensors"))
    warm(read)
    os.makedirs(OUT_DIR, exist_ok=True)
    cs = contenders(with_mergekit, strategy, base)
    if only:
        cs = {k: v for k, v in cs.items() if k in only}
    names = list(cs)
    samples = {k: [] for k in names}
    rss = {k: [] for k in names}
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    for r in range(runs):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            out = os.path.join(OUT_DIR, name)
            clean(out)
            sync()
            res = run_process(cs[name](out, inputs), env=env)
            if res["rc"] != 0:
                raise RuntimeError(f"{name} failed on {case}: {res['stderr']}")
            samples[name].append(res["seconds"])
            rss[name].append(res["peak_rss_bytes"])
            clean(out)
    label = case if strategy == "linear" else f"{strategy} ({n}{' + base' if base else ''} x {case.split('x', 1)[1]})"
    result = {
        "case": label,
        "strategy": strategy,
        "inputs": n,
        "base": bool(base),
        "model_bytes": out_bytes,
        "read_bytes": input_bytes,
        "contenders": {},
    }
    for name in names:
        s = summarize(samples[name])
        result["contenders"][name] = {
            "seconds": s,
            "samples": samples[name],
            "peak_rss_bytes": int(summarize(rss[name])["median"]),
            "gb_per_s": (input_bytes + out_bytes) / s["median"] / 1e9,
        }
    ps = result["contenders"].get("pysoup")
    if ps:
        for name, c in result["contenders"].items():
            if name != "pysoup":
                ps[f"speedup_vs_{name}"] = c["seconds"]["median"] / ps["seconds"]["median"]
        if "io_floor" in result["contenders"]:
            ps["ratio_to_floor"] = ps["seconds"]["median"] / result["contenders"]["io_floor"]["seconds"]["median"]
    return result


def kernel_case(elements: int, runs: int) -> dict:
    """weighted_sum of 4 bf16 tensors in memory: pysoup's kernel vs torch doing the same arithmetic, and the
    triad bandwidth torch reaches (a = b + s*c in fp32), all with the machine's cores.

    torch and pysoup each bring an OpenMP runtime; with the default active wait, one runtime's idle threads spin
    while the other's work, and on 2 cores pysoup measured anywhere from 73% to 91% of triad. Passive waiting
    (set before either runtime starts) and contenders interleaved round by round make the comparison fair."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    import pysoup

    threads = pysoup.info()["threads"]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(elements, generator=g).to(torch.bfloat16) for _ in range(4)]
    w = [0.25] * 4
    moved = 5 * elements * 2  # 4 inputs read + 1 output written, bf16

    def torch_sum():
        acc = torch.zeros(elements, dtype=torch.float32)
        for x, wi in zip(xs, w):
            acc.add_(x, alpha=wi)
        return acc.to(torch.bfloat16)

    out = torch.empty(elements, dtype=torch.bfloat16)
    from pysoup.ops.cpu import weighted_sum_raw

    def pysoup_sum():
        weighted_sum_raw([x.data_ptr() for x in xs], ["BF16"] * 4, w, elements, out.data_ptr(), "BF16", False, threads)

    a, b, c = (torch.randn(elements, generator=g) for _ in range(3))

    def triad():
        torch.add(b, c, alpha=0.5, out=a)

    res = {"elements": elements, "threads": threads, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
    stats = interleaved({"pysoup": pysoup_sum, "torch": torch_sum, "triad": triad}, runs)
    for name, nbytes in (("pysoup", moved), ("torch", moved), ("triad", 3 * elements * 4)):
        res[name] = {"seconds": stats[name], "gb_per_s": nbytes / stats[name]["median"] / 1e9}
    res["pysoup_vs_torch"] = res["torch"]["seconds"]["median"] / res["pysoup"]["seconds"]["median"]
    res["pysoup_fraction_of_triad"] = res["pysoup"]["gb_per_s"] / res["triad"]["gb_per_s"]
    return res


def ema_case(params: int, tensors: int, runs: int) -> dict:
    """One EMA step (a <- 0.999 a + 0.001 b) over a model of `tensors` uneven tensors: pysoup.ops.lerp_ (the public
    op, argument checks included) and pysoup.ops.MultiTensorLerp (checked once, then called) against
    torch._foreach_lerp_ and a per-tensor torch loop, in fp32 and bf16; and the same on 500 tensors of 64
    elements, where only the per-call overhead counts."""
    import torch

    import pysoup

    threads = pysoup.info()["threads"]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    per = params // tensors
    sizes = [per + (17 * i) % 1024 for i in range(tensors)]  # uneven, as real models are
    res = {"params": sum(sizes), "tensors": tensors, "threads": threads, "configs": {}}

    def step_fns(avg, new):
        def loop():
            for a, b in zip(avg, new):
                a.lerp_(b, 0.001)

        bound = pysoup.ops.MultiTensorLerp(avg, new)
        return {
            "pysoup": lambda: pysoup.ops.lerp_(avg, new, 0.001),
            "pysoup_bound": lambda: bound(0.001),
            "torch_foreach_lerp": lambda: torch._foreach_lerp_(avg, new, 0.001),
            "torch_loop": loop,
        }

    for label, dtype, shape in (("fp32", torch.float32, sizes), ("bf16", torch.bfloat16, sizes)):
        avg = [torch.randn(s, generator=g).to(dtype) for s in shape]
        new = [torch.randn(s, generator=g).to(dtype) for s in shape]
        moved = 3 * sum(shape) * avg[0].element_size()  # read a and b, write a
        stats = interleaved(step_fns(avg, new), runs)
        cfg = {name: {"seconds": st, "gb_per_s": moved / st["median"] / 1e9} for name, st in stats.items()}
        cfg["speedup_vs_foreach"] = stats["torch_foreach_lerp"]["median"] / stats["pysoup"]["median"]
        res["configs"][label] = cfg
        del avg, new
    avg = [torch.randn(64, generator=g) for _ in range(500)]
    new = [torch.randn(64, generator=g) for _ in range(500)]
    stats = interleaved(step_fns(avg, new), max(runs, 51))
    res["overhead_500x64"] = {name: {"seconds": st} for name, st in stats.items()}
    return res


def interleaved(fns: dict, runs: int) -> dict:
    """Each function once to warm up, then `runs` rounds with the order rotated; per-function time summaries."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: summarize(ts) for name, ts in times.items()}


def markdown(report: dict) -> str:
    lines = [
        *markdown_head(report),
        "Whole processes, warm page cache, outputs on /dev/shm, contenders rotated each round; "
        f"median of {report['runs']} runs (spread = (max - min) / median).",
        "",
        "| case | contender | seconds (median) | spread | GB/s | peak RSS | vs pysoup |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        ps = case["contenders"].get("pysoup", {})
        for name, c in case["contenders"].items():
            if name == "pysoup":
                rel = f"ratio to floor {ps['ratio_to_floor']:.2f}" if "ratio_to_floor" in ps else ""
            elif name == "io_floor":
                rel = "the floor"
            else:
                rel = f"pysoup {ps.get('speedup_vs_' + name, float('nan')):.1f}x faster"
            lines.append(
                f"| {case['case']} | {name} | {c['seconds']['median']:.3f} | {c['seconds']['spread']:.0%} | "
                f"{c['gb_per_s']:.2f} | {c['peak_rss_bytes'] / 2**20:.0f} MiB | {rel} |"
            )
    k = report.get("kernel")
    if k:
        lines += [
            "",
            f"In-memory kernel, 4 x bf16 of {k['elements']:,} elements, {k['threads']} threads:",
            "",
            "| contender | GB/s | seconds (median) |",
            "|---|---|---|",
        ]
        for name in ("pysoup", "torch", "triad"):
            lines.append(f"| {name} | {k[name]['gb_per_s']:.1f} | {k[name]['seconds']['median'] * 1e3:.1f} ms |")
        lines += [
            "",
            f"pysoup is {k['pysoup_vs_torch']:.2f}x torch and reaches {k['pysoup_fraction_of_triad']:.0%} "
            "of torch's triad bandwidth.",
        ]
    e = report.get("ema")
    if e:
        lines += [
            "",
            f"Multi-tensor EMA step, {e['params']:,} parameters in {e['tensors']} tensors, {e['threads']} threads "
            "(pysoup: pysoup.ops.lerp_; pysoup_bound: pysoup.ops.MultiTensorLerp):",
            "",
            "| dtype | contender | seconds (median) | spread | GB/s | its time / pysoup's |",
            "|---|---|---|---|---|---|",
        ]
        for label, cfg in e["configs"].items():
            ps = cfg["pysoup"]["seconds"]["median"]
            for name in ("pysoup", "pysoup_bound", "torch_foreach_lerp", "torch_loop"):
                c = cfg[name]
                rel = "" if name == "pysoup" else f"{c['seconds']['median'] / ps:.2f}"
                lines.append(
                    f"| {label} | {name} | {c['seconds']['median'] * 1e3:.1f} ms | {c['seconds']['spread']:.0%} | "
                    f"{c['gb_per_s']:.1f} | {rel} |"
                )
        o = e["overhead_500x64"]
        lines += [
            "",
            "Per-call overhead, 500 tensors of 64 fp32 elements: "
            + ", ".join(f"{name} {c['seconds']['median'] * 1e6:.0f} us" for name, c in o.items())
            + ".",
        ]
    if report.get("targets"):
        lines += ["", "## Targets", ""] + [f"- {t}" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def check_method_targets(report: dict) -> list:
    """The merge-methods issue's targets: ties <= 3x the floor + 0.5 s and >= 20x mergekit; the others <= 2x the
    floor + 0.5 s and >= 5x mergekit; peak RSS within the core issue's 256 MiB."""
    out = []
    for case in report["cases"]:
        cs = case["contenders"]
        ps = cs["pysoup"]["seconds"]["median"]
        factor, speedup = (3, 20) if case["strategy"] == "ties" else (2, 5)
        if "io_floor" in cs:
            bound = factor * cs["io_floor"]["seconds"]["median"] + 0.5
            out.append(
                f"{case['case']}: {ps:.2f} s vs {factor} x floor + 0.5 s = {bound:.2f} s: "
                f"{'met' if ps <= bound else 'NOT met'}"
            )
        if "mergekit" in cs:
            sp = cs["pysoup"]["speedup_vs_mergekit"]
            out.append(
                f"{case['case']}: {sp:.1f}x faster than mergekit (target >= {speedup}x): "
                f"{'met' if sp >= speedup else 'NOT met'}"
            )
        rss = cs["pysoup"]["peak_rss_bytes"]
        out.append(
            f"{case['case']}: peak RSS {rss / 2**20:.0f} MiB (target <= 256 MiB): "
            f"{'met' if rss <= 256 << 20 else 'NOT met'}"
        )
    return out


def check_targets(report: dict) -> list:
    if report["suite"] == "merge methods":
        return check_method_targets(report)
    if report["suite"] == many_tensors.SUITE:
        return many_tensors.targets(report)
    out = []
    by = {c["case"]: c for c in report["cases"]}
    t = by.get(TARGET_CASE)
    if t and "io_floor" in t["contenders"]:
        ps, fl = t["contenders"]["pysoup"]["seconds"]["median"], t["contenders"]["io_floor"]["seconds"]["median"]
        bound = 1.5 * fl + 0.3
        out.append(
            f"{TARGET_CASE}: pysoup {ps:.2f} s vs bound 1.5 x floor ({fl:.2f} s) + 0.3 s = {bound:.2f} s: "
            f"{'met' if ps <= bound else 'NOT met'}"
        )
        if "naive" in t["contenders"]:
            sp = t["contenders"]["pysoup"]["speedup_vs_naive"]
            out.append(
                f"{TARGET_CASE}: {sp:.1f}x faster than the naive script (target >= 4x): "
                f"{'met' if sp >= 4 else 'NOT met'}"
            )
    a, b = by.get("4x256MiB"), by.get("4x1GiB")
    if a and b:
        ra, rb = a["contenders"]["pysoup"]["peak_rss_bytes"], b["contenders"]["pysoup"]["peak_rss_bytes"]
        out.append(
            f"peak RSS at 4x1GiB {rb / 2**20:.0f} MiB (target <= 256 MiB): {'met' if rb <= 256 << 20 else 'NOT met'}; "
            f"{(rb - ra) / 2**20:+.0f} MiB vs 4x256MiB (target <= +32 MiB): "
            f"{'met' if rb - ra <= 32 << 20 else 'NOT met'}"
        )
    k = report.get("kernel")
    if k:
        f = k["pysoup_fraction_of_triad"]
        out.append(
            f"in-memory kernel at {f:.0%} of triad bandwidth (target >= 85%): {'met' if f >= 0.85 else 'NOT met'}"
        )
    return out


def plot(report: dict, path: str) -> None:
    if importlib.util.find_spec("matplotlib") is None or not report["cases"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c["strategy"] if c.get("strategy", "linear") != "linear" else c["case"] for c in report["cases"]]
    names = sorted({n for c in report["cases"] for n in c["contenders"]}, key=lambda n: n != "pysoup")
    fig, ax = plt.subplots(figsize=(1.6 * len(cases) + 3, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [c["contenders"].get(name, {}).get("seconds", {}).get("median", 0) for c in report["cases"]]
        ax.bar([x + i * width for x in range(len(cases))], vals, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(cases))], cases, rotation=20, ha="right")
    ax.set_ylabel("seconds, whole process (median)")
    ax.set_yscale("log")
    ax.set_title(report["suite"] + ", bf16 checkpoints")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def rewrite(stem: str) -> None:
    """Recomputes the targets and the markdown of saved results (after a change to this report's format)."""
    with open(stem + ".json") as f:
        report = json.load(f)
    report["targets"] = check_targets(report)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(many_tensors.markdown(report) if report["suite"] == many_tensors.SUITE else markdown(report))
    if report["suite"] != many_tensors.SUITE:
        plot(report, stem + ".png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cases", help="comma-separated, e.g. 4x512MiB,2x1GiB")
    p.add_argument("--runs", type=int)
    p.add_argument("--only", help="comma-separated contenders")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--no-kernel", action="store_true")
    p.add_argument("--name", help="results file stem (default: linear, methods, or quick)")
    p.add_argument(
        "--suite",
        choices=["linear", "methods", "headers"],
        default="linear",
        help="linear: N inputs x sizes; methods: every merge method on base + 3 x 512 MiB; headers: files of "
        "10^5 and 10^6 tiny tensors (open vs safe_open, a 2-input merge)",
    )
    p.add_argument("--methods", help="comma-separated subset of the methods suite")
    p.add_argument("--kernel-only", action="store_true", help="only the in-memory kernel case (results: kernel.*)")
    args = p.parse_args(argv)
    if args.suite == "headers":
        return main_headers(args, argv)

    if args.suite == "methods":
        size = "64MiB" if args.quick else "512MiB"
        cases = [(m, f"3x{size}") for m in (args.methods.split(",") if args.methods else METHODS)]
    else:
        names = args.cases.split(",") if args.cases else (QUICK_CASES if args.quick else FULL_CASES)
        cases = [("linear", c) for c in names]
    runs = args.runs or (3 if args.quick or args.suite == "methods" else 5)
    with_mergekit = not args.no_mergekit and importlib.util.find_spec("mergekit") is not None
    print(machine_line(), flush=True)
    report = {
        "suite": "linear merge" if args.suite == "linear" else "merge methods",
        "machine": machine(),
        "machine_line": machine_line(),
        "runs": runs,
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cases": [],
    }
    if args.kernel_only:
        cases, report["suite"] = [], "in-memory kernel"
    for strategy, case in cases:
        print(f"case {case} {strategy}", flush=True)
        res = run_case(case, runs, with_mergekit, only=args.only.split(",") if args.only else None, strategy=strategy)
        report["cases"].append(res)
        for name, c in res["contenders"].items():
            print(
                f"  {name:<9} {c['seconds']['median']:7.3f} s  (spread {c['seconds']['spread']:.0%})  "
                f"{c['gb_per_s']:6.2f} GB/s  {c['peak_rss_bytes'] / 2**20:7.0f} MiB",
                flush=True,
            )
    if (args.kernel_only or args.suite == "linear") and not args.no_kernel and importlib.util.find_spec("torch"):
        report["kernel"] = kernel_case(1 << 22 if args.quick else 1 << 26, max(runs, 5))
        k = report["kernel"]
        print(
            f"kernel: pysoup {k['pysoup']['gb_per_s']:.1f} GB/s, torch {k['torch']['gb_per_s']:.1f} GB/s, "
            f"triad {k['triad']['gb_per_s']:.1f} GB/s",
            flush=True,
        )
        report["ema"] = ema_case(10**7 if args.quick else 10**8, 500, max(runs, 5))
        for label, cfg in report["ema"]["configs"].items():
            print(
                f"ema {label}: pysoup {cfg['pysoup']['seconds']['median'] * 1e3:.1f} ms, torch._foreach_lerp_ "
                f"{cfg['torch_foreach_lerp']['seconds']['median'] * 1e3:.1f} ms ({cfg['speedup_vs_foreach']:.2f}x)",
                flush=True,
            )
    report["targets"] = check_targets(report)
    for t in report["targets"]:
        print(t)
    stem = save_results(
        args.name or ("kernel" if args.kernel_only else "quick" if args.quick else args.suite), report, markdown(report)
    )
    plot(report, stem + ".png")
    return 0


def save_results(name: str, report: dict, text: str) -> str:
    """Writes results/NAME.json and NAME.md; returns the path without its extension."""
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, name)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(f"wrote {stem}.json and .md", flush=True)
    return stem


def main_headers(args, argv) -> int:
    """`--suite headers`: runs per case default to 5, and 3 from 10^6 tensors (a merge there takes seconds)."""
    names = (
        args.cases.split(",") if args.cases else (many_tensors.QUICK_CASES if args.quick else many_tensors.FULL_CASES)
    )
    print(machine_line(), flush=True)
    report = {
        "suite": many_tensors.SUITE,
        "machine": machine(),
        "machine_line": machine_line(),
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cases": [],
    }
    for case in names:
        runs = args.runs or (3 if float(case) >= 1e6 else 5)
        print(f"case {case} tensors, {runs} runs", flush=True)
        res = many_tensors.run_case(case, runs, DATA, OUT_DIR, only=args.only.split(",") if args.only else None)
        report["cases"].append(res)
        for name, c in res["contenders"].items():
            call = f"call {c['call_seconds']['median']:7.3f} s  " if "call_seconds" in c else " " * 19
            print(
                f"  {name:<13} {call}process {c['seconds']['median']:7.3f} s  (spread {c['seconds']['spread']:.0%})  "
                f"{c['peak_rss_bytes'] / 2**20:7.0f} MiB",
                flush=True,
            )
    report["targets"] = check_targets(report)
    for t in report["targets"]:
        print(t)
    save_results(args.name or ("quick-headers" if args.quick else "headers"), report, many_tensors.markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmarks for benchmarks/gpu_check.sh: the fused weighted_sum against torch doing the same arithmetic and
against a device-to-device copy (the bandwidth ceiling), and the multi-tensor EMA update against
torch._foreach_lerp_. Writes benchmarks/results/gpu-<name>.{json,md}.

    python benchmarks/gpu_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pysoup.bench import summarize  # noqa: E402


def timed(fn, runs: int) -> dict:
    """CUDA-event timings of fn, after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return summarize(times)


def weighted_sum_case(n_inputs: int, nbytes: int, runs: int) -> dict:
    from pysoup.kernels.weighted_sum import weighted_sum

    n = nbytes // 2
    xs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(n_inputs)]
    out = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    w = [1.0 / n_inputs] * n_inputs
    moved = (n_inputs + 1) * nbytes

    def torch_sum():
        acc = torch.zeros(n, device="cuda", dtype=torch.float32)
        for x, wi in zip(xs, w):
            acc.add_(x, alpha=wi)
        return acc.to(torch.bfloat16)

    copy_dst = torch.empty_like(xs[0])
    res = {"inputs": n_inputs, "bytes_per_input": nbytes}
    for name, fn, b in (
        ("pysoup", lambda: weighted_sum(xs, w, torch.bfloat16, False, out=out), moved),
        ("torch", torch_sum, moved),
        ("d2d_copy", lambda: copy_dst.copy_(xs[0]), 2 * nbytes),
    ):
        s = timed(fn, runs)
        res[name] = {"seconds": s, "gb_per_s": b / s["median"] / 1e9}
    res["fraction_of_copy"] = res["pysoup"]["gb_per_s"] / res["d2d_copy"]["gb_per_s"]
    return res


def ema_case(params: int, tensors: int, runs: int) -> dict:
    from pysoup.kernels.multi_tensor import TensorTable, lerp_

    per = params // tensors
    sizes = [per + (17 * i) % 1024 for i in range(tensors)]  # uneven, as real models are
    avg = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in sizes]
    new = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in sizes]
    table = TensorTable(avg, new)
    moved = 3 * sum(sizes) * 2
    res = {"params": sum(sizes), "tensors": tensors}
    for name, fn in (
        ("pysoup", lambda: lerp_(table, 0.001)),
        ("torch_foreach_lerp", lambda: torch._foreach_lerp_(avg, new, 0.001)),
    ):
        s = timed(fn, runs)
        res[name] = {"seconds": s, "gb_per_s": moved / s["median"] / 1e9}
    res["speedup_vs_foreach"] = res["torch_foreach_lerp"]["seconds"]["median"] / res["pysoup"]["seconds"]["median"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    name = torch.cuda.get_device_name(0)
    gib = (1 << 28) if args.quick else (1 << 30)
    runs = 5 if args.quick else 10
    report = {"gpu": name, "torch": torch.__version__, "weighted_sum": [], "ema": None}
    for k in (2, 4, 8):
        r = weighted_sum_case(k, gib, runs)
        torch.cuda.empty_cache()  # the case's tensors are gone: give their memory back before the next
        report["weighted_sum"].append(r)
        print(
            f"weighted_sum {k} x {gib >> 20} MiB: pysoup {r['pysoup']['gb_per_s']:.0f} GB/s, torch "
            f"{r['torch']['gb_per_s']:.0f} GB/s, copy {r['d2d_copy']['gb_per_s']:.0f} GB/s "
            f"({r['fraction_of_copy']:.0%} of copy; target >= 85%)",
            flush=True,
        )
    report["ema"] = ema_case(10**8 if args.quick else 10**9, 500, runs)
    e = report["ema"]
    print(
        f"multi-tensor EMA {e['params']:,} params / {e['tensors']} tensors: {e['speedup_vs_foreach']:.2f}x "
        f"torch._foreach_lerp_ (target >= 2x)",
        flush=True,
    )
    stem = os.path.join(HERE, "results", "gpu-" + "".join(c if c.isalnum() else "-" for c in name).strip("-").lower())
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    lines = [
        f"# pysoup GPU benchmarks: {name}",
        "",
        "Command: `bash benchmarks/gpu_check.sh`",
        "",
        "| case | pysoup GB/s | torch GB/s | copy GB/s | pysoup / copy |",
        "|---|---|---|---|---|",
    ]
    for r in report["weighted_sum"]:
        lines.append(
            f"| weighted_sum {r['inputs']} x {r['bytes_per_input'] >> 20} MiB bf16 | "
            f"{r['pysoup']['gb_per_s']:.0f} | {r['torch']['gb_per_s']:.0f} | {r['d2d_copy']['gb_per_s']:.0f} | "
            f"{r['fraction_of_copy']:.0%} |"
        )
    lines += [
        "",
        f"Multi-tensor EMA, {e['params']:,} bf16 parameters in {e['tensors']} tensors: pysoup "
        f"{e['pysoup']['seconds']['median'] * 1e3:.2f} ms, torch._foreach_lerp_ "
        f"{e['torch_foreach_lerp']['seconds']['median'] * 1e3:.2f} ms ({e['speedup_vs_foreach']:.2f}x).",
    ]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

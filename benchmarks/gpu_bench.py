"""GPU benchmarks for benchmarks/gpu_check.sh: the fused weighted_sum against torch doing the same arithmetic and
against a device-to-device copy (the bandwidth ceiling); the multi-tensor EMA update against
torch._foreach_lerp_; the TIES histograms of pysoup._cuda against torch.bincount; whole file merges with
device="cuda" against the CPU path on the same machine (outputs compared byte for byte). Writes
benchmarks/results/gpu-<name>.{json,md}.

    python benchmarks/gpu_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pysoup.bench.harness import summarize  # noqa: E402

# --smoke (a check of this script where there is no GPU): the file-merge and EMA cases only, tiny, the "device"
# being the CPU under TRITON_INTERPRET=1.
SMOKE_DEVICE = None


def timed(fn, runs: int) -> dict:
    """CUDA-event timings of fn, after a warm-up call (wall-clock ones in a --smoke run)."""
    fn()
    if SMOKE_DEVICE:
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return summarize(times)
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


# The EMA case's sweep: (aligned hint, block, warps).
EMA_SWEEP = [
    (aligned, block, warps) for aligned in (False, True) for block in (512, 1024, 2048, 4096) for warps in (2, 4, 8)
]


def ema_case(params: int, tensors: int, runs: int, sweep=EMA_SWEEP) -> dict:
    """The multi-tensor EMA step against torch._foreach_lerp_, over a sweep of block sizes and warps (the
    table's layout depends on the block size); the best setting is the reported one."""
    import pysoup
    from pysoup.kernels.multi_tensor import TensorTable, lerp_

    per = params // tensors
    sizes = [per + (17 * i) % 1024 for i in range(tensors)]  # uneven, as real models are
    dev = SMOKE_DEVICE or "cuda"
    avg = [torch.randn(s, device=dev, dtype=torch.bfloat16) for s in sizes]
    new = [torch.randn(s, device=dev, dtype=torch.bfloat16) for s in sizes]
    moved = 3 * sum(sizes) * 2
    res = {"params": sum(sizes), "tensors": tensors, "sweep": []}
    best = None
    for aligned, block, warps in sweep:
        table = TensorTable(avg, new, block=block, num_warps=warps, aligned=aligned)
        s = timed(lambda table=table: lerp_(table, 0.001), runs)
        entry = {"block": block, "num_warps": warps, "aligned": aligned, "seconds": s}
        entry["gb_per_s"] = moved / s["median"] / 1e9
        res["sweep"].append(entry)
        print(f"  lerp_ block {block} warps {warps} aligned {aligned}: {entry['gb_per_s']:.0f} GB/s", flush=True)
        if best is None or s["median"] < best["seconds"]["median"]:
            best = entry
    res["pysoup"] = best
    s = timed(lambda: torch._foreach_lerp_(avg, new, 0.001), runs)
    res["torch_foreach_lerp"] = {"seconds": s, "gb_per_s": moved / s["median"] / 1e9}
    res["speedup_vs_foreach"] = res["torch_foreach_lerp"]["seconds"]["median"] / best["seconds"]["median"]
    # The public ops at their defaults, host-side argument checks and dispatch included (a CUDA event starts
    # before the Python call, so a launch the host delays shows in the time).
    bound = pysoup.ops.MultiTensorLerp(avg, new)
    res["public_ops"] = {}
    public = {"lerp_": lambda: pysoup.ops.lerp_(avg, new, 0.001), "MultiTensorLerp": lambda b=bound: b(0.001)}
    for name, fn in public.items():
        s = timed(fn, runs)
        res["public_ops"][name] = {
            "seconds": s,
            "gb_per_s": moved / s["median"] / 1e9,
            "speedup_vs_foreach": res["torch_foreach_lerp"]["seconds"]["median"] / s["median"],
        }
    del bound
    avg.clear()  # free the model before allocating the copy (the tables hold these same lists)
    new.clear()
    src = torch.empty(sum(sizes), device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    s = timed(lambda: dst.copy_(src), runs)  # the same bytes in one copy: the bandwidth ceiling
    res["copy_gb_per_s"] = 2 * src.numel() * 2 / s["median"] / 1e9
    return res


def histogram_case(n: int, runs: int) -> dict:
    """Pass 0 of the TIES threshold search (high 16 bits of |x_i - base|) for 3 bf16 models: the fused CUDA
    kernel against the torch fallback (bits materialised, then torch.bincount)."""
    from pysoup.ops.triton import cuda_module

    module = cuda_module()
    base = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(n, device="cuda")).to(torch.bfloat16) for _ in range(3)]
    hist = torch.zeros(3 * 65536, dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def fused():
        module.magnitude_histogram(
            [x.data_ptr() for x in xs], [2] * 3, base.data_ptr(), 2, n, 0, [], hist.data_ptr(), stream
        )

    def bincount():
        bf = base.float()
        for i, x in enumerate(xs):
            bits = (x.float() - bf).view(torch.int32) & 0x7FFFFFFF
            hist[i * 65536 : (i + 1) * 65536] += torch.bincount(bits >> 16, minlength=65536)

    counts = []
    for fn in (fused, bincount):
        hist.zero_()
        fn()
        counts.append(hist.clone())
    res = {"elements": n, "models": 3, "same_counts": bool(torch.equal(counts[0], counts[1]))}
    moved = 4 * n * 2
    for name, fn in (("pysoup_cuda", fused), ("torch_bincount", bincount)):
        s = timed(fn, runs)
        res[name] = {"seconds": s, "gb_per_s": moved / s["median"] / 1e9}
    res["speedup"] = res["torch_bincount"]["seconds"]["median"] / res["pysoup_cuda"]["seconds"]["median"]
    return res


def _write_family(directory: str, nbytes: int, count: int) -> tuple:
    """A bf16 base and `count` fine-tunes of about nbytes each, made on the GPU (seconds, not minutes)."""
    from safetensors.torch import save_file

    from pysoup.testing import decoder_lm_shapes

    dev = SMOKE_DEVICE or "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    shapes = decoder_lm_shapes(nbytes, 2)
    base = {k: torch.randn(s, device=dev, generator=g) * (1.0 if "norm" in k else s[-1] ** -0.5) for k, s in shapes}
    paths = []
    for i in range(count + 1):
        sd = {
            k: (v if i == 0 else v + 0.01 * v.abs().mean() * torch.randn(v.shape, device=dev, generator=g))
            for k, v in base.items()
        }
        path = os.path.join(directory, "base.safetensors" if i == 0 else f"ft{i}.safetensors")
        save_file({k: v.to(torch.bfloat16).cpu() for k, v in sd.items()}, path, metadata={"format": "pt"})
        paths.append(path)
    return paths[0], paths[1:]


# Each merge in a fresh process (as a user runs it), the contenders' order rotated from run to run. A device
# merge's start-up (torch, the CUDA context) is timed apart from the merge. Peak RSS is VmHWM: ru_maxrss would
# carry this benchmark's own peak across fork + exec.
_MERGE = """
import json, sys, time
t0 = time.perf_counter()
a = json.loads(sys.argv[1])
if a["device"]:
    import torch
    torch.zeros(1, device=a["device"])
t1 = time.perf_counter()
import pysoup
r = pysoup.merge(a["inputs"], a["out"], strategy=a["strategy"], base=a["base"], model_params=a["mp"],
                 device=a["device"], progress=False)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"startup": t1 - t0, "merge": time.perf_counter() - t1, "rss": hwm}))
"""


def profile_device_merge(inputs: list, out: str, base=None, strategy="linear", mp=None) -> None:
    """Where a warm in-process device merge spends its time (printed to the log)."""
    import cProfile
    import pstats

    import pysoup

    kw = dict(strategy=strategy, base=base, model_params=mp, device=SMOKE_DEVICE or "cuda", progress=False)
    pysoup.merge(inputs, out, **kw)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    pysoup.merge(inputs, out, **kw)
    prof.disable()
    print(f"warm in-process device merge ({strategy}): {time.perf_counter() - t0:.2f} s", flush=True)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(22)
    sys.stdout.flush()


def file_merge_cases(nbytes: int, runs: int) -> list:
    work = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        base, fts = _write_family(work, nbytes, 3)
        torch.cuda.empty_cache()
        results = []
        # A smoke run checks this code with the linear merge only: interpreted, a TIES device merge takes ~40 s, and
        # tests/test_device.py streams every method to the interpreted device already.
        strategies = (("linear", None),) if SMOKE_DEVICE else (("linear", None), ("ties", [{"density": 0.3}] * 3))
        for strategy, mp in strategies:
            times = {"cpu": [], "cuda": []}
            phases = {"cpu": [], "cuda": []}
            rss = {}
            order = ["cpu", "cuda"]
            warm = 0 if SMOKE_DEVICE else 1  # the first round warms the page cache and Triton's kernel cache
            for r in range(1 - warm, runs + 1):  # (a smoke run checks the code: no warm-up round)
                for dev in order if r % 2 else order[::-1]:
                    out = os.path.join(work, f"{strategy}-{dev}.safetensors")
                    arg = dict(inputs=fts, out=out, strategy=strategy, base=base if strategy != "linear" else None,
                               mp=mp, device=None if dev == "cpu" else SMOKE_DEVICE or "cuda")  # fmt: skip
                    t0 = time.perf_counter()
                    run = subprocess.run(
                        [sys.executable, "-c", _MERGE, json.dumps(arg)], capture_output=True, text=True
                    )
                    wall = time.perf_counter() - t0
                    if run.returncode != 0:
                        raise RuntimeError(f"{strategy} on {dev}: {run.stderr.strip().splitlines()[-1]}")
                    if r:
                        child = json.loads(run.stdout.strip().splitlines()[-1])
                        times[dev].append(wall)
                        phases[dev].append(child)
                        rss[dev] = child["rss"]
            with (
                open(os.path.join(work, f"{strategy}-cpu.safetensors"), "rb") as a,
                open(os.path.join(work, f"{strategy}-cuda.safetensors"), "rb") as b,
            ):
                same = a.read() == b.read()
            res = {
                "strategy": strategy,
                "inputs": f"{'base + ' if strategy != 'linear' else ''}3 x {nbytes >> 20} MiB bf16",
                "identical_output": same,
            }
            for dev in ("cpu", "cuda"):
                res[dev] = {
                    "seconds": summarize(times[dev]),
                    "startup_seconds": summarize([c["startup"] for c in phases[dev]]),
                    "merge_seconds": summarize([c["merge"] for c in phases[dev]]),
                    "peak_rss": rss[dev],
                }
            res["cuda_vs_cpu"] = res["cpu"]["seconds"]["median"] / res["cuda"]["seconds"]["median"]
            results.append(res)
            print(
                f"file merge {strategy} ({res['inputs']}): cpu {res['cpu']['seconds']['median']:.2f} s, cuda "
                f"{res['cuda']['seconds']['median']:.2f} s (start-up {res['cuda']['startup_seconds']['median']:.2f} s, "
                f"merge {res['cuda']['merge_seconds']['median']:.2f} s), identical={same}",
                flush=True,
            )
            if not SMOKE_DEVICE or strategy == "linear":  # interpreted, a profiled TIES merge takes 20 s
                profiled = os.path.join(work, "profiled.safetensors")
                profile_device_merge(fts, profiled, base if strategy != "linear" else None, strategy, mp)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _case(report: dict, key: str, fn, *args):
    """Runs one benchmark case; a failure is recorded and the others still run."""
    try:
        report[key] = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the device run is one shot: keep what the other cases measure
        traceback.print_exc()
        report[key] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="no GPU: the file-merge and EMA cases, tiny, interpreted")
    p.add_argument("--cases", help="comma-separated subset (weighted_sum,ema,ties_histogram,file_merge); the other "
                   "cases keep their entries from the results file")  # fmt: skip
    args = p.parse_args(argv)
    cases = set(args.cases.split(",")) if args.cases else {"weighted_sum", "ema", "ties_histogram", "file_merge"}
    if args.smoke:
        global SMOKE_DEVICE
        SMOKE_DEVICE = "cpu"
        for r in file_merge_cases(1 << 15, 1):
            assert r["identical_output"], r
        e = ema_case(1 << 14, 4, 1, sweep=[(True, 4096, 2)])
        assert set(e["public_ops"]) == {"lerp_", "MultiTensorLerp"}, e
        return 0
    name = torch.cuda.get_device_name(0)
    gib = (1 << 28) if args.quick else (1 << 30)
    runs = 5 if args.quick else 10
    import triton

    import pysoup

    info = pysoup.info()
    stem = os.path.join(HERE, "results", "gpu-" + "".join(c if c.isalnum() else "-" for c in name).strip("-").lower())
    report = {}
    if args.cases and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            report = json.load(f)
    report.update(
        {
            "gpu": name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cpu_threads": info["threads"],
            "cpu_isa": info["cpu_isa"],
        }
    )
    if "weighted_sum" in cases:
        report["weighted_sum"] = []
    for k in (2, 4, 8) if "weighted_sum" in cases else ():
        r = weighted_sum_case(k, gib, runs)
        torch.cuda.empty_cache()  # the case's tensors are gone: give their memory back before the next
        report["weighted_sum"].append(r)
        print(
            f"weighted_sum {k} x {gib >> 20} MiB: pysoup {r['pysoup']['gb_per_s']:.0f} GB/s, torch "
            f"{r['torch']['gb_per_s']:.0f} GB/s, copy {r['d2d_copy']['gb_per_s']:.0f} GB/s "
            f"({r['fraction_of_copy']:.0%} of copy; target >= 85%)",
            flush=True,
        )
    if "ema" in cases:
        _case(report, "ema", ema_case, 10**8 if args.quick else 10**9, 500, runs)
    e = report["ema"]
    if "error" not in e and "ema" in cases:
        print(
            f"multi-tensor EMA {e['params']:,} params / {e['tensors']} tensors: {e['speedup_vs_foreach']:.2f}x "
            f"torch._foreach_lerp_ (target >= 2x)",
            flush=True,
        )
    if "ties_histogram" in cases:
        _case(report, "ties_histogram", histogram_case, (1 << 26) if args.quick else (1 << 28), runs)
    h = report["ties_histogram"]
    if "error" not in h and "ties_histogram" in cases:
        print(
            f"TIES histogram pass, 3 x {h['elements']:,} bf16: pysoup._cuda {h['pysoup_cuda']['gb_per_s']:.0f} GB/s, "
            f"torch.bincount {h['torch_bincount']['gb_per_s']:.0f} GB/s ({h['speedup']:.1f}x), same counts "
            f"{h['same_counts']}",
            flush=True,
        )
    if "file_merge" in cases:
        _case(report, "file_merge", file_merge_cases, (1 << 27) if args.quick else (1 << 29), 3)
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
    lines.append("")
    if "error" in e:
        lines.append(f"Multi-tensor EMA: failed ({e['error']}).")
    else:
        lines.append(
            f"Multi-tensor EMA, {e['params']:,} bf16 parameters in {e['tensors']} tensors: pysoup "
            f"{e['pysoup']['seconds']['median'] * 1e3:.2f} ms, torch._foreach_lerp_ "
            f"{e['torch_foreach_lerp']['seconds']['median'] * 1e3:.2f} ms ({e['speedup_vs_foreach']:.2f}x); best "
            f"of the sweep: block {e['pysoup']['block']}, {e['pysoup']['num_warps']} warps, aligned "
            f"{e['pysoup'].get('aligned')}: {e['pysoup']['gb_per_s']:.0f} GB/s (copying the same bytes: "
            f"{e['copy_gb_per_s']:.0f} GB/s)."
        )
        for name, o in e.get("public_ops", {}).items():
            lines.append(
                f"Public op `pysoup.ops.{name}` (defaults, host-side checks included): "
                f"{o['seconds']['median'] * 1e3:.2f} ms, {o['speedup_vs_foreach']:.2f}x torch._foreach_lerp_."
            )
        lines.append("")
        lines.append("| lerp_ block | warps | aligned hint | GB/s |")
        lines.append("|---|---|---|---|")
        lines += [
            f"| {x['block']} | {x['num_warps']} | {x.get('aligned', False)} | {x['gb_per_s']:.0f} |" for x in e["sweep"]
        ]
    lines.append("")
    if "error" in h:
        lines.append(f"TIES histogram: failed ({h['error']}).")
    else:
        lines.append(
            f"TIES threshold, histogram pass 0 over 3 x {h['elements']:,} bf16 elements (+ base): pysoup._cuda "
            f"{h['pysoup_cuda']['seconds']['median'] * 1e3:.2f} ms ({h['pysoup_cuda']['gb_per_s']:.0f} GB/s), "
            f"torch.bincount {h['torch_bincount']['seconds']['median'] * 1e3:.2f} ms "
            f"({h['torch_bincount']['gb_per_s']:.0f} GB/s): {h['speedup']:.1f}x; identical counts: {h['same_counts']}."
        )
    fm = report["file_merge"]
    lines += ["", f"File merges, each in a fresh process (CPU path: {report['cpu_threads']} threads, "
              f"{report['cpu_isa']}; files in /dev/shm; medians of 3 after a warm-up round):", ""]  # fmt: skip
    if isinstance(fm, dict):
        lines.append(f"failed ({fm['error']})")
    else:
        lines += ["| merge | inputs | CPU s | device=cuda s (start-up + merge) | CPU / cuda | same bytes "
                  "| peak RSS CPU / cuda MiB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in fm:
            c = r["cuda"]
            lines.append(
                f"| {r['strategy']} | {r['inputs']} | {r['cpu']['seconds']['median']:.2f} | "
                f"{c['seconds']['median']:.2f} ({c['startup_seconds']['median']:.2f} + "
                f"{c['merge_seconds']['median']:.2f}) | {r['cuda_vs_cpu']:.2f}x | {r['identical_output']} | "
                f"{r['cpu']['peak_rss'] >> 20} / {c['peak_rss'] >> 20} |"
            )
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Merges on Ray (pysoup.distributed) against the local merge, on this machine.

Cases (inputs and outputs under /dev/shm, so storage is the page cache and the numbers are CPU and memory bound):

  1. TIES (density 0.5), bf16 base + 3 x SIZE (default 512 MiB), one output file: the local merge in this process
     (1 and 2 kernel threads) against Ray with 1 worker slot (ray.init(num_cpus=1)) and 2 (num_cpus=2), tasks of
     one CPU writing byte ranges of --task-size of the one pre-sized output file. Each configuration: one warm-up
     merge, then --runs timed merges; medians. pysoup.plan's time estimate is printed beside each measurement.
  2. Per-task overhead: a no-op Ray task's round trip and the throughput of 200 of them (scheduling alone); the
     time a merge task spends opening the inputs' headers, re-planning and laying out the output (TaskResult
     .open_seconds); and the extra wall time per task of a distributed merge of a tiny model (18 tensors) cut into
     many tasks, against the same merge local.
  3. A sweep of 16 TIES merges (densities 0.1 ... 0.85) of base + 3 x SWEEP_SIZE (default 64 MiB): 16 sequential
     `pysoup merge` processes against pysoup.distributed.sweep on 1 and 2 Ray worker slots.

The machine is shared with other agents while this runs: the load average is recorded beside each case.

    python benchmarks/scale_out.py [--size-mib 512] [--sweep-size-mib 64] [--runs 3] [--task-size 64MiB]
                                   [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def _median(times: list) -> dict:
    from pysoup.bench.harness import summarize

    return summarize(times)


def _ray_session(num_cpus: int):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=100 << 20,
    )
    return ray


def _time(fn, runs: int) -> list:
    fn()  # warm-up: Ray workers started, pysoup imported in them, inputs in the page cache
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def case_ties(d: str, fts: list, base: str, runs: int, task_size: str) -> dict:
    import pysoup
    from pysoup.distributed import RayExecutor

    out = os.path.join(d, "ties.safetensors")
    kw = dict(strategy="ties", base=base, params={"density": 0.5}, progress=False)
    res = {"case": f"ties base + 3 x {os.path.getsize(fts[0]) / 2**20:.0f} MiB, one output file", "contenders": {}}
    reference = None
    for threads in (1, 2):
        times = _time(lambda threads=threads: pysoup.merge(fts, out, threads=threads, **kw), runs)
        est = pysoup.plan(fts, out, strategy="ties", base=base, params={"density": 0.5}, threads=threads)
        res["contenders"][f"local, {threads} thread(s)"] = {
            "seconds": _median(times),
            "samples": times,
            "estimate_seconds": est.seconds,
            "load": _load(),
        }
        with open(out, "rb") as f:
            reference = reference or f.read()
    for workers in (1, 2):
        ray = _ray_session(workers)
        ex = RayExecutor(task_size=task_size, num_cpus=1)
        times = _time(lambda ex=ex: pysoup.merge(fts, out, executor=ex, **kw), runs)
        with open(out, "rb") as f:
            same = f.read() == reference
        est = pysoup.plan(fts, out, strategy="ties", base=base, params={"density": 0.5}, executor=ex, workers=workers)
        tasks = ex.last_tasks
        res["contenders"][f"ray, {workers} worker slot(s)"] = {
            "seconds": _median(times),
            "samples": times,
            "tasks": len(tasks),
            "task_seconds_median": statistics.median(t.seconds for t in tasks),
            "task_open_seconds_median": statistics.median(t.open_seconds for t in tasks),
            "task_peak_rss_bytes_max": max(t.peak_rss_bytes for t in tasks),
            "estimate_seconds": est.seconds,
            "estimate_peak_memory_bytes": est.peak_memory_bytes,
            "byte_identical_to_local": same,
            "load": _load(),
        }
        ray.shutdown()
    return res


def case_overhead(d: str, runs: int) -> dict:
    import pysoup
    from pysoup.distributed import RayExecutor
    from pysoup.testing import make_family

    ray = _ray_session(2)

    @ray.remote(num_cpus=1)
    def noop():
        return None

    ray.get([noop.remote() for _ in range(4)])  # workers up
    rt = []
    for _ in range(50):
        t = time.perf_counter()
        ray.get(noop.remote())
        rt.append(time.perf_counter() - t)
    t = time.perf_counter()
    ray.get([noop.remote() for _ in range(200)])
    burst = (time.perf_counter() - t) / 200

    tiny = os.path.join(d, "tiny")
    fts = make_family(tiny, 3, 1 << 20, dtype="BF16", seed=1)
    base = os.path.join(tiny, "base.safetensors")
    out = os.path.join(d, "tiny.safetensors")
    kw = dict(strategy="ties", base=base, params={"density": 0.5}, progress=False)
    local = _time(lambda: pysoup.merge(fts, out, **kw), runs * 3)
    ex = RayExecutor(task_size="1B", num_cpus=1)  # one task per tensor
    dist = _time(lambda: pysoup.merge(fts, out, executor=ex, **kw), runs * 3)
    n_tasks = len(ex.last_tasks)
    per_task = (statistics.median(dist) - statistics.median(local)) / n_tasks * 2  # 2 slots run at once
    ray.shutdown()
    tensors = len(pysoup.open(fts[0]).keys())
    return {
        "case": "per-task overhead (2 worker slots)",
        "noop_round_trip_seconds": _median(rt),
        "noop_burst_seconds_per_task": burst,
        "tiny_merge": {
            "inputs": 4,
            "tensors": tensors,
            "tasks": n_tasks,
            "local_seconds": _median(local),
            "ray_seconds": _median(dist),
            "extra_seconds_per_task_slot": per_task,
            "task_open_seconds_median": statistics.median(t.open_seconds for t in ex.last_tasks),
            "task_seconds_median": statistics.median(t.seconds for t in ex.last_tasks),
        },
        "load": _load(),
    }


def case_sweep(d: str, size_mib: int) -> dict:
    import pysoup.distributed
    from pysoup.bench.harness import run_process
    from pysoup.distributed import RayExecutor
    from pysoup.testing import make_family

    fam = os.path.join(d, "sweep_inputs")
    fts = make_family(fam, 3, size_mib << 20, dtype="BF16", seed=2)
    base = os.path.join(fam, "base.safetensors")
    densities = [round(0.1 + 0.05 * i, 2) for i in range(16)]
    res = {"case": f"sweep of 16 ties merges, base + 3 x {size_mib} MiB", "contenders": {}}
    outs = os.path.join(d, "sweep_seq")
    os.makedirs(outs, exist_ok=True)
    for threads in (1, 2):
        t = time.perf_counter()
        for i, dens in enumerate(densities):
            cmd = [sys.executable, "-m", "pysoup", "merge", *fts, "--base", base, "--strategy", "ties"]
            cmd += ["--param", f"density={dens}", "--threads", str(threads), "--no-progress", "-o"]
            out = os.path.join(outs, f"{i:03d}.safetensors")
            r = run_process(cmd + [out], env={**os.environ, "PYTHONPATH": ROOT})
            if r["rc"] != 0:
                raise SystemExit(f"pysoup merge failed: {r['stderr']}")
        res["contenders"][f"16 sequential processes ({threads} thread(s) each)"] = {
            "seconds": time.perf_counter() - t,
            "load": _load(),
        }
    for workers in (1, 2):
        ray = _ray_session(workers)
        grid = [dict(strategy="ties", params={"density": dens}) for dens in densities]
        pysoup.distributed.sweep(fts, grid[:workers], os.path.join(d, "warm"), base=base)  # workers up
        t = time.perf_counter()
        results = pysoup.distributed.sweep(
            fts, grid, os.path.join(d, f"sweep_ray{workers}"), base=base, executor=RayExecutor(num_cpus=1)
        )
        wall = time.perf_counter() - t
        same = all(
            open(r.out, "rb").read() == open(os.path.join(outs, f"{i:03d}.safetensors"), "rb").read()
            for i, r in enumerate(results)
        )
        shutil.rmtree(os.path.join(d, f"sweep_ray{workers}"))  # tmpfs is memory
        res["contenders"][f"ray sweep, {workers} worker slot(s) of 1 CPU"] = {
            "seconds": wall,
            "merge_seconds_median": statistics.median(r.seconds for r in results),
            "byte_identical_to_processes": same,
            "load": _load(),
        }
        ray.shutdown()
    return res


# The 4 x 405B model (docs/scale-out.md): Llama 3.1 405B in bf16 is 810 GB, 1,137 tensors (126 layers x 9 + 3).
MODEL = {
    "params": 405e9,
    "inputs": 4,  # e.g. TIES: a base and three fine-tunes
    "tensors": 1137,
    "shard_bytes": 5e9,  # the default --shard-size: one task per 5 GB output shard
    "slots_per_node": 32,  # tasks of one CPU each that a node runs at once
    "driver_seconds": 10.0,  # joining the cluster, reading 4 x 191 headers over the network, commit: assumed
}
# Storage: (what, per-node read+write bandwidth in GB/s, the shared file system's aggregate limit in GB/s).
STORAGE = [("5 GB/s per node, 100 GB/s aggregate", 5.0, 100.0), ("12.5 GB/s per node (100 GbE), 400 GB/s", 12.5, 400.0)]


def model_405b(result: dict) -> list:
    """Rows of the 4 x 405B model on 1, 4, 16 and 64 nodes from the measured per-task overhead and the measured TIES
    arithmetic rate per thread (methods.json, as pysoup.plan uses it); see docs/scale-out.md for the assumptions."""
    import math

    from pysoup.distributed.estimate import MEASURED, MEASURED_THREADS

    measured_bytes, seconds, floor = MEASURED["ties"]
    per_thread = measured_bytes / (seconds - floor) / MEASURED_THREADS / 1e9  # GB read per s per thread
    o = result["cases"][1]
    overhead = o["noop_round_trip_seconds"]["median"] + o["tiny_merge"]["task_open_seconds_median"] * 1137 / max(
        1, o["tiny_merge"]["tensors"]
    )
    size = MODEL["params"] * 2 / 1e9  # GB per model
    tasks = math.ceil(size / (MODEL["shard_bytes"] / 1e9))
    read_task = MODEL["inputs"] * size / tasks
    write_task = size / tasks
    rows = []
    for what, b, aggregate in STORAGE:
        for n in (1, 4, 16, 64):
            k = math.ceil(tasks / n)  # tasks on the busiest node
            io_rate = min(b, aggregate / n)
            io = k * (read_task + write_task) / io_rate
            compute = k * read_task / (per_thread * MODEL["slots_per_node"])
            t = max(io, compute) + k * overhead / MODEL["slots_per_node"] + MODEL["driver_seconds"]
            rows.append(
                {
                    "storage": what,
                    "nodes": n,
                    "tasks_on_busiest_node": k,
                    "io_seconds": io,
                    "compute_seconds": compute,
                    "seconds": t,
                    "bound": "storage" if io >= compute else "arithmetic",
                }
            )
    return [{"tasks": tasks, "read_per_task_gb": read_task, "per_thread_gbps": per_thread, "overhead": overhead}] + rows


def _ties_prose(c: dict, isa: str) -> str:
    """What the TIES table shows, from its own numbers."""
    local1, local2 = c["local, 1 thread(s)"]["seconds"]["median"], c["local, 2 thread(s)"]["seconds"]["median"]
    ray1, ray2 = c["ray, 1 worker slot(s)"]["seconds"]["median"], c["ray, 2 worker slot(s)"]["seconds"]["median"]
    return (
        f"One Ray slot against one local thread: {ray1 / local1:.2f}x the time (the tasks' fixed costs and Ray's "
        f"dispatch); two slots against one: {ray1 / ray2:.2f}x faster; two slots against the local two-thread merge: "
        f"{local2 / ray2:.2f}x faster (independent tasks on separate cores scale better than two OpenMP threads "
        "sharing one merge). The estimates are pysoup.plan's without --calibrate: rates of the AVX-512 host of "
        f"methods.json, while this host runs {isa}, which is why they are low here (`--calibrate` times the method "
        "on the machine itself). Every distributed output's bytes equal the local merge's; a Ray task's peak RSS "
        "does not depend on the model's size."
    )


def _sweep_prose(c: dict) -> str:
    """What the sweep table shows, from its own numbers."""
    procs = min(v["seconds"] for k, v in c.items() if k.startswith("16 sequential"))
    ray1 = c["ray sweep, 1 worker slot(s) of 1 CPU"]["seconds"]
    ray2 = c["ray sweep, 2 worker slot(s) of 1 CPU"]["seconds"]
    return (
        f"The sweep: one Ray slot ran the 16 merges in warm worker processes {procs / ray1:.2f}x faster than the "
        "best of 16 processes run one after another (each process pays Python's start, pysoup's import and cold "
        f"kernels); two slots {procs / ray2:.2f}x faster."
    )


def _markdown(result: dict) -> str:
    from pysoup.io.units import format_bytes

    lines = [
        "# Scale-out on Ray (issue 15)",
        "",
        f"{result['machine_line']}; Ray {result['ray']}. `{result['command']}`.",
        "",
        "Load averages beside each row (2 cores): above ~2, other work held the cores and wall times say little.",
        "",
    ]
    ties = result["cases"][0]
    lines += [f"## {ties['case']}", "", "| contender | median s | runs | pysoup.plan estimate s | notes | load |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, c in ties["contenders"].items():
        notes = ""
        if "tasks" in c:
            notes = (
                f"{c['tasks']} tasks, task median {c['task_seconds_median']:.2f} s (opening "
                f"{c['task_open_seconds_median'] * 1e3:.0f} ms), task peak RSS "
                f"{format_bytes(c['task_peak_rss_bytes_max'])}, bytes equal to local: {c['byte_identical_to_local']}"
            )
        lines.append(
            f"| {name} | {c['seconds']['median']:.2f} | {c['seconds']['n']} | {c['estimate_seconds']:.2f} | {notes} "
            f"| {c['load'][0]} |"
        )
    lines += [
        "",
        _ties_prose(ties["contenders"], result["machine"]["cpu_isa"]),
        "",
    ]
    o = result["cases"][1]
    t = o["tiny_merge"]
    lines += [
        "",
        "## Per-task overhead (Ray, 2 worker slots)",
        "",
        f"- a no-op task's round trip: {o['noop_round_trip_seconds']['median'] * 1e3:.1f} ms (median of 50); 200 "
        f"submitted at once: {o['noop_burst_seconds_per_task'] * 1e3:.2f} ms a task",
        f"- a TIES merge of a tiny model ({t['tensors']} tensors, base + 3) cut into {t['tasks']} tasks: "
        f"{t['ray_seconds']['median']:.3f} s against {t['local_seconds']['median']:.3f} s local, "
        f"{t['extra_seconds_per_task_slot'] * 1e3:.1f} ms more per task and slot; inside a task, opening the 4 "
        f"inputs' headers, re-planning and laying out took {t['task_open_seconds_median'] * 1e3:.1f} ms (median), "
        f"the whole task {t['task_seconds_median'] * 1e3:.1f} ms",
        "",
    ]
    s = result["cases"][2]
    lines += [f"## {s['case']}", "", "| contender | wall s | notes | load |", "|---|---|---|---|"]
    for name, c in s["contenders"].items():
        notes = ""
        if "merge_seconds_median" in c:
            notes = (
                f"merge median {c['merge_seconds_median']:.2f} s in its worker; bytes equal to the processes': "
                f"{c['byte_identical_to_processes']}"
            )
        lines.append(f"| {name} | {c['seconds']:.2f} | {notes} | {c['load'][0]} |")
    lines += [
        "",
        _sweep_prose(s["contenders"]),
    ]
    head, *rows = model_405b(result)
    lines += [
        "",
        "## Model: TIES of 4 x 405B (bf16) on 1 to 64 nodes",
        "",
        f"{head['tasks']} tasks (one per 5 GB output shard, each reading {head['read_per_task_gb']:.0f} GB); "
        f"arithmetic {head['per_thread_gbps']:.2f} GB/s read per thread (TIES, methods.json) on "
        f"{MODEL['slots_per_node']} one-CPU slots per node; per-task overhead {head['overhead'] * 1e3:.1f} ms "
        f"(measured above); {MODEL['driver_seconds']:.0f} s for the driver (assumed). docs/scale-out.md states the "
        "assumptions.",
        "",
        "| storage | nodes | tasks on the busiest node | storage s | arithmetic s | total | bound by |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['storage']} | {r['nodes']} | {r['tasks_on_busiest_node']} | {r['io_seconds']:.0f} | "
            f"{r['compute_seconds']:.0f} | {r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min) | {r['bound']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--sweep-size-mib", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--task-size", default="64MiB")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--markdown-only", action="store_true", help="re-write scale_out.md from scale_out.json")
    args = p.parse_args()
    if args.markdown_only:
        with open(os.path.join(args.out, "scale_out.json")) as f:
            result = json.load(f)
        with open(os.path.join(args.out, "scale_out.md"), "w") as f:
            f.write(_markdown(result))
        print(_markdown(result))
        return 0

    import ray

    from pysoup.bench.harness import machine, machine_line, work_dir
    from pysoup.testing import make_family

    need = (5 * args.size_mib + 4 * args.sweep_size_mib + 36 * args.sweep_size_mib) << 20
    command = "python benchmarks/scale_out.py " + " ".join(sys.argv[1:])
    with work_dir(need) as d:
        fts = make_family(os.path.join(d, "inputs"), 3, args.size_mib << 20, dtype="BF16", seed=0)
        base = os.path.join(d, "inputs", "base.safetensors")
        cases = [case_ties(d, fts, base, args.runs, args.task_size)]
        print(json.dumps(cases[-1], indent=1), flush=True)
        cases.append(case_overhead(d, args.runs))
        print(json.dumps(cases[-1], indent=1), flush=True)
        cases.append(case_sweep(d, args.sweep_size_mib))
        print(json.dumps(cases[-1], indent=1), flush=True)
    m = machine()
    result = {
        "suite": "scale_out",
        "machine": m,
        "machine_line": machine_line(m),
        "ray": ray.__version__,
        "shared_machine": True,
        "command": command,
        "cases": cases,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale_out.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "scale_out.md"), "w") as f:
        f.write(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

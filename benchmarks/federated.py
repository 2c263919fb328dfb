"""Out-of-core FedAvg: one server round over client models on disk, against the I/O floor and Flower's in-memory
aggregation.

The cases: 16 client models of 512 MiB each (bf16: 16 matrices of 4096 x 4096 and 16 norms), and the same at
128 MiB, where Flower's in-memory aggregation fits beside the inputs; a global model of the same tensors; FedAvg
with example counts (server_lr 1: the new model is the example-weighted mean of the clients, as Flower's FedAvg).
Contenders, each a whole process timed by pysoup.bench.harness, which reports the process's own peak RSS:

  - pysoup: pysoup.federated.FedAvg().aggregate(global file, client files, out=file): streaming, bounded memory;
  - io_floor: pysoup/bench/baselines.py's floor over the same inputs: read every client byte once (mmap, two
    threads), write the output's bytes; no arithmetic (FedAvg with server_lr 1 does not read the global model);
  - flower_inplace: Flower's `aggregate_inplace` as its server runs it: every client's parameters held in memory
    (read whole, as received), each deserialized to fp32 numpy arrays (bf16 widened), scaled in place by
    n_k / sum n and added up; then rounded to bf16 and written. Run only when the machine has the memory for it.

Targets: pysoup's peak RSS <= 256 MiB and its time <= 1.5x the I/O floor. Inputs live under /dev/shm when it has
room (else the system's temporary directory), and are removed afterwards; a case takes fewer clients when the
memory available (tmpfs is memory) would not leave 3 GiB to the rest of the machine, and says so.

    python benchmarks/federated.py [--quick] [--clients 16] [--size-mib 512] [--runs 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# The target case, then the same clients at a quarter of the size, where Flower's in-memory aggregation (which holds
# every client) fits beside the inputs on a 23 GiB machine shared with others.
FULL = [{"clients": 16, "size_mib": 512, "runs": 3}, {"clients": 16, "size_mib": 128, "runs": 3}]
QUICK = [{"clients": 4, "size_mib": 8, "runs": 1}]
RSS_TARGET = 256 << 20
FLOOR_TARGET = 1.5
TENSORS = 16  # matrices per model; plus one norm each


def _shapes(size_mib: int) -> dict:
    """{name: shape} of a bf16 model of about size_mib MiB: TENSORS square matrices and a norm vector each."""
    side = int(((size_mib << 20) // 2 // TENSORS) ** 0.5)
    out = {}
    for i in range(TENSORS):
        out[f"model.layers.{i}.mlp.weight"] = (side, side)
        out[f"model.layers.{i}.norm.weight"] = (side,)
    return out


def counts(n: int) -> list:
    """Each client's example count (unequal, so the weights are not uniform)."""
    return [1000 + 137 * i for i in range(n)]


def write_models(directory: str, n: int, size_mib: int) -> tuple:
    """The global model and n clients as safetensors files of random bf16 values (|x| in [2^-7, 2))."""
    import numpy as np

    from pysoup.io.writer import write_arrays

    shapes = _shapes(size_mib)
    paths = []
    for i in range(n + 1):
        rng = np.random.default_rng(i)
        arrays = {}
        for name, shape in shapes.items():
            bits = rng.integers(0x3C00, 0x4000, size=shape, dtype=np.uint16)  # exponents 2^-7 .. 2^0
            bits |= (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15).astype(np.uint16)
            arrays[name] = bits
        path = os.path.join(directory, "global.safetensors" if i == 0 else f"client{i - 1:02d}.safetensors")
        write_arrays(path, arrays, dict.fromkeys(arrays, "BF16"))
        paths.append(path)
    return paths[0], paths[1:]


# -- the contenders, each run as `python federated.py _<name> OUT GLOBAL CLIENT...` -------------------------------


def run_pysoup(out: str, global_path: str, clients: list) -> None:
    from pysoup.federated.aggregators import ClientUpdate, FedAvg

    ups = [ClientUpdate(i, weights=p, num_examples=c) for i, (p, c) in enumerate(zip(clients, counts(len(clients))))]
    FedAvg().aggregate(global_path, ups, out=out)


def run_flower_inplace(out: str, global_path: str, clients: list) -> None:
    """Flower's aggregate_inplace (flwr/server/strategy/aggregate.py) over bf16 safetensors payloads held in memory."""
    import json as _json
    import struct

    import numpy as np

    def parse(payload: bytes) -> tuple:
        (n,) = struct.unpack("<Q", payload[:8])
        header = _json.loads(payload[8 : 8 + n])
        header.pop("__metadata__", None)
        return header, 8 + n

    def to_ndarrays(payload: bytes) -> list:  # Flower's parameters_to_ndarrays: a new array per tensor
        header, start = parse(payload)
        out = []
        for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
            b, e = header[name]["data_offsets"]
            bits = np.frombuffer(payload, dtype="<u2", count=(e - b) // 2, offset=start + b)
            out.append((bits.astype(np.uint32) << 16).view(np.float32).reshape(header[name]["shape"]))
        return out

    payloads = []
    for p in clients:  # what the server holds once every client has answered
        with open(p, "rb") as f:
            payloads.append(f.read())
    num = counts(len(clients))
    total = sum(num)
    scaling = np.asarray([n / total for n in num])

    def inplace(x, y, op):
        return op(x, y, out=x) if np.can_cast(y, x.dtype, casting="same_kind") else op(x, np.array(y, x.dtype), out=x)

    params = [inplace(x, scaling[0], np.multiply) for x in to_ndarrays(payloads[0])]
    for i, payload in enumerate(payloads[1:], start=1):
        res = (inplace(x, scaling[i], np.multiply) for x in to_ndarrays(payload))
        params = [inplace(a, b, np.add) for a, b in zip(params, res)]
    header, _ = parse(payloads[0])
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    entries, blobs, offset = {}, [], 0
    for name, acc in zip(names, params):
        u = acc.reshape(-1).view(np.uint32)
        y = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        entries[name] = {"dtype": "BF16", "shape": header[name]["shape"], "data_offsets": [offset, offset + y.nbytes]}
        blobs.append(y)
        offset += y.nbytes
    text = _json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for y in blobs:
            f.write(y.tobytes())


# -- the suite ------------------------------------------------------------------------------------------------------


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(cfg: dict, work: str) -> dict:
    from pysoup.bench import baselines
    from pysoup.bench.harness import raise_on_failure, rotated, run_process, summarize, sync, warm_page_cache

    n, size = cfg["clients"], cfg["size_mib"] << 20
    global_path, clients = write_models(work, n, cfg["size_mib"])
    input_bytes = sum(os.path.getsize(p) for p in clients)
    me = os.path.abspath(__file__)
    commands = {
        "pysoup": [sys.executable, me, "_pysoup", os.path.join(work, "pysoup.safetensors"), global_path, *clients],
        "io_floor": baselines.command("io_floor", os.path.join(work, "floor.safetensors"), *clients),
        "flower_inplace": [
            sys.executable,
            me,
            "_flower",
            os.path.join(work, "flower.safetensors"),
            global_path,
            *clients,
        ],
    }
    notes = []
    # Flower holds every payload, the fp32 sum and one client's fp32 arrays; leave 2 GiB to everyone else.
    flower_need = input_bytes + 4 * size + (2 << 30)
    if mem_available() < flower_need:
        del commands["flower_inplace"]
        notes.append(
            f"flower_inplace skipped: it needs ~{flower_need / 2**30:.1f} GiB of memory (with 2 GiB to spare), "
            f"{mem_available() / 2**30:.1f} GiB available"
        )
    warm_page_cache([global_path, *clients])
    load_before = os.getloadavg()[0]
    times = {name: [] for name in commands}
    cpu = {name: [] for name in commands}
    rss = {name: [] for name in commands}
    for r in range(cfg["runs"]):
        for name in rotated(list(commands), r):
            sync()
            before = _children_cpu()
            res = run_process(commands[name])
            raise_on_failure(res, name, f"{n}x{cfg['size_mib']}MiB")
            times[name].append(res["seconds"])
            cpu[name].append(_children_cpu() - before)  # the launcher's and the command's user + system time
            rss[name].append(res["peak_rss_bytes"])
    results = {}
    for name in commands:
        s = summarize(times[name])
        results[name] = {
            "seconds": s,
            "cpu_seconds": statistics.median(cpu[name]),
            "peak_rss_bytes": max(rss[name]),
            "gb_per_s": (input_bytes + size) / s["median"] / 1e9,
        }
    cores = len(os.sched_getaffinity(0))
    notes.append(
        f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the runs ({cores} cores, shared "
        "with other work): wall times follow CPU time"
    )
    results["pysoup"]["max_abs_diff_vs_flower"] = _diff(work) if "flower_inplace" in commands else None
    floor = results["io_floor"]["seconds"]["median"]
    ratio = results["pysoup"]["seconds"]["median"] / floor
    peak = results["pysoup"]["peak_rss_bytes"]
    targets = {
        "peak_rss": {"value_mib": peak / 2**20, "target_mib": RSS_TARGET / 2**20, "pass": peak <= RSS_TARGET},
        "time_vs_floor": {"value": ratio, "target": FLOOR_TARGET, "pass": ratio <= FLOOR_TARGET},
    }
    return {
        "case": f"FedAvg {n} clients x {cfg['size_mib']} MiB bf16",
        "clients": n,
        "model_bytes": size,
        "input_bytes": input_bytes,
        "runs": cfg["runs"],
        "results": results,
        "targets": targets,
        "notes": notes,
    }


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _diff(work: str) -> float:
    """The largest |pysoup - flower| over the outputs (bf16 both; different fp32 rounding orders)."""
    import numpy as np

    import pysoup

    worst = 0.0
    with (
        pysoup.open(os.path.join(work, "pysoup.safetensors")) as a,
        pysoup.open(os.path.join(work, "flower.safetensors")) as b,
    ):
        for name in a.keys():
            x = (a.numpy(name).astype(np.uint32) << 16).view(np.float32)
            y = (b.numpy(name).astype(np.uint32) << 16).view(np.float32)
            worst = max(worst, float(np.max(np.abs(x - y))))
    return worst


def markdown(report: dict) -> str:
    from pysoup.bench.harness import machine_line

    lines = [
        "# pysoup benchmarks: out-of-core FedAvg",
        "",
        f"Machine: {machine_line(report['machine'])}",
        "",
        f"Command: `{report['command']}`",
        "",
        "FedAvg with server_lr 1 and example-count weights: the new model is the clients' weighted mean (the global "
        "model, of the same size, is not read). The I/O floor reads every client byte once and writes the output's "
        f"size. Files on {report['scratch']}, warm page cache; contenders rotated each round; median of the runs "
        "(spread = (max - min) / median; CPU seconds: user + system, median).",
    ]
    for m in report["measurements"]:
        lines += _case_markdown(m)
    return "\n".join(lines) + "\n"


def _case_markdown(m: dict) -> list:
    lines = [
        "",
        f"## {m['case']}",
        "",
        f"Client files {m['input_bytes'] / 2**30:.2f} GiB; {m['runs']} runs.",
        "",
        "| contender | seconds (median) | spread | CPU seconds | GB/s (read + written) | peak RSS | vs the I/O floor |",
        "|---|---|---|---|---|---|---|",
    ]
    floor = m["results"]["io_floor"]["seconds"]["median"]
    for name, r in m["results"].items():
        s = r["seconds"]
        lines.append(
            f"| {name} | {s['median']:.3f} | {s['spread']:.0%} | {r['cpu_seconds']:.1f} | {r['gb_per_s']:.2f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | {s['median'] / floor:.2f}x |"
        )
    t = m["targets"]
    lines += [
        "",
        f"Targets (pysoup): peak RSS {t['peak_rss']['value_mib']:.0f} MiB <= {t['peak_rss']['target_mib']:.0f} MiB: "
        f"**{'PASS' if t['peak_rss']['pass'] else 'FAIL'}**; time {t['time_vs_floor']['value']:.2f}x the I/O floor "
        f"<= {t['time_vs_floor']['target']}x: **{'PASS' if t['time_vs_floor']['pass'] else 'FAIL'}**.",
    ]
    diff = m["results"]["pysoup"].get("max_abs_diff_vs_flower")
    if diff is not None:
        lines += [
            "",
            f"pysoup's model and Flower's differ by at most {diff:.3g} (fused fp32 fma sum / sum n vs Flower's "
            "sum of fp32 products by n_k / sum n; both rounded to bf16).",
        ]
    for note in m["notes"]:
        lines += ["", f"Note: {note}"]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 clients of 8 MiB, one run (a smoke test)")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--size-mib", type=int)
    parser.add_argument("--runs", type=int)
    parser.add_argument(
        "--out", help="where federated.{json,md} go (default: benchmarks/results; with --quick: only printed)"
    )
    args = parser.parse_args(argv)
    cases = [dict(c) for c in (QUICK if args.quick else FULL)]
    for key in ("clients", "size_mib", "runs"):
        if getattr(args, key) is not None:
            for c in cases:
                c[key] = getattr(args, key)
    if args.size_mib is not None:
        cases = cases[:1]

    from pysoup.bench.harness import machine, work_dir

    measurements = []
    for cfg in cases:
        size = cfg["size_mib"] << 20
        scale_note = None
        # Inputs on tmpfs are memory: leave 3 GiB to everyone else, scaling the number of clients down if needed.
        fit = (mem_available() - (3 << 30)) // size - 4  # the global model and three outputs beside the clients
        if fit < cfg["clients"]:
            if fit < 2:
                raise SystemExit(f"not enough free memory for 2 clients of {cfg['size_mib']} MiB; try --size-mib")
            scale_note = f"scaled to {fit} clients (asked for {cfg['clients']}): the memory available held no more"
            cfg["clients"] = fit
        with work_dir((cfg["clients"] + 4) * size) as work:
            scratch = os.path.dirname(work)
            m = measure(cfg, work)
        if scale_note:
            m["notes"].insert(0, scale_note)
        measurements.append(m)
    report = {
        "suite": "federated",
        "machine": machine(),
        "command": "python benchmarks/federated.py" + (" --quick" if args.quick else "") + _extra(args),
        "scratch": scratch,
        "measurements": measurements,
    }
    text = markdown(report)
    out = args.out or (None if args.quick else os.path.join(HERE, "results"))
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "federated.json"), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        with open(os.path.join(out, "federated.md"), "w") as f:
            f.write(text)
    print(text)
    return 0


def _extra(args) -> str:
    return "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}"
        for k in ("clients", "size_mib", "runs")
        if getattr(args, k) is not None
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_pysoup", "_flower"):
        out, global_path, *client_paths = sys.argv[2:]
        (run_pysoup if sys.argv[1] == "_pysoup" else run_flower_inplace)(out, global_path, client_paths)
    else:
        sys.exit(main())

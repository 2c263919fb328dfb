"""The many-tensors suite (`python benchmarks/run.py --suite headers`): files of 10^5 and 10^6 tiny tensors, as
MoE checkpoints have (DeepSeek-V3: ~90k tensors), where the per-tensor work (parse, validate, plan, lay out)
is the cost, not the bytes.

Contenders, each a whole process, rotated round by round:
  pysoup_open   pysoup.open(path) + len(keys())                      (time of the call, measured inside)
  safe_open     safetensors.safe_open(path, "pt") + len(keys())      (torch imported before the clock starts)
  pysoup_merge  `pysoup merge a b -o /dev/shm/...` (uniform, 2 inputs)  (whole process)
  io_floor      read both inputs, write the output's bytes (benchmarks/baselines/io_floor.py)
"""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np

from pysoup.bench import markdown_head, run_process, summarize, sync

HERE = os.path.dirname(os.path.abspath(__file__))

SUITE = "many tensors"
FULL_CASES = ["1e5", "1e6"]
QUICK_CASES = ["2e4"]
LAYERS = 61  # DeepSeek-V3's
# safetensors' writer order: dtype (its enum, largest first), then name; F32 sorts before BF16.
_ORDER = {"F32": 0, "BF16": 1}
# The 10^6 case's header is 91 MB with these names; MoE names in full ("model.layers.7.mlp.experts.12.w1.weight")
# would take it past the 100 MB header limit that safetensors and pysoup both enforce.
_NAMES = ("layers.{i}.experts.{j}.w1", "layers.{i}.experts.{j}.w2", "layers.{i}.experts.{j}.w3")


def tensor_specs(count: int) -> list:
    """(name, dtype, shape) of `count` tiny tensors: per layer one F32 norm of 4 elements, then experts of three
    BF16 2 x 2 matrices, the expert count chosen so that the layers hold `count` in all."""
    experts = -(-(count - LAYERS) // (3 * LAYERS))
    specs = []
    for i in range(LAYERS):
        specs.append((f"layers.{i}.norm", "F32", [4]))
        specs += [(n.format(i=i, j=j), "BF16", [2, 2]) for j in range(experts) for n in _NAMES]
    return specs[:count]


def write_file(path: str, specs: list, seed: int) -> int:
    """Writes one safetensors file laid out as the `safetensors` package lays it out (its header bytes, its
    order); the values are small normal numbers, so no merged value is NaN or inf. Returns the header's size."""
    ordered = sorted(specs, key=lambda s: (_ORDER[s[1]], s[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in ordered:
        nbytes = (4 if dtype == "F32" else 2) * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    values = np.random.default_rng(seed).standard_normal(offset // 2, dtype=np.float32)
    # Every 2-byte word is a bf16 of a normal value: a finite F32 too when two are read as one.
    words = (values.view(np.uint32) >> 16).astype(np.uint16)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.write(words.tobytes())
    os.replace(path + ".tmp", path)
    return len(text)


def inputs_for(data_dir: str, case: str) -> tuple:
    """Two files of the case's tensor count (made once, cached); returns (paths, header bytes)."""
    count = int(float(case))
    root = os.path.join(data_dir, f"headers-{case}")
    stamp = os.path.join(root, ".complete")
    paths = [os.path.join(root, f"ft{k}.safetensors") for k in (1, 2)]
    if not os.path.exists(stamp):
        os.makedirs(root, exist_ok=True)
        print(f"  making 2 files of {count:,} tensors in {root} ...", flush=True)
        specs = tensor_specs(count)
        sizes = [write_file(p, specs, seed=k) for k, p in enumerate(paths)]
        with open(stamp, "w") as f:
            json.dump({"tensors": count, "header_bytes": sizes[0]}, f)
    with open(stamp) as f:
        return paths, json.load(f)["header_bytes"]


def contenders(out_dir: str) -> dict:
    py = sys.executable
    opener = os.path.join(HERE, "baselines", "open_keys.py")
    out = os.path.join(out_dir, "headers-merge.safetensors")
    return {
        "pysoup_open": lambda ins: ([py, opener, "pysoup", ins[0]], None),
        "safe_open": lambda ins: ([py, opener, "safetensors", ins[0]], None),
        "pysoup_merge": lambda ins: ([py, "-m", "pysoup", "merge", *ins, "-o", out, "--no-progress"], out),
        "io_floor": lambda ins: ([py, os.path.join(HERE, "baselines", "io_floor.py"), out, *ins], out),
    }


def _call_seconds(stderr: str):
    """The in-process time open_keys.py prints (None for the other contenders)."""
    for line in stderr.splitlines():
        if line.startswith("OPEN_KEYS_SECONDS "):
            return float(line.split()[1])
    return None


def run_case(case: str, runs: int, data_dir: str, out_dir: str, only=None) -> dict:
    paths, header_bytes = inputs_for(data_dir, case)
    count = int(float(case))
    for p in paths:  # warm page cache
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    os.makedirs(out_dir, exist_ok=True)
    cs = contenders(out_dir)
    if only:
        cs = {k: v for k, v in cs.items() if k in only}
    names = list(cs)
    samples = {k: {"seconds": [], "call_seconds": [], "peak_rss_bytes": []} for k in names}
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cmd, out = cs[name](paths)
            if out and os.path.exists(out):
                os.remove(out)
            sync()
            res = run_process(cmd, env=env)
            if res["rc"] != 0:
                raise RuntimeError(f"{name} failed on {case}: {res['stderr']}")
            s = samples[name]
            s["seconds"].append(res["seconds"])
            s["peak_rss_bytes"].append(res["peak_rss_bytes"])
            call = _call_seconds(res["stderr"])
            if call is not None:
                s["call_seconds"].append(call)
            if out and os.path.exists(out):
                os.remove(out)
    result = {
        "case": case,
        "tensors": count,
        "header_bytes": header_bytes,
        "file_bytes": os.path.getsize(paths[0]),
        "rss_bound_bytes": 2 * header_bytes + (256 << 20),
        "contenders": {},
    }
    for name in names:
        s = samples[name]
        c = {
            "seconds": summarize(s["seconds"]),
            "samples": s["seconds"],
            "peak_rss_bytes": int(summarize(s["peak_rss_bytes"])["median"]),
        }
        if s["call_seconds"]:
            c["call_seconds"] = summarize(s["call_seconds"])
            c["call_samples"] = s["call_seconds"]
        result["contenders"][name] = c
    cs_ = result["contenders"]
    if "pysoup_merge" in cs_:
        merge = cs_["pysoup_merge"]["seconds"]["median"]
        floor = cs_["io_floor"]["seconds"]["median"] if "io_floor" in cs_ else 0.0
        result["merge_us_per_tensor"] = merge / count * 1e6
        result["merge_overhead_us_per_tensor"] = (merge - floor) / count * 1e6
    return result


def targets(report: dict) -> list:
    """Issue 9, item 18: pysoup.open no slower than safe_open; merge overhead <= 10 us per tensor; merge peak RSS
    <= 2 x the header's JSON size + 256 MiB."""
    out = []
    for case in report["cases"]:
        cs, label = case["contenders"], f"{case['tensors']:,} tensors"
        if "pysoup_open" in cs and "safe_open" in cs:
            p, s = cs["pysoup_open"]["call_seconds"]["median"], cs["safe_open"]["call_seconds"]["median"]
            out.append(
                f"{label}: pysoup.open {p:.3f} s vs safe_open {s:.3f} s ({p / s:.2f}x; target <= 1x): "
                f"{'met' if p <= s else 'NOT met'}"
            )
        if "merge_overhead_us_per_tensor" in case:
            us = case["merge_overhead_us_per_tensor"]
            out.append(
                f"{label}: merge overhead {us:.1f} us per tensor (target <= 10 us): {'met' if us <= 10 else 'NOT met'}"
            )
        if "pysoup_merge" in cs:
            rss, bound = cs["pysoup_merge"]["peak_rss_bytes"], case["rss_bound_bytes"]
            out.append(
                f"{label}: merge peak RSS {rss / 2**20:.0f} MiB vs 2 x header ({case['header_bytes'] / 1e6:.1f} MB) "
                f"+ 256 MiB = {bound / 2**20:.0f} MiB: {'met' if rss <= bound else 'NOT met'}"
            )
    return out


def markdown(report: dict) -> str:
    lines = [
        *markdown_head(report),
        "Two files per case of tiny tensors (F32 4-element norms, BF16 2 x 2 experts); whole processes, warm page "
        "cache, output on /dev/shm, contenders rotated each round; medians (spread = (max - min) / median). "
        "`open` columns: the time of `open(path)` + `len(keys())` inside the process (imports excluded); "
        "merge: `pysoup merge a b -o OUT` (uniform soup), the whole process.",
        "",
        "| tensors | header | contender | runs | call s | process s | spread | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for name, c in case["contenders"].items():
            call = f"{c['call_seconds']['median']:.3f}" if "call_seconds" in c else ""
            lines.append(
                f"| {case['tensors']:,} | {case['header_bytes'] / 1e6:.1f} MB | {name} | {c['seconds']['n']} | "
                f"{call} | {c['seconds']['median']:.3f} | {c['seconds']['spread']:.0%} | "
                f"{c['peak_rss_bytes'] / 2**20:.0f} MiB |"
            )
    lines += [
        "",
        "| tensors | merge us / tensor | overhead over the I/O floor, us / tensor | RSS bound |",
        "|---|---|---|---|",
    ]
    for case in report["cases"]:
        if "merge_us_per_tensor" in case:
            lines.append(
                f"| {case['tensors']:,} | {case['merge_us_per_tensor']:.1f} | "
                f"{case['merge_overhead_us_per_tensor']:.1f} | {case['rss_bound_bytes'] / 2**20:.0f} MiB |"
            )
    if report.get("targets"):
        lines += ["", "## Targets", ""] + [f"- {t}" for t in report["targets"]]
    return "\n".join(lines) + "\n"

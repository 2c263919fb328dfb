"""The `headers` suite: files of 10^5 and 10^6 tiny tensors, as MoE checkpoints have (DeepSeek-V3: ~90k tensors),
where the per-tensor work (parse, validate, plan, lay out) is the cost, not the bytes.

Contenders, each a whole process, rotated round by round:
  pysoup_open   pysoup.open(path) + len(keys())                      (time of the call, measured inside)
  safe_open     safetensors.safe_open(path, "pt") + len(keys())      (torch imported before the clock starts;
                                                                      only where safetensors and torch are installed)
  pysoup_merge  `pysoup merge a b -o OUT` (uniform, 2 inputs)        (whole process)
  io_floor      read both inputs, write the output's bytes
"""

from __future__ import annotations

import json
import os
import struct
import sys

from pysoup.bench import baselines
from pysoup.bench.cases import child_env
from pysoup.bench.harness import raise_on_failure, rotated, run_process, summarize, sync, warm_page_cache

SUITE = "many tensors"
FULL_CASES = ["1e5", "1e6"]
QUICK_CASES = ["2e4"]
LAYERS = 61  # DeepSeek-V3's
# safetensors' writer order: dtype (its enum, largest first), then name; F32 sorts before BF16.
_ORDER = {"F32": 0, "BF16": 1}
# The 10^6 case's header is 91 MB with these names; MoE names in full ("model.layers.7.mlp.experts.12.w1.weight")
# would take it past the 100 MB header limit that safetensors and pysoup both enforce.
_NAMES = ("layers.{i}.experts.{j}.w1", "layers.{i}.experts.{j}.w2", "layers.{i}.experts.{j}.w3")


def tensor_count(case: str) -> int:
    """'1e6' -> 1000000."""
    try:
        count = int(float(case))
    except ValueError:
        count = 0
    if count < LAYERS:
        from pysoup.errors import SoupError

        raise SoupError(f"case {case!r}: expected a tensor count of at least {LAYERS}, e.g. 1e5")
    return count


def scratch_bytes(cases: list) -> int:
    """About the most the suite writes into its work directory: two inputs and an output per case, ~100 bytes a
    tensor in each (its header entry and its data)."""
    return sum(3 * 100 * tensor_count(c) for c in cases) + (64 << 20)


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
    import numpy as np

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


def inputs_for(data_dir: str, case: str, echo=print) -> tuple:
    """Two files of the case's tensor count (made once per data directory); returns (paths, header bytes)."""
    count = tensor_count(case)
    root = os.path.join(data_dir, f"headers-{case}")
    stamp = os.path.join(root, ".complete")
    paths = [os.path.join(root, f"ft{k}.safetensors") for k in (1, 2)]
    if not os.path.exists(stamp):
        os.makedirs(root, exist_ok=True)
        echo(f"  making 2 files of {count:,} tensors in {root} ...")
        specs = tensor_specs(count)
        sizes = [write_file(p, specs, seed=k) for k, p in enumerate(paths)]
        with open(stamp, "w") as f:
            json.dump({"tensors": count, "header_bytes": sizes[0]}, f)
    with open(stamp) as f:
        return paths, json.load(f)["header_bytes"]


def contenders(work: str) -> dict:
    """name -> (inputs -> (argv, output path or None))."""
    out = os.path.join(work, "headers-merge.safetensors")
    py = sys.executable
    cs = {"pysoup_open": lambda ins: (baselines.command("open_keys", "pysoup", ins[0]), None)}
    if baselines.torch_and_safetensors_available():
        cs["safe_open"] = lambda ins: (baselines.command("open_keys", "safetensors", ins[0]), None)
    cs["pysoup_merge"] = lambda ins: ([py, "-m", "pysoup", "merge", *ins, "-o", out, "--no-progress"], out)
    cs["io_floor"] = lambda ins: (baselines.command("io_floor", out, *ins), out)
    return cs


def run_case(case: str, runs: int, data_dir: str, work: str, only=None, echo=print) -> dict:
    """Times every contender on one case; returns its result (per contender: process seconds, the in-process
    time of the call for the openers, peak RSS; the merge's microseconds per tensor over the I/O floor)."""
    paths, header_bytes = inputs_for(data_dir, case, echo)
    count = tensor_count(case)
    warm_page_cache(paths)
    cs = contenders(work)
    if only:
        cs = {k: v for k, v in cs.items() if k in only}
    samples = {k: {"seconds": [], "call_seconds": [], "peak_rss_bytes": []} for k in cs}
    env = child_env()
    for r in range(runs):
        for name in rotated(list(cs), r):
            cmd, out = cs[name](paths)
            if out and os.path.exists(out):
                os.remove(out)
            sync()
            res = run_process(cmd, env=env, cwd=work)
            if out and os.path.exists(out):
                os.remove(out)
            raise_on_failure(res, name, case)
            s = samples[name]
            s["seconds"].append(res["seconds"])
            s["peak_rss_bytes"].append(res["peak_rss_bytes"])
            call = baselines.open_keys_seconds(res["stderr"])
            if call is not None:
                s["call_seconds"].append(call)
    result = {
        "case": case,
        "tensors": count,
        "header_bytes": header_bytes,
        "file_bytes": os.path.getsize(paths[0]),
        "rss_bound_bytes": 2 * header_bytes + (256 << 20),
        "contenders": {},
    }
    for name, s in samples.items():
        c = {
            "seconds": summarize(s["seconds"]),
            "samples": s["seconds"],
            "peak_rss_bytes": int(summarize(s["peak_rss_bytes"])["median"]),
        }
        if s["call_seconds"]:
            c["call_seconds"] = summarize(s["call_seconds"])
            c["call_samples"] = s["call_seconds"]
        result["contenders"][name] = c
    done = result["contenders"]
    if "pysoup_merge" in done:
        merge = done["pysoup_merge"]["seconds"]["median"]
        floor = done["io_floor"]["seconds"]["median"] if "io_floor" in done else 0.0
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

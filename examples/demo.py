"""pysoup's demo (`make demo`): three fine-tunes of a small Llama-shaped bf16 model, written as real
Hugging Face directories (one of them sharded), merged three ways, checked bit for bit, and timed.

    python examples/demo.py [--size 64MiB] [--workdir .demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import pysoup
from pysoup.bench.harness import run_process
from pysoup.io.units import format_bytes, parse_size
from pysoup.testing import make_family


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="64MiB", help="size of each model")
    p.add_argument("--workdir", default=".demo")
    args = p.parse_args(argv)

    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    size = parse_size(args.size)
    print(f"pysoup {pysoup.__version__}: {pysoup.info()}")
    t = time.perf_counter()
    models = make_family(os.path.join(work, "models"), 3, size, layout="hf", shard_bytes=size // 3)
    print(
        f"made 3 fine-tunes of one base ({format_bytes(size)} each, bf16, sharded Hugging Face directories) "
        f"in {time.perf_counter() - t:.1f} s: {', '.join(os.path.relpath(m) for m in models)}"
    )

    weights = [0.5, 0.3, 0.2]
    rows = []
    # 1. The command line, as a user runs it: a sharded directory output with its index and config.json.
    cli_out = os.path.join(work, "soup-cli")
    res = pysoup_cli(
        *models, "-o", cli_out, "--weights", "0.5,0.3,0.2", "--shard-size", f"{size // 2}", "--no-progress"
    )
    rows.append(("pysoup merge (CLI, sharded dir)", res["seconds"], res["peak_rss_bytes"], _load_dir(cli_out)))
    # 2. The Python API, one file.
    api_out = os.path.join(work, "soup.safetensors")
    report = pysoup.merge(models, api_out, weights=weights, progress=False)
    rows.append(("pysoup.merge (API, one file)", report.seconds, None, _load_file(api_out)))
    # 3. In memory: state dicts in, tensors out.
    import torch  # noqa: F401 - the in-memory path needs torch

    sds = [dict(_load_dir(m)) for m in models]
    t = time.perf_counter()
    mem = pysoup.merge(sds, weights=weights)
    rows.append(("pysoup.merge (state dicts)", time.perf_counter() - t, None, mem))

    # The reference backend defines the result: every path must match it bit for bit.
    from pysoup.ops import reference

    want = {k: reference.weighted_sum([sd[k] for sd in sds], weights, sds[0][k].dtype, True) for k in sds[0]}
    moved = report.bytes_read + report.bytes_written
    print()
    print(f"{'how':<34} {'seconds':>8} {'GB/s':>7} {'peak RSS':>10}  identical to the reference")
    for how, seconds, rss, tensors in rows:
        same = all(torch.equal(tensors[k].view(torch.int16), want[k].view(torch.int16)) for k in want)
        rss_s = format_bytes(rss) if rss else "-"
        print(
            f"{how:<34} {seconds:8.3f} {moved / seconds / 1e9:7.2f} {rss_s:>10}  {'yes, bit for bit' if same else 'NO'}"
        )
        if not same:
            return 1
    # A task-vector method on the same files: TIES against the base, CLI vs the torch reference backend.
    base = os.path.join(os.path.dirname(models[0]), "base")
    ties_out = os.path.join(work, "ties.safetensors")
    res = pysoup_cli(
        *models, "--base", base, "--strategy", "ties", "--param", "density=0.3", "-o", ties_out, "--no-progress"
    )
    t = time.perf_counter()
    pysoup.merge(
        models,
        os.path.join(work, "ties-ref.safetensors"),
        strategy="ties",
        base=base,
        params={"density": 0.3},
        backend="reference",
        progress=False,
    )
    ref_seconds = time.perf_counter() - t
    same = open(ties_out, "rb").read() == open(os.path.join(work, "ties-ref.safetensors"), "rb").read()
    rss = format_bytes(res["peak_rss_bytes"])
    verdict = "yes, byte for byte" if same else "NO"
    print(
        f"{'pysoup merge --strategy ties (CLI)':<34} {res['seconds']:8.3f} {'':>7} {rss:>10}  {verdict} "
        f"(reference backend: {ref_seconds:.1f} s)"
    )
    if not same:
        return 1
    print()
    print(f"output directory {os.path.relpath(cli_out)}: {', '.join(sorted(os.listdir(cli_out)))}")
    subprocess.run([sys.executable, "-m", "pysoup", "inspect", api_out], stdout=subprocess.PIPE, check=True)
    print("every method: docs/methods.md; benchmarks against the I/O floor, a naive script and mergekit: make bench")
    return 0


def pysoup_cli(*args) -> dict:
    """Runs `python -m pysoup merge ARGS` as a user would; exits on failure with its message."""
    res = run_process([sys.executable, "-m", "pysoup", "merge", *args])
    if res["rc"] != 0:
        sys.exit(res["stderr"])
    return res


def _load_file(path):
    with pysoup.open(path) as ckpt:
        return {k: ckpt[k].clone() for k in ckpt.keys()}


def _load_dir(path):
    return _load_file(path)


if __name__ == "__main__":
    sys.exit(main())

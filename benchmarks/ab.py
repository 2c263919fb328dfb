"""A/B of two builds of pysoup on the linear and TIES cases of the suites: the `pysoup merge` CLI of each, on the
same cached inputs (benchmarks/.data, as run.py makes them), interleaved run by run (who goes first alternates),
output on /dev/shm, `sync` between runs; medians. The machine is noisy: only ratios from one run of this script
mean anything.

    python benchmarks/ab.py --before /tmp/oldvenv/bin/python --after .venv/bin/python --runs 7 --name ab-issue9

A "before" interpreter for commit C: `git worktree add /tmp/old C`, build `_C` there with cmake into
/tmp/old/pysoup/, and a venv whose site-packages holds a .pth with the lines `/tmp/old` and this venv's
site-packages (so the editable install of the checkout does not shadow it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pysoup.bench.cases import family  # noqa: E402
from pysoup.bench.harness import machine_line, warm_page_cache  # noqa: E402
from pysoup.bench.report import markdown_head  # noqa: E402

DATA = os.path.join(HERE, ".data")  # the synthetic checkpoints benchmarks/run.py caches
RESULTS = os.path.join(HERE, "results")
TIES = "density=0.5"
OUT = "/dev/shm/pysoup-ab.safetensors" if os.path.isdir("/dev/shm") else os.path.join(DATA, "ab.safetensors")


def version(python: str) -> str:
    code = "import pysoup, os; print(pysoup.__version__, os.path.dirname(pysoup.__file__), pysoup.info()['cpu_isa'])"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout.strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="python of the build to compare against")
    p.add_argument("--after", required=True, help="python of the build under test")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--name", default="ab")
    args = p.parse_args(argv)

    fts = family(DATA, "512MiB", 512 << 20, 8)
    base = os.path.join(os.path.dirname(fts[0]), "base")
    cases = {
        "linear 4 x 512MiB": fts[:4],
        "ties base + 3 x 512MiB (density 0.5)": [*fts[:3], "--base", base, "--strategy", "ties", "--param", TIES],
    }
    warm_page_cache([*fts[:4], base])
    pythons = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}  # they run in /
    seconds = {case: {k: [] for k in pythons} for case in cases}
    for case, inputs in cases.items():
        for r in range(args.runs):
            for name in list(pythons)[:: 1 if r % 2 == 0 else -1]:
                if os.path.exists(OUT):
                    os.remove(OUT)
                subprocess.run(["sync"], check=False)
                t = time.perf_counter()
                proc = subprocess.run(
                    [pythons[name], "-m", "pysoup", "merge", *inputs, "-o", OUT, "--no-progress"],
                    capture_output=True,
                    text=True,
                    cwd="/",  # not the checkout: its editable install must not shadow the "before" tree
                )
                seconds[case][name].append(time.perf_counter() - t)
                if proc.returncode:
                    raise RuntimeError(f"{name} failed on {case}: {proc.stderr}")
    if os.path.exists(OUT):
        os.remove(OUT)

    report = {
        "suite": f"A/B {args.name}",
        "machine_line": machine_line(),
        "command": "python benchmarks/ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "builds": {k: version(v) for k, v in pythons.items()},
        "seconds": seconds,
    }
    lines = [
        *markdown_head(report),
        *(f"- {k}: {v}" for k, v in report["builds"].items()),
        "",
        f"Whole `pysoup merge` processes, interleaved, {args.runs} runs each; seconds.",
        "",
        "| case | before median | after median | after / before | before min-max | after min-max |",
        "|---|---|---|---|---|---|",
    ]
    for case, d in seconds.items():
        b, a = statistics.median(d["before"]), statistics.median(d["after"])
        lines.append(
            f"| {case} | {b:.3f} | {a:.3f} | {a / b:.3f} | {min(d['before']):.3f}-{max(d['before']):.3f} | "
            f"{min(d['after']):.3f}-{max(d['after']):.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.name + ".json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(RESULTS, args.name + ".md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

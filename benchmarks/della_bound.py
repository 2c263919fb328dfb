"""Why della misses issue 14's bound (3x the I/O floor + 0.5 s on base + 3 x 512 MiB bf16), measured.

Times the committed DELLA against two builds made for timing only, whose merges are wrong:
- `no-rank`: DELLA's counting rank gives each entry the keep threshold of its index instead of its rank (rows
  that take the radix sort, none of the benchmark's bf16 rows, are still ranked);
- `no-rank-no-draws`: that, and no Philox words drawn (each tile compares against the words left in scratch).
So the committed time less `no-rank` is what the exact per-row ranks cost, and `no-rank` less `no-rank-no-draws`
what the draws cost; `no-rank-no-draws` is what every other part of the merge (two passes over the inputs, the L1
statistics, the TIES combine, the writes) takes. Each build is this checkout's csrc/, pysoup/ and CMakeLists.txt
with the lines below changed, built with the same flags as the package (CMake, Release); the merges run in-process
(the CLI's `merge`, as the methods benchmark runs it, without the process start-up), rounds alternating the builds.

    python benchmarks/della_bound.py [--rounds 3] [--method della]   # ~10 min: three builds, then the merges

Needs the methods benchmark's files (benchmarks/.data/lm-512MiB: `python benchmarks/run.py --suite methods` makes
them). Writes benchmarks/results/della-bound.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "benchmarks", ".data", "lm-512MiB")
KERNELS = "csrc/cpu/sparsify_impl.h"

# (old, new): each old text must occur exactly once, or the build stops (the source moved on).
_ROW_START = "    const uint32_t* bits = c.bits.data();\n    // More than 1/16 of the entries with a low half"
NO_RANK = (
    _ROW_START,
    "    for (int64_t j = 0; j < n; ++j) kb[j] = by_rank[j];  // timing only\n    return true;\n" + _ROW_START,
)
NO_DRAWS = ("        if (a.drops[i]) philox_words(", "        if (a.drops[i] && m < 0) philox_words(")
VARIANTS = {"committed": [], "no-rank": [NO_RANK], "no-rank-no-draws": [NO_RANK, NO_DRAWS]}

# One in-process merge in a child whose sys.path puts the variant first (and drops an editable install's finder).
CHILD = """
import os, sys, time
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pysoup.bench.cases import METHODS, method_of
from pysoup.cli import main
import pysoup
assert pysoup.__file__.startswith(sys.argv[1]), pysoup.__file__
m, data, out = sys.argv[2], sys.argv[3], sys.argv[4]
args, n, base, _ = METHODS[m]
ins = [f"{data}/ft{i}/model.safetensors" for i in range(1, n + 1)]
argv = ["merge", *ins, "-o", out, "--no-progress", "--strategy", method_of(m), *args]
argv += ["--base", f"{data}/base/model.safetensors"]
t = time.perf_counter()
main(argv)
print("SECONDS", time.perf_counter() - t)
"""


def build(name: str, edits: list, work: str) -> str:
    """This checkout's sources with `edits` applied, built into work/name (returns the directory to import from)."""
    src = os.path.join(work, name)
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", "HEAD", "csrc", "pysoup", "CMakeLists.txt"], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        tarfile.open(fileobj=f).extractall(src, filter="data")
    path = os.path.join(src, KERNELS)
    text = open(path).read()
    for old, new in edits:
        if text.count(old) != 1:
            sys.exit(f"della_bound: {KERNELS} no longer has the line this variant changes: {old.strip()!r}")
        text = text.replace(old, new)
    open(path, "w").write(text)
    py = sys.executable
    cmakedir = subprocess.run([py, "-m", "pybind11", "--cmakedir"], check=True, capture_output=True, text=True)
    out = os.path.join(src, "build")
    subprocess.run(
        ["cmake", "-S", src, "-B", out, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={py}",
         f"-Dpybind11_DIR={cmakedir.stdout.strip()}"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["ninja", "-C", out], check=True, capture_output=True)
    [so] = [f for f in os.listdir(out) if f.startswith("_C.") and f.endswith(".so")]
    shutil.copy(os.path.join(out, so), os.path.join(src, "pysoup", so))
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="della", choices=["della", "della_linear"])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "pysoup-della-bound"))
    ap.add_argument("--out", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    a = ap.parse_args()
    if not os.path.exists(os.path.join(DATA, "base", "model.safetensors")):
        sys.exit(f"della_bound: no benchmark files in {DATA} (python benchmarks/run.py --suite methods makes them)")
    dirs = {}
    for name, edits in VARIANTS.items():
        t = time.perf_counter()
        dirs[name] = build(name, edits, a.work)
        print(f"built {name} in {time.perf_counter() - t:.0f} s", flush=True)
    out = os.path.join(a.out, "della_bound.safetensors")
    times: dict = {name: [] for name in VARIANTS}
    for r in range(a.rounds + 1):  # round 0 warms the page cache and is not counted
        for name, src in dirs.items():
            p = subprocess.run(
                [sys.executable, "-c", CHILD, src, a.method, DATA, out], check=True, capture_output=True, text=True
            )
            s = float(p.stdout.split("SECONDS")[-1])
            if r:
                times[name].append(s)
            print(f"round {r} {name}: {s:.2f} s", flush=True)
    os.unlink(out)
    med = {name: statistics.median(v) for name, v in times.items()}
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    lines = [
        f"# Why {a.method} misses its bound: the committed build against two timing-only builds",
        "",
        f"Command: `python benchmarks/della_bound.py --rounds {a.rounds} --method {a.method}` (HEAD "
        f"{head.stdout.strip()}, {time.strftime('%Y-%m-%d %H:%M')}). In-process merges of base + 3 x 512 MiB bf16, "
        "rounds alternating the builds, seconds (median, then every run):",
        "",
        "| build | seconds | runs |",
        "|---|---|---|",
        *[f"| {n} | {med[n]:.2f} | {', '.join(f'{s:.2f}' for s in v)} |" for n, v in times.items()],
        "",
        f"- the exact per-row ranks: {med['committed'] - med['no-rank']:.2f} s",
        f"- the Philox draws: {med['no-rank'] - med['no-rank-no-draws']:.2f} s",
        f"- everything else: {med['no-rank-no-draws']:.2f} s",
        "",
    ]
    path = os.path.join(ROOT, "benchmarks", "results", f"{a.method.replace('_', '-')}-bound.md")
    open(path, "w").write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""pysoup's benchmark suites (the code: pysoup/bench/, shipped in the package; `pysoup bench` runs them from an
installed wheel). This wrapper keeps the repository's habits: results in benchmarks/results/<name>.{json,md,png},
overwritten; synthetic checkpoints cached in benchmarks/.data between runs.

    python benchmarks/run.py            # the full linear suite (~20 min; makes ~15 GB of synthetic checkpoints once)
    python benchmarks/run.py --quick    # one small case, seconds
    python benchmarks/run.py --cases 4x512MiB --runs 7
    python benchmarks/run.py --suite methods             # every merge method on base + 3 x 512 MiB
    python benchmarks/run.py --suite headers             # files of 10^5 and 10^6 tiny tensors
    python benchmarks/run.py --kernel-only --runs 31     # the in-memory kernel and EMA cases (results: kernel.*)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the source tree's pysoup, as `make bench` builds it in place
DATA = os.path.join(HERE, ".data")
RESULTS = os.path.join(HERE, "results")


def _split(text):
    return [t for t in text.split(",") if t] if text else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cases", help="comma-separated, e.g. 4x512MiB,2x1GiB (headers: 1e5,1e6)")
    p.add_argument("--runs", type=int)
    p.add_argument("--only", help="comma-separated contenders")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--no-kernel", action="store_true", help="leave out the in-memory kernel and EMA cases")
    p.add_argument("--name", help="results file stem (default: linear, methods, headers, kernel, or quick[-SUITE])")
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

    import pysoup.bench

    if args.kernel_only:
        default_name = "kernel"
    elif args.quick:
        default_name = "quick" if args.suite == "linear" else f"quick-{args.suite}"
    else:
        default_name = args.suite
    name = args.name or default_name  # a NAME with a folder (--name /tmp/x/ties) writes there
    pysoup.bench.run(
        args.suite,
        os.path.join(RESULTS, os.path.dirname(name)),
        quick=args.quick,
        name=os.path.basename(name),
        cases=[] if args.kernel_only else _split(args.cases),
        methods=_split(args.methods),
        runs=args.runs,
        only=_split(args.only),
        mergekit=not args.no_mergekit,
        in_memory_cases=not args.no_kernel,
        data_dir=DATA,
        force=True,
        command="python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    return 0


def rewrite(stem: str) -> None:
    """Recomputes the targets, the markdown and the chart of saved results (after a change to the report's
    format): rewrite("benchmarks/results/linear")."""
    import pysoup.bench
    from pysoup.bench import report

    with open(stem + ".json") as f:
        rep = json.load(f)
    rep["targets"] = pysoup.bench.targets(rep)
    report.save(rep, os.path.dirname(stem), os.path.basename(stem))


if __name__ == "__main__":
    sys.exit(main())

"""What the reproductions in examples/ share: the machine line of their results, and writing the results as
examples/results/NAME.{json,md,png}."""

from __future__ import annotations

import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def save(name: str, res: dict, text: str, plot) -> None:
    """Writes the results (JSON), their table (markdown) and plot(res, path) (PNG) under examples/results/."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text)
    plot(res, os.path.join(RESULTS, f"{name}.png"))
    print(f"wrote {RESULTS}/{name}.{{json,md,png}}")


def map_seeds(run_seed, seeds: list, *args) -> list:
    """run_seed(seed, *args) for every seed, one seed per forked process, two at a time (one per core). The first
    optimizer's imports (seconds) are made before forking, once."""
    import concurrent.futures
    import multiprocessing

    import torch

    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    fork = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=fork) as pool:
        return list(pool.map(run_seed, seeds, *([a] * len(seeds) for a in args)))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

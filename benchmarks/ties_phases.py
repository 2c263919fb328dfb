"""TIES on the CPU, phase by phase, in memory: the two radix-select histogram passes and the combine, per ISA.

    python benchmarks/ties_phases.py [--elements 67108864] [--runs 5]

Three bf16 fine-tunes of a bf16 base (|tau| spans a few exponents, as in real fine-tunes), density 0.5, the
engine's 4 Mi-element chunks, the machine's threads; medians. Prints one line per ISA (ms per phase).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--elements", type=int, default=64 << 20)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    import pysoup
    from pysoup.engine.execute import CHUNK_ELEMENTS
    from pysoup.ops import cpu
    from pysoup.ops.table import Chunk, TaskVectorParams

    n = args.elements
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    xs = [(base.float() + 5e-4 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(3)]
    out = torch.empty(n, dtype=torch.bfloat16)
    chunks = [(s, min(CHUNK_ELEMENTS, n - s)) for s in range(0, n, CHUNK_ELEMENTS)]

    def select(isa, passes):
        """The selector after up to `passes` passes, and the seconds the last of them took (0 where the selection
        ended before it: the CPU's ends after pass 0 where the thresholds have a zero low half)."""
        sel = cpu.CpuBackend(isa=isa).top_k_selector([n // 2] * 3)
        seconds = 0.0
        for pass_ in range(passes):
            if sel.thresholds is not None:
                seconds = 0.0
                break
            t = time.perf_counter()
            for s, m in chunks:
                sel.add(Chunk("w", [x[s:].data_ptr() for x in [*xs, base]], ["BF16"] * 4, s, m), pass_)
            seconds = time.perf_counter() - t
            sel.finish(pass_)
        return sel, seconds

    def combine(isa, sel):
        params = TaskVectorParams((1.0,) * 3, 1.0, True, True, trim_bits=tuple(sel.thresholds))
        quota = list(sel.quotas)
        backend = cpu.CpuBackend(isa=isa)
        t = time.perf_counter()
        for s, m in chunks:
            chunk = Chunk("w", [x[s:].data_ptr() for x in [*xs, base]], ["BF16"] * 4, s, m, out[s:].data_ptr(), "BF16")
            _, quota = backend.task_vector_raw(chunk, params, quota)
        return time.perf_counter() - t

    print(f"{pysoup.info()['threads']} threads, 3 x {n:,} bf16 elements, medians of {args.runs}")
    print(f"{'isa':<8} {'pass 0':>8} {'pass 1':>8} {'combine':>8}  (ms)")
    for isa in cpu.usable_isas():
        times = {"pass 0": [], "pass 1": [], "combine": []}
        for _ in range(args.runs):
            times["pass 0"].append(select(isa, 1)[1])
            sel, seconds = select(isa, 2)
            times["pass 1"].append(seconds)
            times["combine"].append(combine(isa, sel))
        print(f"{isa:<8} " + " ".join(f"{statistics.median(v) * 1e3:8.0f}" for v in times.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

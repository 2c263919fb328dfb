"""The in-memory cases of the `linear` suite (they need torch): the weighted-sum kernel against torch doing the
same arithmetic and against torch's triad bandwidth, and one multi-tensor EMA step against torch._foreach_lerp_."""

from __future__ import annotations

import os

from pysoup.bench.harness import interleaved

KERNEL_ELEMENTS, KERNEL_QUICK_ELEMENTS = 1 << 26, 1 << 22
EMA_PARAMS, EMA_QUICK_PARAMS = 10**8, 10**6
EMA_TENSORS = 500


def kernel_case(elements: int, runs: int) -> dict:
    """weighted_sum of 4 bf16 tensors in memory: pysoup's kernel vs torch doing the same arithmetic, and the
    triad bandwidth torch reaches (a = b + s*c in fp32), all with the machine's cores.

    torch and pysoup each bring an OpenMP runtime; with the default active wait, one runtime's idle threads spin
    while the other's work, and on 2 cores pysoup measured anywhere from 73% to 91% of triad. Passive waiting
    (set before either runtime starts) and contenders interleaved round by round make the comparison fair."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    import pysoup
    from pysoup.ops import get_backend
    from pysoup.ops.table import Chunk

    threads = pysoup.info()["threads"]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(elements, generator=g).to(torch.bfloat16) for _ in range(4)]
    w = [0.25] * 4
    moved = 5 * elements * 2  # 4 inputs read + 1 output written, bf16

    def torch_sum():
        acc = torch.zeros(elements, dtype=torch.float32)
        for x, wi in zip(xs, w):
            acc.add_(x, alpha=wi)
        return acc.to(torch.bfloat16)

    out = torch.empty(elements, dtype=torch.bfloat16)
    cpu = get_backend("cpu", threads=threads)
    chunk = Chunk("kernel", [x.data_ptr() for x in xs], ["BF16"] * 4, 0, elements, out.data_ptr(), "BF16")

    def pysoup_sum():
        cpu.weighted_sum_raw(chunk, w, False)

    a, b, c = (torch.randn(elements, generator=g) for _ in range(3))

    def triad():
        torch.add(b, c, alpha=0.5, out=a)

    res = {"elements": elements, "threads": threads, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
    stats = interleaved({"pysoup": pysoup_sum, "torch": torch_sum, "triad": triad}, runs)
    for name, nbytes in (("pysoup", moved), ("torch", moved), ("triad", 3 * elements * 4)):
        res[name] = {"seconds": stats[name], "gb_per_s": nbytes / stats[name]["median"] / 1e9}
    res["pysoup_vs_torch"] = res["torch"]["seconds"]["median"] / res["pysoup"]["seconds"]["median"]
    res["pysoup_fraction_of_triad"] = res["pysoup"]["gb_per_s"] / res["triad"]["gb_per_s"]
    return res


def ema_case(params: int, tensors: int, runs: int) -> dict:
    """One EMA step (a <- 0.999 a + 0.001 b) over a model of `tensors` uneven tensors: pysoup.ops.lerp_ (the public
    op, argument checks included) and pysoup.ops.MultiTensorLerp (checked once, then called) against
    torch._foreach_lerp_ and a per-tensor torch loop, in fp32 and bf16; and the same on 500 tensors of 64
    elements, where only the per-call overhead counts."""
    import torch

    import pysoup

    threads = pysoup.info()["threads"]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    per = params // tensors
    sizes = [per + (17 * i) % 1024 for i in range(tensors)]  # uneven, as real models are
    res = {"params": sum(sizes), "tensors": tensors, "threads": threads, "configs": {}}

    def step_fns(avg, new):
        def loop():
            for a, b in zip(avg, new):
                a.lerp_(b, 0.001)

        bound = pysoup.ops.MultiTensorLerp(avg, new)
        return {
            "pysoup": lambda: pysoup.ops.lerp_(avg, new, 0.001),
            "pysoup_bound": lambda: bound(0.001),
            "torch_foreach_lerp": lambda: torch._foreach_lerp_(avg, new, 0.001),
            "torch_loop": loop,
        }

    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        avg = [torch.randn(s, generator=g).to(dtype) for s in sizes]
        new = [torch.randn(s, generator=g).to(dtype) for s in sizes]
        moved = 3 * sum(sizes) * avg[0].element_size()  # read a and b, write a
        stats = interleaved(step_fns(avg, new), runs)
        cfg = {name: {"seconds": st, "gb_per_s": moved / st["median"] / 1e9} for name, st in stats.items()}
        cfg["speedup_vs_foreach"] = stats["torch_foreach_lerp"]["median"] / stats["pysoup"]["median"]
        res["configs"][label] = cfg
        del avg, new
    avg = [torch.randn(64, generator=g) for _ in range(500)]
    new = [torch.randn(64, generator=g) for _ in range(500)]
    stats = interleaved(step_fns(avg, new), max(runs, 51))
    res["overhead_500x64"] = {name: {"seconds": st} for name, st in stats.items()}
    return res


def targets(report: dict) -> list:
    """The core issue's kernel target: pysoup's in-memory weighted sum at >= 85% of torch's triad bandwidth."""
    k = report.get("kernel")
    if not k:
        return []
    f = k["pysoup_fraction_of_triad"]
    return [f"in-memory kernel at {f:.0%} of triad bandwidth (target >= 85%): {'met' if f >= 0.85 else 'NOT met'}"]

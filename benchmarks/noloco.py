"""NoLoCo's outer step per GB of weights: pysoup's fused weighted sums against the same formula written with torch
ops, and against the memory-bandwidth floor.

One worker of a group of g = 2, in one process, with its peer's message already received (no communication: the
arithmetic is what pysoup fuses). Inputs: the worker's parameters theta_i (separate tensors, as a model's), its
outer weights phi_i and momentum m_i (flat buffers, as NoLoCo keeps them; float32 momentum always), and the
received buffer [theta_j - phi_j | phi_j] (flat, as NoLoCo receives it). The step, alpha 0.7, beta 0.5:

    m_i <- beta m_i + alpha mean(theta_i - phi_i, d_j) + alpha (mean(phi_i, phi_j) - phi_i);  phi_i <- phi_i + m_i;
    theta_i <- phi_i

Contenders, every one updating the same tensors in place (the list ones through per-tensor views of the flat
buffers), timed in rotated rounds after a warm-up call (pysoup.bench.harness.interleaved):

  - pysoup NoLoCo (flat): NoLoCo.outer_step's arithmetic without its exchange: `_delta(NoLoCo._flat(params), phi)`,
    `_noloco_update(phi, m, [phi, phi_j], [d_i, d_j])` and `NoLoCo._set_params` (the functions noloco.py calls;
    the send buffer torch.cat([d_i, phi]) is left out: it belongs to the exchange);
  - pysoup per tensor: the same three calls per tensor, as simulate_outer_step's loop does them;
  - torch: the formula with torch ops, a loop over the tensors, fp32 arithmetic (`.float()` on bf16 inputs);
  - torch _foreach: the same formula with torch._foreach_* over the tensor lists;
  - triad: torch.add(a, b, out=c) on three fp32 tensors of 128 MiB; its bandwidth (3 x 128 MiB / its time) turns
    the bytes the step must touch (read theta, phi, m, d_j, phi_j; write m, phi, theta) into the floor.

Peak extra memory (the contender's temporaries) is measured in a child process, on the same shapes scaled to
256 MiB of fp32 weights (temporaries scale with the tensors; reported as a multiple of the weights): its RSS
high-water mark reset (/proc/self/clear_refs), one call, the mark minus the RSS before; glibc is told to serve
every allocation of 64 KiB or more with mmap (MALLOC_MMAP_THRESHOLD_), so freed temporaries leave the RSS and
nothing is hidden in reused heap. The timing process keeps glibc's defaults.

Models: 1 GiB of fp32 weights (2^28 parameters) as 8 tensors of 128 MiB, and as ~2000 tensors (124 transformer
blocks of hidden 384: four attention and two MLP matrices, their biases, two LayerNorms; an embedding fills the
rest); the same parameters in bf16 with fp32 momentum (512 MiB of weights). Holding the inputs takes 5 x the fp32
weights, the whole run ~8.5 x; with less than that + 2 GiB available, the size is halved to 512 MiB (and the
results say so).

    python benchmarks/noloco.py [--quick] [--runs 7] [--size-mib 1024] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# torch and pysoup each bring an OpenMP runtime: with the default active wait, one's idle threads spin while the
# other works (see pysoup/bench/in_memory.py). Set before either starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ALPHA, BETA = 0.7, 0.5  # NoLoCo's outer lr and momentum (the paper's configs)
LAYERS = 124  # transformer blocks of the many-tensor model: 16 tensors each, ~2000 in all
# probe_mib: the memory probe's size (its child holds the inputs and a contender's temporaries, up to ~9.5 x the
# weights: at 1 GiB it was OOM-killed beside the other work on this 24 GiB machine)
FULL = {"size_mib": 1024, "runs": 7, "triad_mib": 128, "layers": LAYERS, "probe_mib": 256}
QUICK = {"size_mib": 8, "runs": 3, "triad_mib": 16, "layers": 8, "probe_mib": 8}
# Peak of the timing process, in fp32-weight sizes: the inputs (5 x) + the largest temporaries (torch _foreach on
# bf16: 4.5 x the fp32 size; pysoup flat: 2 x) + the triad (3 x 128 MiB) and the interpreter; plus a margin for the
# other work on a shared machine (no swap here: running short would invite the OOM killer).
MEM_FACTOR = 8.5
MEM_MARGIN = 2 << 30
CONTENDERS = ("pysoup NoLoCo (flat)", "pysoup per tensor", "torch", "torch _foreach")
FLOOR = "floor"


# -- the models ------------------------------------------------------------------------------------------------------
def big_shapes(params: int) -> list:
    """8 equal vectors (8 x 128 MiB at 1 GiB of fp32)."""
    return [(params // 8,)] * 8


def transformer_shapes(params: int, layers: int = LAYERS) -> list:
    """`layers` transformer blocks (LayerNorm, q/k/v/o with biases, LayerNorm, MLP h -> 4h -> h with biases: 16
    tensors, 12 h^2 + 13 h parameters), the hidden size the largest multiple of 32 leaving >= 10% of `params` to
    an embedding [rows, h] that brings the total to `params` (to within h), and a final LayerNorm."""
    h = 32
    while layers * (12 * (h + 32) ** 2 + 13 * (h + 32)) <= 0.9 * params:
        h += 32
    block = [(h,), (h,), (h, h), (h,), (h, h), (h,), (h, h), (h,), (h, h), (h,), (h,), (h,)]
    block += [(4 * h, h), (4 * h,), (h, 4 * h), (h,)]
    rows = (params - layers * (12 * h * h + 13 * h) - 2 * h) // h
    return [(rows, h)] + block * layers + [(h,), (h,)]


def models(size_mib: int, layers: int = LAYERS) -> list:
    """(label, shapes, torch dtype) of every case."""
    import torch

    params = (size_mib << 20) // 4
    big, many = big_shapes(params), transformer_shapes(params, layers)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16 (fp32 momentum)"
        out.append((f"{name}, {len(big)} x {big[0][0]:,}", big, dtype))
        out.append((f"{name}, {len(many)} tensors (transformer mix)", many, dtype))
    return out


class Inputs:
    """One worker's state and its peer's message: theta (a list of separate tensors), phi and m (flat), received
    (flat: d_j then phi_j), and per-tensor views of the flat buffers (phis, ms, djs, qjs)."""

    def __init__(self, shapes: list, dtype, fill: str = "random"):
        import torch

        sizes = [_numel(s) for s in shapes]
        n = sum(sizes)
        self.dtype, self.numel = dtype, n
        g = torch.Generator().manual_seed(0)

        def values(count, scale, base=None):
            if fill != "random":  # the memory probe: any values, every page touched
                return torch.full((count,), scale, dtype=torch.float32)
            x = torch.randn(count, generator=g).mul_(scale)
            return x if base is None else x.add_(base)

        phi32 = values(n, 0.02)
        self.phi = phi32.to(dtype)
        theta = values(n, 1e-3, phi32).to(dtype)
        self.theta = [t.view(s).clone() for t, s in zip(torch.split(theta, sizes), shapes)]
        del theta
        self.m = values(n, 1e-3)
        self.received = torch.empty(2 * n, dtype=dtype)
        self.received[:n] = values(n, 1e-3)  # d_j = theta_j - phi_j, rounded into the weights' dtype
        self.received[n:] = values(n, 1e-3, phi32)  # phi_j
        del phi32

        def views(flat):
            return [v.view(s) for v, s in zip(torch.split(flat, sizes), shapes)]

        self.phis, self.ms = views(self.phi), views(self.m)
        self.djs, self.qjs = views(self.received[:n]), views(self.received[n:])

    def weight_bytes(self) -> int:
        return self.numel * self.phi.element_size()

    def floor_bytes(self) -> int:
        """What the step must touch: read theta, phi, m, d_j, phi_j; write m, phi, theta."""
        return self.numel * (6 * self.phi.element_size() + 2 * 4)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- the contenders --------------------------------------------------------------------------------------------------
def contenders(x: Inputs, threads: int) -> dict:
    """{name: a function doing worker i's outer step on x in place}."""
    import types

    import torch

    from pysoup.federated.noloco import NoLoCo, _delta, _noloco_update

    ops = {"backend": "auto", "threads": threads}
    n = x.numel
    d_j, phi_j = x.received[:n], x.received[n:]
    holder = types.SimpleNamespace(_by_dtype={x.dtype: x.theta}, phi={x.dtype: x.phi})  # what _set_params reads

    def pysoup_flat():
        d_i = _delta(NoLoCo._flat(x.theta), x.phi, ops)
        _noloco_update(x.phi, x.m, [x.phi, phi_j], [d_i, d_j], ALPHA, BETA, ops)
        NoLoCo._set_params(holder)

    def pysoup_per_tensor():
        for theta, phi, m, dj, qj in zip(x.theta, x.phis, x.ms, x.djs, x.qjs):
            d_i = _delta(theta, phi, ops)
            _noloco_update(phi, m, [phi, qj], [d_i, dj], ALPHA, BETA, ops)
            theta.copy_(phi)

    def torch_loop():
        for theta, phi, m, dj, qj in zip(x.theta, x.phis, x.ms, x.djs, x.qjs):
            d_i = theta - phi  # what worker i sends, in the weights' dtype
            delta_bar = (d_i.float() + dj.float()) / 2
            phi_bar = (phi.float() + qj.float()) / 2
            m.mul_(BETA).add_(delta_bar, alpha=ALPHA).add_(phi_bar - phi.float(), alpha=ALPHA)
            phi.add_(m)
            theta.copy_(phi)

    def up(xs):
        return xs if x.dtype == torch.float32 else [t.float() for t in xs]

    def torch_foreach():
        d_i = torch._foreach_sub(x.theta, x.phis)
        delta_bar = torch._foreach_add(up(d_i), up(x.djs))
        torch._foreach_div_(delta_bar, 2)
        phi_bar = torch._foreach_add(up(x.phis), up(x.qjs))
        torch._foreach_div_(phi_bar, 2)
        torch._foreach_sub_(phi_bar, up(x.phis))
        torch._foreach_mul_(x.ms, BETA)
        torch._foreach_add_(x.ms, delta_bar, alpha=ALPHA)
        torch._foreach_add_(x.ms, phi_bar, alpha=ALPHA)
        torch._foreach_add_(x.phis, x.ms)
        torch._foreach_copy_(x.theta, x.phis)

    fns = dict(zip(CONTENDERS, (pysoup_flat, pysoup_per_tensor, torch_loop, torch_foreach)))
    return {name: _no_grad(fn) for name, fn in fns.items()}


def _no_grad(fn):
    import torch

    def run():
        with torch.no_grad():
            fn()

    return run


def triad(mib: int):
    """(a function doing c = a + b on fp32 tensors of `mib` MiB, the bytes it counts: 3 x mib MiB)."""
    import torch

    n = (mib << 20) // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    return (lambda: torch.add(a, b, out=c)), 3 * 4 * n


# -- checks ----------------------------------------------------------------------------------------------------------
def check_numerics(threads: int) -> list:
    """On a small many-tensor model in each dtype: pysoup's two forms equal simulate_outer_step's worker 0 bit for
    bit (group [0, 1] at step 0); the torch contenders agree with it to rounding. Returns one line per dtype."""
    import torch

    from pysoup.federated.noloco import _delta, simulate_outer_step

    lines = []
    shapes = transformer_shapes(1 << 18, layers=4)
    for dtype in (torch.float32, torch.bfloat16):
        ref = Inputs(shapes, dtype)
        n = ref.numel
        # worker 1 of the simulation: phi_j, and a theta_j with theta_j - phi_j = d_j
        sim_phi = [[p.clone() for p in ref.phis], [q.clone() for q in ref.qjs]]
        sim_theta = [[t.clone() for t in ref.theta], [q + d for q, d in zip(ref.qjs, ref.djs)]]
        sent = [_delta(t, q, {"backend": "auto", "threads": threads}) for t, q in zip(sim_theta[1], sim_phi[1])]
        for d, dj in zip(sent, ref.djs):  # theta_j = phi_j + d_j may round: send what the simulation will send
            dj.copy_(d)
        sim_m = [[m.clone() for m in ref.ms], [torch.zeros_like(m) for m in ref.ms]]
        assert simulate_outer_step(sim_theta, sim_phi, sim_m, step=0, outer_lr=ALPHA, momentum=BETA) == [[0, 1]]
        results = {}
        for name in CONTENDERS:
            x = Inputs(shapes, dtype)
            x.received[:n] = ref.received[:n]
            contenders(x, threads)[name]()
            results[name] = x
        for name in CONTENDERS[:2]:
            x = results[name]
            same = all(torch.equal(a, b) for a, b in zip(x.phis + x.ms + x.theta, sim_phi[0] + sim_m[0] + sim_theta[0]))
            if not same:
                raise AssertionError(f"{name} ({dtype}) differs from simulate_outer_step")
        worst = {}
        p_ref = torch.cat([p.reshape(-1) for p in sim_phi[0]]).float()
        m_ref = torch.cat([m.reshape(-1) for m in sim_m[0]])
        for name in CONTENDERS[2:]:
            x = results[name]
            dphi = (x.phi.float() - p_ref).abs().max().item()
            dm = (x.m - m_ref).abs().max().item()
            ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-23  # relative spacing of the weights' dtype
            tol_phi = ulp * p_ref.abs().max().item()
            tol_m = 1e-6 * p_ref.abs().max().item()
            if dphi > tol_phi or dm > tol_m:
                raise AssertionError(f"{name} ({dtype}): |d phi| {dphi:.3g} (tol {tol_phi:.3g}), |d m| {dm:.3g}")
            worst[name] = (dphi, dm)
        lines.append(
            f"{str(dtype).removeprefix('torch.')}: both pysoup forms equal simulate_outer_step's worker 0 bit for bit "
            "(theta, phi, m); "
            + "; ".join(f"{k}: max |d phi| {v[0]:.2g}, max |d m| {v[1]:.2g}" for k, v in worst.items())
            + f" (|phi| <= {p_ref.abs().max().item():.2g})"
        )
    return lines


# -- memory (a child process) ------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(size_mib: int, layers: int, threads: int) -> list:
    """Per case of models(size_mib, layers): {"case", "weight_bytes", "extra_bytes": {contender: peak extra bytes of
    one call, or None where the high-water mark cannot be reset}}."""
    import torch

    torch.set_num_threads(threads)
    out = []
    for label, shapes, dtype in models(size_mib, layers):
        x = Inputs(shapes, dtype, fill="constant")
        fns = contenders(x, threads)
        extra = {}
        out.append({"case": label, "weight_bytes": x.weight_bytes(), "extra_bytes": extra})
        for name, fn in fns.items():
            fn()  # one-time costs (thread pools, the native module) are not temporaries
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                extra[name] = None
                continue
            before = _status("VmRSS")
            fn()
            extra[name] = _status("VmHWM") - before
        del x, fns
    return out


def measure_memory(size_mib: int, layers: int, threads: int) -> dict:
    """memory_child's list in a child process, as {"size_mib", "cases"}; {"size_mib", "error"} if it failed (the
    timings are kept either way)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "_memory", str(size_mib), str(layers), str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        why = (proc.stderr.strip().splitlines() or [f"killed by signal {-proc.returncode}"])[-1]
        return {"size_mib": size_mib, "error": f"exit {proc.returncode}: {why}"}
    return {"size_mib": size_mib, "cases": json.loads(proc.stdout.strip().splitlines()[-1])}


def _die_first() -> None:
    """Makes this process the OOM killer's first choice: on a shared machine without swap, running short of memory
    should end this benchmark, not someone else's work."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


# -- the suite -------------------------------------------------------------------------------------------------------
def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(label: str, shapes: list, dtype, runs: int, threads: int, triad_mib: int) -> dict:
    import torch

    from pysoup.bench.harness import interleaved

    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    x = Inputs(shapes, dtype)
    fns = contenders(x, threads)
    fns["triad"], triad_bytes = triad(triad_mib)
    faults = dict.fromkeys(fns, 0)
    stats = interleaved({name: _count_faults(fn, faults, name) for name, fn in fns.items()}, runs)
    gb = x.weight_bytes() / 1e9
    tri = stats.pop("triad")
    bandwidth = triad_bytes / tri["median"]
    floor_s = x.floor_bytes() / bandwidth
    case = {
        "case": label,
        "tensors": len(shapes),
        "params": x.numel,
        "weights_dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": x.weight_bytes(),
        "floor_bytes": x.floor_bytes(),
        "runs": runs,
        "load_1min_before": load,
        "triad": {"bytes": triad_bytes, "seconds": tri, "gb_per_s": bandwidth / 1e9},
        "floor_seconds": floor_s,
        "contenders": {},
    }
    page = os.sysconf("SC_PAGE_SIZE")
    for name, s in stats.items():
        case["contenders"][name] = {
            "seconds": s,
            "s_per_gb": {k: s[k] / gb for k in ("median", "min", "max")},
            # pages the kernel mapped (and zeroed) for it per call, as a multiple of the weights' bytes
            "faulted_per_call": faults[name] / (runs + 1) * page / x.weight_bytes(),
        }
    base, fe = stats["torch"]["median"], stats["torch _foreach"]["median"]
    for c in case["contenders"].values():
        med = c["seconds"]["median"]
        c["vs_torch"], c["vs_foreach"], c["vs_floor"] = med / base, med / fe, med / floor_s
    tiny = (x.m.abs() < 2.0**-126) & (x.m != 0)  # subnormal momenta would slow every contender's arithmetic
    case["subnormal_momenta_after"] = int(torch.count_nonzero(tiny))
    case["wall_seconds"] = time.perf_counter() - t0
    del x, fns
    return case


def _count_faults(fn, faults: dict, name: str):
    """fn, adding the minor page faults of each call to faults[name]."""
    import resource

    def run():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    return run


def compare(c: dict, other: dict, label: str) -> str:
    """'0.66x torch's time (faster)': c's median over other's, and whether their min - max ranges overlap."""
    a, b = c["seconds"], other["seconds"]
    r = a["median"] / b["median"]
    word = (
        "within this run's noise"
        if a["min"] <= b["max"] and b["min"] <= a["max"]
        else ("slower" if r > 1 else "faster")
    )
    return f"{r:.2f}x {label}'s time ({word})"


def summary(report: dict) -> list:
    """Per case, one line: each pysoup form against torch's loop, torch _foreach and the floor."""
    out = []
    for case in report["cases"]:
        cs = case["contenders"]
        parts = []
        for name in CONTENDERS[:2]:
            c = cs[name]
            parts.append(
                f"{name} {c['s_per_gb']['median']:.2f} s/GB: {compare(c, cs['torch'], 'torch')}, "
                f"{compare(c, cs['torch _foreach'], 'torch _foreach')}, {c['vs_floor']:.1f}x the floor"
            )
        out.append(f"{case['case']}: " + "; ".join(parts) + ".")
    return out


def extra(report: dict, k: int, name: str) -> str:
    """Case k's contender `name`: its peak extra memory as a multiple of the weights' bytes, and in MiB at the
    probe's size."""
    mem = report["memory"]
    if "error" in mem:
        return "not measured"
    case = mem["cases"][k]
    b = case["extra_bytes"].get(name)
    return "not measured" if b is None else f"{b / case['weight_bytes']:.2f} x ({b / 2**20:,.0f} MiB)"


def markdown(report: dict) -> str:
    from pysoup.bench.report import markdown_head

    lines = markdown_head(report)
    probe = report["memory"]["size_mib"]
    lines += [
        f"Load average (1 min) before / after: {report['load_before']:.2f} / {report['load_after']:.2f} on "
        f"{report['cores']} cores shared with other work; {report['threads']} threads (torch.set_num_threads and "
        f"pysoup); OMP_WAIT_POLICY={report['omp_wait_policy']}; torch {report['torch']}.",
        "",
        f"NoLoCo's outer step for one worker of a group of 2, its peer's message already received (no "
        f"communication), alpha {ALPHA}, beta {BETA}; {report['size_mib']} MiB of fp32 weights "
        f"({report['params']:,} parameters; the bf16 cases are the same parameters, half the bytes). "
        "Seconds per GB (1e9 bytes) of the weights in their own dtype: the median of rotated rounds after a "
        "warm-up call, with its min - max; `x torch`, `x foreach`, `x floor`: the contender's time divided by "
        "torch's loop, torch _foreach's and the floor's (above 1: slower). Peak extra: its temporaries, as a "
        "multiple of the weights' bytes and in MiB, measured in a child process "
        + (
            f"on the same shapes scaled to {probe} MiB of fp32 weights (one call, RSS high-water mark minus the RSS "
            "before; temporaries scale with the tensors, and at the timed size the child's inputs and "
            "temporaries together were OOM-killed beside the other work on this machine)."
            if probe < report["size_mib"]
            else "on the same shapes (one call, RSS high-water mark minus the RSS before)."
        )
        + " Faulted in / call: the memory the kernel mapped and zeroed for the contender per call in the timing "
        "process (minor page faults x the page size, averaged over its calls), as a multiple of the weights' bytes.",
    ]
    if "error" in report["memory"]:
        lines += ["", f"**The memory probe failed** ({report['memory']['error']}): no peak extra memory."]
    if report.get("scaled"):
        lines += ["", f"**Scaled:** {report['scaled']}"]
    for k, case in enumerate(report["cases"]):
        tri = case["triad"]
        gb = case["weight_bytes"] / 1e9
        lines += [
            "",
            f"### {case['case']}: {case['params']:,} parameters, {case['weight_bytes'] / 2**20:,.0f} MiB of "
            f"weights, {case['runs']} runs (load {case['load_1min_before']:.1f} at the start)",
            "",
            "| contender | s / GB (median) | min - max | spread | x torch | x foreach | x floor | peak extra | "
            "faulted in / call |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in case["contenders"].items():
            s, sg = c["seconds"], c["s_per_gb"]
            lines.append(
                f"| {name} | {sg['median']:.3f} | {sg['min']:.3f} - {sg['max']:.3f} | {s['spread']:.0%} | "
                f"{c['vs_torch']:.2f} | {c['vs_foreach']:.2f} | {c['vs_floor']:.2f} | "
                f"{extra(report, k, name)} | {c['faulted_per_call']:.2f} x |"
            )
        lines.append(
            f"| {FLOOR} | {case['floor_seconds'] / gb:.3f} | | {tri['seconds']['spread']:.0%} (triad) | "
            f"{case['floor_seconds'] / case['contenders']['torch']['seconds']['median']:.2f} | "
            f"{case['floor_seconds'] / case['contenders']['torch _foreach']['seconds']['median']:.2f} | 1.00 | 0 | 0 |"
        )
        lines += [
            "",
            f"Floor: {case['floor_bytes'] / case['params']:.0f} bytes per parameter at the triad's "
            f"{tri['gb_per_s']:.1f} GB/s (torch.add(a, b, out=c), 3 x {tri['bytes'] / 3 / 2**20:.0f} MiB, timed "
            "in the same rounds).",
        ]
    lines += ["", "## Summary", "", *(f"- {t}" for t in summary(report)), "", "## Checks", ""]
    lines += [*(f"- {t}" for t in report["checks"]), "", "## Notes", ""]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "pysoup NoLoCo (flat) is what NoLoCo.outer_step computes, less the exchange: it concatenates the parameters "
    "into one buffer (a copy of the weights), writes d_i = theta_i - phi_i (the weights' dtype), writes the new m "
    "into a fresh buffer then copies it into m, writes phi + m into a fresh buffer then copies it into phi, and "
    "copies phi into the parameters: about 84 bytes per fp32 parameter of traffic against the floor's 32, in four "
    "fresh buffers of the weights' size (two alive at once). The real outer step also builds its send buffer "
    "torch.cat([d_i, phi]) (2 x the weights more, excluded here).",
    "pysoup per tensor does the same per tensor (no concatenation; its temporaries are one tensor's size).",
    "torch: per tensor, `d_i = theta - phi; delta_bar = (d_i.float() + d_j.float()) / 2; phi_bar = (phi.float() + "
    "phi_j.float()) / 2; m.mul_(beta).add_(delta_bar, alpha=alpha).add_(phi_bar - phi.float(), alpha=alpha); "
    "phi.add_(m); theta.copy_(phi)` (`.float()` is free on fp32 tensors and a copy on bf16 ones). "
    "torch _foreach: the same steps as torch._foreach_sub / add / div_ / sub_ / mul_ / add_ / copy_ over the "
    "lists, so its temporaries are the whole model's.",
    "Every contender updates the same buffers in place, round after round, so each call starts from the previous "
    "one's output: the state converges toward phi = phi_j + d_j, m = 0 by a factor of about 0.7 per call; after a "
    "case's calls no momentum is subnormal (counted: `subnormal_momenta_after` in the JSON), so no contender pays "
    "for subnormal arithmetic.",
    "Where the time goes: the extra passes (pysoup's fresh result buffers copied back into m and phi; torch's "
    "intermediate tensors) and the fresh memory behind them. glibc serves an allocation of 32 MiB or more (and "
    "smaller ones until its threshold has grown) with a new mmap, which the kernel zeroes page by page at first "
    "touch: the `faulted in / call` column. Smaller temporaries are reused from the heap, and whether a big one "
    "fits in freed heap depends on what ran before it, so a contender's time depends on its predecessor; the "
    "rotation spreads that over all of them, and it is part of the spread.",
    "The floor counts what any implementation must read (theta, phi, m, d_j, phi_j) and write (m, phi, theta), "
    "at the bandwidth of a triad measured in the same rounds: a bound, not a contender.",
]


def cpu_suite(args) -> dict:
    import torch

    from pysoup.bench.harness import machine, machine_line

    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    size = args.size_mib or cfg["size_mib"]
    scaled = None
    need = MEM_FACTOR * (size << 20) + MEM_MARGIN
    if not args.quick and mem_available() < need and size > 512:
        scaled = (
            f"{mem_available() / 2**30:.1f} GiB available < {need / 2**30:.1f} GiB needed for {size} MiB: "
            "run at 512 MiB of fp32 weights"
        )
        size = 512
    need = MEM_FACTOR * (size << 20) + MEM_MARGIN
    if mem_available() < need:
        from pysoup.errors import SoupError

        raise SoupError(
            f"{size} MiB of weights need about {need / 2**30:.1f} GiB of memory; {mem_available() / 2**30:.1f} GiB "
            "is available (pass a smaller --size-mib, or wait for the other work to finish)"
        )
    runs = args.runs or cfg["runs"]
    load_before = os.getloadavg()[0]
    checks = check_numerics(args.threads)
    cases = []
    for label, shapes, dtype in models(size, cfg["layers"]):
        cases.append(run_case(label, shapes, dtype, runs, args.threads, cfg["triad_mib"]))
        print(f"{label}: {cases[-1]['wall_seconds']:.1f} s", file=sys.stderr)
        print(json.dumps(cases[-1]), file=sys.stderr)  # a run cut short keeps what it measured in its log
    memory = measure_memory(min(size, cfg["probe_mib"]), cfg["layers"], args.threads)
    return {
        "suite": "NoLoCo outer step" + (" --quick" if args.quick else ""),
        "machine_line": machine_line(),
        "machine": machine(),
        "cores": len(os.sched_getaffinity(0)),
        "command": " ".join(["python benchmarks/noloco.py", *sys.argv[1:]]),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "size_mib": size,
        "params": (size << 20) // 4,
        "scaled": scaled,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "checks": checks,
        "cases": cases,
        "memory": memory,
        "notes": NOTES,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_first()
    if argv[:1] == ["_memory"]:
        print(json.dumps(memory_child(*(int(a) for a in argv[1:4]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 MiB models, 8 blocks, 3 runs (< 20 s)")
    p.add_argument("--runs", type=int, default=0, help="rounds per case (default 7; 3 with --quick)")
    p.add_argument("--size-mib", type=int, default=0, help="MiB of fp32 weights (default 1024; 8 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="CPU cores this process runs on (default 2)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of the results (default %(default)s)")
    args = p.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if args.threads > len(cores):
        p.error(f"--threads {args.threads}: this process may use {len(cores)} cores")
    if args.runs and args.runs < 5 and not args.quick:
        p.error("--runs: at least 5 (medians of fewer mean little)")
    os.sched_setaffinity(0, cores[: args.threads])  # torch's threads and pysoup's default both see --threads cores
    report = cpu_suite(args)
    text = markdown(report)
    print(text)
    name = "noloco-quick" if args.quick else "noloco"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Merging LoRA adapters into one adapter, in one of two explicit modes.

- `factors`: every tensor of the adapters (the A's, the B's, modules_to_save copies) is combined on its own with a
  merge strategy, as averaging checkpoints along one run does (MWA). The result's update is
  (Σ wᵢBᵢ)(Σ wⱼAⱼ), which has cross terms BᵢAⱼ: it equals Σ wᵢΔWᵢ only when the A's (or the B's) are equal, or for
  one adapter. Needs equal modules, ranks and scalings.
- `delta`: each module's update ΔWᵢ = sᵢBᵢAᵢ is combined exactly, then refactored to an adapter.
  For linear strategies (linear, uniform, task_arithmetic) the combination Σ cᵢΔWᵢ is never formed:
  `concat` writes B = [c₁s₁B₁ | c₂s₂B₂ | ...] and A = [A₁; A₂; ...] (rank Σrᵢ, exact), and `svd` takes the SVD of
  that product through the factors' fp64 Gram matrices (the SVD of a small Σrᵢ × Σrᵢ core; see _product_svd).
  Other strategies (ties, dare_linear, dare_ties, ...) are not linear in ΔW: each module's ΔWᵢ is built in fp32,
  the strategy runs on it through pysoup.merge with a zero base (so the task vectors are the ΔWᵢ themselves), and
  the result is refactored by truncated SVD (`svd` only). One module's buffers at a time: memory does not grow
  with the number of modules.

Truncation to rank k keeps the k largest singular values; the report gives, per module, the fraction of
spectral energy discarded (Σ_{j>k} σⱼ² / Σ σⱼ²), and by Eckart-Young ‖ΔW − B'A'‖_F = √(Σ_{j>k} σⱼ²).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

from pysoup.engine.report import peak_rss_bytes
from pysoup.errors import PlanError
from pysoup.lora.adapter import LoraAdapter, open_adapter
from pysoup.lora.output import check_output, factor_keys, scale_one_config, write_adapter

MODES = ("factors", "delta")
REFACTORS = ("concat", "svd")
# Strategies whose result is a fixed linear combination Σ cᵢΔWᵢ, with their parameters.
_LINEAR = {"linear": ("normalize",), "uniform": (), "task_arithmetic": ("lambda", "normalize")}


@dataclass
class AdapterMergeReport:
    """What an adapter merge did.

    Attributes:
        seconds: wall time.
        outputs: the files written.
        mode, refactor, strategy: as asked (refactor None in factors mode).
        modules: modules in the result.
        ranks: {module: rank of the result}.
        discarded_energy: {module: fraction of ΔW's spectral energy the truncation dropped} (svd only).
        peak_rss_bytes: the process's peak resident memory.
    """

    seconds: float
    outputs: list
    mode: str
    refactor: str | None
    strategy: str
    modules: int
    ranks: dict = field(default_factory=dict)
    discarded_energy: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0

    @property
    def max_discarded_energy(self) -> float:
        return max(self.discarded_energy.values(), default=0.0)

    @property
    def notes(self) -> list:
        lines = []
        if self.discarded_energy:
            worst = max(self.discarded_energy, key=self.discarded_energy.get)
            mean = sum(self.discarded_energy.values()) / len(self.discarded_energy)
            lines.append(
                f"svd: discarded spectral energy mean {mean:.3e}, max {self.discarded_energy[worst]:.3e} ({worst})"
            )
        return lines


def merge_adapters(
    adapters,
    out,
    *,
    mode: str,
    weights=None,
    strategy: str = "linear",
    params=None,
    refactor: str = "concat",
    rank: int | None = None,
    dtype=None,
    backend: str = "auto",
) -> AdapterMergeReport:
    """Merges PEFT LoRA adapters of one base model into one adapter directory PEFT loads.

    Args:
        adapters: adapter directories (adapter_config.json + adapter_model.safetensors).
        out: the output directory.
        mode: "factors" (A's and B's combined separately: approximate, see the module doc) or "delta" (exact
            combination of the updates ΔWᵢ = sᵢBᵢAᵢ).
        weights: one number per adapter (default 1 each).
        strategy: a pysoup strategy (linear, uniform, task_arithmetic, ties, dare_linear, dare_ties, ...).
        params: the strategy's parameters ({"density": 0.5}, {"lambda": 2.0}, ...).
        refactor: delta mode: "concat" (exact, rank Σrᵢ; linear strategies) or "svd" (truncated to `rank`).
        rank: the result's rank for refactor="svd" (at most min(out, in) per module).
        dtype: the result's dtype (default: the first adapter's factor dtype).
        backend: the pysoup backend for strategies that run through pysoup.merge.

    Returns:
        An AdapterMergeReport (per-module ranks and, for svd, the discarded spectral energy).

    Example:
        >>> r = merge_adapters(["a/", "b/"], "ab/", mode="delta", weights=[0.5, 0.5])  # doctest: +SKIP
        >>> r = merge_adapters(["a/", "b/"], "ab/", mode="delta", strategy="ties", refactor="svd", rank=16,
        ...                    params={"density": 0.5})  # doctest: +SKIP
    """
    from pysoup.dtypes import parse_dtype
    from pysoup.strategies import get_strategy

    start = time.perf_counter()
    if mode not in MODES:
        raise PlanError(f"adapter merge mode must be one of {', '.join(MODES)} (lora=...), got {mode!r}")
    if isinstance(adapters, (str, os.PathLike)):
        raise PlanError("adapters must be a list of adapter directories")
    paths = list(adapters)
    if not paths:
        raise PlanError("an adapter merge needs at least one adapter")
    weights = _weights(weights, len(paths))
    get_strategy(strategy)  # an unknown name fails before anything is opened
    out_dtype = parse_dtype(dtype)
    if mode == "delta":
        if refactor not in REFACTORS:
            raise PlanError(f"refactor must be one of {', '.join(REFACTORS)}, got {refactor!r}")
        if refactor == "svd" and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise PlanError(f"refactor='svd' needs a positive integer rank, got {rank!r}")
        if refactor == "concat" and rank is not None:
            raise PlanError("rank= is for refactor='svd'; concat keeps every rank (Σ rᵢ)")
        if refactor == "concat" and strategy not in _LINEAR:
            raise PlanError(
                f"strategy {strategy!r} is not linear in ΔW, so concatenated factors cannot express it: "
                "use refactor='svd' with a rank"
            )
    opened = []
    try:
        for p in paths:
            opened.append(p if isinstance(p, LoraAdapter) else open_adapter(p))
        _check_together(opened, mode)
        out_path = check_output(out, opened)
        dtype = out_dtype or opened[0].dtype
        if mode == "factors":
            report = _merge_factors(opened, out_path, weights, strategy, params, dtype, backend)
        else:
            report = _merge_delta(opened, out_path, weights, strategy, params, refactor, rank, dtype, backend)
    finally:
        for ad in opened:
            if not isinstance(ad, str) and ad not in paths:
                ad.close()
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


# -- checks ---------------------------------------------------------------------------------------------------
def _weights(weights, n: int) -> list:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (int, float)):
        raise PlanError("weights must be one number per adapter")
    weights = list(weights)
    if len(weights) != n:
        raise PlanError(f"{len(weights)} weights for {n} adapters")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise PlanError(
                f"adapter weights must be finite numbers, one per adapter (per-layer gradients and filters are "
                f"not supported for adapters), got {w!r}"
            )
    return [float(w) for w in weights]


def _check_together(adapters: list, mode: str) -> None:
    """One-line errors for adapters that cannot be merged together, naming the adapter and the module."""
    first = adapters[0]
    for ad in adapters[1:]:
        if first.base_model and ad.base_model and first.base_model != ad.base_model:
            raise PlanError(
                f"{ad.path}: adapter of base model {ad.base_model!r}, but {first.path} adapts {first.base_model!r}"
            )
        if ad.fan_in_fan_out != first.fan_in_fan_out:
            raise PlanError(
                f"{ad.path}: fan_in_fan_out={ad.fan_in_fan_out} but {first.path} has {first.fan_in_fan_out}: "
                "the adapters target differently laid out weights"
            )
        if set(ad.whole) != set(first.whole):
            extra = sorted(set(ad.whole) ^ set(first.whole))[0]
            raise PlanError(
                f"{ad.path}: modules_to_save differ from {first.path}'s ({extra!r} is in one only): whole tensors "
                "can only be averaged when every adapter has them"
            )
        for name, key in ad.whole.items():
            mine, theirs = ad.reader.infos[key].shape, first.reader.infos[first.whole[name]].shape
            if mine != theirs:
                raise PlanError(f"{ad.path}: {name!r} has shape {list(mine)} but {list(theirs)} in {first.path}")
    seen = {}  # module -> (adapter, LoraModule) of its first holder
    for ad in adapters:
        for name, m in ad.modules.items():
            if name not in seen:
                seen[name] = (ad, m)
                continue
            other_ad, other = seen[name]
            if (m.kind, m.weight_shape) != (other.kind, other.weight_shape):
                raise PlanError(
                    f"{ad.path}: module {name!r} is a {m.kind} of weight {list(m.weight_shape)} but a {other.kind} of "
                    f"{list(other.weight_shape)} in {other_ad.path} (different base models?)"
                )
    if mode == "factors":
        for ad in adapters[1:]:
            if set(ad.base_copies) != set(first.base_copies):
                raise PlanError(
                    f"{ad.path}: its saved base layers ({sorted(ad.base_copies)}) differ from {first.path}'s "
                    f"({sorted(first.base_copies)}): factors mode combines every tensor, so the files must match"
                )
            for name in sorted(first.modules.keys() | ad.modules.keys()):
                if name not in ad.modules or name not in first.modules:
                    holder, lacking = (first, ad) if name in first.modules else (ad, first)
                    raise PlanError(
                        f"{lacking.path}: module {name!r} is not adapted here but is in {holder.path}: factors mode "
                        "needs the same target modules (delta mode treats a missing module as ΔW = 0)"
                    )
                m, f = ad.modules[name], first.modules[name]
                if m.rank != f.rank or not math.isclose(m.scaling, f.scaling, rel_tol=1e-12):
                    raise PlanError(
                        f"{ad.path}: module {name!r} has rank {m.rank}, scaling {m.scaling:g} but rank {f.rank}, "
                        f"scaling {f.scaling:g} in {first.path}: factors mode needs equal ranks and scalings "
                        "(delta mode does not)"
                    )


# -- factors --------------------------------------------------------------------------------------------------
def _merge_factors(adapters, out, weights, strategy, params, dtype, backend) -> AdapterMergeReport:
    """Every tensor combined with the strategy through pysoup.merge (task-vector strategies against a zero base);
    the first adapter's config, whose ranks and scalings every adapter shares."""
    import pysoup
    from pysoup.strategies import get_strategy

    strat = get_strategy(strategy)
    files = [ad.reader.path for ad in adapters]
    base = None
    if strat.base != "forbidden":
        import torch

        from pysoup.dtypes import to_torch

        infos = adapters[0].reader.infos
        base = {k: torch.zeros(infos[k].shape, dtype=to_torch(infos[k].dtype)) for k in infos}
    merged = pysoup.merge(
        files, None, strategy=strategy, weights=weights, params=params, base=base, dtype="float32", backend=backend
    )
    first = adapters[0]
    entries = [(k, dtype, tuple(t.shape)) for k, t in merged.items()]
    config = dict(first.config, inference_mode=True)
    paths = write_adapter(out, entries, lambda k: merged[k].numpy(), config, [f for ad in adapters for f in ad.files])
    ranks = {name: m.rank for name, m in first.modules.items()}
    return AdapterMergeReport(0.0, paths, "factors", None, strategy, len(ranks), ranks)


# -- delta ----------------------------------------------------------------------------------------------------
def _merge_delta(adapters, out, weights, strategy, params, refactor, rank, dtype, backend) -> AdapterMergeReport:
    import numpy as np

    coeffs = _linear_coefficients(strategy, weights, params or {}) if strategy in _LINEAR else None
    modules = {}  # module -> [(adapter index, LoraModule)], in first-seen order
    for i, ad in enumerate(adapters):
        for name, m in ad.modules.items():
            modules.setdefault(name, []).append((i, m))

    ranks = {}
    entries = []
    for name, held in modules.items():
        m = held[0][1]
        out_f, in_f = m.features
        k = sum(h.rank for _, h in held) if refactor == "concat" else min(rank, out_f, in_f)
        if coeffs is not None and refactor == "svd":
            k = min(k, sum(h.rank for _, h in held))
        ranks[name] = k
        a_key, b_key = factor_keys(name, m.kind)
        entries += [(a_key, dtype, (k, in_f)), (b_key, dtype, (out_f, k))]
    for key in adapters[0].whole.values():
        entries.append((key, dtype, tuple(adapters[0].reader.infos[key].shape)))
    copies = {}  # base copies (a targeted embedding's base weight): the first holder's, they are the base's
    for ad in adapters:
        for key in ad.base_copies.values():
            if key not in copies:
                copies[key] = ad
                entries.append((key, dtype, tuple(ad.reader.infos[key].shape)))

    by_key = {}
    for name, held in modules.items():
        a_key, b_key = factor_keys(name, held[0][1].kind)
        by_key[a_key] = (name, 0)
        by_key[b_key] = (name, 1)
    discarded = {}
    pending = {}  # the other factor of the module computed last, until its turn in the write order

    def produce(key):
        if key in pending:
            return pending.pop(key)
        if key in copies:
            return copies[key].read(key)
        if key not in by_key:  # a modules_to_save tensor: the weights' normalized average
            return _whole_average(adapters, weights, key)
        name, which = by_key[key]
        held = modules[name]
        with one_blas_thread():
            if coeffs is not None:
                a, b, lost = _linear_factors([(coeffs[i], adapters[i], m) for i, m in held], refactor, ranks[name])
            else:
                dw = _strategy_delta(adapters, held, name, weights, strategy, params, backend)
                a, b, lost = _svd_factors(dw, ranks[name])
        if lost is not None:
            discarded[name] = lost
        a_key, b_key = factor_keys(name, held[0][1].kind)
        pending[b_key if which == 0 else a_key] = b if which == 0 else a
        return np.ascontiguousarray(a if which == 0 else b, dtype=np.float32)

    same_modules = all(ad.modules.keys() == adapters[0].modules.keys() for ad in adapters)
    targets = None if same_modules else sorted(modules)
    config = scale_one_config(adapters[0].config, ranks, targets, adapters[0].fan_in_fan_out)
    paths = write_adapter(out, entries, produce, config, [f for ad in adapters for f in ad.files])
    return AdapterMergeReport(0.0, paths, "delta", refactor, strategy, len(ranks), ranks, discarded)


def _linear_coefficients(strategy: str, weights: list, params: dict) -> list:
    """cᵢ of Σ cᵢΔWᵢ, as pysoup's linear strategies define them (linear: normalized by default; task_arithmetic:
    λ·wᵢ, not normalized by default; uniform: 1/n)."""
    valid = _LINEAR[strategy]
    for key in params:
        if key not in valid:
            raise PlanError(
                f"unknown parameter {key!r} for strategy {strategy!r} (valid: {', '.join(valid) or 'none'})"
            )
    if strategy == "uniform":
        return [1.0 / len(weights)] * len(weights)
    normalize = bool(params.get("normalize", strategy == "linear"))
    lam = float(params.get("lambda", 1.0))
    if normalize:
        total = sum(weights)
        if total == 0:
            raise PlanError(f"the weights {weights} sum to 0 and cannot be normalized (pass normalize=False)")
        weights = [w / total for w in weights]
    return [lam * w for w in weights]


def _linear_factors(terms, refactor: str, rank: int) -> tuple:
    """A, B (and the discarded energy fraction for svd) of Σ cᵢsᵢBᵢAᵢ over terms (cᵢ, adapter, module)."""
    import numpy as np

    As, Bs = [], []
    for c, ad, m in terms:
        a, b = ad.factors(m.name)
        As.append(a)
        Bs.append(b * np.float32(c * m.scaling))
    a_cat, b_cat = np.concatenate(As, axis=0), np.concatenate(Bs, axis=1)
    if refactor == "concat":
        return a_cat, b_cat, None
    return _product_svd(b_cat, a_cat, rank)


# Eigenvalues of a Gram matrix below this fraction of the largest are its null space: in fp64 they carry no digit of
# a singular value above 1e-7 of the largest, below the fp32 factors' own precision.
_GRAM_TOL = 1e-14


@contextlib.contextmanager
def one_blas_thread():
    """numpy's LAPACK on one thread, when threadpoolctl is there to set it. OpenBLAS's threads spin waiting for work
    and, on a loaded machine, turn small factorizations pathological: a 512 x 512 eigh took 3.1 CPU seconds on 2
    threads beside other jobs and 0.06 s on one (the Gram of a 5632 x 512 factor 0.19 s and 0.05 s)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _product_svd(b, a, rank: int) -> tuple:
    """The truncated SVD of B·A (B [out, R], A [R, in]) without forming it: with the fp64 Grams BᵀB = Vb Λb Vbᵀ and
    A Aᵀ = Va Λa Vaᵀ, B = Qb·Sb and Aᵀ = Qa·Sa where Sb = Λb^½ Vbᵀ, Qb = B Vb Λb^-½ (orthonormal), so
    B·A = Qb·(Sb Saᵀ)·Qaᵀ and the SVD of the small core Sb Saᵀ = U Σ Wᵀ gives B·A's: U' = Qb U, V'ᵀ = Wᵀ Qaᵀ.
    Cost ~2·R²·(out + in) flops for the Grams. (numpy's Householder QR of the same factors took 30x longer here:
    17.7 s against 0.57 s for a 5632 x 512 B and 512 x 2048 A.)"""
    import numpy as np

    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    lb, vb = np.linalg.eigh(b64.T @ b64)
    la, va = np.linalg.eigh(a64 @ a64.T)
    kb = lb > _GRAM_TOL * max(float(lb[-1]), 0.0) if lb.size else lb > 0
    ka = la > _GRAM_TOL * max(float(la[-1]), 0.0) if la.size else la > 0
    lb, vb, la, va = lb[kb], vb[:, kb], la[ka], va[:, ka]
    if lb.size == 0 or la.size == 0:  # B·A = 0
        return _truncate(np.zeros((b.shape[0], 0)), np.zeros(0), np.zeros((0, a.shape[1])), rank)
    core = (np.sqrt(lb)[:, None] * vb.T) @ (np.sqrt(la)[:, None] * va.T).T
    u, s, wt = np.linalg.svd(core, full_matrices=False)
    k = min(rank, s.shape[0])
    left = b64 @ ((vb / np.sqrt(lb)) @ u[:, :k])
    right = (wt[:k] @ (va / np.sqrt(la)).T) @ a64
    return _truncate(left, s, right, rank)


def _svd_factors(dw, rank: int) -> tuple:
    import numpy as np

    # fp64 where it is cheap (the error then is the truncation alone); fp32 LAPACK for large modules.
    work = dw.astype(np.float64) if dw.size <= (1 << 22) else dw
    u, s, vt = np.linalg.svd(work, full_matrices=False)
    return _truncate(u, s.astype(np.float64), vt, rank)


def _truncate(u, s, vt, rank: int) -> tuple:
    """A = √σ·Vᵀ, B = U·√σ over the `rank` largest singular values (zero-padded when ΔW has fewer), and the
    fraction of Σσ² left out. The square root splits the scale evenly, as a trained adapter's factors are."""
    import numpy as np

    k = min(rank, s.shape[0], u.shape[1])
    total = float(np.sum(s * s))
    lost = float(np.sum(s[k:] * s[k:]) / total) if total > 0 else 0.0
    root = np.sqrt(s[:k])
    a = np.zeros((rank, vt.shape[1]), dtype=np.float32)
    b = np.zeros((u.shape[0], rank), dtype=np.float32)
    a[:k] = root[:, None] * vt[:k]
    b[:, :k] = u[:, :k] * root
    return a, b, lost


def _strategy_delta(adapters, held, name, weights, strategy, params, backend):
    """The strategy's merge of the modules' ΔWᵢ (zero for adapters without the module), through pysoup.merge
    against a zero base: one module's n + 2 fp32 buffers."""
    import numpy as np
    import torch

    import pysoup
    from pysoup.strategies import get_strategy

    m = held[0][1]
    key = m.weight_name
    shape = m.features
    present = {i: mod for i, mod in held}
    inputs = []
    for i, ad in enumerate(adapters):
        dw = ad.delta(name) if i in present else np.zeros(shape, dtype=np.float32)
        inputs.append({key: torch.from_numpy(np.ascontiguousarray(dw, dtype=np.float32))})
    base = {key: torch.zeros(shape, dtype=torch.float32)} if get_strategy(strategy).base != "forbidden" else None
    merged = pysoup.merge(inputs, None, strategy=strategy, weights=weights, params=params, base=base, backend=backend)
    return merged[key].numpy()


def _whole_average(adapters, weights, key):
    """A modules_to_save tensor (a whole weight, not an update): the weights' normalized average."""
    import numpy as np

    name = next(n for n, k in adapters[0].whole.items() if k == key)
    total = sum(weights)
    if total == 0:
        raise PlanError(f"{name!r}: the weights sum to 0, so the adapters' whole copies cannot be averaged")
    acc = None
    for w, ad in zip(weights, adapters):
        t = ad.read(ad.whole[name]) * np.float32(w / total)
        acc = t if acc is None else acc + t
    return acc

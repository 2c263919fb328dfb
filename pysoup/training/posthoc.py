"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2):
choose the length of the EMA after training, from snapshots saved during it.

During training, `PostHocEMA` keeps one power-function EMA of the model per profile (exponent γ, or its relative
width σ_rel) and every S steps writes each profile's EMA to a safetensors snapshot, listed in a JSON manifest.
Afterwards, `synthesize` reads the manifest alone, solves the least-squares combination of the snapshots' impulse
responses that best matches a target σ_rel at a step t (the paper's Algorithm 3), divides the coefficients by
their sum (as EDM2 does; ema-pytorch does not), and runs one streaming linear merge of the snapshot files: its
memory is the merge engine's bounded buffers, whatever the number and size of the snapshots.

The formulas, with t counting optimizer steps from 1:

    β_γ(t) = (1 − 1/t)^(γ+1),   θ̂_t = β_γ(t) θ̂_{t−1} + (1 − β_γ(t)) θ_t   (the first update copies the model)
    σ_rel(γ) = sqrt(γ+1) / ((γ+2) sqrt(γ+3))       (largest, ≈ 0.3003, at γ = (√5 − 3)/2)
    p_{γ,t}(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]      (the EMA's impulse response: exactly, the weight θ̂_t gives
                                                     θ_τ is ∫_{τ−1}^{τ} p_{γ,t})
    ⟨p_a, p_b⟩ = (γa+1)(γb+1) min(ta, tb)^(γa+γb+1) / ((γa+γb+1) ta^(γa+1) tb^(γb+1))

Example:
    >>> ema = PostHocEMA(model, sigma_rels=(0.05, 0.28), snapshot_every=1000, directory="phema")  # doctest: +SKIP
    >>> for batch in loader:                                                                     # doctest: +SKIP
    ...     loss(model, batch).backward(); opt.step(); opt.zero_grad(); ema.update()
    >>> synthesize("phema", 0.10, "ema-0.10.safetensors")  # later, in any process                # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass

from pysoup.errors import FormatError, PlanError

MANIFEST_NAME = "posthoc_ema.json"
_FORMAT = "pysoup.posthoc_ema"
_VERSION = 1

# σ_rel(γ) rises from 0 at γ = -1 to its maximum at γ+1 = (√5 - 1)/2, then falls to 0 as γ grows. A σ_rel in
# (0, SIGMA_REL_MAX] has two exponents; the EMA is the larger one (EDM2's std_to_exp takes the largest root).
_GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0
SIGMA_REL_MAX = math.sqrt(_GAMMA_AT_MAX + 1) / ((_GAMMA_AT_MAX + 2) * math.sqrt(_GAMMA_AT_MAX + 3))
# ⟨p, p⟩ is finite for γ > -1/2 only: the least squares need every exponent above it.
GAMMA_MIN = -0.5


# -- the power-function EMA ----------------------------------------------------------------------------------------
def power_beta(t, gamma: float) -> float:
    """β_γ(t) = (1 − 1/t)^(γ+1): the decay of the power-function EMA's update after optimizer step t (t ≥ 1).

    Example:
        >>> power_beta(1, 6.94)   # the first update copies the model
        0.0
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t >= 1:
        raise PlanError(f"power_beta: the step must be a number >= 1, got {t!r}")
    return (1.0 - 1.0 / t) ** (_check_gamma(gamma) + 1.0)


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel = sqrt(γ+1) / ((γ+2) sqrt(γ+3)): the standard deviation of the EMA's impulse response, relative to
    the training time.

    Example:
        >>> round(gamma_to_sigma_rel(0.0), 4)   # the running mean: uniform over [0, t]
        0.2887
    """
    g = _check_gamma(gamma)
    return math.sqrt(g + 1.0) / ((g + 2.0) * math.sqrt(g + 3.0))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ of the power-function EMA of relative width σ_rel: the largest root of
    (γ+1) = σ_rel² (γ+2)² (γ+3), i.e. of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) (EDM2's std_to_exp).

    Args:
        sigma_rel: in (0, SIGMA_REL_MAX ≈ 0.3003].

    Example:
        >>> round(sigma_rel_to_gamma(0.10), 2)   # EDM2's profiles: 0.10 <-> 6.94, 0.05 <-> 16.97
        6.94
    """
    import numpy as np

    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, numbers.Real) or not math.isfinite(sigma_rel):
        raise PlanError(f"sigma_rel must be a number in (0, {SIGMA_REL_MAX:.4f}], got {sigma_rel!r}")
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise PlanError(
            f"sigma_rel = {sigma_rel!r} is outside (0, {SIGMA_REL_MAX:.4f}]: no power-function EMA is that "
            f"{'wide' if sigma_rel > 0 else 'narrow'} (σ_rel = {SIGMA_REL_MAX:.4f} at γ = {_GAMMA_AT_MAX:.4f})"
        )
    s = float(sigma_rel) ** -2
    gamma = float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())
    # Near SIGMA_REL_MAX the two upper roots meet and np.roots may return them as a complex pair; the bisection
    # on the decreasing branch is exact there.
    if abs(gamma_to_sigma_rel(max(gamma, _GAMMA_AT_MAX)) - sigma_rel) > 1e-12 * sigma_rel:
        lo, hi = _GAMMA_AT_MAX, max(gamma, _GAMMA_AT_MAX) + 1.0
        while gamma_to_sigma_rel(hi) > sigma_rel:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if gamma_to_sigma_rel(mid) > sigma_rel else (lo, mid)
        gamma = 0.5 * (lo + hi)
    return max(gamma, _GAMMA_AT_MAX)


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma):
        raise PlanError(f"gamma must be a finite number > {GAMMA_MIN}, got {gamma!r}")
    if not gamma > GAMMA_MIN:
        raise PlanError(f"gamma = {gamma!r} must be > {GAMMA_MIN} (the impulse response is not square-integrable)")
    return float(gamma)


def _target_gamma(sigma_rel, gamma) -> float:
    if (sigma_rel is None) == (gamma is None):
        raise PlanError("give the target as exactly one of sigma_rel or gamma")
    return sigma_rel_to_gamma(sigma_rel) if gamma is None else _check_gamma(gamma)


# -- the least-squares fit (Algorithm 3) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """One saved EMA: `file` (a name inside the snapshot directory), its profile's exponent and the step after
    which it was saved."""

    file: str
    profile: int
    gamma: float
    step: int


@dataclass(frozen=True)
class PostHocFit:
    """The least-squares combination of snapshots for one target.

    Attributes:
        coefficients: one per snapshot given, in their order, summing to 1 (0 for snapshots after `step`).
        gamma, sigma_rel, step: the target profile and time.
        residual: ‖Σ xᵢ pᵢ − p_target‖₂ / ‖p_target‖₂ with the normalized coefficients: how far the synthesized
            impulse response is from the target's, relative to its size.
        coefficient_sum: the sum of the least-squares coefficients before the division (1 when exact).
    """

    coefficients: tuple
    gamma: float
    sigma_rel: float
    step: float
    residual: float
    coefficient_sum: float


def _inner_products(ga, ta, gb, tb):
    """⟨p_{ga,ta}, p_{gb,tb}⟩ for arrays that broadcast, as ratios ((t_lo / t_hi)^γ_hi / t_hi, EDM2's p_dot_p): the
    powers t^(γ+1) themselves overflow float64 for long runs and narrow profiles."""
    import numpy as np

    lo, hi = np.minimum(ta, tb), np.maximum(ta, tb)
    gamma_hi = np.where(ta <= tb, gb, ga)
    return (ga + 1) * (gb + 1) * (lo / hi) ** gamma_hi / ((ga + gb + 1) * hi)


def fit(snapshots, sigma_rel=None, t=None, *, gamma=None) -> PostHocFit:
    """Solves the paper's Algorithm 3 for one target: the coefficients x minimizing ∫ (Σ xᵢ pᵢ(τ) − p_r(τ))² dτ,
    in float64 (numpy lstsq), then divided by their sum. Snapshots saved after the target step are not used (they
    hold weights the target's EMA has not seen); their coefficient is 0.

    Args:
        snapshots: Snapshot objects or (gamma, step) pairs.
        sigma_rel: the target's relative width (or give `gamma`).
        t: the target step; default the last snapshot's.
        gamma: the target's exponent, instead of sigma_rel.

    Returns:
        A PostHocFit.

    Example:
        >>> f = fit([(6.94, 100), (6.94, 200), (0.1, 100), (0.1, 200)], sigma_rel=0.10)
        >>> round(sum(f.coefficients), 12)
        1.0
    """
    import numpy as np

    g_r = _target_gamma(sigma_rel, gamma)
    pairs = [(s.gamma, s.step) if isinstance(s, Snapshot) else tuple(s) for s in snapshots]
    for i, p in enumerate(pairs):
        if len(p) != 2:
            raise PlanError(f"snapshot {i}: expected (gamma, step), got {p!r}")
        _check_gamma(p[0])
        if isinstance(p[1], bool) or not isinstance(p[1], numbers.Real) or not p[1] > 0 or not math.isfinite(p[1]):
            raise PlanError(f"snapshot {i}: the step must be a positive number, got {p[1]!r}")
    if not pairs:
        raise PlanError("post-hoc EMA needs at least 2 snapshots, got none")
    last = max(p[1] for p in pairs)
    t_r = last if t is None else t
    if isinstance(t_r, bool) or not isinstance(t_r, numbers.Real) or not t_r > 0 or not math.isfinite(t_r):
        raise PlanError(f"the target step must be a positive number, got {t_r!r}")
    if t_r > last:
        raise PlanError(f"the target step {t_r} is after the last snapshot (step {last})")
    used = [i for i, p in enumerate(pairs) if p[1] <= t_r]
    if len(used) < 2:
        raise PlanError(f"post-hoc EMA needs at least 2 snapshots at or before step {t_r}, got {len(used)}")
    g = np.array([pairs[i][0] for i in used], dtype=np.float64)
    ts = np.array([pairs[i][1] for i in used], dtype=np.float64) / t_r  # x does not depend on the time unit
    a = _inner_products(g[:, None], ts[:, None], g[None, :], ts[None, :])
    b = _inner_products(g, ts, np.float64(g_r), np.float64(1.0))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    total = float(x.sum())
    if not math.isfinite(total) or abs(total) < 1e-6:
        raise PlanError(f"the least-squares coefficients sum to {total:.3g}: these snapshots cannot reach the target")
    x = x / total
    norm2 = (g_r + 1) ** 2 / (2 * g_r + 1)  # ⟨p_r, p_r⟩ at t_r = 1
    err2 = float(x @ a @ x - 2 * x @ b + norm2)
    coefficients = [0.0] * len(pairs)
    for i, c in zip(used, x.tolist()):
        coefficients[i] = c
    return PostHocFit(
        coefficients=tuple(coefficients),
        gamma=g_r,
        sigma_rel=gamma_to_sigma_rel(g_r),
        step=t_r,
        residual=math.sqrt(max(err2, 0.0) / norm2),
        coefficient_sum=total,
    )


def coefficients(snapshots, sigma_rel=None, t=None, *, gamma=None) -> tuple:
    """The normalized least-squares coefficients of `fit` (one per snapshot, 0 for those after step t).

    Example:
        >>> c = coefficients([(6.94, 100), (0.1, 100)], gamma=6.94)  # a tracked profile: its own snapshot
        >>> round(c[0], 9), round(abs(c[1]), 9)
        (1.0, 0.0)
    """
    return fit(snapshots, sigma_rel, t, gamma=gamma).coefficients


# -- the snapshot directory ------------------------------------------------------------------------------------------
def read_manifest(directory) -> list:
    """The snapshots listed in `directory`'s manifest, checked: a list of Snapshot in the order saved."""
    from pysoup.io.format import load_json

    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FormatError(f"{directory}: no post-hoc EMA manifest ({MANIFEST_NAME}) in this directory") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    obj = load_json(path, raw, "the post-hoc EMA manifest")
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT or not isinstance(obj.get("snapshots"), list):
        raise FormatError(f"{path}: not a post-hoc EMA manifest (expected format {_FORMAT!r} and a snapshot list)")
    if obj.get("version") != _VERSION:
        raise FormatError(f"{path}: manifest version {obj.get('version')!r}; this pysoup reads version {_VERSION}")
    out = []
    for i, e in enumerate(obj["snapshots"]):
        ok = isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("profile"), int)
        ok = ok and isinstance(e.get("gamma"), (int, float)) and isinstance(e.get("step"), int)
        if not ok or e["step"] < 1 or not math.isfinite(e["gamma"]) or not e["gamma"] > GAMMA_MIN:
            raise FormatError(f"{path}: snapshot {i} is not {{file, profile, gamma > -0.5, step >= 1}}: {e!r:.120}")
        name = e["file"]
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise FormatError(f"{path}: snapshot {i}: {name!r} is not a file name inside the directory")
        out.append(Snapshot(file=name, profile=e["profile"], gamma=float(e["gamma"]), step=e["step"]))
    return out


@dataclass(frozen=True)
class Synthesis:
    """What `synthesize` did.

    Attributes:
        files: the snapshot files merged (paths), latest first.
        coefficients: their weights, summing to 1 (may be negative).
        gamma, sigma_rel, step, residual, coefficient_sum: as in PostHocFit.
        merge: the MergeReport when written to `out`, else None.
        tensors: the synthesized state dict when `out` is None, else None.
    """

    files: tuple
    coefficients: tuple
    gamma: float
    sigma_rel: float
    step: float
    residual: float
    coefficient_sum: float
    merge: object = None
    tensors: dict = None


def synthesize(
    directory,
    sigma_rel=None,
    out=None,
    step=None,
    *,
    gamma=None,
    dtype=None,
    backend="auto",
    threads=None,
    progress=None,
) -> Synthesis:
    """The EMA of profile σ_rel (or γ) at `step`, from the snapshots in `directory`: the least-squares coefficients
    (`fit`), then one streaming `pysoup.merge(files, out, strategy="linear", weights=coefficients,
    params={"normalize": False})`. No snapshot is loaded whole; the output is written atomically.

    Args:
        directory: a PostHocEMA snapshot directory (its manifest names the files).
        sigma_rel: the target relative width, in (0, SIGMA_REL_MAX].
        out: a .safetensors path or a directory (as pysoup.merge), or None for a state dict in memory.
        step: the target step (default: the last snapshot's); only snapshots at or before it are merged.
        gamma: the target exponent, instead of sigma_rel.
        dtype, backend, threads, progress: as pysoup.merge (dtype default: the snapshots', float32 by default).

    Returns:
        A Synthesis: the files, their coefficients, the fit's residual and the merge report (or the tensors).

    Example:
        >>> r = synthesize("phema", 0.10, "ema-0.10.safetensors")   # doctest: +SKIP
        >>> r.coefficients, r.residual                             # doctest: +SKIP
    """
    from pysoup.api import merge

    directory = os.fspath(directory)
    snaps = read_manifest(directory)
    f = fit(snaps, sigma_rel, step, gamma=gamma)
    chosen = [(s, c) for s, c in zip(snaps, f.coefficients) if s.step <= f.step]
    # Latest first: integer buffers (step counters) are copied from the first input of a merge.
    chosen.sort(key=lambda sc: -sc[0].step)
    files = [os.path.join(directory, s.file) for s, _ in chosen]
    for path in files:
        if not os.path.isfile(path):
            raise FormatError(f"{path}: a snapshot the manifest lists is missing")
    weights = [c for _, c in chosen]
    result = merge(
        files,
        out,
        strategy="linear",
        weights=weights,
        params={"normalize": False},  # the coefficients sum to 1 already; some may be negative
        dtype=dtype,
        backend=backend,
        threads=threads,
        progress=progress,
    )
    written = out is not None
    return Synthesis(
        files=tuple(files),
        coefficients=tuple(weights),
        gamma=f.gamma,
        sigma_rel=f.sigma_rel,
        step=f.step,
        residual=f.residual,
        coefficient_sum=f.coefficient_sum,
        merge=result if written else None,
        tensors=None if written else result,
    )


# -- during training -----------------------------------------------------------------------------------------------
class PostHocEMA:
    """Power-function EMAs of a model, one per profile, updated after each optimizer step with one fused
    multi-tensor lerp per profile (pysoup.ops.MultiTensorLerp, weight 1 − β_γ(t)), and saved every
    `snapshot_every` steps as safetensors snapshots plus a manifest, for `synthesize`.

    The averaged tensors are the model's parameters and floating-point buffers (persistent ones); integer and bool
    buffers are saved as the model holds them at the snapshot. Tied parameters are saved once, under their first
    name.

    Args:
        model: the training model (a torch.nn.Module).
        sigma_rels: the profiles' relative widths (EDM2 trains with 0.05 and 0.10; ema-pytorch's default is
            (0.05, 0.28)). Or give `gammas`.
        snapshot_every: S: after every S-th update, each profile's EMA is written to `directory`; None: only when
            `save_snapshot()` is called.
        directory: where the snapshots and the manifest go (created at the first snapshot). It must not hold
            another run's snapshots, unless this object resumes that run (load_state_dict).
        gammas: the profiles' exponents (each > -0.5), instead of sigma_rels.
        dtype: the EMAs' dtype ("float32" by default, whatever the model's; None keeps each tensor's own).
        backend, threads: as pysoup.ops.MultiTensorLerp (the update's backend and CPU threads).

    Example:
        >>> ema = PostHocEMA(model, sigma_rels=(0.05, 0.28), snapshot_every=1000, directory="phema")  # doctest: +SKIP
        >>> opt.step(); ema.update()                                                                # doctest: +SKIP
        >>> model.load_state_dict(ema.ema_state_dict(0), strict=False)  # profile 0's EMA now          # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        sigma_rels=(0.05, 0.28),
        snapshot_every=None,
        directory=None,
        *,
        gammas=None,
        dtype="float32",
        backend="auto",
        threads=None,
    ):
        import torch

        from pysoup.dtypes import parse_dtype, to_torch

        if not isinstance(model, torch.nn.Module):
            raise PlanError(f"PostHocEMA: expected a torch.nn.Module, got {type(model).__name__}")
        if gammas is not None:
            gammas = tuple(_check_gamma(g) for g in _as_sequence(gammas))
        else:
            gammas = tuple(sigma_rel_to_gamma(s) for s in _as_sequence(sigma_rels))
        if not gammas:
            raise PlanError("PostHocEMA: give at least one profile")
        if len(set(gammas)) != len(gammas):
            raise PlanError(f"PostHocEMA: profiles repeat: gammas {list(gammas)}")
        if snapshot_every is not None and (
            isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1
        ):
            raise PlanError(f"PostHocEMA: snapshot_every must be a positive integer or None, got {snapshot_every!r}")
        if snapshot_every is not None and directory is None:
            raise PlanError("PostHocEMA: snapshot_every needs a directory to write the snapshots to")
        if directory is not None:
            directory = os.fspath(directory)
            if os.path.exists(directory) and not os.path.isdir(directory):
                raise PlanError(f"PostHocEMA: {directory} exists and is not a directory")
        self.gammas = gammas
        self.sigma_rels = tuple(gamma_to_sigma_rel(g) for g in gammas)
        self.snapshot_every = snapshot_every
        self.directory = directory
        self.dtype = None if dtype is None else to_torch(parse_dtype(dtype))
        self.step = 0  # updates so far
        self.snapshots = []  # Snapshot, in the order saved
        self._model = model
        self._backend, self._threads = backend, threads
        self._directory_checked = False
        tracked, copied = self._named_tensors()
        for name, t in tracked:
            if not t.is_contiguous():
                raise PlanError(f"PostHocEMA: {name!r} is not contiguous; the fused update reads it in place")
        self.names = [n for n, _ in tracked]
        self._copied_names = [n for n, _ in copied]
        with torch.no_grad():
            self._ema = [{n: t.detach().to(self.dtype or t.dtype, copy=True) for n, t in tracked} for _ in gammas]
        self._bind(tracked, copied)

    # -- binding ---------------------------------------------------------------------------------------------------
    def _named_tensors(self):
        """(averaged, copied): the model's parameters and floating-point persistent buffers, and its other persistent
        buffers, as (name, tensor) lists; shared tensors once."""
        import torch

        floats = (torch.float32, torch.float16, torch.bfloat16)
        tracked, copied, seen = [], [], set()
        # keep_vars: the Parameter and buffer objects themselves (MultiTensorLerp binds their memory).
        for name, t in self._model.state_dict(keep_vars=True).items():
            if id(t) in seen or not isinstance(t, torch.Tensor):
                continue
            seen.add(id(t))
            if t.dtype in floats:
                tracked.append((name, t))
            elif t.is_floating_point() or t.is_complex():
                raise PlanError(f"PostHocEMA: {name!r} has dtype {t.dtype}; the EMA takes float32, float16, bfloat16")
            else:
                copied.append((name, t))
        if not tracked:
            raise PlanError("PostHocEMA: the model has no float parameters or buffers to average")
        return tracked, copied

    def _bind(self, tracked, copied) -> None:
        from pysoup.ops import MultiTensorLerp

        self._current = [t for _, t in tracked]
        self._copied = [t for _, t in copied]
        self._signature = [(t.shape, t.dtype, t.device, t.data_ptr()) for t in self._current + self._copied]
        self._lerps = [
            MultiTensorLerp(list(ema.values()), self._current, backend=self._backend, threads=self._threads)
            for ema in self._ema
        ]

    def _check_model(self) -> None:
        """The model still holds the tensors bound, with their names, shapes, dtypes, devices and memory. Walking
        the model costs ~10 us per tensor (5 ms for 500 tensors on 2 busy cores), so update() does it at the first
        step and before each snapshot only; between them MultiTensorLerp's own check (every tensor's memory, a few
        microseconds in all) catches a cast or a move."""
        tracked, copied = self._named_tensors()
        names, bound = [n for n, _ in tracked + copied], self.names + self._copied_names
        if names != bound:
            extra, gone = [n for n in names if n not in bound], [n for n in bound if n not in names]
            what = f"{extra[0]!r} was added" if extra else f"{gone[0]!r} was removed" if gone else "tensors reordered"
            raise PlanError(f"PostHocEMA: the model changed since it was bound ({what}); make a new PostHocEMA")
        for (name, t), b, (shape, dtype, device, address) in zip(
            tracked + copied, self._current + self._copied, self._signature
        ):
            if t.shape != shape or t.dtype != dtype or t.device != device:
                raise PlanError(
                    f"PostHocEMA: {name!r} changed since it was bound ({list(shape)} {dtype} on {device} -> "
                    f"{list(t.shape)} {t.dtype} on {t.device}); make a new PostHocEMA"
                )
            if t is not b:
                raise PlanError(
                    f"PostHocEMA: {name!r} is not the tensor bound (was its module replaced?); make a new PostHocEMA"
                )
            if t.data_ptr() != address:
                raise PlanError(
                    f"PostHocEMA: {name!r} no longer holds the memory it had (was its .data replaced?); "
                    "make a new PostHocEMA"
                )

    def _check_directory(self) -> None:
        """The directory holds no snapshots, or those of this run (a resumed one); checked once, before the first
        update."""
        if self._directory_checked or self.directory is None:
            return
        if os.path.exists(os.path.join(self.directory, MANIFEST_NAME)):
            theirs = read_manifest(self.directory)
            if theirs[: len(self.snapshots)] != self.snapshots or (not self.snapshots and theirs):
                raise PlanError(
                    f"PostHocEMA: {self.directory} holds another run's snapshots ({MANIFEST_NAME}); use an empty "
                    "directory, or resume that run with load_state_dict"
                )
        self._directory_checked = True

    # -- the update ------------------------------------------------------------------------------------------------
    def update(self) -> None:
        """Call after each optimizer step: every profile's EMA moves to β θ̂ + (1 − β) θ with β = β_γ(t), t = the
        number of updates so far including this one; after every `snapshot_every`-th update, the snapshots are
        written. A changed model (a tensor added, removed, replaced, reshaped or cast) raises before anything
        changes."""
        import torch

        t = self.step + 1
        snapshot = bool(self.snapshot_every) and t % self.snapshot_every == 0
        if t == 1 or snapshot:
            self._check_model()
        self._check_directory()
        with torch.no_grad():
            if t == 1:  # β = 0: a copy, exact even where the initial EMA holds inf or NaN (0 * inf is NaN)
                for ema in self._ema:
                    for a, x in zip(ema.values(), self._current):
                        a.copy_(x)
            else:
                try:
                    for gamma, lerp in zip(self.gammas, self._lerps):
                        lerp(1.0 - power_beta(t, gamma))
                except PlanError:
                    # Only the first profile's call can raise (they bind the same tensors), before writing.
                    self._check_model()
                    raise
        self.step = t
        if snapshot:
            self.save_snapshot()

    # -- snapshots -------------------------------------------------------------------------------------------------
    def save_snapshot(self) -> list:
        """Writes every profile's EMA at the current step to the directory (one safetensors file each, written
        atomically) and then the manifest. Nothing new when this step was saved already.

        Returns:
            The Snapshot entries written.
        """
        if self.directory is None:
            raise PlanError("PostHocEMA: no directory to write snapshots to")
        if self.step == 0:
            raise PlanError("PostHocEMA: no update yet: a snapshot holds the EMA after at least one step")
        if any(s.step == self.step for s in self.snapshots):
            return []
        self._check_directory()
        os.makedirs(self.directory, exist_ok=True)
        new = []
        for k, gamma in enumerate(self.gammas):
            name = f"ema{k}-step{self.step:09d}.safetensors"
            self._write_profile(k, os.path.join(self.directory, name))
            new.append(Snapshot(file=name, profile=k, gamma=gamma, step=self.step))
        self.snapshots.extend(new)
        self._write_manifest()
        return new

    def _write_profile(self, k: int, path: str) -> None:
        from pysoup.dtypes import from_torch
        from pysoup.io.writer import write_arrays

        arrays, dtypes = {}, {}
        tensors = list(self._ema[k].items()) + list(zip(self._copied_names, self._copied))
        for name, t in tensors:
            t = t.detach().cpu().contiguous()
            dtypes[name] = from_torch(t.dtype)
            # numpy has no bfloat16: float tensors go as their bits (write_arrays copies bytes)
            arrays[name] = t.view(_same_size_int(t.dtype)).numpy() if t.is_floating_point() else t.numpy()
        metadata = {"format": "pt", "posthoc_ema.gamma": repr(self.gammas[k]), "posthoc_ema.step": str(self.step)}
        write_arrays(path, arrays, dtypes, metadata=metadata)

    def _manifest(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "snapshot_every": self.snapshot_every,
            "profiles": [{"gamma": g, "sigma_rel": s} for g, s in zip(self.gammas, self.sigma_rels)],
            "snapshots": [
                {"file": s.file, "profile": s.profile, "gamma": s.gamma, "step": s.step} for s in self.snapshots
            ],
        }

    def _write_manifest(self) -> None:
        """The manifest, replaced atomically: a reader sees the old list or the new one, never a partial file."""
        from pysoup.io.temporary import TempFile

        os.makedirs(self.directory, exist_ok=True)
        data = (json.dumps(self._manifest(), indent=1) + "\n").encode()
        temp = TempFile(os.path.join(self.directory, MANIFEST_NAME))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(temp.fd, view) :]
            temp.replace()
        except BaseException:
            temp.discard()
            raise

    # -- reading -----------------------------------------------------------------------------------------------------
    def ema_state_dict(self, profile: int = 0) -> dict:
        """Profile `profile`'s EMA as a state dict: the averaged tensors themselves (clone them to keep a copy) and the
        model's integer buffers as they are now; load it with model.load_state_dict(..., strict=False) when the model
        ties parameters (they are kept once, under their first name)."""
        if isinstance(profile, bool) or not isinstance(profile, int) or not 0 <= profile < len(self.gammas):
            raise PlanError(f"PostHocEMA: profile must be an index below {len(self.gammas)}, got {profile!r}")
        return {**self._ema[profile], **{n: t.detach() for n, t in zip(self._copied_names, self._copied)}}

    # -- resuming ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: the EMAs (copies), the step and the snapshots saved so far."""
        return {
            "kind": "PostHocEMA",
            "version": _VERSION,
            "gammas": list(self.gammas),
            "step": self.step,
            "ema": [{n: t.clone() for n, t in ema.items()} for ema in self._ema],
            "snapshots": [
                {"file": s.file, "profile": s.profile, "gamma": s.gamma, "step": s.step} for s in self.snapshots
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes from `state_dict()`: the same profiles and model; the directory (when given) must hold this run's
        snapshots or none, and its manifest is cut back to the state's snapshots. Checked before anything changes."""
        import torch

        if not isinstance(state, dict) or state.get("kind") != "PostHocEMA":
            raise PlanError("PostHocEMA: not a PostHocEMA state")
        if list(state.get("gammas", ())) != list(self.gammas):
            raise PlanError(
                f"PostHocEMA: the state's profiles (gammas {state.get('gammas')}) differ from {list(self.gammas)}"
            )
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise PlanError(f"PostHocEMA: the state's step is {step!r}")
        for mine, theirs in zip(self._ema, state["ema"]):
            if list(theirs) != list(mine):
                diff = sorted(set(mine) ^ set(theirs)) or ["(order)"]
                raise PlanError(f"PostHocEMA: the state's tensors differ from the model's (first: {diff[0]!r})")
            for name, t in theirs.items():
                if t.shape != mine[name].shape or t.dtype != mine[name].dtype:
                    raise PlanError(
                        f"PostHocEMA: {name!r} is {list(t.shape)} {t.dtype} in the state, "
                        f"{list(mine[name].shape)} {mine[name].dtype} here"
                    )
        snapshots = [Snapshot(**s) for s in state["snapshots"]]
        if any(s.step > step for s in snapshots):
            raise PlanError("PostHocEMA: the state lists snapshots after its own step")
        previous = self.snapshots, self._directory_checked
        self.snapshots, self._directory_checked = snapshots, False
        try:
            self._check_directory()
        except PlanError:
            self.snapshots, self._directory_checked = previous
            raise
        with torch.no_grad():
            for mine, theirs in zip(self._ema, state["ema"]):
                for name, t in theirs.items():
                    mine[name].copy_(t)
        self.step = step
        if self.directory is not None and os.path.exists(os.path.join(self.directory, MANIFEST_NAME)):
            self._write_manifest()  # drops what the interrupted run saved after this state


def _as_sequence(values) -> tuple:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = (values,)
    return tuple(values)


def _same_size_int(dtype):
    import torch

    return {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]


__all__ = [
    "MANIFEST_NAME",
    "SIGMA_REL_MAX",
    "PostHocEMA",
    "PostHocFit",
    "Snapshot",
    "Synthesis",
    "coefficients",
    "fit",
    "gamma_to_sigma_rel",
    "power_beta",
    "read_manifest",
    "sigma_rel_to_gamma",
    "synthesize",
]

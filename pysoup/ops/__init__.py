"""Primitive ops and their backends.

Each op has one signature here; each backend module (`reference`: torch, the definition of every result;
`cpu`: the C++ kernels; `triton`: pysoup.kernels, for CUDA tensors) implements it. `backend="auto"` picks `cpu`
for host memory when the C++ module loads, else `reference`, and `triton` for CUDA tensors when it loads; the
environment variable PYSOUP_BACKEND overrides "auto"; an explicit backend that cannot run here is an error
listing those that can.
"""

from __future__ import annotations

import importlib
import os

from pysoup.errors import BackendError, PlanError

_BACKEND_MODULES = {"reference": "pysoup.ops.reference", "cpu": "pysoup.ops.cpu", "triton": "pysoup.ops.triton"}


def _load(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def available_backends() -> list:
    """Backends that can run here, in preference order for host memory."""
    out = []
    for name in ("cpu", "reference", "triton"):
        ok, _ = _load(name).availability()
        if ok:
            out.append(name)
    return out


def get_backend(name: str = "auto", device: str = "cpu"):
    """The backend module to use. Raises BackendError (listing the usable ones) when it cannot run here."""
    if name in (None, "auto"):
        name = os.environ.get("PYSOUP_BACKEND") or "auto"
    if name == "auto":
        # Host memory: the C++ kernels, else torch. Not triton: asking whether it could run imports torch
        # (1.5 s and 200 MB on every file merge). CUDA tensors: Triton when it loads, else torch.
        if device == "cpu":
            choices = [b for b in ("cpu", "reference") if _load(b).availability()[0]]
        else:
            choices = ["triton"] if _load("triton").availability()[0] else ["reference"]
        if not choices:
            raise BackendError("no backend can run here: the C++ module did not load and torch is not installed")
        return _load(choices[0])
    if name not in _BACKEND_MODULES:
        raise BackendError(f"unknown backend {name!r} (usable here: {', '.join(available_backends()) or 'none'})")
    ok, reason = _load(name).availability()
    if not ok:
        raise BackendError(
            f"backend {name!r} cannot run here ({reason}); usable here: {', '.join(available_backends()) or 'none'}"
        )
    return _load(name)


def weighted_sum(tensors, weights, out_dtype=None, normalize=False, backend="auto", threads=None):
    """Fused N-ary weighted sum of torch tensors, by the numerical contract (fp32 fma in input order,
    optional division by the fp32 sum of the weights, round-to-nearest-even into `out_dtype`).

    Args:
        tensors: torch tensors of one shape, each float32, float16 or bfloat16 (dtypes may mix).
        weights: one number per tensor.
        out_dtype: torch dtype of the result (default: the first tensor's).
        normalize: divide by the sum of the weights.
        backend: "auto", "cpu", "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or "reference".
        threads: CPU threads (cpu backend; default: every core this process may use).

    Returns:
        A new tensor; every backend returns the same bytes.

    Example:
        >>> out = weighted_sum([a, b], [0.25, 0.75], out_dtype=torch.bfloat16)   # doctest: +SKIP
    """
    from pysoup.ops._checks import check_weighted_sum

    tensors, weights, out_dtype = check_weighted_sum(tensors, weights, out_dtype, normalize)
    device = tensors[0].device.type
    return get_backend(backend, device).weighted_sum(tensors, weights, out_dtype, normalize, threads=threads)


def lerp_(averaged, current, weight, backend="auto", threads=None) -> None:
    """Multi-tensor in-place interpolation, for averaging during training: for every pair (a, b),
    a <- weighted_sum([a, b], [1 - weight, weight]) rounded into a's dtype, by the numerical contract.

    EMA is weight = 1 - beta; SWA's n-th update is weight = 1 / (n + 1). All pairs go in one call per dtype pair:
    one C++ call whose threads split every tensor's elements (cpu), or one Triton launch driven by a table of
    pointers and sizes, kept for the next call on the same tensors (CUDA). The result does not depend on the
    backend, the threads or the grouping. The update is not recorded by autograd. The averaged tensors must not
    share memory with each other or with another pair's current tensor (threads update them at once). In a loop
    over the same tensors, MultiTensorLerp does the checks once and costs a few microseconds per call instead of
    ~0.5 us per tensor.

    Args:
        averaged: tensors updated in place (float32, float16 or bfloat16; contiguous), or one tensor.
        current: tensors of the same shapes (any of those dtypes; strided ones are copied), or one tensor.
        weight: the share of `current`; a number whose float32 rounding, and that of 1 - weight, are finite.
        backend: "auto", "cpu", "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or "reference".
        threads: CPU threads (cpu backend; default: every core this process may use).

    Example:
        >>> with torch.no_grad():                                                        # doctest: +SKIP
        ...     pysoup.ops.lerp_(list(ema.parameters()), list(model.parameters()), 1 - 0.999)
    """
    from pysoup.ops._checks import check_lerp_tensors, check_weight

    t = check_weight(weight)
    avg, cur = check_lerp_tensors(averaged, current, copy_strided=True)
    if avg:
        get_backend(backend, avg[0].device.type).lerp_(avg, cur, t, threads=threads)


class MultiTensorLerp:
    """pysoup.ops.lerp_ bound to one list of tensor pairs: the checks and the launch tables are made once, so each
    call costs one C++ call or one launch per dtype pair, plus a check that no tensor has moved.

    Args: as lerp_, without the weight; every current tensor must be contiguous (it is read in place each call).
    Calling it with a weight updates the averaged tensors. The tensors are bound by their memory: replacing a
    tensor's `.data` makes the next call raise instead of writing to memory the tensor no longer owns (pass the
    parameters themselves: a detached view made before would go on reading the old memory).

    Example:
        >>> ema_step = pysoup.ops.MultiTensorLerp(list(ema.parameters()), list(model.parameters()))  # doctest: +SKIP
        >>> with torch.no_grad():                                                                    # doctest: +SKIP
        ...     ema_step(1 - 0.999)
    """

    def __init__(self, averaged, current, backend="auto", threads=None):
        from pysoup.ops._checks import check_lerp_tensors

        avg, cur = check_lerp_tensors(averaged, current, copy_strided=False)
        self._tensors = avg + cur
        self._addresses = [x.data_ptr() for x in self._tensors]
        self._plan = get_backend(backend, avg[0].device.type).LerpPlan(avg, cur, threads=threads) if avg else None
        self._count = len(avg)

    def __len__(self) -> int:
        return self._count

    def __call__(self, weight) -> None:
        from pysoup.ops._checks import check_weight

        t = check_weight(weight)
        if self._plan is None:
            return
        now = [x.data_ptr() for x in self._tensors]
        if now != self._addresses:
            i = next(i for i, (a, b) in enumerate(zip(now, self._addresses)) if a != b)
            side, i = ("averaged", i) if i < self._count else ("current", i - self._count)
            raise PlanError(
                f"{side} tensor {i} no longer holds the memory it had when this MultiTensorLerp was made "
                "(was its .data replaced?); make a new one"
            )
        self._plan(t)


__all__ = ["MultiTensorLerp", "available_backends", "get_backend", "lerp_", "weighted_sum"]

"""Primitive ops and their backends.

Every op is declared once, in `pysoup.ops.table` (the `Backend` class: names, arguments, results). Each backend is
a registered subclass: `reference` (torch, the definition of every result), `cpu` (the C++ kernels) and `triton`
(pysoup.kernels: on CUDA tensors, and for file merges on a GPU, streaming host ranges to it). `backend="auto"`
picks `cpu` for host memory when the C++ module loads, else `reference`, and `triton` for CUDA when it loads;
the environment variable PYSOUP_BACKEND overrides "auto"; an explicit backend that cannot run here is an error
listing those that can.
"""

from __future__ import annotations

import importlib
import os

from pysoup.errors import BackendError, PlanError

# name -> module that defines and registers it (imported on first use: torch and triton stay unloaded until needed)
_BACKEND_MODULES = {"cpu": "pysoup.ops.cpu", "reference": "pysoup.ops.reference", "triton": "pysoup.ops.triton"}
_REGISTRY: dict = {}  # name -> Backend subclass
_INSTANCES: dict = {}  # (name, threads, device, PYSOUP_CPU_ISA) -> a Backend made before


def register_backend(cls):
    """Class decorator: makes a Backend subclass available under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def backend_class(name: str):
    """The Backend subclass registered under `name`."""
    if name not in _REGISTRY and name in _BACKEND_MODULES:
        importlib.import_module(_BACKEND_MODULES[name])
    return _REGISTRY[name]


def available_backends() -> list:
    """Backends that can run here, in preference order for host memory."""
    return [name for name in ("cpu", "reference", "triton") if backend_class(name).availability()[0]]


def get_backend(name: str = "auto", device=None, threads: int | None = None):
    """A Backend instance. `device`: None or "cpu" for host memory (tensors on the CPU, file merges on the CPU),
    or a CUDA device ("cuda", "cuda:1"): file merges stream there; only triton runs there. Raises BackendError
    (listing the usable backends) when the backend cannot run here."""
    if name in (None, "auto"):
        name = os.environ.get("PYSOUP_BACKEND") or "auto"
    on_host = device is None or str(device) == "cpu"
    if name == "auto":
        # Host memory: the C++ kernels, else torch. Not triton: asking whether it could run imports torch
        # (1.5 s and 200 MB on every file merge). A device: Triton when it loads, else torch (tensor ops only).
        order = ("cpu", "reference") if on_host else ("triton", "reference")
        choices = [b for b in order if backend_class(b).availability()[0]]
        if not choices:
            raise BackendError("no backend can run here: the C++ module did not load and torch is not installed")
        name = choices[0]
    if name not in _BACKEND_MODULES and name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r} (usable here: {', '.join(available_backends()) or 'none'})")
    cls = backend_class(name)
    ok, reason = cls.availability()
    if not ok:
        raise BackendError(
            f"backend {name!r} cannot run here ({reason}); usable here: {', '.join(available_backends()) or 'none'}"
        )
    key = (name, threads, None if on_host else str(device), os.environ.get("PYSOUP_CPU_ISA"))
    backend = _INSTANCES.get(key)
    if backend is None:
        backend = cls(threads) if on_host or name != "triton" else cls(threads, device=device)
        _INSTANCES[key] = backend
    return backend


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
    from pysoup.ops.checks import check_weighted_sum

    tensors, weights, out_dtype = check_weighted_sum(tensors, weights, out_dtype, normalize)
    return get_backend(backend, tensors[0].device.type, threads).weighted_sum(tensors, weights, out_dtype, normalize)


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
    from pysoup.ops.checks import check_lerp_tensors, check_weight

    t = check_weight(weight)
    avg, cur = check_lerp_tensors(averaged, current, copy_strided=True)
    if avg:
        get_backend(backend, avg[0].device.type, threads).lerp_(avg, cur, t)


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
        from pysoup.ops.checks import check_lerp_tensors

        avg, cur = check_lerp_tensors(averaged, current, copy_strided=False)
        self._tensors = avg + cur
        self._addresses = [x.data_ptr() for x in self._tensors]
        self._plan = get_backend(backend, avg[0].device.type, threads).lerp_plan(avg, cur) if avg else None
        self._count = len(avg)

    def __len__(self) -> int:
        return self._count

    def __call__(self, weight) -> None:
        from pysoup.ops.checks import check_weight

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


__all__ = [
    "MultiTensorLerp",
    "available_backends",
    "backend_class",
    "get_backend",
    "lerp_",
    "register_backend",
    "weighted_sum",
]

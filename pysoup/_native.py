"""Loads the compiled module; importing pysoup never fails because it is missing."""

from __future__ import annotations

from pysoup.errors import BackendError


class _MissingNative:
    """Stands in for pysoup._C: every attribute access raises the import error, clearly."""

    def __init__(self, reason: str):
        self._reason = reason

    def __getattr__(self, name):
        raise BackendError(
            f"pysoup's C++ module is not available ({self._reason}); reinstall pysoup or use backend='reference'"
        )


try:
    from pysoup import _C as native  # noqa: F401

    available = True
    load_error = None
except ImportError as exc:  # pragma: no cover - depends on the installation
    native = _MissingNative(str(exc))
    available = False
    load_error = str(exc)

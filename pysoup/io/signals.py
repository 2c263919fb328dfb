"""Termination signals while a merge writes its output.

Ctrl-C raises KeyboardInterrupt, and the merge's cleanup runs: temporaries removed, an older output intact.
SIGTERM (what `kill`, systemd, Slurm and Kubernetes send) and SIGHUP (a closed terminal) kill a Python process
outright by default, skipping that cleanup. `cleanup_on_termination()` makes them behave like Ctrl-C for the
duration of a merge (only where their action is still the default: a program that handles them keeps its
handlers), then delivers the signal again with its default action, so the process still ends as it would have.
`deferred_termination()` holds any of the three back while a commit renames files (whatever their handlers:
one that raises would otherwise stop the renames halfway), so an output is all old or all new.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_TERMINATING = (signal.SIGTERM, signal.SIGHUP)
_deferring = False
_pending: list = []


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived during a merge (a BaseException, like KeyboardInterrupt: `except Exception`
    must not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _record(signum, frame):
    _pending.append(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def raise_on_termination() -> None:
    """Makes SIGTERM and SIGHUP raise Terminated from now on (the command line's choice for its whole run)."""
    for sig in _TERMINATING:
        signal.signal(sig, _raise_terminated)


def die_by(signum: int) -> None:
    """Ends the process by `signum` with its default action (the exit status a shell expects)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def cleanup_on_termination():
    """Within the block, SIGTERM and SIGHUP whose action is the default raise Terminated, so the cleanup of
    the code inside runs; on leaving, the signal is delivered again with the default action."""
    if not _in_main_thread():  # signal handlers can only be set from the main thread
        yield
        return
    replaced = {}
    for sig in _TERMINATING:
        if signal.getsignal(sig) == signal.SIG_DFL:
            replaced[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    except Terminated as exc:
        if exc.signum in replaced:
            die_by(exc.signum)  # the default action ends the process here
        raise
    finally:
        for sig, old in replaced.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def deferred_termination():
    """Holds SIGINT, SIGTERM and SIGHUP back until the block is done, then delivers them."""
    global _deferring
    if not _in_main_thread() or _deferring:
        yield
        return
    replaced = {}
    for sig in (signal.SIGINT, *_TERMINATING):
        if signal.getsignal(sig) not in (signal.SIG_IGN, None):  # None: a handler not set from Python
            replaced[sig] = signal.signal(sig, _record)
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        for sig, old in replaced.items():
            signal.signal(sig, old)
        pending, _pending[:] = list(_pending), []
        for sig in dict.fromkeys(pending):
            os.kill(os.getpid(), sig)

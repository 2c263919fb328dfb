"""The repository's root, and the command line run as a user runs it."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args, check=False, env=None):
    """Runs `python -m pysoup ARGS` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "pysoup", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc

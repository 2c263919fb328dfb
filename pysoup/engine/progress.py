"""The progress bar every long loop shows on a terminal (tqdm, imported only when shown)."""

from __future__ import annotations

import sys


def progress_bar(total, progress=None, **options):
    """A tqdm bar over `total` steps, or None when not shown (progress=None: only when stderr is a terminal)."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress or not total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, dynamic_ncols=True, mininterval=0.2, **options)

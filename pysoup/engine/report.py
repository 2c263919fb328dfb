"""What one merge did: time, bytes, memory, outputs."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


@dataclass
class MergeReport:
    """Returned by `pysoup.merge` when it writes files.

    Attributes:
        seconds: wall time of the whole merge (open, plan, execute, commit).
        bytes_read: tensor bytes read from the inputs.
        bytes_written: bytes of every output file (headers included).
        peak_rss_bytes: the process's peak resident memory at the end of the merge.
        outputs: paths written, the index last.
    """

    seconds: float
    bytes_read: int
    bytes_written: int
    peak_rss_bytes: int
    outputs: list
    strategy: str
    backend: str
    cpu_isa: str | None
    threads: int
    tensors: int
    device: str = "cpu"  # where the arithmetic ran ("cuda:0" for device merges)
    nonfinite_tensors: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # what the strategy measured, e.g. {"sparsity": 0.9}
    notes: list = field(default_factory=list)  # the same, as lines for people (the command line prints them)

    @classmethod
    def of_files(cls, start, plan, target, strategy: str, backend, threads: int, nonfinite, stats, notes):
        """The report of a file merge that began at perf_counter() `start`, wrote `target` and has just committed."""
        return cls(
            seconds=time.perf_counter() - start,
            bytes_read=plan.bytes_to_read,
            bytes_written=target.total_bytes,
            peak_rss_bytes=peak_rss_bytes(),
            outputs=target.paths,
            strategy=strategy,
            **backend.describe(),
            threads=threads,
            tensors=len(plan),
            nonfinite_tensors=nonfinite,
            stats=stats,
            notes=notes,
        )

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / self.seconds / 1e9 if self.seconds > 0 else float("inf")

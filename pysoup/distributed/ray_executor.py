"""The driver of a merge on Ray: plans and lays out the output here, runs one task per output shard (or byte range
of one file) on the cluster, and commits only when every task succeeded.

Tensor data never goes through Ray's object store: each task reads its inputs' byte ranges from storage every node
sees and writes its share of the output into a temporary the driver created there; only the small task spec and
result cross the network. Ray is imported on first use, so `import pysoup` and local merges never load it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass

from pysoup.distributed.tasks import task_ranges
from pysoup.distributed.worker import MergeSpec, file_identities, run_task
from pysoup.errors import PlanError, SoupError
from pysoup.io.units import parse_size

# Ray retries a task whose worker process died (killed, out of memory, node lost) this many times; a task that
# raises is not retried: pysoup's errors are about the inputs, and a retry would give the same error.
DEFAULT_MAX_RETRIES = 3
# How long the reachability check of an address waits: Ray's own client retries an unreachable GCS for minutes.
DEFAULT_CONNECT_TIMEOUT = 5.0


_REMOTES: dict = {}  # function -> its Ray remote function, made once per process


def _remote(ray, fn):
    if fn not in _REMOTES:
        _REMOTES[fn] = ray.remote(fn)
    return _REMOTES[fn]


# An HTTP/2 client's connection preface and an empty SETTINGS frame; the server's first frame is its SETTINGS (type 4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HTTP2_SETTINGS = 4


class ClusterError(SoupError):
    """The Ray cluster cannot be reached or cannot run the merge's tasks."""


@dataclass
class RayExecutor:
    """Runs `pysoup.merge` as Ray tasks.

    Args:
        address: a running cluster ("HOST:PORT", "ray://HOST:PORT", "auto"), or None: the cluster `ray.init()`
            finds (RAY_ADDRESS) or a new local one. Ignored when Ray is already initialized in this process.
        task_size: output bytes per task ("2GB", an int); None: one task per output shard (a single-file output
            is then one task). Tasks hold whole tensors, so a tensor larger than this is a task of its own.
        num_cpus: CPUs each task declares to Ray, and its kernel threads.
        memory: bytes each task declares (None: the dry run's peak-memory estimate for this merge).
        max_retries: retries of a task whose worker process died.
        connect_timeout: seconds to wait for a HOST:PORT address to answer before failing.

    Example:
        >>> ex = RayExecutor("auto", num_cpus=4)
        >>> pysoup.merge(paths, "soup/", strategy="ties", base=b, executor=ex)  # doctest: +SKIP
    """

    address: str | None = None
    task_size: object = None
    num_cpus: int = 1
    memory: int | None = None
    max_retries: int = DEFAULT_MAX_RETRIES
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def __post_init__(self):
        if self.task_size is not None:
            self.task_size = parse_size(self.task_size)
        if not isinstance(self.num_cpus, int) or self.num_cpus < 1:
            raise PlanError(f"num_cpus must be a positive integer, got {self.num_cpus!r}")
        if self.memory is not None:
            self.memory = parse_size(self.memory)
        self.last_tasks = []  # the TaskResults of the last run, in layout order (benchmarks read them)

    # -- connection ------------------------------------------------------------------------------------
    def check_address(self) -> None:
        """Fails fast on an address that is malformed or does not answer (a TCP connect within connect_timeout)."""
        address = self.address
        if address in (None, "", "auto", "local"):
            return
        text = address[len("ray://") :] if address.startswith("ray://") else address
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ClusterError(f"ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=self.connect_timeout) as conn:
                # Ray's GCS and client server speak gRPC: an HTTP/2 server answers the client preface with a
                # SETTINGS frame at once. Anything else (another service, a port that accepts and stays silent)
                # would keep ray.init retrying for minutes, in C++ where not even SIGTERM stops it.
                conn.sendall(_HTTP2_PREFACE)
                frame = conn.recv(9)
            if len(frame) < 9 or frame[3] != _HTTP2_SETTINGS:
                raise ClusterError(
                    f"ray address {address!r}: answers, but not as a Ray cluster (no gRPC server); is it the head "
                    "node's GCS port (6379) or its client port (10001)?"
                )
        except socket.gaierror as exc:
            raise ClusterError(f"ray address {address!r}: unknown host ({exc.strerror})") from None
        except OSError as exc:
            why = "no answer" if isinstance(exc, socket.timeout) else exc.strerror
            raise ClusterError(
                f"ray address {address!r}: cannot connect ({why} within {self.connect_timeout:g} s); is the "
                "cluster running (`ray start --head`)?"
            ) from None

    def connect(self):
        """Ray, initialized: the running session, or one joined / started now. Returns the ray module."""
        try:
            import ray
        except ImportError:
            raise ClusterError("executor='ray' needs Ray: pip install 'pysoup[ray]'") from None
        if not ray.is_initialized():
            self.check_address()
            # ray.init makes SIGTERM call sys.exit; the handler in place (pysoup's: clean up, then end by the
            # signal, as a local merge does) is put back.
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if main else None
            try:
                ray.init(
                    address=None if self.address in ("", "local") else self.address,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ClusterError(f"ray address {self.address!r}: {str(exc).splitlines()[0]}") from None
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
        return ray

    # -- the merge -------------------------------------------------------------------------------------
    def run(self, plan, target, inputs, base, spec: dict, progress=None) -> tuple:
        """Runs the merge planned as `plan` into `target` (laid out, not created) on the cluster; commits.

        Returns:
            (names of non-finite tensors, stats, notes), as a local merge's report has them.
        """
        from pysoup.distributed.estimate import task_memory_bytes
        from pysoup.engine.execute import report_of
        from pysoup.engine.progress import progress_bar

        ray = self.connect()
        ranges = task_ranges(plan, target, self.task_size)
        memory = self.memory if self.memory is not None else task_memory_bytes(plan)
        self._check_fits(ray, memory)
        # SPREAD: a merge is bound by each node's storage reads, so its tasks go to as many nodes as there are.
        remote = _remote(ray, run_task).options(
            num_cpus=self.num_cpus,
            memory=memory,
            max_retries=self.max_retries,
            retry_exceptions=False,
            scheduling_strategy="SPREAD",
        )
        t0 = time.perf_counter()
        target.create()
        refs = []
        try:
            names = target.share()
            merge_spec = MergeSpec(
                inputs=[os.path.abspath(os.fspath(p)) for p in inputs],
                base=os.path.abspath(os.fspath(base)) if base is not None else None,
                out=target.out,
                strategy=spec["strategy"],
                weights=spec["weights"],
                params=spec["params"],
                model_params=spec["model_params"],
                out_dtype=spec["out_dtype"],
                shard_size=spec["shard_size"],
                backend=spec["backend"],
                threads=self.num_cpus,
                durable=spec["durable"],
                files=[file_identities(c) for c in plan.inputs],
                shard_sizes=[s.size for s in target.shards],
                temporaries=names,
            )
            spec_ref = ray.put(merge_spec)  # one copy in the object store, not one per task
            refs = [remote.remote(spec_ref, t.start, t.stop, t.shard, t.bytes_read) for t in ranges]
            bar = progress_bar(plan.bytes_to_read, progress, unit="B", unit_scale=True, desc="merging read")
            try:
                results = self._gather(ray, refs, ranges, bar)
            finally:
                if bar is not None:
                    bar.close()
            target.commit()
        except BaseException:
            _cancel_running(ray, refs)  # what still runs writes into unlinked files: nothing is left behind
            target.abort()
            raise
        self.last_tasks = results
        nonfinite, summaries = [], {}
        for r in results:
            nonfinite += r.nonfinite
            for op, items in r.summaries.items():
                summaries.setdefault(op, []).extend(items)
            for message in r.warnings:
                from pysoup.engine.execute import NonFiniteWarning

                warnings.warn(message, NonFiniteWarning, stacklevel=4)
        stats, notes = report_of(summaries)
        hosts = {r.node for r in results}
        seconds = sorted(r.seconds for r in results)
        notes = list(notes) + [
            f"ray: {len(results)} tasks on {len(hosts)} node(s), {self.num_cpus} CPU(s) each; task time median "
            f"{seconds[len(seconds) // 2]:.2f} s, max {seconds[-1]:.2f} s; wall {time.perf_counter() - t0:.2f} s"
        ]
        return nonfinite, stats, notes

    def _check_fits(self, ray, memory: int) -> None:
        """A task no node can hold would wait for ever: refused before anything is written."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        fits = [
            n
            for n in nodes
            if n["Resources"].get("CPU", 0) >= self.num_cpus and n["Resources"].get("memory", 0) >= memory
        ]
        if not fits:
            most_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
            most_mem = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
            raise ClusterError(
                f"no node of the ray cluster can run a merge task of {self.num_cpus} CPU(s) and {memory / 1e9:.2f} "
                f"GB (largest node: {most_cpu:g} CPUs, {most_mem / 1e9:.2f} GB)"
            )

    def _gather(self, ray, refs, ranges, bar) -> list:
        """Every task's result; on failures, the error of the first failed task in layout order (the one a local
        merge would have met first), once the tasks before it have finished; the tasks after it are cancelled."""
        from ray.exceptions import RayTaskError, TaskCancelledError, WorkerCrashedError

        index = {ref: i for i, ref in enumerate(refs)}
        results = [None] * len(refs)
        errors = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            try:
                results[i] = ray.get(done[0])
                if bar is not None:
                    bar.update(ranges[i].bytes_read)
            except RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else None
                errors[i] = cause if cause is not None else SoupError(str(exc).splitlines()[0])
            except TaskCancelledError:
                continue
            except WorkerCrashedError:
                errors[i] = ClusterError(
                    f"merge task {i + 1} of {len(refs)} (tensors {ranges[i].start}-{ranges[i].stop - 1}): its worker "
                    f"process died {self.max_retries + 1} times (out of memory? killed?)"
                )
            if errors:
                first = min(errors)
                _cancel_running(ray, [ref for ref in pending if index[ref] > first])
                pending = [ref for ref in pending if index[ref] < first]
        if errors:
            raise errors[min(errors)]
        return results


def _cancel_running(ray, refs) -> None:
    """Cancels the tasks of `refs` that have not finished (cancelling a finished one can trip Ray's task manager)."""
    if not refs:
        return
    _, running = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in running:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - it finished meanwhile: nothing to cancel
            pass
